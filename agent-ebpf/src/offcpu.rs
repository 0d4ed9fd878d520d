//! Off-CPU time of watched processes: the raw tracepoint `sched_switch` stamps a watched thread
//! that goes to sleep with the time and its user stack, and the time asleep goes to that
//! (process, stack) when the thread is switched back in.
//!
//! A Go thread that sleeps because every goroutine it could run is parked keeps, on x86_64,
//! the parked goroutine's stack below the scheduler's frames (`mcall` leaves the frame pointer
//! chain intact): a lock's call site shows as lost CPU.
//!
//! The program runs at every context switch of the node, so what an unwatched switch costs is
//! kept to the least: a raw tracepoint (the classic one builds a record first, which cost more
//! than the whole program here), sleeping threads found by their `task_struct` pointer (an
//! argument) in an array the verifier inlines lookups of, and one helper call (the tgid) when a
//! task goes to sleep. Only processes userspace put in `OFFCPU_WATCH` pay for the clock and a
//! stack.

use agent_common::{FUTEX_WAIT_SLOTS, LossKind, LossReason, OffCpu, SampleKey};
use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::raw_tracepoint,
    programs::{RawTracePointContext, tracing::StackIdContext as _},
};

use crate::maps::{
    Lost, OFFCPU, OFFCPU_SLOTS, OFFCPU_STACKS, OFFCPU_WATCH, atomic_add, counted, stack_loss,
    window_bit,
};

/// `TASK_INTERRUPTIBLE | TASK_UNINTERRUPTIBLE`: a thread that sleeps. A preempted thread is
/// runnable, waiting for a CPU, not for an event.
const SLEEPING: u64 = 0x3;

/// `sched_switch(preempt, prev, next, prev_state)` (5.18 and later): the state says whether
/// `prev` sleeps.
#[raw_tracepoint(tracepoint = "sched_switch")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    let prev_state: u64 = ctx.arg(3);
    switch(&ctx, prev_state & SLEEPING != 0);
    0
}

/// `sched_switch(preempt, prev, next)` (before 5.18): a switch that was not a preemption
/// counts as a sleep (a `sched_yield` too, which is rare and short).
#[raw_tracepoint(tracepoint = "sched_switch")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn sched_switch_compat(ctx: RawTracePointContext) -> i32 {
    // A C `bool`: the low byte.
    let preempt: u64 = ctx.arg(0);
    switch(&ctx, preempt.trailing_zeros() >= 8);
    0
}

#[inline]
fn switch(ctx: &RawTracePointContext, prev_sleeps: bool) {
    let next: u64 = ctx.arg(2);
    counted(switched_in(next));
    if prev_sleeps {
        let prev: u64 = ctx.arg(1);
        switched_out(ctx, prev);
    }
}

/// A task's slot in `OFFCPU_SLOTS`, from its `task_struct` address (slab objects kilobytes
/// apart: the low bits say little).
#[inline]
fn slot_of(task: u64) -> u32 {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "masked to the slot count below"
    )]
    let mixed = ((task >> 8) ^ (task >> 24)) as u32;
    mixed & (FUTEX_WAIT_SLOTS - 1)
}

/// Now, in ns.
#[inline]
fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// A watched thread wakes: its time asleep goes to its process and stack.
fn switched_in(task: u64) -> Result<(), Lost> {
    let Some(slot) = OFFCPU_SLOTS.get_ptr_mut(slot_of(task)) else {
        return Ok(());
    };
    // SAFETY: the task's slot: copied out, then freed. Two tasks with the same slot lose one
    // sleep (the later overwrites the earlier), never mix them: the task is checked.
    let s = unsafe {
        if task == 0 || (*slot).task != task {
            return Ok(());
        }
        let s = slot.read();
        (*slot).task = 0;
        s
    };
    // No stack was taken at the switch-out (counted there).
    if s.stack_id < 0 {
        return Ok(());
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a stack id is a map index (checked not negative above)"
    )]
    let key = SampleKey {
        tgid: s.tgid,
        stack_id: s.stack_id as u32 | window_bit(),
    };
    let asleep = now().saturating_sub(s.start_ns);
    let value = if let Some(v) = OFFCPU.get_ptr_mut(key) {
        v
    } else {
        // NOEXIST: another CPU may have made it meanwhile (then the insert fails and the
        // lookup finds it). Full: this sleep goes uncounted.
        let _made = OFFCPU.insert(key, OffCpu::default(), u64::from(BPF_NOEXIST));
        OFFCPU
            .get_ptr_mut(key)
            .ok_or(Lost(LossKind::OffCpu, LossReason::MapFull))?
    };
    // SAFETY: a map value; other CPUs add to it at the same time.
    unsafe {
        atomic_add(&raw mut (*value).ns, asleep);
        atomic_add(&raw mut (*value).sleeps, 1);
    }
    Ok(())
}

/// The current task (`prev`) goes to sleep: stamped when its process is watched.
fn switched_out(ctx: &RawTracePointContext, task: u64) {
    let process = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A process is watched when its slot holds its tgid (see `OFFCPU_WATCH`).
    if process == 0 || OFFCPU_WATCH.get(process & (FUTEX_WAIT_SLOTS - 1)).copied() != Some(process)
    {
        return;
    }
    let stack_id = match ctx.get_stackid(&OFFCPU_STACKS, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id,
        Err(e) => {
            if let Some(lost) = stack_loss(LossKind::OffCpu, e) {
                lost.count();
            }
            -1
        }
    };
    let Some(slot) = OFFCPU_SLOTS.get_ptr_mut(slot_of(task)) else {
        return;
    };
    // SAFETY: the task's slot, written whole.
    unsafe {
        // Another sleeping thread in the same slot: its sleep is replaced, not measured.
        let other = (*slot).task;
        if other != 0 && other != task {
            Lost(LossKind::OffCpu, LossReason::SlotTaken).count();
        }
        (*slot).tgid = process;
        (*slot).start_ns = now();
        (*slot).stack_id = stack_id;
        (*slot).task = task;
    }
}
