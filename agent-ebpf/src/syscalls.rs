//! Limit writes seen at the write syscalls, for kernels without fexit and kprobes: the program
//! follows the fd to its file and keeps only writes to cgroup2 limit files, so ordinary writes
//! cost a few reads. Catches redirections (`sh` dup2s the fd), `write`, `pwrite64` and `writev`.

use agent_common::{FILE_NAME_LEN, LossKind, LossReason, OFFSET_UNKNOWN, PendingWrite, VALUE_LEN};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_task_btf,
        bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_buf,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    kernel::{CGROUP2_SUPER_MAGIC, load, offset, read_field, record_field},
    limits::emit_for_node,
    maps::{Lost, OFFSETS, PENDING_WRITES, any_pending, counted, pending_add},
};

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
    ($($program:ident => $name:literal, $iov:literal, $btf:literal);* $(;)?) => {$(
        #[tracepoint(category = "syscalls", name = $name)]
        // `allow`, not `expect`: clippy does not lint code made by a local macro.
        #[allow(clippy::needless_pass_by_value, reason = "the program macro fixes the signature")]
        pub fn $program(ctx: TracePointContext) -> u32 {
            // An error is a write that is not to a limit file, or whose fd could not be
            // followed (then the file is not one this mode can name): nothing to record.
            if let Ok(Some(pending)) = enter::<$btf>(&ctx, $iov) {
                counted(keep(pending));
            }
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
            counted(exit(&ctx));
            0
        }
    )*};
}

syscall_enter! {
    sys_enter_write => "sys_enter_write", false, true;
    sys_enter_pwrite64 => "sys_enter_pwrite64", false, true;
    sys_enter_writev => "sys_enter_writev", true, true;
    sys_enter_write_compat => "sys_enter_write", false, false;
    sys_enter_pwrite64_compat => "sys_enter_pwrite64", false, false;
    sys_enter_writev_compat => "sys_enter_writev", true, false;
}

syscall_exit! {
    sys_exit_write => "sys_exit_write";
    sys_exit_pwrite64 => "sys_exit_pwrite64";
    sys_exit_writev => "sys_exit_writev";
}

/// At entry: is `fd` a cgroup2 limit file? If so, its node and the written bytes.
fn enter<const BTF: bool>(ctx: &TracePointContext, iov: bool) -> Result<Option<PendingWrite>, i32> {
    let fd = record_field(ctx, ARG0);
    let found = if BTF {
        cgroup_node_btf(fd)?
    } else {
        cgroup_node(fd)?
    };
    let Some(kn) = found else {
        return Ok(None);
    };
    if !is_limit_file(kn)? {
        return Ok(None);
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
    Ok(Some(pending))
}

/// Keeps a limit write until its syscall returns.
fn keep(pending: PendingWrite) -> Result<(), Lost> {
    // LRU: a full map evicts; an insert fails only when the kernel has no memory.
    PENDING_WRITES
        .insert(bpf_get_current_pid_tgid(), pending, 0)
        .map_err(|_| Lost(LossKind::LimitWrite, LossReason::MapFull))?;
    pending_add(1);
    Ok(())
}

/// The fd's cgroup2 node (`None`: not open, or not on cgroup2) through `bpf_probe_read_kernel`:
/// seven helper calls, on any kernel.
#[inline]
fn cgroup_node(fd: u64) -> Result<Option<*const u8>, i32> {
    let off = OFFSETS.load();
    // SAFETY: the current task is a `struct task_struct`; offsets come from BTF. Every read goes
    // through bpf_probe_read_kernel, so a stale pointer fails instead of faulting.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let files: *const u8 = read_field(task, off.task_files)?;
        let fdt: *const u8 = read_field(files, off.files_struct_fdt)?;
        // `max_fds` and `fd` are adjacent on every kernel from 5.10 to 6.18: one read.
        let (max_fds, fds) = if off.fdtable_fd == off.fdtable_max_fds + 8 {
            let both: [u64; 2] = read_field(fdt, off.fdtable_max_fds)?;
            (both[0] & u64::from(u32::MAX), both[1] as *const u8)
        } else {
            let max_fds: u32 = read_field(fdt, off.fdtable_max_fds)?;
            (u64::from(max_fds), read_field(fdt, off.fdtable_fd)?)
        };
        if fd >= max_fds {
            return Ok(None);
        }
        slot_node(fds, fd)
    }
}

/// The cgroup2 node of the file in slot `fd` of the `struct file *` array `fds`, through
/// `bpf_probe_read_kernel` (four helper calls).
///
/// # Safety
/// `fds` must be an fd table's array with more than `fd` slots.
#[inline]
unsafe fn slot_node(fds: *const u8, fd: u64) -> Result<Option<*const u8>, i32> {
    let off = OFFSETS.load();
    unsafe {
        #[expect(clippy::cast_possible_truncation, reason = "fd < max_fds, an int")]
        let file: *const u8 = read_field(fds.add(fd as usize * 8), 0)?;
        let inode: *const u8 = read_field(file, off.file_f_inode)?;
        let sb: *const u8 = read_field(inode, off.inode_i_sb)?;
        let magic: u64 = read_field(sb, off.super_block_s_magic)?;
        if magic != CGROUP2_SUPER_MAGIC {
            return Ok(None);
        }
        Ok(Some(read_field(inode, off.inode_i_private)?))
    }
}

/// The same by direct loads from the BTF-typed current task (5.11 and later): the verifier
/// types each load from the kernel's BTF and the JIT makes it one fault-handled move, several
/// times cheaper than a helper call. This is what keeps ordinary writes cheap.
///
/// All the way to the superblock for the fds in the table every process starts with (the
/// first 64, until it has more open); a process that outgrew that table needs the helpers from
/// the fd slot on, since the verifier cannot type the separately allocated array.
///
/// The verifier needs every offset to be a constant: they sit in frozen `.rodata`, and the
/// array slot is reached by adding a constant per bit of the fd (a computed `8 * fd` would be a
/// variable offset, which it refuses).
#[inline]
fn cgroup_node_btf(fd: u64) -> Result<Option<*const u8>, i32> {
    let offsets = [
        offset!(task_files),
        offset!(files_struct_fdt),
        offset!(files_struct_fdtab),
        offset!(files_struct_fd_array),
        offset!(fdtable_max_fds),
        offset!(fdtable_fd),
        offset!(file_f_inode),
        offset!(inode_i_sb),
        offset!(super_block_s_magic),
        offset!(inode_i_private),
    ];
    if offsets.contains(&OFFSET_UNKNOWN) {
        return cgroup_node(fd);
    }
    let [
        files_off,
        fdt_off,
        fdtab_off,
        array_off,
        max_fds_off,
        slots_off,
        inode_off,
        sb_off,
        magic_off,
        private_off,
    ] = offsets.map(|o| o as usize);
    // SAFETY: the verifier checks each load against the kernel's BTF at these constant offsets,
    // and the JIT turns a fault into a zero.
    unsafe {
        let task = bpf_get_current_task_btf() as *const u8;
        let files = load::<*const u8>(task, files_off);
        let fdt = load::<*const u8>(files, fdt_off);
        if fd >= u64::from(load::<u32>(fdt, max_fds_off)) {
            return Ok(None);
        }
        if fdt != files.add(fdtab_off) || fd >= FD_ARRAY_LEN {
            // The process outgrew its first table.
            return slot_node(load::<*const u8>(fdt, slots_off), fd);
        }
        let mut slot = files.add(array_off);
        for (bit, step) in FD_SLOT_STEPS.iter().enumerate() {
            if fd & (1 << bit) != 0 {
                slot = slot.add(core::ptr::read_volatile(step) as usize);
            }
        }
        let file = load::<*const u8>(slot, 0);
        if file.is_null() {
            return Ok(None);
        }
        let inode = load::<*const u8>(file, inode_off);
        let sb = load::<*const u8>(inode, sb_off);
        if load::<u64>(sb, magic_off) != CGROUP2_SUPER_MAGIC {
            return Ok(None);
        }
        Ok(Some(load::<*const u8>(inode, private_off)))
    }
}

/// Slots in `files_struct.fd_array` (`NR_OPEN_DEFAULT`, the bits in a long).
const FD_ARRAY_LEN: u64 = 64;

/// The byte offset of each bit of an fd in `fd_array`. Read through volatile loads so that LLVM
/// cannot fold them back into `8 * fd`; the verifier sees the frozen values as constants.
static FD_SLOT_STEPS: [u32; 6] = [8, 16, 32, 64, 128, 256];

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
fn exit(ctx: &TracePointContext) -> Result<(), Lost> {
    if !any_pending() {
        return Ok(());
    }
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(pending) = (unsafe { PENDING_WRITES.get(key) }).copied() else {
        return Ok(());
    };
    if PENDING_WRITES.remove(key).is_ok() {
        pending_add(u64::MAX);
    }
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
