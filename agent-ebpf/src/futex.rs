//! Futex waits, aggregated in the kernel: for each process a log2 histogram of the time its
//! threads waited to be woken, counts by outcome, and per futex word totals, maxima and the user
//! stack of a long wait. Only these aggregates cross to userspace.
//!
//! Two ways to see a wait, with one aggregate: fentry/fexit on the kernel's futex wait functions,
//! which only futex waits pay for, and tracepoints on the futex syscalls, for kernels without
//! fentry. While any syscall tracepoint is attached, every syscall of every task on the node
//! takes the kernel's slower entry path, which made every syscall about 45% slower.

use agent_common::{
    FUTEX_BUCKETS, FUTEX_WAIT_SLOTS, FutexLock, FutexLockKey, FutexProcess, FutexWait, LossKind,
    LossReason, OUTCOME_EAGAIN, OUTCOME_ERROR, OUTCOME_INTERRUPTED, OUTCOME_TIMEOUT, OUTCOME_WOKEN,
    programs::FUTEX_FUNCTIONS,
};
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{fentry, fexit, tracepoint},
    programs::{FEntryContext, FExitContext, TracePointContext, tracing::StackIdContext},
};

use crate::kernel::record_field;
use crate::maps::{
    FUTEX_CONFIG, FUTEX_LOCKS, FUTEX_PROCESSES, FUTEX_SELECTED, FUTEX_STACKS, FUTEX_WAITS,
    FUTEX_ZERO, Lost, atomic_add, counted, stack_loss,
};

/// `op & FUTEX_CMD_MASK` (without `FUTEX_PRIVATE_FLAG` and `FUTEX_CLOCK_REALTIME`).
const FUTEX_CMD_MASK: u64 = !(128 | 256);
const FUTEX_WAIT: u64 = 0;
const FUTEX_LOCK_PI: u64 = 6;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAIT_REQUEUE_PI: u64 = 11;
const FUTEX_LOCK_PI2: u64 = 13;

/// Errnos the outcome counts tell apart.
const ETIMEDOUT: i64 = 110;
const EAGAIN: i64 = 11;
const EINTR: i64 = 4;
/// What the kernel's wait functions return for a signal, before the syscall's exit turns it
/// into EINTR or a restart.
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Offsets in the `syscalls/sys_enter_futex` record (every argument takes 8 bytes).
const UADDR: usize = 16;
const OP: usize = 24;
/// `ret` in every `syscalls/sys_exit_*` record.
const RET: usize = 16;

/// `futex(2)`: a wait operation starts.
#[tracepoint(category = "syscalls", name = "sys_enter_futex")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn futex_enter(ctx: TracePointContext) -> u32 {
    let op = record_field(&ctx, OP) & FUTEX_CMD_MASK;
    if matches!(
        op,
        FUTEX_WAIT | FUTEX_WAIT_BITSET | FUTEX_LOCK_PI | FUTEX_LOCK_PI2 | FUTEX_WAIT_REQUEUE_PI
    ) {
        start(record_field(&ctx, UADDR));
    }
    0
}

/// `futex_waitv(2)` (5.16+) and `futex_wait(2)` (6.7+): waits by definition. The first
/// argument (the waiters array, or the word) names the wait.
#[tracepoint(category = "syscalls", name = "sys_enter_futex_waitv")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn futex_waitv_enter(ctx: TracePointContext) -> u32 {
    start(record_field(&ctx, UADDR));
    0
}

/// The exit of any of the futex syscalls: the wait's time and outcome.
#[tracepoint(category = "syscalls", name = "sys_exit_futex")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn futex_exit(ctx: TracePointContext) -> u32 {
    #[expect(
        clippy::cast_possible_wrap,
        reason = "ret is a signed long in the record"
    )]
    let ret = record_field(&ctx, RET) as i64;
    counted(finish(&ctx, ret));
    0
}

/// For each kernel wait function, an fentry (the wait starts, at the futex word `uaddr`) and an
/// fexit program (it ends with the function's `int` result, which fexit passes after its
/// arguments). The function is named at load time (the loader checks its parameter count in
/// the kernel's BTF).
macro_rules! futex_functions {
    ($($entry:ident, $exit:ident => FUTEX_FUNCTIONS[$i:literal], $uaddr:ident;)*) => {$(
        #[fentry]
        // `allow`, not `expect`: clippy does not lint code made by a local macro.
        #[allow(clippy::needless_pass_by_value, reason = "the program macro fixes the signature")]
        pub fn $entry(ctx: FEntryContext) -> i32 {
            start($uaddr(&ctx));
            0
        }

        #[fexit]
        #[allow(clippy::needless_pass_by_value, reason = "the program macro fixes the signature")]
        pub fn $exit(ctx: FExitContext) -> i32 {
            let ret: i32 = ctx.arg(FUTEX_FUNCTIONS[$i].params);
            counted(finish(&ctx, i64::from(ret)));
            0
        }
    )*};
}

/// The first argument is the futex word (`u32 __user *uaddr`).
fn first_argument(ctx: &FEntryContext) -> u64 {
    ctx.arg(0)
}

/// `futex_wait_multiple(struct futex_vector *vs, ...)`: the first waiter's word, `vs[0].w.uaddr`
/// (`struct futex_waitv` is UAPI: `u64 val; u64 uaddr; ...`).
fn first_waiter(ctx: &FEntryContext) -> u64 {
    let vs: u64 = ctx.arg(0);
    // SAFETY: `vs` is the kernel's array of waiters; a failed read names the wait 0.
    unsafe { bpf_probe_read_kernel((vs + 8) as *const u64) }.unwrap_or(0)
}

// One pair per `programs::FUTEX_FUNCTIONS` entry (its program names and parameter count).
futex_functions! {
    futex_wait_fentry, futex_wait_fexit => FUTEX_FUNCTIONS[0], first_argument;
    futex_lock_pi_fentry, futex_lock_pi_fexit => FUTEX_FUNCTIONS[1], first_argument;
    futex_requeue_pi_fentry, futex_requeue_pi_fexit => FUTEX_FUNCTIONS[2], first_argument;
    futex_waitv_fentry, futex_waitv_fexit => FUTEX_FUNCTIONS[3], first_waiter;
}

/// Remembers the start of a wait of a selected process.
fn start(uaddr: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !selected(pid_tgid) {
        return;
    }
    let Some(slot) = FUTEX_WAITS.get_ptr_mut(slot_of(pid_tgid)) else {
        return;
    };
    // SAFETY: the slot is this thread's (by its id); plain loads and stores of a value type.
    unsafe {
        // Another thread's wait in progress in the same slot (ids equal modulo the slots):
        // it is replaced, and its end will not be measured.
        let other = (*slot).pid_tgid;
        if other != 0 && other != pid_tgid {
            Lost(LossKind::FutexWait, LossReason::SlotTaken).count();
        }
        slot.write(FutexWait {
            pid_tgid,
            start_ns: bpf_ktime_get_ns(),
            uaddr,
        });
    }
}

/// The thread's slot in `FUTEX_WAITS`.
#[inline]
fn slot_of(pid_tgid: u64) -> u32 {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the lower half is the thread id"
    )]
    let tid = pid_tgid as u32;
    tid & (FUTEX_WAIT_SLOTS - 1)
}

/// Whether the process is watched: every process, or those userspace selected.
#[inline]
fn selected(pid_tgid: u64) -> bool {
    let config = FUTEX_CONFIG.load();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == config.agent_tgid {
        return false;
    }
    if config.select_all != 0 {
        return true;
    }
    // SAFETY: only presence is checked.
    unsafe { FUTEX_SELECTED.get(tgid) }.is_some()
}

/// The end of a wait of the current thread with result `ret`: its outcome and, when woken, its
/// time, into the process's and the futex word's aggregates.
fn finish<C: StackIdContext>(ctx: &C, ret: i64) -> Result<(), Lost> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(slot) = FUTEX_WAITS.get_ptr_mut(slot_of(pid_tgid)) else {
        return Ok(());
    };
    // SAFETY: the thread's slot: copied out, then freed.
    let wait = unsafe {
        if (*slot).pid_tgid != pid_tgid {
            // Not waiting (a wake, or a wait of an unselected process), or lost to a collision.
            return Ok(());
        }
        let wait = slot.read();
        (*slot).pid_tgid = 0;
        wait
    };
    let outcome = match ret {
        r if r >= 0 => OUTCOME_WOKEN,
        r if r == -ETIMEDOUT => OUTCOME_TIMEOUT,
        r if r == -EAGAIN => OUTCOME_EAGAIN,
        r if r == -EINTR
            || matches!(
                -r,
                ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
            ) =>
        {
            OUTCOME_INTERRUPTED
        }
        _ => OUTCOME_ERROR,
    };
    // Only a woken wait's time is kept: the clock is read for those alone.
    let waited = if outcome == OUTCOME_WOKEN {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }.saturating_sub(wait.start_ns)
    } else {
        0
    };
    let tgid = (pid_tgid >> 32) as u32;
    let process = process_entry(tgid).ok_or(Lost(LossKind::FutexWait, LossReason::MapFull))?;
    // SAFETY: `process` points into the map's value; every update is one atomic add.
    unsafe {
        atomic_add(&raw mut (*process).outcomes[outcome], 1);
        if outcome == OUTCOME_WOKEN {
            atomic_add(&raw mut (*process).buckets[bucket(waited)], 1);
            atomic_add(&raw mut (*process).woken_ns, waited);
        }
    }
    if outcome != OUTCOME_WOKEN {
        return Ok(());
    }
    let key = FutexLockKey {
        tgid,
        reserved: 0,
        uaddr: wait.uaddr,
    };
    let lock = if let Some(l) = FUTEX_LOCKS.get_ptr_mut(key) {
        l
    } else {
        let fresh = FutexLock {
            waits: 0,
            total_ns: 0,
            max_ns: 0,
            stack_id: -1,
        };
        // Full (the cap): this word goes uncounted, the process's figures still count.
        FUTEX_LOCKS
            .insert(key, fresh, 0)
            .map_err(|_| Lost(LossKind::FutexLock, LossReason::MapFull))?;
        FUTEX_LOCKS
            .get_ptr_mut(key)
            .ok_or(Lost(LossKind::FutexLock, LossReason::MapFull))?
    };
    // SAFETY: `lock` points into the map's value; counts are atomic adds, the maximum and the
    // stack a plain store (a lost race keeps another long wait's figures).
    unsafe {
        atomic_add(&raw mut (*lock).waits, 1);
        atomic_add(&raw mut (*lock).total_ns, waited);
        if waited > (*lock).max_ns {
            (*lock).max_ns = waited;
            if waited >= FUTEX_CONFIG.load().stack_threshold_ns {
                match ctx.get_stackid(&FUTEX_STACKS, u64::from(BPF_F_USER_STACK)) {
                    Ok(id) => (*lock).stack_id = id,
                    Err(e) => {
                        (*lock).stack_id = -1;
                        if let Some(lost) = stack_loss(LossKind::FutexStack, e) {
                            lost.count();
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The process's aggregate, created on its first wait (with its comm and cgroup); `None`
/// when the map is full (the cap on tracked processes).
fn process_entry(tgid: u32) -> Option<*mut FutexProcess> {
    if let Some(p) = FUTEX_PROCESSES.get_ptr_mut(tgid) {
        return Some(p);
    }
    let zero = FUTEX_ZERO.get(0)?;
    // NOEXIST: another thread of the process may have made it meanwhile. Full (the cap on
    // tracked processes): this process is not tracked.
    let made = FUTEX_PROCESSES
        .insert(tgid, zero, u64::from(BPF_NOEXIST))
        .is_ok();
    let p = FUTEX_PROCESSES.get_ptr_mut(tgid)?;
    if made {
        let comm = bpf_get_current_comm().unwrap_or([0; 16]);
        // SAFETY: the entry just made; its identity is written once.
        unsafe {
            (*p).cgroup_id = bpf_get_current_cgroup_id();
            (*p).comm = comm;
        }
    }
    Some(p)
}

/// The log2 bucket of `ns`: bucket i holds [2^i, 2^(i+1)) ns (0 also holds 0).
#[inline]
fn bucket(ns: u64) -> usize {
    let log2 = 63 - (ns | 1).leading_zeros() as usize;
    // The mask shows the verifier the index is inside the 64 buckets; the volatile read keeps
    // LLVM from folding it into the arithmetic above, where the verifier loses the bound.
    // SAFETY: reads a local.
    unsafe { core::ptr::read_volatile(&raw const log2) & (FUTEX_BUCKETS - 1) }
}
