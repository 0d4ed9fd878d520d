//! Cgroup creation and removal, so userspace maps ids to paths without rescanning.
//! `cgroup_mkdir(struct cgroup *cgrp, const char *path)` and `cgroup_rmdir` (same arguments).

use agent_common::{CgroupEvent, EventKind, LossKind, LossReason, PATH_LEN};
use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes, macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use crate::{
    kernel::{cgroup_id, current_header},
    maps::{EVENTS, Lost, OFFSETS, counted},
};

#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn cgroup_mkdir(ctx: RawTracePointContext) -> i32 {
    counted(emit(&ctx, EventKind::CgroupMkdir, LossKind::CgroupMkdir));
    0
}

#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn cgroup_rmdir(ctx: RawTracePointContext) -> i32 {
    counted(emit(&ctx, EventKind::CgroupRmdir, LossKind::CgroupRmdir));
    0
}

fn emit(ctx: &RawTracePointContext, kind: EventKind, loss: LossKind) -> Result<(), Lost> {
    let off = OFFSETS.load();
    let cgrp: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    // SAFETY: `cgrp` is the tracepoint's `struct cgroup *`; offsets come from BTF.
    let id = unsafe { cgroup_id(&off, cgrp) }.map_err(|_| Lost(loss, LossReason::ReadFailed))?;
    let Some(mut entry) = EVENTS.reserve::<CgroupEvent>(0) else {
        return Err(Lost(loss, LossReason::RingFull));
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved slot of the right size; every field is written before submit.
    unsafe {
        (*event).header = current_header(kind as u32);
        (*event).id = id;
        (*event).reserved = 0;
        (*event).path = [0; PATH_LEN];
        let len = bpf_probe_read_kernel_str_bytes(path, &mut (*event).path).map_or(0, <[u8]>::len);
        #[expect(clippy::cast_possible_truncation, reason = "len <= PATH_LEN")]
        let len = len as u32;
        (*event).path_len = len;
    }
    entry.submit(0);
    Ok(())
}
