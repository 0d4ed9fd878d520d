//! The explicit lock diagnostic (`nodewarden diagnose-locks`): a uprobe on a Go lock slow path
//! of one process counts its entries by user stack. Never attached by the agent itself: a trap
//! on every slow-path entry, taken while the lock is contended, slows the very contention it
//! measures, so the command bounds it in time and measures what each entry costs.

use agent_common::SampleKey;
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::bpf_get_current_pid_tgid,
    macros::uprobe,
    programs::{ProbeContext, tracing::StackIdContext as _},
};

use crate::maps::{DIAG_COUNTS, DIAG_LOST, DIAG_STACKS, atomic_add, count};

#[uprobe]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn lock_diag(ctx: ProbeContext) -> u32 {
    // An entry whose stack or count had no room: `nodewarden diagnose-locks` reports how many.
    if entered(&ctx).is_err()
        && let Some(n) = DIAG_LOST.get_ptr_mut(0)
    {
        // SAFETY: the map's one value; other CPUs add to it at the same time.
        unsafe { atomic_add(n, 1) };
    }
    0
}

fn entered(ctx: &ProbeContext) -> Result<(), ()> {
    let stack = ctx
        .get_stackid(&DIAG_STACKS, u64::from(BPF_F_USER_STACK))
        .map_err(drop)?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a stack id is a map index (the helper's errors were returned above)"
    )]
    let key = SampleKey {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        stack_id: stack as u32,
    };
    count(&DIAG_COUNTS, key)
}
