//! Cgroup creation and removal, so userspace maps ids to paths without rescanning.
//! `cgroup_mkdir(struct cgroup *cgrp, const char *path)` and `cgroup_rmdir` (same arguments).

use agent_common::{CgroupEvent, EventKind, PATH_LEN};
use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes, macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use crate::{
    kernel::{current_header, read_field},
    maps::{EVENTS, OFFSETS},
};

#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn cgroup_mkdir(ctx: RawTracePointContext) -> i32 {
    let _ = emit(&ctx, EventKind::CgroupMkdir);
    0
}

#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn cgroup_rmdir(ctx: RawTracePointContext) -> i32 {
    let _ = emit(&ctx, EventKind::CgroupRmdir);
    0
}

fn emit(ctx: &RawTracePointContext, kind: EventKind) -> Result<(), i32> {
    let off = OFFSETS.load();
    let cgrp: *const u8 = ctx.arg(0);
    let path: *const u8 = ctx.arg(1);
    // SAFETY: `cgrp` is the tracepoint's `struct cgroup *`; offsets come from BTF.
    let id: u64 = unsafe {
        let kn: *const u8 = read_field(cgrp, off.cgroup_kn)?;
        read_field(kn, off.kernfs_node_id)?
    };
    let Some(mut entry) = EVENTS.reserve::<CgroupEvent>(0) else {
        return Err(-1);
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
