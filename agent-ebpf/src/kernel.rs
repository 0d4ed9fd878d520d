//! Reads of kernel structs at offsets taken from BTF (Rust eBPF has no CO-RE).

use agent_common::{COMM_LEN, EventHeader, ExecKey, KernelOffsets, OFFSET_UNKNOWN, WriterIdentity};
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
};
use aya_ebpf::{EbpfContext as _, programs::TracePointContext};

/// `CGROUP2_SUPER_MAGIC` from the kernel's uapi `magic.h`.
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// One field of the kernel offsets (`maps::OFFSETS`), read alone from the frozen `.rodata`: the
/// verifier then knows it as a constant, which direct BTF-typed loads need.
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: `Global` is a transparent wrapper of an initialized `KernelOffsets`.
        unsafe {
            core::ptr::read_volatile(
                &raw const (*(&raw const crate::maps::OFFSETS)
                    .cast::<agent_common::KernelOffsets>())
                .$field,
            )
        }
    };
}
pub(crate) use offset;

/// A `T` at `base + offset`, by a direct load the verifier checks against BTF.
///
/// # Safety
/// `base` must be a BTF-typed kernel pointer whose type has a `T` field at `offset`.
#[expect(
    clippy::inline_always,
    reason = "a BPF subprogram call would hide the BTF type and the constant offset from the verifier"
)]
#[inline(always)]
pub unsafe fn load<T>(base: *const u8, offset: usize) -> T {
    unsafe { base.add(offset).cast::<T>().read() }
}

/// Reads a `T` at `base + offset`; fails for an unknown offset or a null base.
///
/// # Safety
/// `base` must point to a kernel object of the type the offset was taken from.
#[inline]
pub unsafe fn read_field<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    if offset == OFFSET_UNKNOWN || base.is_null() {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<T>()) }
}

/// `task->cgroups->dfl_cgrp->kn->id`: the task's cgroup v2 id.
///
/// # Safety
/// `task` must point to a `struct task_struct`.
#[inline]
pub unsafe fn task_cgroup_id(off: &KernelOffsets, task: *const u8) -> Result<u64, i32> {
    unsafe {
        let css_set: *const u8 = read_field(task, off.task_cgroups)?;
        let cgroup: *const u8 = read_field(css_set, off.css_set_dfl_cgrp)?;
        cgroup_id(off, cgroup)
    }
}

/// `cgroup->kn->id`: a cgroup's id (its directory's inode number).
///
/// # Safety
/// `cgroup` must point to a `struct cgroup`.
#[inline]
pub unsafe fn cgroup_id(off: &KernelOffsets, cgroup: *const u8) -> Result<u64, i32> {
    unsafe {
        let kn: *const u8 = read_field(cgroup, off.cgroup_kn)?;
        read_field(kn, off.kernfs_node_id)
    }
}

/// A header describing the current task.
#[inline]
pub fn current_header(kind: u32) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    EventHeader {
        kind,
        // The upper half is the tgid, the lower the thread id: truncation is the point.
        tgid: (pid_tgid >> 32) as u32,
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the lower half is the thread id"
        )]
        pid: pid_tgid as u32,
        reserved: 0,
        // SAFETY: these helpers have no preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    }
}

/// A file's (device, inode): `file->f_inode->{i_sb->s_dev, i_ino}`.
///
/// # Safety
/// `file` must point to a `struct file`.
#[inline]
pub unsafe fn file_key(off: &KernelOffsets, file: *const u8) -> Result<ExecKey, i32> {
    unsafe {
        let inode: *const u8 = read_field(file, off.file_f_inode)?;
        let sb: *const u8 = read_field(inode, off.inode_i_sb)?;
        Ok(ExecKey {
            dev: read_field(sb, off.super_block_s_dev)?,
            reserved: 0,
            ino: read_field(inode, off.inode_i_ino)?,
        })
    }
}

/// The executable a task runs: `task->mm->exe_file`'s key (fails for a kernel thread).
///
/// # Safety
/// `task` must point to a `struct task_struct`.
#[inline]
unsafe fn task_exe(off: &KernelOffsets, task: *const u8) -> Result<ExecKey, i32> {
    unsafe {
        let mm: *const u8 = read_field(task, off.task_mm)?;
        let file: *const u8 = read_field(mm, off.mm_exe_file)?;
        file_key(off, file)
    }
}

/// The current task's executable and its parent's, as they are now (at the write). What
/// cannot be read stays zero: the writer is then not trusted.
#[inline]
pub fn current_writer() -> WriterIdentity {
    let off = crate::maps::OFFSETS.load();
    let mut who = WriterIdentity::default();
    // SAFETY: the helper returns the running task.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    // SAFETY: `task` is the current `struct task_struct`; offsets come from BTF.
    unsafe {
        if let Ok(exe) = task_exe(&off, task) {
            who.exe = exe;
        }
        if let Ok(parent) = read_field::<*const u8>(task, off.task_real_parent) {
            who.parent_tgid = read_field(parent, off.task_tgid).unwrap_or(0);
            if let Ok(exe) = task_exe(&off, parent) {
                who.parent_exe = exe;
            }
        }
    }
    who
}

/// An 8-byte field of a syscall tracepoint's record, loaded directly: a helper call per field
/// would cost every traced syscall more than the rest of its program.
#[inline]
pub fn record_field(ctx: &TracePointContext, offset: usize) -> u64 {
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
