//! The guard: a BPF LSM program on `file_open` that refuses an untrusted process's open of a
//! protected limit file for writing, so the bad value is never written. LSM hooks see the file
//! and the opener, not the bytes: the decision is by who opens, never by what they would write.
//!
//! The hook runs on every open on the node, so everything that is not an open of a cgroup2 file
//! for writing leaves after a few direct loads (no helper call): `f_mode`, then `f_inode`,
//! `i_sb` and `s_magic`. Only then a map lookup by inode number says whether the file is
//! protected, and only a protected file costs the opener's identity.

use agent_common::{EventKind, GuardEntry, GuardEvent, LossKind, LossReason};
use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::lsm,
    programs::LsmContext,
};

use crate::{
    kernel::{CGROUP2_SUPER_MAGIC, current_header, current_writer, load, offset},
    maps::{
        EVENTS, GUARD_CGROUPS, GUARD_EXES, GUARD_FILES, GUARD_PARENTS, GUARD_PIDS, GUARD_TRUST,
        Lost, counted,
    },
};

/// `FMODE_WRITE`: the file was opened for writing.
const FMODE_WRITE: u32 = 0x2;
/// `-EPERM`: "Operation not permitted".
const EPERM: i32 = -1;

/// `int file_open(struct file *file)`; the second argument is the previous LSM's verdict.
#[lsm(hook = "file_open")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn guard_file_open(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    let file: *const u8 = ctx.arg(0);
    match protected(file) {
        Some((ino, entry)) => decide(ino, &entry),
        None => 0,
    }
}

/// An empty program on the same hook: the benchmark's baseline for what any LSM program costs.
#[lsm(hook = "file_open")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn guard_empty(ctx: LsmContext) -> i32 {
    ctx.arg(1)
}

/// The inode number and entry of the protected file `file` is, when it is opened for writing.
/// Most opens are reads: they leave after the first load.
#[inline]
fn protected(file: *const u8) -> Option<(u64, GuardEntry)> {
    // The loader attaches the program only when every offset is known (an unknown one would
    // fail the verifier's check of the load at load time, never at run time).
    let mode_off = offset!(file_f_mode) as usize;
    // SAFETY: `file` is the hook's BTF-typed `struct file *`; the verifier checks each load
    // against the kernel's BTF at these constant offsets, and the JIT turns a fault into a zero.
    if unsafe { load::<u32>(file, mode_off) } & FMODE_WRITE == 0 {
        return None;
    }
    let [inode_off, sb_off, magic_off, ino_off] = [
        offset!(file_f_inode),
        offset!(inode_i_sb),
        offset!(super_block_s_magic),
        offset!(inode_i_ino),
    ]
    .map(|o| o as usize);
    // SAFETY: as above.
    let ino = unsafe {
        let inode = load::<*const u8>(file, inode_off);
        let sb = load::<*const u8>(inode, sb_off);
        if load::<u64>(sb, magic_off) != CGROUP2_SUPER_MAGIC {
            return None;
        }
        load::<u64>(inode, ino_off)
    };
    // SAFETY: the value is copied out at once.
    unsafe { GUARD_FILES.get(ino) }.map(|e| (ino, *e))
}

/// Allows a trusted opener; refuses anyone else in enforce, reports a would-deny in dry-run.
#[inline]
fn decide(ino: u64, entry: &GuardEntry) -> i32 {
    let Some(trust) = GUARD_TRUST.get(0).copied() else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == trust.agent_tgid {
        return 0;
    }
    let who = current_writer();
    // SAFETY: these helpers have no preconditions; map values are copied out at once.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let mask = |v: Option<&u64>| v.copied().unwrap_or(0);
    // SAFETY: as above.
    let trusted = unsafe {
        trust.trusts(
            mask(GUARD_EXES.get(who.exe)),
            mask(GUARD_PARENTS.get(who.parent_exe)),
            mask(GUARD_PIDS.get(tgid)),
            mask(GUARD_CGROUPS.get(cgroup)),
        )
    };
    if trusted {
        return 0;
    }
    counted(report(entry, &who, ino));
    if entry.enforce != 0 { EPERM } else { 0 }
}

/// Sends the denial (or would-deny) to userspace; a full ring is counted, and the verdict
/// stands all the same.
#[inline]
fn report(
    entry: &GuardEntry,
    who: &agent_common::WriterIdentity,
    file_ino: u64,
) -> Result<(), Lost> {
    let Some(mut slot) = EVENTS.reserve::<GuardEvent>(0) else {
        return Err(Lost(LossKind::GuardDenial, LossReason::RingFull));
    };
    let event = slot.as_mut_ptr();
    // SAFETY: a reserved slot of the right size; every field is written before submit.
    unsafe {
        (*event).header = current_header(EventKind::GuardDenial as u32);
        (*event).target_cgroup_id = entry.cgroup_id;
        (*event).file_ino = file_ino;
        (*event).limit = entry.limit;
        (*event).enforced = entry.enforce;
        (*event).writer = *who;
    }
    slot.submit(0);
    Ok(())
}
