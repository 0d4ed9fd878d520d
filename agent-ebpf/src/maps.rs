//! Every map and global the programs share with userspace. Names come from `agent_common::maps`.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use agent_common::{
    ExecKey, FUTEX_WAIT_SLOTS, FutexConfig, FutexLock, FutexLockKey, FutexProcess, FutexWait,
    GuardEntry, GuardTrust, KernelOffsets, KilledTask, LOSS_SLOTS, LimitWriteArgs, LossCounts,
    LossKind, LossReason, OffCpu, OffCpuSlot, OomEntry, PendingWrite, SampleKey, WINDOW_BIT,
};
use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, StackTrace},
};

/// The events userspace must not miss (limit writes, cgroup changes, OOM kills, Go fatal
/// errors). 1 MiB holds about 5,200 limit writes of 200 bytes: half a second of a burst of
/// 10,000 a second while the agent is held up (256 KiB lost 2 to 4% of such a burst to a
/// full ring), and bursts of OOM kills fit. Nothing high-volume shares it.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// Execs of executables not reported before: one record per file, not per exec.
#[map(name = "EXECS")]
pub static EXECS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Executables reported by an exec record. LRU: a file evicted is reported again at its next
/// exec, which userspace recognises.
#[map(name = "EXEC_SEEN")]
pub static EXEC_SEEN: LruHashMap<ExecKey, u8> = LruHashMap::with_max_entries(8192, 0);

/// What the programs could not record, per CPU; userspace sums and exports them.
#[map(name = "LOST")]
pub static LOST: PerCpuArray<LossCounts> = PerCpuArray::with_max_entries(1, 0);

/// Something a program could not record, and why.
#[derive(Clone, Copy)]
pub struct Lost(pub LossKind, pub LossReason);

impl Lost {
    /// Counts it in [`LOST`].
    #[inline]
    pub fn count(self) {
        let Lost(kind, reason) = self;
        let index = LossCounts::index(kind, reason);
        // The mask shows the verifier the index is inside the array (the kind and reason can
        // reach here as values it has no bounds for); the volatile read keeps LLVM from
        // dropping the mask as redundant.
        // SAFETY: reads a local.
        let index = unsafe { core::ptr::read_volatile(&raw const index) } & (LOSS_SLOTS - 1);
        if let Some(c) = LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's value, and an index inside it. Atomic: a perf event program
            // can interrupt another on the same CPU.
            unsafe { atomic_add(&raw mut (*c).counts[index], 1) };
        }
    }
}

/// Counts the loss a program's body returned, if any: no event is dropped silently.
#[inline]
pub fn counted(r: Result<(), Lost>) {
    if let Err(lost) = r {
        lost.count();
    }
}

/// Recent SIGKILL targets by pid. The kernel sends an OOM victim SIGKILL just before it marks it,
/// and `oom/mark_victim` carries only the pid on older kernels, so the victim's cgroup is read
/// from the task here. LRU so that ordinary kills never fill it.
#[map(name = "KILLED")]
pub static KILLED: LruHashMap<u32, KilledTask> = LruHashMap::with_max_entries(1024, 0);

/// Limit writes in flight between kprobe and kretprobe, by `pid_tgid`. A thread writes one file at
/// a time, so a few hundred entries cover every writer on a node; LRU so that an entry whose
/// return was missed cannot fill the map.
#[map(name = "LIMIT_WRITE_ARGS")]
pub static LIMIT_WRITE_ARGS: LruHashMap<u64, LimitWriteArgs> =
    LruHashMap::with_max_entries(1024, 0);

/// Limit writes seen at syscall entry, by `pid_tgid`, until the syscall returns (syscalls mode).
#[map(name = "PENDING_WRITES")]
pub static PENDING_WRITES: LruHashMap<u64, PendingWrite> = LruHashMap::with_max_entries(1024, 0);

/// `out_of_memory` calls in progress by `pid_tgid` (see `oom::remember_oom`). LRU: entries are
/// replaced, never removed.
#[map(name = "OOM_ENTRIES")]
pub static OOM_ENTRIES: LruHashMap<u64, OomEntry> = LruHashMap::with_max_entries(256, 0);

/// Futex waits in flight, by thread id modulo its size (see `FUTEX_WAIT_SLOTS`).
#[map(name = "FUTEX_WAITS")]
pub static FUTEX_WAITS: Array<FutexWait> = Array::with_max_entries(FUTEX_WAIT_SLOTS, 0);

/// Futex aggregates by tgid. Its size is the cap on tracked processes (the loader sets it from
/// the configuration); userspace removes the processes that exited.
#[map(name = "FUTEX_PROCESSES")]
pub static FUTEX_PROCESSES: HashMap<u32, FutexProcess> = HashMap::with_max_entries(1024, 0);

/// A zeroed aggregate, never written: a new process's entry is copied from it (the struct is
/// larger than the BPF stack, and zeroing it in place would be a loop the verifier walks).
#[map(name = "FUTEX_ZERO")]
pub static FUTEX_ZERO: Array<FutexProcess> = Array::with_max_entries(1, 0);

/// Futex word totals by (tgid, address); sized by the loader too.
#[map(name = "FUTEX_LOCKS")]
pub static FUTEX_LOCKS: HashMap<FutexLockKey, FutexLock> = HashMap::with_max_entries(16_384, 0);

/// User stacks of long waits.
#[map(name = "FUTEX_STACKS")]
pub static FUTEX_STACKS: StackTrace = StackTrace::with_max_entries(4096, 0);

/// Selected processes, when the configuration does not select them all.
#[map(name = "FUTEX_SELECTED")]
pub static FUTEX_SELECTED: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// The read window: userspace flips bit 0 (see `agent_common::WINDOW_BIT`).
#[map(name = "WINDOW")]
pub static WINDOW: Array<u32> = Array::with_max_entries(1, 0);

/// [`WINDOW_BIT`] when the current read window is odd, else 0: added to the stack id of a
/// count's key.
#[inline]
pub fn window_bit() -> u32 {
    match WINDOW.get(0) {
        Some(w) if *w & 1 != 0 => WINDOW_BIT,
        _ => 0,
    }
}

/// CPU samples by (tgid, user stack): a few thousand stacks cover the busy processes.
#[map(name = "CPU_SAMPLES")]
pub static CPU_SAMPLES: HashMap<SampleKey, u64> = HashMap::with_max_entries(16_384, 0);

/// User stacks of the CPU samples.
#[map(name = "SAMPLE_STACKS")]
pub static SAMPLE_STACKS: StackTrace = StackTrace::with_max_entries(16_384, 0);

/// Sleeping threads of watched processes, by thread id modulo its size.
#[map(name = "OFFCPU_SLOTS")]
pub static OFFCPU_SLOTS: Array<OffCpuSlot> = Array::with_max_entries(FUTEX_WAIT_SLOTS, 0);

/// Off-CPU time by (tgid, user stack at the switch-out).
#[map(name = "OFFCPU")]
pub static OFFCPU: HashMap<SampleKey, OffCpu> = HashMap::with_max_entries(16_384, 0);

/// User stacks of the switch-outs.
#[map(name = "OFFCPU_STACKS")]
pub static OFFCPU_STACKS: StackTrace = StackTrace::with_max_entries(16_384, 0);

/// Processes whose off-CPU time is measured: slot `tgid % size` holds the tgid (0: none). An
/// array, not a hash map: the program looks it up on every switch, and the verifier inlines an
/// array lookup where a hash map's is a helper call. Userspace keeps it to a few processes and
/// never puts two in one slot.
#[map(name = "OFFCPU_WATCH")]
pub static OFFCPU_WATCH: Array<u32> = Array::with_max_entries(FUTEX_WAIT_SLOTS, 0);

/// Lock slow-path entries by (tgid, user stack), for `nodewarden diagnose-locks`.
#[map(name = "DIAG_COUNTS")]
pub static DIAG_COUNTS: HashMap<SampleKey, u64> = HashMap::with_max_entries(4096, 0);

/// Their user stacks.
#[map(name = "DIAG_STACKS")]
pub static DIAG_STACKS: StackTrace = StackTrace::with_max_entries(4096, 0);

/// Lock slow-path entries that could not be counted by stack (no room).
#[map(name = "DIAG_LOST")]
pub static DIAG_LOST: Array<u64> = Array::with_max_entries(1, 0);

/// The guard's protected limit files by inode number. Sized by the loader from the
/// configuration; userspace adds and removes entries as cgroups come and go. The guard's maps
/// are not preallocated: a node that protects nothing pays nothing for them.
#[map(name = "GUARD_FILES")]
pub static GUARD_FILES: HashMap<u64, GuardEntry> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// Trusted writers' executables (every key each configured path has had): a bit per writer.
#[map(name = "GUARD_EXES")]
pub static GUARD_EXES: HashMap<ExecKey, u64> = HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Trusted writers' parents' executables: a bit per writer.
#[map(name = "GUARD_PARENTS")]
pub static GUARD_PARENTS: HashMap<ExecKey, u64> =
    HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// Tgids that trusted writers must have (systemd's 1): a bit per writer.
#[map(name = "GUARD_PIDS")]
pub static GUARD_PIDS: HashMap<u32, u64> = HashMap::with_max_entries(1024, BPF_F_NO_PREALLOC);

/// Cgroups that trusted writers must run in, by id: a bit per writer. Sized by the loader
/// like `GUARD_FILES`.
#[map(name = "GUARD_CGROUPS")]
pub static GUARD_CGROUPS: HashMap<u64, u64> = HashMap::with_max_entries(16_384, BPF_F_NO_PREALLOC);

/// The writers with no constraint of each kind, and the agent's tgid: one entry. All zero (no
/// one trusted, not even the agent) until userspace writes it, which it does before it
/// protects any file.
#[map(name = "GUARD_TRUST")]
pub static GUARD_TRUST: Array<GuardTrust> = Array::with_max_entries(1, 0);

/// How the futex programs run.
#[unsafe(no_mangle)]
pub static FUTEX_CONFIG: Global<FutexConfig> = Global::new(FutexConfig::DEFAULT);

/// Kernel struct offsets, set by the loader from the running kernel's BTF.
#[unsafe(no_mangle)]
pub static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::UNKNOWN);

/// How many entries `PENDING_WRITES` may hold (a limit write in flight somewhere). The exit
/// programs run after every write on the node and skip the map while it is zero: a map lookup
/// and the pid helper are each a call, and calls are most of what a probe costs an ordinary
/// write. Never too low (counted up after the insert, down after a removal), only too high
/// when the LRU evicts an entry, which costs a lookup, never an event.
static mut PENDING_COUNT: u64 = 0;

/// Adds `n` (wrapping: `u64::MAX` takes one away) to [`PENDING_COUNT`], atomically: enters and
/// exits run on every CPU at once.
#[inline]
pub fn pending_add(n: u64) {
    // SAFETY: an aligned u64 in .bss, changed only atomically.
    unsafe { atomic_add(&raw mut PENDING_COUNT, n) };
}

/// `*p += n` atomically (one `lock xadd`). The BPF target has no `AtomicU64::fetch_add`, so
/// this calls the intrinsic those methods call.
///
/// # Safety
/// `p` must be an aligned `u64` in a map value or global.
#[inline]
pub unsafe fn atomic_add(p: *mut u64, n: u64) {
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n);
    }
}

/// Adds one to `key`'s count in `map`, making the entry if needed; fails when the map is
/// full.
#[inline]
pub fn count(map: &HashMap<SampleKey, u64>, key: SampleKey) -> Result<(), ()> {
    if let Some(n) = map.get_ptr_mut(key) {
        // SAFETY: a map value; other CPUs add to it at the same time.
        unsafe { atomic_add(n, 1) };
        return Ok(());
    }
    // Another CPU may have made it meanwhile; then add to it.
    if map.insert(key, 1, u64::from(BPF_NOEXIST)).is_err() {
        let n = map.get_ptr_mut(key).ok_or(())?;
        // SAFETY: as above.
        unsafe { atomic_add(n, 1) };
    }
    Ok(())
}

/// `-EEXIST` from `bpf_get_stackid`: the bucket holds another stack.
const EEXIST: i32 = -17;
/// `-EFAULT`: no stack to take (a kernel thread has no user stack).
const EFAULT: i32 = -14;

/// Why a stack could not be taken, as a loss of `kind`; `None` when there was no stack to take.
#[inline]
pub fn stack_loss(kind: LossKind, err: i32) -> Option<Lost> {
    match err {
        EFAULT => None,
        EEXIST => Some(Lost(kind, LossReason::StackCollision)),
        _ => Some(Lost(kind, LossReason::StackFailed)),
    }
}

/// Whether any limit write may be in flight.
#[inline]
pub fn any_pending() -> bool {
    // SAFETY: an aligned u64 in .bss; a torn read is impossible for one aligned word.
    unsafe { core::ptr::read_volatile(&raw const PENDING_COUNT) != 0 }
}
