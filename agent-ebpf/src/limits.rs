//! Writes to cgroup limit files, seen at the kernel's write handlers.

use agent_common::{EventKind, LimitFile, LimitWriteEvent, VALUE_LEN};
use aya_ebpf::{helpers::bpf_probe_read_kernel_str_bytes, macros::fexit, programs::FExitContext};

use crate::{
    kernel::{current_header, read_field},
    maps::{EVENTS, OFFSETS},
};

/// `ssize_t memory_max_write(struct kernfs_open_file *of, char *buf, size_t nbytes, loff_t off)`,
/// on return: the arguments and the result in one place.
#[fexit(function = "memory_max_write")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn memory_max_write_fexit(ctx: FExitContext) -> i32 {
    match try_limit_write(&ctx, LimitFile::MemoryMax) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_limit_write(ctx: &FExitContext, limit: LimitFile) -> Result<(), i32> {
    let of: *const u8 = ctx.arg(0);
    let buf: *const u8 = ctx.arg(1);
    // fexit arguments are followed by the return value.
    let result: i64 = ctx.arg(4);
    let off = OFFSETS.load();

    // The written file's directory is the cgroup: of->kn->parent->id.
    let target_cgroup_id = if off.has_file_cgroup() {
        // SAFETY: `of` is the handler's `struct kernfs_open_file *`; offsets come from BTF.
        unsafe {
            let kn: *const u8 = read_field(of, off.kernfs_open_file_kn)?;
            let parent: *const u8 = read_field(kn, off.kernfs_node_parent)?;
            read_field::<u64>(parent, off.kernfs_node_id)?
        }
    } else {
        0
    };

    let Some(mut entry) = EVENTS.reserve::<LimitWriteEvent>(0) else {
        return Err(-1);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring buffer slot of the right size; every field is
    // written before submit.
    unsafe {
        (*event).header = current_header(EventKind::LimitWrite as u32);
        (*event).target_cgroup_id = target_cgroup_id;
        (*event).result = result;
        (*event).limit = limit as u32;
        (*event).value = [0; VALUE_LEN];
        let len = bpf_probe_read_kernel_str_bytes(buf, &mut (*event).value).map_or(0, <[u8]>::len);
        #[expect(clippy::cast_possible_truncation, reason = "len <= VALUE_LEN")]
        let len = len as u32;
        (*event).value_len = len;
    }
    entry.submit(0);
    Ok(())
}
