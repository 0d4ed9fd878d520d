//! Low-rate CPU sampling (a software clock, a few dozen times a second per CPU): each sample
//! counts the running process's user stack, so userspace can tell the share of a process's CPU
//! spent in lock slow paths or in the Go map runtime, and where they are called from. Nothing
//! is added to the programs' own code paths (no uprobes).

use agent_common::{LossKind, LossReason, SampleKey};
use aya_ebpf::{
    bindings::BPF_F_USER_STACK,
    helpers::bpf_get_current_pid_tgid,
    macros::perf_event,
    programs::{PerfEventContext, tracing::StackIdContext as _},
};

use crate::maps::{
    CPU_SAMPLES, FUTEX_CONFIG, Lost, SAMPLE_STACKS, count, counted, stack_loss, window_bit,
};

#[perf_event]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn cpu_sample(ctx: PerfEventContext) -> u32 {
    counted(sample(&ctx));
    0
}

fn sample(ctx: &PerfEventContext) -> Result<(), Lost> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The idle task, and the agent itself.
    if tgid == 0 || tgid == FUTEX_CONFIG.load().agent_tgid {
        return Ok(());
    }
    // A kernel thread has no user stack: the helper fails and the sample is not kept (not a
    // loss); any other failure is.
    let stack = match ctx.get_stackid(&SAMPLE_STACKS, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id,
        Err(e) => return stack_loss(LossKind::CpuSample, e).map_or(Ok(()), Err),
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a stack id is a map index (the helper's errors were returned above)"
    )]
    let key = SampleKey {
        tgid,
        stack_id: stack as u32 | window_bit(),
    };
    count(&CPU_SAMPLES, key).map_err(|()| Lost(LossKind::CpuSample, LossReason::MapFull))
}
