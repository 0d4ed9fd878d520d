//! OOM kills: the victim from `oom/mark_victim`, its cgroup and memory from the SIGKILL sent
//! just before, and the limit that was hit from the `out_of_memory` call that chose it.

use agent_common::{
    COMM_LEN, EventKind, KernelOffsets, KilledTask, LossKind, LossReason, OOM_CONTROL, OomEntry,
    OomKillEvent, VICTIM_FROM_TASK, VICTIM_MEMORY,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{fentry, kprobe, raw_tracepoint, tracepoint},
    programs::{FEntryContext, ProbeContext, RawTracePointContext, TracePointContext},
};
use aya_log_ebpf::debug;

use crate::{
    kernel::{cgroup_id, current_header, read_field, task_cgroup_id},
    maps::{EVENTS, KILLED, Lost, OFFSETS, OOM_ENTRIES, counted},
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
    counted(try_signal_generate(&ctx));
    0
}

fn try_signal_generate(ctx: &RawTracePointContext) -> Result<(), Lost> {
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
    let (pid, killed) = unsafe { read_killed(&off, task) }
        .map_err(|_| Lost(LossKind::OomVictim, LossReason::ReadFailed))?;
    // LRU: a full map evicts; an insert fails only when the kernel has no memory.
    KILLED
        .insert(pid, killed, 0)
        .map_err(|_| Lost(LossKind::OomVictim, LossReason::MapFull))
}

/// What a SIGKILL's target is: its pid, and the figures the OOM probe reports of a victim.
///
/// # Safety
/// `task` must point to a `struct task_struct`.
unsafe fn read_killed(off: &KernelOffsets, task: *const u8) -> Result<(u32, KilledTask), i32> {
    unsafe {
        let pid: u32 = read_field(task, off.task_pid)?;
        let mut killed = KilledTask {
            cgroup_id: task_cgroup_id(off, task)?,
            tgid: read_field(task, off.task_tgid)?,
            flags: VICTIM_FROM_TASK,
            comm: read_field::<[u8; COMM_LEN]>(task, off.task_comm).unwrap_or([0; COMM_LEN]),
            rss_pages: [0; 4],
            total_vm_pages: 0,
            oom_score_adj: 0,
            reserved: 0,
        };
        if read_memory(off, task, &mut killed).is_ok() {
            killed.flags |= VICTIM_MEMORY;
        }
        Ok((pid, killed))
    }
}

/// The task's RSS counters, `total_vm` and `oom_score_adj`: what the kernel's own OOM report
/// prints, read at the same moment (the SIGKILL precedes the report).
///
/// # Safety
/// `task` must point to a `struct task_struct`.
unsafe fn read_memory(off: &KernelOffsets, task: *const u8, k: &mut KilledTask) -> Result<(), i32> {
    unsafe {
        let signal: *const u8 = read_field(task, off.task_signal)?;
        let adj: i16 = read_field(signal, off.signal_oom_score_adj)?;
        k.oom_score_adj = i32::from(adj);
        // A kernel thread has no mm; an exiting task may have dropped it.
        let mm: *const u8 = read_field(task, off.task_mm)?;
        k.total_vm_pages = read_field(mm, off.mm_total_vm)?;
        let mut at = off.mm_rss_counters;
        for slot in &mut k.rss_pages {
            // The per-CPU total can be briefly negative; the kernel reports it as 0 too.
            let pages: i64 = read_field(mm, at)?;
            *slot = pages.max(0).cast_unsigned();
            at = at.wrapping_add(off.mm_rss_stride);
        }
    }
    Ok(())
}

/// fentry on `out_of_memory(struct oom_control *oc)`: every victim chosen in this call (several
/// with `memory.oom.group`) is marked from inside it, on this thread.
#[fentry(function = "out_of_memory")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn oom_enter_fentry(ctx: FEntryContext) -> i32 {
    let oc: u64 = ctx.arg(0);
    remember_oom(oc);
    0
}

/// The same as a kprobe, where fentry is not allowed (arm64 6.1).
#[kprobe]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn oom_enter_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(oc) = ctx.arg::<u64>(0) {
        remember_oom(oc);
    }
    0
}

/// Keeps the call's `oc` for `mark_victim`. No return probe removes it: every `mark_victim`
/// comes from inside an `out_of_memory` call, whose entry has just replaced the thread's entry.
fn remember_oom(oc: u64) {
    let entry = OomEntry {
        oc,
        // SAFETY: no preconditions.
        entered_ns: unsafe { bpf_ktime_get_ns() },
    };
    // LRU: a full map evicts; an insert fails only when the kernel has no memory. The kill is
    // still reported, its limit then derived in userspace.
    if OOM_ENTRIES
        .insert(bpf_get_current_pid_tgid(), entry, 0)
        .is_err()
    {
        Lost(LossKind::OomLimit, LossReason::MapFull).count();
    }
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
    counted(try_mark_victim(&ctx));
    0
}

fn try_mark_victim(ctx: &TracePointContext) -> Result<(), Lost> {
    // SAFETY: the offset is inside the tracepoint's record (see MARK_VICTIM_PID_OFFSET).
    let victim_pid: i32 = unsafe { ctx.read_at(MARK_VICTIM_PID_OFFSET) }
        .map_err(|_| Lost(LossKind::OomKill, LossReason::ReadFailed))?;
    let victim_pid = victim_pid.cast_unsigned();
    // SAFETY: the value is copied out before anything else touches the map entry.
    let killed = unsafe { KILLED.get(victim_pid) }.copied();
    let _ = KILLED.remove(victim_pid);

    // SAFETY: the value is copied out of the map.
    let oom = unsafe { OOM_ENTRIES.get(bpf_get_current_pid_tgid()) }.copied();

    let Some(mut entry) = EVENTS.reserve::<OomKillEvent>(0) else {
        return Err(Lost(LossKind::OomKill, LossReason::RingFull));
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring buffer slot; every field is written before submit.
    unsafe {
        (*event).header = current_header(EventKind::OomKill as u32);
        (*event).victim_pid = victim_pid;
        let k = killed.unwrap_or(KilledTask {
            cgroup_id: 0,
            tgid: 0,
            flags: 0,
            comm: [0; COMM_LEN],
            rss_pages: [0; 4],
            total_vm_pages: 0,
            oom_score_adj: 0,
            reserved: 0,
        });
        (*event).victim_cgroup_id = k.cgroup_id;
        (*event).victim_tgid = k.tgid;
        (*event).victim_comm = k.comm;
        (*event).victim_flags = k.flags;
        (*event).victim_oom_score_adj = k.oom_score_adj;
        (*event).victim_rss_pages = k.rss_pages;
        (*event).victim_total_vm_pages = k.total_vm_pages;
        (*event).limit_cgroup_id = 0;
        (*event).limit_usage_pages = 0;
        (*event).limit_max_pages = 0;
        (*event).total_pages = 0;
        (*event).incident_ns = 0;
        (*event).constraint = 0;
        (*event).oom_flags = 0;
        if let Some(oom) = oom
            && read_oom_control(oom.oc as *const u8, &mut *event).is_ok()
        {
            (*event).incident_ns = oom.entered_ns;
            (*event).oom_flags = OOM_CONTROL;
        }
    }
    entry.submit(0);
    debug!(ctx, "oom: victim pid {}", victim_pid);
    Ok(())
}

/// The limit the `out_of_memory` call is about: `oc->constraint`, `oc->totalpages`, and for a
/// memory cgroup's OOM (`oc->memcg` set) its cgroup id, usage and max.
///
/// # Safety
/// `oc` must point to the `struct oom_control` of an `out_of_memory` call in progress.
unsafe fn read_oom_control(oc: *const u8, event: &mut OomKillEvent) -> Result<(), i32> {
    let off = OFFSETS.load();
    if !off.has_oom_control() {
        return Err(-1);
    }
    unsafe {
        event.constraint = read_field(oc, off.oom_control_constraint)?;
        event.total_pages = read_field(oc, off.oom_control_totalpages).unwrap_or(0);
        let memcg: *const u8 = read_field(oc, off.oom_control_memcg)?;
        if memcg.is_null() {
            return Ok(());
        }
        let cgroup: *const u8 = read_field(memcg, off.mem_cgroup_css_cgroup)?;
        event.limit_cgroup_id = cgroup_id(&off, cgroup)?;
        let usage: i64 = read_field(memcg, off.mem_cgroup_usage).unwrap_or(0);
        event.limit_usage_pages = usage.max(0).cast_unsigned();
        event.limit_max_pages = read_field(memcg, off.mem_cgroup_max).unwrap_or(0);
    }
    Ok(())
}
