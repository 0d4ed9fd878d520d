//! OOM kills: the victim from `oom/mark_victim`, its cgroup from the SIGKILL sent just before.

use agent_common::{COMM_LEN, EventKind, KilledTask, OomKillEvent, VICTIM_FROM_TASK};
use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::debug;

use crate::{
    kernel::{current_header, read_field, task_cgroup_id},
    maps::{EVENTS, KILLED, OFFSETS},
};

const SIGKILL: i32 = 9;

/// `signal_generate(int sig, struct kernel_siginfo *info, struct task_struct *task, int group,
/// int result)`: remembers each SIGKILL target's cgroup, since the OOM killer sends SIGKILL to its
/// victim right before `mark_victim`, whose tracepoint carries only the pid on kernels < 6.8.
#[raw_tracepoint(tracepoint = "signal_generate")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn signal_generate(ctx: RawTracePointContext) -> i32 {
    match try_signal_generate(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_signal_generate(ctx: &RawTracePointContext) -> Result<(), i32> {
    // The raw argument is a 64-bit register; the signal number is its low 32 bits.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "an int passed in a register"
    )]
    let sig = ctx.arg::<u64>(0) as i32;
    if sig != SIGKILL {
        return Ok(());
    }
    let off = OFFSETS.load();
    if !off.has_task_cgroup() {
        return Ok(());
    }
    let task: *const u8 = ctx.arg(2);
    // SAFETY: `task` is the tracepoint's `struct task_struct *`; offsets come from BTF.
    let (pid, killed) = unsafe {
        let pid: u32 = read_field(task, off.task_pid)?;
        let killed = KilledTask {
            cgroup_id: task_cgroup_id(&off, task)?,
            tgid: read_field(task, off.task_tgid)?,
            reserved: 0,
            comm: read_field::<[u8; COMM_LEN]>(task, off.task_comm).unwrap_or([0; COMM_LEN]),
        };
        (pid, killed)
    };
    KILLED.insert(pid, killed, 0)
}

/// Offset of `pid` in the `oom/mark_victim` record: first field after the 8-byte common header,
/// on every kernel that has the tracepoint (4.19 to 6.18).
const MARK_VICTIM_PID_OFFSET: usize = 8;

#[tracepoint(category = "oom", name = "mark_victim")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn oom_mark_victim(ctx: TracePointContext) -> i32 {
    match try_mark_victim(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_mark_victim(ctx: &TracePointContext) -> Result<(), i32> {
    // SAFETY: the offset is inside the tracepoint's record (see MARK_VICTIM_PID_OFFSET).
    let victim_pid: i32 = unsafe { ctx.read_at(MARK_VICTIM_PID_OFFSET) }?;
    let victim_pid = victim_pid.cast_unsigned();
    // SAFETY: the value is copied out before anything else touches the map entry.
    let killed = unsafe { KILLED.get(victim_pid) }.copied();
    let _ = KILLED.remove(victim_pid);

    let Some(mut entry) = EVENTS.reserve::<OomKillEvent>(0) else {
        return Err(-1);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring buffer slot; every field is written before submit.
    unsafe {
        (*event).header = current_header(EventKind::OomKill as u32);
        (*event).victim_pid = victim_pid;
        (*event).reserved = 0;
        let (cgroup_id, tgid, comm, flags) = killed.map_or((0, 0, [0; COMM_LEN], 0), |k| {
            (k.cgroup_id, k.tgid, k.comm, VICTIM_FROM_TASK)
        });
        (*event).victim_cgroup_id = cgroup_id;
        (*event).victim_tgid = tgid;
        (*event).victim_comm = comm;
        (*event).victim_flags = flags;
    }
    entry.submit(0);
    debug!(ctx, "oom: victim pid {}", victim_pid);
    Ok(())
}
