//! Limit writes seen at the write syscalls, for kernels without fexit and kprobes: the program
//! follows the fd to its file and keeps only writes to cgroup2 limit files, so ordinary writes
//! cost a few reads. Catches redirections (`sh` dup2s the fd), `write`, `pwrite64` and `writev`.

use agent_common::{FILE_NAME_LEN, PendingWrite, VALUE_LEN};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user_buf,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    kernel::read_field,
    limits::emit_for_node,
    maps::{OFFSETS, PENDING_WRITES},
};

/// `CGROUP2_SUPER_MAGIC` from the kernel's uapi `magic.h`.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// Field offsets in the `syscalls/sys_enter_*` records (after the 8-byte common header and the
/// syscall number): the first three arguments, the same for write, pwrite64 and writev.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
/// `ret` in the `syscalls/sys_exit_*` records.
const RET: usize = 16;

/// The limit files, NUL-padded to 16 bytes so a name compares as two words.
const LIMIT_NAMES: [[u8; FILE_NAME_LEN]; 7] = [
    *b"memory.max\0\0\0\0\0\0",
    *b"memory.high\0\0\0\0\0",
    *b"memory.low\0\0\0\0\0\0",
    *b"memory.min\0\0\0\0\0\0",
    *b"memory.swap.max\0",
    *b"pids.max\0\0\0\0\0\0\0\0",
    *b"cpu.max\0\0\0\0\0\0\0\0\0",
];

macro_rules! syscall_enter {
    ($($program:ident => $name:literal, $iov:literal);* $(;)?) => {$(
        #[tracepoint(category = "syscalls", name = $name)]
        // `allow`, not `expect`: clippy does not lint code made by a local macro.
        #[allow(clippy::needless_pass_by_value, reason = "the program macro fixes the signature")]
        pub fn $program(ctx: TracePointContext) -> u32 {
            let _ = enter(&ctx, $iov);
            0
        }
    )*};
}

macro_rules! syscall_exit {
    ($($program:ident => $name:literal);* $(;)?) => {$(
        #[tracepoint(category = "syscalls", name = $name)]
        // `allow`, not `expect`: clippy does not lint code made by a local macro.
        #[allow(clippy::needless_pass_by_value, reason = "the program macro fixes the signature")]
        pub fn $program(ctx: TracePointContext) -> u32 {
            let _ = exit(&ctx);
            0
        }
    )*};
}

syscall_enter! {
    sys_enter_write => "sys_enter_write", false;
    sys_enter_pwrite64 => "sys_enter_pwrite64", false;
    sys_enter_writev => "sys_enter_writev", true;
}

syscall_exit! {
    sys_exit_write => "sys_exit_write";
    sys_exit_pwrite64 => "sys_exit_pwrite64";
    sys_exit_writev => "sys_exit_writev";
}

/// At entry: is `fd` a cgroup2 limit file? If so, keep its node and the written bytes.
fn enter(ctx: &TracePointContext, iov: bool) -> Result<(), i32> {
    let fd = record_field(ctx, ARG0);
    let off = OFFSETS.load();
    // SAFETY: the current task is a `struct task_struct`; offsets come from BTF. Every read goes
    // through bpf_probe_read_kernel, so a stale pointer fails instead of faulting.
    let kn = unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files: *const u8 = read_field(task, off.task_files)?;
        let fdt: *const u8 = read_field(files, off.files_struct_fdt)?;
        let (max_fds, fds) = fdtable(fdt, &off)?;
        if fd >= u64::from(max_fds) {
            return Ok(());
        }
        #[expect(clippy::cast_possible_truncation, reason = "fd < max_fds, an int")]
        let slot = fds.add(fd as usize * 8);
        let file: *const u8 = read_field(slot, 0)?;
        let inode: *const u8 = read_field(file, off.file_f_inode)?;
        let sb: *const u8 = read_field(inode, off.inode_i_sb)?;
        let magic: u64 = read_field(sb, off.super_block_s_magic)?;
        if magic != CGROUP2_SUPER_MAGIC {
            return Ok(());
        }
        read_field::<*const u8>(inode, off.inode_i_private)?
    };
    if !is_limit_file(kn)? {
        return Ok(());
    }
    let (mut buf, mut count) = (record_field(ctx, ARG1), record_field(ctx, ARG2));
    if iov {
        // writev: the first iovec (a limit value is one short string).
        // SAFETY: `buf` is the user's `struct iovec *`; bpf_probe_read_user checks it.
        let first: [u64; 2] =
            unsafe { aya_ebpf::helpers::bpf_probe_read_user(buf as *const [u64; 2])? };
        buf = first[0];
        count = first[1];
    }
    let mut pending = PendingWrite {
        kn: kn as u64,
        value_len: 0,
        reserved: 0,
        value: [0; VALUE_LEN],
    };
    // At most VALUE_LEN - 1 bytes, so the value stays NUL-terminated. Older verifiers (6.1)
    // cannot follow min(); the volatile read keeps LLVM from dropping the mask they can follow.
    let capped = count.min(VALUE_LEN as u64 - 1);
    // SAFETY: reads a local.
    let capped = unsafe { core::ptr::read_volatile(&raw const capped) };
    #[expect(clippy::cast_possible_truncation, reason = "masked below VALUE_LEN")]
    let len = (capped as usize) & (VALUE_LEN - 1);
    // SAFETY: `buf` is the user's buffer of at least `count` bytes; the helper checks it.
    if unsafe { bpf_probe_read_user_buf(buf as *const u8, &mut pending.value[..len]) }.is_ok() {
        #[expect(clippy::cast_possible_truncation, reason = "len < VALUE_LEN")]
        let len = len as u32;
        pending.value_len = len;
    }
    PENDING_WRITES.insert(bpf_get_current_pid_tgid(), pending, 0)
}

/// An 8-byte field of the tracepoint record, loaded directly: a helper call per field would
/// cost ordinary writes more than the rest of the filter.
#[inline]
fn record_field(ctx: &TracePointContext, offset: usize) -> u64 {
    // SAFETY: `offset` is a field inside the syscall record the kernel passes as ctx, 8-byte
    // aligned like the record itself (which the verifier checks).
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "the record's u64 fields are 8-byte aligned"
    )]
    unsafe {
        ctx.as_ptr().cast::<u8>().add(offset).cast::<u64>().read()
    }
}

/// `fdt->max_fds` and `fdt->fd`, in one read when they are adjacent (they are on every kernel
/// from 5.10 to 6.18: an `unsigned int`, then the array pointer).
#[inline]
fn fdtable(fdt: *const u8, off: &agent_common::KernelOffsets) -> Result<(u32, *const u8), i32> {
    // SAFETY: `fdt` is a `struct fdtable *`; offsets come from BTF.
    unsafe {
        if off.fdtable_fd == off.fdtable_max_fds + 8 {
            let both: [u64; 2] = read_field(fdt, off.fdtable_max_fds)?;
            #[expect(
                clippy::cast_possible_truncation,
                reason = "max_fds is an unsigned int"
            )]
            return Ok((both[0] as u32, both[1] as *const u8));
        }
        Ok((
            read_field(fdt, off.fdtable_max_fds)?,
            read_field(fdt, off.fdtable_fd)?,
        ))
    }
}

/// Whether the kernfs node `kn` is one of the limit files (by name).
fn is_limit_file(kn: *const u8) -> Result<bool, i32> {
    let off = OFFSETS.load();
    let mut name = [0u8; FILE_NAME_LEN];
    // SAFETY: `kn` is a `struct kernfs_node *`; its name is a kernel string.
    unsafe {
        let ptr: *const u8 = read_field(kn, off.kernfs_node_name)?;
        bpf_probe_read_kernel_str_bytes(ptr, &mut name)?;
    }
    Ok(LIMIT_NAMES.contains(&name))
}

/// At exit: the pending write, if any, with the syscall's result.
fn exit(ctx: &TracePointContext) -> Result<(), i32> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(pending) = (unsafe { PENDING_WRITES.get(key) }).copied() else {
        return Ok(());
    };
    let _ = PENDING_WRITES.remove(key);
    #[expect(
        clippy::cast_possible_wrap,
        reason = "ret is a signed long in the record"
    )]
    let ret = record_field(ctx, RET) as i64;
    emit_for_node(pending.kn as *const u8, ret, |value| {
        *value = pending.value;
        pending.value_len as usize
    })
}
