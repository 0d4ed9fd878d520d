//! Writes to cgroup limit files, seen at the kernel's write handlers, which all share the kernfs
//! signature `ssize_t f(struct kernfs_open_file *of, char *buf, size_t nbytes, loff_t off)`.
//!
//! Two modes with one event: fexit (one program per handler: fexit binds to one function) and
//! kprobe/kretprobe (one pair attached to every handler). The written file's name tells which
//! limit it is, so the event does not depend on which program saw it.

use agent_common::{
    EventKind, FILE_NAME_LEN, LimitWriteArgs, LimitWriteEvent, LossKind, LossReason, VALUE_LEN,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};

use crate::{
    kernel::{current_header, current_writer, read_field},
    maps::{EVENTS, LIMIT_WRITE_ARGS, Lost, OFFSETS, counted},
};

/// A write that could not be recorded, and why.
const fn lost(reason: LossReason) -> Lost {
    Lost(LossKind::LimitWrite, reason)
}

/// One fexit program per handler; fexit passes the return value after the four arguments.
macro_rules! limit_write_fexit {
    ($($program:ident => $handler:literal),* $(,)?) => {$(
        #[fexit(function = $handler)]
        // `allow`, not `expect`: clippy does not lint code made by a local macro.
        #[allow(clippy::needless_pass_by_value, reason = "the program macro fixes the signature")]
        pub fn $program(ctx: FExitContext) -> i32 {
            counted(emit(ctx.arg(0), ctx.arg(1), ctx.arg(4)));
            0
        }
    )*};
}

limit_write_fexit! {
    memory_max_write_fexit => "memory_max_write",
    memory_high_write_fexit => "memory_high_write",
    memory_low_write_fexit => "memory_low_write",
    memory_min_write_fexit => "memory_min_write",
    swap_max_write_fexit => "swap_max_write",
    pids_max_write_fexit => "pids_max_write",
    cpu_max_write_fexit => "cpu_max_write",
}

/// Entry of any limit write handler: keep `of` and `buf` for the return probe.
#[kprobe]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn limit_write_kprobe(ctx: ProbeContext) -> u32 {
    let (Some(of), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    // LRU: a full map evicts; an insert fails only when the kernel has no memory.
    if LIMIT_WRITE_ARGS
        .insert(bpf_get_current_pid_tgid(), LimitWriteArgs { of, buf }, 0)
        .is_err()
    {
        lost(LossReason::MapFull).count();
    }
    0
}

/// Return of any limit write handler: the write with its result.
#[kretprobe]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn limit_write_kretprobe(ctx: RetProbeContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(args) = (unsafe { LIMIT_WRITE_ARGS.get(key) }).copied() else {
        return 0;
    };
    // Gone already only if evicted meanwhile: the entry was read, nothing is lost.
    let _ = LIMIT_WRITE_ARGS.remove(key);
    let result: i64 = ctx.ret();
    counted(emit(args.of as *const u8, args.buf as *const u8, result));
    0
}

/// Emits a [`LimitWriteEvent`] for a handler call on `of` with `buf`, which returned `result`.
fn emit(of: *const u8, buf: *const u8, result: i64) -> Result<(), Lost> {
    let off = OFFSETS.load();
    // SAFETY: `of` is the handler's `struct kernfs_open_file *`; offsets come from BTF (the
    // loader attaches these programs only when it found them).
    let kn: *const u8 = unsafe { read_field(of, off.kernfs_open_file_kn) }
        .map_err(|_| lost(LossReason::ReadFailed))?;
    emit_for_node(kn, result, |value| {
        // SAFETY: `buf` is the kernel's copy of the written bytes, NUL-terminated.
        unsafe { bpf_probe_read_kernel_str_bytes(buf, value) }.map_or(0, <[u8]>::len)
    })
}

/// Emits a [`LimitWriteEvent`] for a write to the kernfs file `kn` that returned `result`;
/// `fill_value` writes the value and returns its length.
pub fn emit_for_node(
    kn: *const u8,
    result: i64,
    fill_value: impl FnOnce(&mut [u8; VALUE_LEN]) -> usize,
) -> Result<(), Lost> {
    // SAFETY: `kn` is a `struct kernfs_node *`.
    let (name, target_cgroup_id) =
        unsafe { node_name_and_cgroup(kn) }.map_err(|_| lost(LossReason::ReadFailed))?;
    let Some(mut entry) = EVENTS.reserve::<LimitWriteEvent>(0) else {
        return Err(lost(LossReason::RingFull));
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring buffer slot of the right size; every field is
    // written before submit. `name` is a kernel string.
    unsafe {
        (*event).header = current_header(EventKind::LimitWrite as u32);
        (*event).target_cgroup_id = target_cgroup_id;
        (*event).result = result;
        (*event).reserved = 0;
        (*event).writer = current_writer();
        (*event).file_name = [0; FILE_NAME_LEN];
        let _ = bpf_probe_read_kernel_str_bytes(name, &mut (*event).file_name);
        (*event).value = [0; VALUE_LEN];
        let len = fill_value(&mut (*event).value);
        #[expect(clippy::cast_possible_truncation, reason = "len <= VALUE_LEN")]
        let len = len.min(VALUE_LEN) as u32;
        (*event).value_len = len;
    }
    entry.submit(0);
    Ok(())
}

/// A kernfs file's name and its directory's id (the cgroup the file belongs to).
///
/// # Safety
/// `kn` must point to a `struct kernfs_node`.
unsafe fn node_name_and_cgroup(kn: *const u8) -> Result<(*const u8, u64), i32> {
    let off = OFFSETS.load();
    unsafe {
        let name: *const u8 = read_field(kn, off.kernfs_node_name)?;
        let parent: *const u8 = read_field(kn, off.kernfs_node_parent)?;
        Ok((name, read_field::<u64>(parent, off.kernfs_node_id)?))
    }
}
