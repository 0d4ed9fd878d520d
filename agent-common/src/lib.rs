//! Types shared by nodewarden's eBPF programs and its agent.
//!
//! Every type here crosses the kernel/user boundary as raw bytes, so each is `#[repr(C)]` with no
//! implicit padding (fields ordered and sized so the layout is the same on every target) and has a
//! compile-time size check. Names of maps and programs live here too, so both sides agree on them.
#![no_std]

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Bytes of a limit value captured as written (`"max"`, `"67108864"`, `"64M\n"`...).
pub const VALUE_LEN: usize = 64;

/// Bytes of a limit file's name (`"memory.swap.max"` is the longest, 15 + NUL).
pub const FILE_NAME_LEN: usize = 16;

/// Bytes of a cgroup path captured at mkdir (Kubernetes container paths are under 200).
pub const PATH_LEN: usize = 256;

/// Names of maps, shared by the programs (section names) and the loader (look-ups).
pub mod maps {
    /// Ring buffer of the events userspace must not miss: limit writes, cgroup changes, OOM
    /// kills, Go fatal errors.
    pub const EVENTS: &str = "EVENTS";
    /// Ring buffer of the execs of executables not reported before (high volume, apart from
    /// `EVENTS` so an exec storm cannot push out a limit write).
    pub const EXECS: &str = "EXECS";
    /// Executables already reported by an exec, by (device, inode): one record per file.
    pub const EXEC_SEEN: &str = "EXEC_SEEN";
    /// Per-CPU counts of what the programs could not record ([`super::LossCounts`]).
    pub const LOST: &str = "LOST";
    /// SIGKILLs seen recently, keyed by the target's pid: the OOM probe reads the victim's cgroup here.
    pub const KILLED: &str = "KILLED";
    /// Limit writes seen at syscall entry, waiting for the syscall's exit (syscalls mode).
    pub const PENDING_WRITES: &str = "PENDING_WRITES";
    /// The guard's protected limit files, by inode number ([`super::GuardEntry`]).
    pub const GUARD_FILES: &str = "GUARD_FILES";
    /// Trusted writers' executables: a bit per trusted writer that may run it.
    pub const GUARD_EXES: &str = "GUARD_EXES";
    /// Trusted writers' parents' executables: a bit per trusted writer that may have it.
    pub const GUARD_PARENTS: &str = "GUARD_PARENTS";
    /// Tgids trusted writers must have: a bit per trusted writer that must have it.
    pub const GUARD_PIDS: &str = "GUARD_PIDS";
    /// Cgroup ids trusted writers must run in: a bit per trusted writer that may run there.
    pub const GUARD_CGROUPS: &str = "GUARD_CGROUPS";
    /// The writers with no constraint of each kind, and the agent ([`super::GuardTrust`]).
    pub const GUARD_TRUST: &str = "GUARD_TRUST";
    /// Arguments of limit writes in flight, keyed by `pid_tgid` (kprobe mode: entry to return).
    pub const LIMIT_WRITE_ARGS: &str = "LIMIT_WRITE_ARGS";
    /// Global with the kernel struct offsets read from BTF at start-up.
    pub const OFFSETS: &str = "OFFSETS";
    /// `out_of_memory` calls in progress, keyed by `pid_tgid`: their `struct oom_control *`.
    pub const OOM_ENTRIES: &str = "OOM_ENTRIES";
    /// Futex waits in progress, by `pid_tgid`.
    pub const FUTEX_WAITS: &str = "FUTEX_WAITS";
    /// Futex wait aggregates by process (tgid): the cap on tracked processes is its size.
    pub const FUTEX_PROCESSES: &str = "FUTEX_PROCESSES";
    /// Futex wait totals by (tgid, futex word).
    pub const FUTEX_LOCKS: &str = "FUTEX_LOCKS";
    /// User stacks of long futex waits.
    pub const FUTEX_STACKS: &str = "FUTEX_STACKS";
    /// Processes whose futex waits are measured, when not all are (tgid to 1).
    pub const FUTEX_SELECTED: &str = "FUTEX_SELECTED";
    /// Global [`super::FutexConfig`].
    pub const FUTEX_CONFIG: &str = "FUTEX_CONFIG";
    /// CPU samples by (tgid, user stack id).
    pub const CPU_SAMPLES: &str = "CPU_SAMPLES";
    /// The sampled user stacks.
    pub const SAMPLE_STACKS: &str = "SAMPLE_STACKS";
    /// Threads off CPU (asleep) in watched processes, by thread id modulo its size.
    pub const OFFCPU_SLOTS: &str = "OFFCPU_SLOTS";
    /// Off-CPU time by (tgid, user stack id at the switch-out).
    pub const OFFCPU: &str = "OFFCPU";
    /// User stacks at the switch-outs.
    pub const OFFCPU_STACKS: &str = "OFFCPU_STACKS";
    /// Processes whose off-CPU time is measured, chosen by userspace: slot `tgid % size` (the
    /// size is `FUTEX_WAIT_SLOTS`) holds the tgid.
    pub const OFFCPU_WATCH: &str = "OFFCPU_WATCH";
    /// The read window the sampling and off-CPU programs count into: bit 0 of its one
    /// entry, set by userspace (see [`super::WINDOW_BIT`]).
    pub const WINDOW: &str = "WINDOW";
    /// Lock slow-path entries by (tgid, user stack id), for the lock diagnostic.
    pub const DIAG_COUNTS: &str = "DIAG_COUNTS";
    /// Their user stacks.
    pub const DIAG_STACKS: &str = "DIAG_STACKS";
    /// Lock slow-path entries that could not be counted by stack.
    pub const DIAG_LOST: &str = "DIAG_LOST";
}

/// Names of the programs (their function names in the eBPF object).
pub mod programs {
    /// kprobe on every limit write handler: remembers the arguments.
    pub const LIMIT_WRITE_KPROBE: &str = "limit_write_kprobe";
    /// kretprobe on every limit write handler: the write with its result.
    pub const LIMIT_WRITE_KRETPROBE: &str = "limit_write_kretprobe";
    /// Tracepoints on the write syscalls (syscalls mode): program, tracepoint (category
    /// `syscalls`). Entries keep writes to limit files; exits emit them with the result.
    pub const SYSCALL_WRITES: [(&str, &str); 6] = [
        ("sys_enter_write", "sys_enter_write"),
        ("sys_enter_pwrite64", "sys_enter_pwrite64"),
        ("sys_enter_writev", "sys_enter_writev"),
        ("sys_exit_write", "sys_exit_write"),
        ("sys_exit_pwrite64", "sys_exit_pwrite64"),
        ("sys_exit_writev", "sys_exit_writev"),
    ];
    /// The same entries for kernels without `bpf_get_current_task_btf` (before 5.11) or whose
    /// verifier refuses the direct loads: they read the task through helper calls instead.
    pub const SYSCALL_WRITES_COMPAT: [(&str, &str); 3] = [
        ("sys_enter_write_compat", "sys_enter_write"),
        ("sys_enter_pwrite64_compat", "sys_enter_pwrite64"),
        ("sys_enter_writev_compat", "sys_enter_writev"),
    ];
    /// Empty programs on `syscalls/sys_enter_write` and `sys_exit_write`: the benchmark's baseline.
    pub const BENCH_EMPTY: [(&str, &str); 2] = [
        ("bench_empty_enter", "sys_enter_write"),
        ("bench_empty_exit", "sys_exit_write"),
    ];
    /// BPF LSM program on `file_open`: refuses untrusted opens of protected limit files.
    pub const GUARD_FILE_OPEN: &str = "guard_file_open";
    /// An empty BPF LSM program on `file_open`: the guard benchmark's baseline.
    pub const GUARD_EMPTY: &str = "guard_empty";
    /// The LSM hook the guard runs on.
    pub const FILE_OPEN_HOOK: &str = "file_open";
    /// Raw tracepoint `cgroup_mkdir`: a cgroup's id and path as it is created.
    pub const CGROUP_MKDIR: &str = "cgroup_mkdir";
    /// Raw tracepoint `cgroup_rmdir`: a cgroup is removed.
    pub const CGROUP_RMDIR: &str = "cgroup_rmdir";
    /// Tracepoint `oom/mark_victim`: the kernel chose an OOM victim.
    pub const OOM_MARK_VICTIM: &str = "oom_mark_victim";
    /// Raw tracepoint `signal_generate`: remembers SIGKILL targets' cgroups for the OOM probe.
    pub const SIGNAL_GENERATE: &str = "signal_generate";
    /// fentry on `out_of_memory`: remembers its `struct oom_control *` (the limit hit).
    pub const OOM_ENTER_FENTRY: &str = "oom_enter_fentry";
    /// kprobe on `out_of_memory`, where fentry is not allowed.
    pub const OOM_ENTER_KPROBE: &str = "oom_enter_kprobe";
    /// The kernel function both OOM entry programs attach to.
    pub const OUT_OF_MEMORY: &str = "out_of_memory";
    /// fentry/fexit programs on the kernel's futex wait functions: only futex waits pay for
    /// them, unlike the syscall tracepoints below.
    pub const FUTEX_FUNCTIONS: [super::FutexFunction; 4] = [
        super::FutexFunction {
            entry: "futex_wait_fentry",
            exit: "futex_wait_fexit",
            // Since 6.7 `futex_wait` calls `__futex_wait`, which `futex_wait(2)` calls directly.
            kernel: &["__futex_wait", "futex_wait"],
            params: 5,
            required: true,
        },
        super::FutexFunction {
            entry: "futex_lock_pi_fentry",
            exit: "futex_lock_pi_fexit",
            kernel: &["futex_lock_pi"],
            params: 4,
            required: true,
        },
        super::FutexFunction {
            entry: "futex_requeue_pi_fentry",
            exit: "futex_requeue_pi_fexit",
            kernel: &["futex_wait_requeue_pi"],
            params: 6,
            required: true,
        },
        super::FutexFunction {
            entry: "futex_waitv_fentry",
            exit: "futex_waitv_fexit",
            // `futex_waitv(2)`, since 5.16.
            kernel: &["futex_wait_multiple"],
            params: 3,
            required: false,
        },
    ];
    /// Tracepoint `syscalls/sys_enter_futex`: wait operations start.
    pub const FUTEX_ENTER: &str = "futex_enter";
    /// Tracepoints `syscalls/sys_enter_futex_waitv` (5.16+) and `sys_enter_futex_wait` (6.7+).
    pub const FUTEX_WAITV_ENTER: &str = "futex_waitv_enter";
    /// The exits of all three futex syscalls.
    pub const FUTEX_EXIT: &str = "futex_exit";
    /// Uprobes on `runtime.fatal` / `runtime.throw`, register ABI (Go 1.17+ amd64, 1.18+ arm64).
    pub const GO_FATAL_REGS: &str = "go_fatal_regs";
    pub const GO_THROW_REGS: &str = "go_throw_regs";
    /// The same for the stack ABI of older Go.
    pub const GO_FATAL_STACK: &str = "go_fatal_stack";
    pub const GO_THROW_STACK: &str = "go_throw_stack";
    /// Raw tracepoint `sched_process_exec`: new programs to look at for Go.
    pub const PROCESS_EXEC: &str = "process_exec";
    /// perf event (software CPU clock) on every CPU: user stack samples.
    pub const CPU_SAMPLE: &str = "cpu_sample";
    /// Raw tracepoint `sched_switch`: off-CPU time of watched processes' threads (5.18 and
    /// later: with the previous task's state).
    pub const SCHED_SWITCH: &str = "sched_switch";
    /// The same before 5.18 (no state argument: a switch that is not a preemption is a sleep).
    pub const SCHED_SWITCH_COMPAT: &str = "sched_switch_compat";
    /// uprobe on a Go lock slow path of one process (`nodewarden diagnose-locks` only).
    pub const LOCK_DIAG: &str = "lock_diag";
}

/// A kernel function a futex wait sleeps in, and the fentry/fexit programs for it.
#[derive(Clone, Copy, Debug)]
pub struct FutexFunction {
    /// The fentry program (the wait starts).
    pub entry: &'static str,
    /// The fexit program (the wait ends with the function's result).
    pub exit: &'static str,
    /// The kernel's name for it, the first the kernel has of these.
    pub kernel: &'static [&'static str],
    /// Its parameter count: the fexit program reads the result after them.
    pub params: usize,
    /// Whether every kernel since 5.10 has it (fexit mode fails without it).
    pub required: bool,
}

/// Event kinds, with stable numbers: they are the first field of every event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A write to a cgroup limit file ([`LimitWriteEvent`]).
    LimitWrite = 1,
    /// The kernel's OOM killer chose a victim ([`OomKillEvent`]).
    OomKill = 2,
    /// A cgroup was created ([`CgroupEvent`]).
    CgroupMkdir = 3,
    /// A cgroup was removed ([`CgroupEvent`]).
    CgroupRmdir = 4,
    /// A Go program entered its fatal error path ([`GoFatalEvent`]).
    GoFatal = 5,
    /// A process exec'd a program not reported before ([`ExecEvent`], ring `EXECS`).
    Exec = 6,
    /// The guard refused (or, in dry-run, would have refused) an open of a protected limit
    /// file for writing ([`GuardEvent`]).
    GuardDenial = 7,
}

impl EventKind {
    /// The kind for a raw header value, `None` for a kind this build does not know.
    #[must_use]
    pub const fn from_u32(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::LimitWrite),
            2 => Some(Self::OomKill),
            3 => Some(Self::CgroupMkdir),
            4 => Some(Self::CgroupRmdir),
            5 => Some(Self::GoFatal),
            6 => Some(Self::Exec),
            7 => Some(Self::GuardDenial),
            _ => None,
        }
    }
}

/// Cgroup v2 limit files, each with the kernel function that handles its writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitFile {
    MemoryMax,
    MemoryHigh,
    MemoryLow,
    MemoryMin,
    MemorySwapMax,
    PidsMax,
    CpuMax,
}

impl LimitFile {
    /// Every limit file, in a stable order.
    pub const ALL: [Self; 7] = [
        Self::MemoryMax,
        Self::MemoryHigh,
        Self::MemoryLow,
        Self::MemoryMin,
        Self::MemorySwapMax,
        Self::PidsMax,
        Self::CpuMax,
    ];

    /// The file's name in a cgroup directory.
    #[must_use]
    pub const fn file_name(self) -> &'static str {
        match self {
            Self::MemoryMax => "memory.max",
            Self::MemoryHigh => "memory.high",
            Self::MemoryLow => "memory.low",
            Self::MemoryMin => "memory.min",
            Self::MemorySwapMax => "memory.swap.max",
            Self::PidsMax => "pids.max",
            Self::CpuMax => "cpu.max",
        }
    }

    /// The kernel function that handles writes to the file (the same name on 5.10 to 6.18).
    #[must_use]
    pub const fn kernel_handler(self) -> &'static str {
        match self {
            Self::MemoryMax => "memory_max_write",
            Self::MemoryHigh => "memory_high_write",
            Self::MemoryLow => "memory_low_write",
            Self::MemoryMin => "memory_min_write",
            Self::MemorySwapMax => "swap_max_write",
            Self::PidsMax => "pids_max_write",
            Self::CpuMax => "cpu_max_write",
        }
    }

    /// The fexit program for this file in the eBPF object.
    #[must_use]
    pub const fn fexit_program(self) -> &'static str {
        match self {
            Self::MemoryMax => "memory_max_write_fexit",
            Self::MemoryHigh => "memory_high_write_fexit",
            Self::MemoryLow => "memory_low_write_fexit",
            Self::MemoryMin => "memory_min_write_fexit",
            Self::MemorySwapMax => "swap_max_write_fexit",
            Self::PidsMax => "pids_max_write_fexit",
            Self::CpuMax => "cpu_max_write_fexit",
        }
    }

    /// The limit file called `name`, if it is one.
    #[must_use]
    pub fn from_file_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.file_name() == name)
    }
}

/// First part of every event: what happened, when, and the task that was running.
///
/// `task_*` and `cgroup_id` describe the *current* task in the probe: the writer of a limit, the
/// task whose allocation triggered an OOM kill. They are never the victim's.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] number.
    pub kind: u32,
    /// Thread group id (the process id userspace sees) of the current task.
    pub tgid: u32,
    /// Thread id of the current task.
    pub pid: u32,
    /// Reserved, zero; keeps the next field 8-byte aligned without implicit padding.
    pub reserved: u32,
    /// `bpf_ktime_get_ns()` (`CLOCK_MONOTONIC`) when the probe ran.
    pub timestamp_ns: u64,
    /// Cgroup v2 id of the current task.
    pub cgroup_id: u64,
    /// The current task's `comm`, NUL-padded.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<EventHeader>() == 48);

/// A write to a cgroup limit file, seen when the kernel's write handler returned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LimitWriteEvent {
    /// Kind [`EventKind::LimitWrite`]; the task is the writer.
    pub header: EventHeader,
    /// Cgroup v2 id (inode number) of the cgroup whose limit was written.
    pub target_cgroup_id: u64,
    /// The handler's return value: bytes consumed, or a negative errno.
    pub result: i64,
    /// Reserved, zero.
    pub reserved: u32,
    /// Bytes of `value` that hold the value (without the NUL).
    pub value_len: u32,
    /// Who wrote, as the kernel knew them at the write: the trusted writers are told by this,
    /// never by comm.
    pub writer: WriterIdentity,
    /// The written file's name (`kn->name`), NUL-terminated: says which limit it is.
    pub file_name: [u8; FILE_NAME_LEN],
    /// The value as the kernel parsed it (whitespace stripped), NUL-terminated.
    pub value: [u8; VALUE_LEN],
}
const _: () = assert!(size_of::<LimitWriteEvent>() == 48 + 24 + 40 + FILE_NAME_LEN + VALUE_LEN);

/// A writer's executable and parentage, read from its task in the kernel at the write.
/// A key is all zero when it could not be read (a kernel thread has no executable).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterIdentity {
    /// The writer's executable (`current->mm->exe_file`).
    pub exe: ExecKey,
    /// Its parent's executable (`current->real_parent->mm->exe_file`).
    pub parent_exe: ExecKey,
    /// Its parent's tgid (0 when unknown).
    pub parent_tgid: u32,
    /// Reserved, zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<WriterIdentity>() == 40);

/// A protected limit file, the value of `GUARD_FILES` (keyed by the file's inode number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardEntry {
    /// The cgroup the file belongs to.
    pub cgroup_id: u64,
    /// The limit, as its index in [`LimitFile::ALL`].
    pub limit: u32,
    /// 1: refuse untrusted opens (enforce); 0: allow them and report a would-deny (dry-run).
    pub enforce: u32,
}
const _: () = assert!(size_of::<GuardEntry>() == 16);

/// The guard's trust, beside its maps: each mask has a bit per trusted writer (at most
/// [`GUARD_MAX_WRITERS`]). A writer is trusted when one bit survives the AND of its
/// executable's, its parent's, its tgid's and its cgroup's masks, each OR'd with the writers
/// that have no constraint of that kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardTrust {
    /// Writers that may have any parent.
    pub any_parent: u64,
    /// Writers that may have any tgid.
    pub any_pid: u64,
    /// Writers that may run in any cgroup.
    pub any_cgroup: u64,
    /// The agent's own tgid: its restores are never refused.
    pub agent_tgid: u32,
    /// Reserved, zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<GuardTrust>() == 32);

/// Trusted writers the guard can tell apart: one bit of a `u64` each.
pub const GUARD_MAX_WRITERS: usize = 64;

impl GuardTrust {
    /// Whether a writer whose executable, parent, tgid and cgroup have these masks (0 where
    /// the map has no entry) is trusted. The kernel and the agent's tests use this one rule.
    #[must_use]
    pub const fn trusts(&self, exe: u64, parent: u64, pid: u64, cgroup: u64) -> bool {
        exe & (parent | self.any_parent) & (pid | self.any_pid) & (cgroup | self.any_cgroup) != 0
    }
}

/// An open of a protected limit file for writing by an untrusted process, which the guard
/// refused (`enforced` 1) or let through as a would-deny (dry-run, `enforced` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GuardEvent {
    /// Kind [`EventKind::GuardDenial`]; the task is the opener.
    pub header: EventHeader,
    /// The cgroup whose limit file it was.
    pub target_cgroup_id: u64,
    /// The file's inode number.
    pub file_ino: u64,
    /// The limit, as its index in [`LimitFile::ALL`].
    pub limit: u32,
    /// 1: the open failed with `EPERM`; 0: it was allowed (dry-run).
    pub enforced: u32,
    /// The opener as the kernel knew it at the open.
    pub writer: WriterIdentity,
}
const _: () = assert!(size_of::<GuardEvent>() == 48 + 24 + 40);

/// A cgroup was created or removed: keeps the agent's id-to-path map current without rescans.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgroupEvent {
    /// Kind [`EventKind::CgroupMkdir`] or [`EventKind::CgroupRmdir`].
    pub header: EventHeader,
    /// Cgroup v2 id of the cgroup.
    pub id: u64,
    /// Bytes of `path` that hold the path.
    pub path_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Path relative to the hierarchy's root, NUL-terminated; truncated at `PATH_LEN - 1` bytes.
    pub path: [u8; PATH_LEN],
}
const _: () = assert!(size_of::<CgroupEvent>() == 48 + 16 + PATH_LEN);

/// A process exec'd an executable file the kernel had not reported yet.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    /// Kind [`EventKind::Exec`]; the task is the one that exec'd.
    pub header: EventHeader,
    /// The executable's key in `EXEC_SEEN`: userspace removes it to hear of the file again.
    pub key: ExecKey,
}
const _: () = assert!(size_of::<ExecEvent>() == 48 + 16);

/// An executable file: the kernel's `s_dev` of its filesystem and its inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExecKey {
    /// `super_block.s_dev` (the kernel's encoding: major << 20 | minor).
    pub dev: u32,
    /// Reserved, zero.
    pub reserved: u32,
    pub ino: u64,
}
const _: () = assert!(size_of::<ExecKey>() == 16);

/// What was lost: the first index of [`LossCounts::counts`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LossKind {
    LimitWrite = 0,
    CgroupMkdir = 1,
    CgroupRmdir = 2,
    OomKill = 3,
    /// The victim's task as the SIGKILL saw it (the kill is then reported without it).
    OomVictim = 4,
    /// The `out_of_memory` call (the limit is then derived in userspace).
    OomLimit = 5,
    GoFatal = 6,
    Exec = 7,
    FutexWait = 8,
    /// A futex word's totals.
    FutexLock = 9,
    /// The user stack of a long futex wait.
    FutexStack = 10,
    CpuSample = 11,
    OffCpu = 12,
    /// A ring buffer record userspace could not decode.
    Record = 13,
    /// Userspace: a remediation decision the executor had no room for.
    Decision = 14,
    /// A guard denial's event (the open was refused or allowed all the same).
    GuardDenial = 15,
    /// Userspace: a change to the guard's maps the executor had no room for (the guard's
    /// state is then rebuilt).
    GuardChange = 16,
}

/// Why: the second index of [`LossCounts::counts`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LossReason {
    /// The ring buffer had no room.
    RingFull = 0,
    /// A map had no room for a new entry.
    MapFull = 1,
    /// The stack map's bucket held another stack (`-EEXIST`).
    StackCollision = 2,
    /// The stack map had no free entry, or the stack could not be taken.
    StackFailed = 3,
    /// An array slot shared by ids was taken by another one.
    SlotTaken = 4,
    /// A kernel struct could not be read.
    ReadFailed = 5,
    /// Userspace: the record did not decode.
    Decode = 6,
    /// Userspace: a worker's queue was full.
    QueueFull = 7,
    /// Userspace: inotify's queue overflowed.
    InotifyOverflow = 8,
    /// Userspace: a stack id named no stack any more when read.
    StackMissing = 9,
}

/// Number of [`LossKind`]s.
pub const LOSS_KINDS: usize = 17;
/// Number of [`LossReason`]s.
pub const LOSS_REASONS: usize = 10;

impl LossKind {
    /// Every kind, by index.
    pub const ALL: [Self; LOSS_KINDS] = [
        Self::LimitWrite,
        Self::CgroupMkdir,
        Self::CgroupRmdir,
        Self::OomKill,
        Self::OomVictim,
        Self::OomLimit,
        Self::GoFatal,
        Self::Exec,
        Self::FutexWait,
        Self::FutexLock,
        Self::FutexStack,
        Self::CpuSample,
        Self::OffCpu,
        Self::Record,
        Self::Decision,
        Self::GuardDenial,
        Self::GuardChange,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LimitWrite => "limit_write",
            Self::CgroupMkdir => "cgroup_mkdir",
            Self::CgroupRmdir => "cgroup_rmdir",
            Self::OomKill => "oom_kill",
            Self::OomVictim => "oom_victim",
            Self::OomLimit => "oom_limit",
            Self::GoFatal => "go_fatal",
            Self::Exec => "exec",
            Self::FutexWait => "futex_wait",
            Self::FutexLock => "futex_lock",
            Self::FutexStack => "futex_stack",
            Self::CpuSample => "cpu_sample",
            Self::OffCpu => "off_cpu",
            Self::Record => "record",
            Self::Decision => "decision",
            Self::GuardDenial => "guard_denial",
            Self::GuardChange => "guard_change",
        }
    }

    /// The reasons one can be lost for: the series `nodewarden_events_lost_total` exports
    /// (from zero, so an increase from the first loss on shows).
    #[must_use]
    pub const fn reasons(self) -> &'static [LossReason] {
        use LossReason as R;
        match self {
            Self::LimitWrite => &[R::RingFull, R::MapFull, R::ReadFailed, R::InotifyOverflow],
            Self::CgroupMkdir | Self::CgroupRmdir | Self::OomKill => &[R::RingFull, R::ReadFailed],
            Self::OomVictim => &[R::MapFull, R::ReadFailed],
            Self::OomLimit | Self::FutexLock => &[R::MapFull],
            Self::GoFatal | Self::GuardDenial => &[R::RingFull],
            Self::Exec => &[R::RingFull, R::ReadFailed, R::QueueFull],
            Self::FutexWait => &[R::MapFull, R::SlotTaken],
            Self::FutexStack => &[R::StackCollision, R::StackFailed, R::StackMissing],
            Self::CpuSample => &[
                R::MapFull,
                R::StackCollision,
                R::StackFailed,
                R::StackMissing,
            ],
            Self::OffCpu => &[
                R::MapFull,
                R::StackCollision,
                R::StackFailed,
                R::SlotTaken,
                R::StackMissing,
            ],
            Self::Record => &[R::Decode],
            Self::Decision | Self::GuardChange => &[R::QueueFull],
        }
    }

    /// Whether losing one leaves the agent's view of cgroup limits stale (a resync follows).
    #[must_use]
    pub const fn stales_limits(self) -> bool {
        matches!(
            self,
            Self::LimitWrite | Self::CgroupMkdir | Self::CgroupRmdir | Self::Record
        )
    }
}

impl LossReason {
    /// Every reason, by index.
    pub const ALL: [Self; LOSS_REASONS] = [
        Self::RingFull,
        Self::MapFull,
        Self::StackCollision,
        Self::StackFailed,
        Self::SlotTaken,
        Self::ReadFailed,
        Self::Decode,
        Self::QueueFull,
        Self::InotifyOverflow,
        Self::StackMissing,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RingFull => "ring_full",
            Self::MapFull => "map_full",
            Self::StackCollision => "stack_collision",
            Self::StackFailed => "stack_failed",
            Self::SlotTaken => "slot_taken",
            Self::ReadFailed => "read_failed",
            Self::Decode => "decode",
            Self::QueueFull => "queue_full",
            Self::InotifyOverflow => "inotify_overflow",
            Self::StackMissing => "stack_missing",
        }
    }
}

/// Slots of [`LossCounts`]: a power of two at least `LOSS_KINDS * LOSS_REASONS`, so that the
/// programs can mask an index for the verifier.
pub const LOSS_SLOTS: usize = 256;
const _: () = assert!(LOSS_KINDS * LOSS_REASONS <= LOSS_SLOTS && LOSS_SLOTS.is_power_of_two());

/// Losses by `kind * LOSS_REASONS + reason`, one per CPU (map `LOST`, a single entry): one read
/// gives them all.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LossCounts {
    pub counts: [u64; LOSS_SLOTS],
}
const _: () = assert!(size_of::<LossCounts>() == 8 * LOSS_SLOTS);

impl LossCounts {
    /// The index of (kind, reason) in `counts`.
    #[must_use]
    pub const fn index(kind: LossKind, reason: LossReason) -> usize {
        kind as usize * LOSS_REASONS + reason as usize
    }
}

/// A write(2) to a cgroup limit file seen at syscall entry (syscalls mode), kept until its exit.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingWrite {
    /// The file's `struct kernfs_node *`.
    pub kn: u64,
    /// Bytes of `value` captured from the user's buffer.
    pub value_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The start of the written bytes (limit values are short), not NUL-terminated.
    pub value: [u8; VALUE_LEN],
}
const _: () = assert!(size_of::<PendingWrite>() == 16 + VALUE_LEN);

/// Arguments of a limit write handler, kept from kprobe to kretprobe.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LimitWriteArgs {
    /// `struct kernfs_open_file *of`.
    pub of: u64,
    /// `char *buf`.
    pub buf: u64,
}
const _: () = assert!(size_of::<LimitWriteArgs>() == 16);

/// The OOM killer chose a victim.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomKillEvent {
    /// Kind [`EventKind::OomKill`]; the task is the one whose allocation triggered the kill.
    pub header: EventHeader,
    /// Cgroup v2 id of the victim, 0 when the kernel did not tell (see `victim_flags`).
    pub victim_cgroup_id: u64,
    /// Thread id of the victim (the kernel's `task->pid`).
    pub victim_pid: u32,
    /// Thread group id of the victim, 0 when unknown.
    pub victim_tgid: u32,
    /// Bit set of `VICTIM_*` flags.
    pub victim_flags: u32,
    /// The victim's `oom_score_adj` (valid with [`VICTIM_MEMORY`]).
    pub victim_oom_score_adj: i32,
    /// The victim's `comm`, NUL-padded; empty when unknown.
    pub victim_comm: [u8; COMM_LEN],
    /// The victim's resident pages by [`RSS_FILE`], [`RSS_ANON`], [`RSS_SWAP`] (swap entries)
    /// and [`RSS_SHMEM`], when it was sent SIGKILL (valid with [`VICTIM_MEMORY`]).
    pub victim_rss_pages: [u64; 4],
    /// The victim's `mm->total_vm` in pages (valid with [`VICTIM_MEMORY`]).
    pub victim_total_vm_pages: u64,
    /// Cgroup v2 id of the memory cgroup whose limit was hit; 0 for a global OOM or when the
    /// OOM call was not seen (see `oom_flags`).
    pub limit_cgroup_id: u64,
    /// That cgroup's `memory.current` in pages when the victim was chosen.
    pub limit_usage_pages: u64,
    /// That cgroup's `memory.max` in pages.
    pub limit_max_pages: u64,
    /// `oom_control.totalpages`: the memory the OOM killer weighed victims against.
    pub total_pages: u64,
    /// When the `out_of_memory` call that chose this victim began (`CLOCK_MONOTONIC`): the same
    /// for every victim of one limit hit.
    pub incident_ns: u64,
    /// `oom_control.constraint` (`enum oom_constraint`: 0 none, 1 cpuset, 2 mempolicy, 3 memcg).
    pub constraint: u32,
    /// Bit set of `OOM_*` flags.
    pub oom_flags: u32,
}
const _: () = assert!(size_of::<OomKillEvent>() == 48 + 24 + COMM_LEN + 32 + 56);

/// `victim_cgroup_id`, `victim_tgid` and `victim_comm` were read from the victim's task in the kernel.
pub const VICTIM_FROM_TASK: u32 = 1;
/// The victim's memory figures and `oom_score_adj` were read from its task.
pub const VICTIM_MEMORY: u32 = 2;
/// The `out_of_memory` call was seen: the `limit_*`, `total_pages`, `incident_ns` and
/// `constraint` fields are the kernel's.
pub const OOM_CONTROL: u32 = 1;

/// Indexes of `victim_rss_pages`, the kernel's `MM_FILEPAGES`, `MM_ANONPAGES`, `MM_SWAPENTS`
/// and `MM_SHMEMPAGES` (the same numbers since 4.5).
pub const RSS_FILE: usize = 0;
pub const RSS_ANON: usize = 1;
pub const RSS_SWAP: usize = 2;
pub const RSS_SHMEM: usize = 3;

/// What the `signal_generate` probe remembers of a SIGKILL's target, keyed by its pid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KilledTask {
    /// Cgroup v2 id of the target task.
    pub cgroup_id: u64,
    /// Thread group id of the target.
    pub tgid: u32,
    /// `VICTIM_*` flags for what could be read.
    pub flags: u32,
    /// The target's `comm`.
    pub comm: [u8; COMM_LEN],
    /// As [`OomKillEvent::victim_rss_pages`].
    pub rss_pages: [u64; 4],
    /// `mm->total_vm` in pages.
    pub total_vm_pages: u64,
    /// `signal->oom_score_adj`.
    pub oom_score_adj: i32,
    /// Reserved, zero.
    pub reserved: u32,
}
const _: () = assert!(size_of::<KilledTask>() == 80);

/// An `out_of_memory` call in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomEntry {
    /// Its `struct oom_control *`.
    pub oc: u64,
    /// When it began (`CLOCK_MONOTONIC`).
    pub entered_ns: u64,
}
const _: () = assert!(size_of::<OomEntry>() == 16);

/// Bytes of a Go fatal error's message captured ("concurrent map writes" is 21).
pub const GO_MESSAGE_LEN: usize = 128;

/// A Go program called `runtime.fatal` or `runtime.throw`: it is about to die.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct GoFatalEvent {
    /// Kind [`EventKind::GoFatal`]; the task is the goroutine's thread.
    pub header: EventHeader,
    /// [`GO_FATAL`] or [`GO_THROW`]: which function was entered.
    pub function: u32,
    /// Bytes of `message` that hold the message (it is a Go string: not NUL-terminated).
    pub len: u32,
    pub message: [u8; GO_MESSAGE_LEN],
}
const _: () = assert!(size_of::<GoFatalEvent>() == 48 + 8 + GO_MESSAGE_LEN);

/// `runtime.fatal` (Go 1.19+: map races, deadlocks, "unlock of unlocked mutex").
pub const GO_FATAL: u32 = 1;
/// `runtime.throw` (the runtime's other fatal errors; map races before 1.19).
pub const GO_THROW: u32 = 2;

/// Buckets of the futex wait histograms: bucket i counts waits of [2^i, 2^(i+1)) ns.
pub const FUTEX_BUCKETS: usize = 64;

/// Indexes of [`FutexProcess::outcomes`]: how waits ended.
pub const OUTCOME_WOKEN: usize = 0;
pub const OUTCOME_TIMEOUT: usize = 1;
/// `EAGAIN`: the word had changed, the thread never slept.
pub const OUTCOME_EAGAIN: usize = 2;
pub const OUTCOME_INTERRUPTED: usize = 3;
pub const OUTCOME_ERROR: usize = 4;
pub const OUTCOMES: usize = 5;

/// A process's futex waits so far (updated by atomic adds from every CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FutexProcess {
    /// Woken waits by log2 of the time waited in ns.
    pub buckets: [u64; FUTEX_BUCKETS],
    /// Waits by `OUTCOME_*`.
    pub outcomes: [u64; OUTCOMES],
    /// Total ns of the woken waits.
    pub woken_ns: u64,
    /// Cgroup v2 id of the thread that waited first.
    pub cgroup_id: u64,
    /// Its comm.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<FutexProcess>() == 8 * (FUTEX_BUCKETS + OUTCOMES + 2) + COMM_LEN);

/// A futex word of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FutexLockKey {
    pub tgid: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The futex word's user address (a `pthread_mutex_t`, a Go runtime note...).
    pub uaddr: u64,
}
const _: () = assert!(size_of::<FutexLockKey>() == 16);

/// Woken waits on one futex word.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FutexLock {
    pub waits: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// `FUTEX_STACKS` id of the user stack of the longest wait at or above the threshold;
    /// negative when none.
    pub stack_id: i64,
}
const _: () = assert!(size_of::<FutexLock>() == 32);

/// A wait in progress, in slot `tid % FUTEX_WAIT_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FutexWait {
    /// `pid_tgid` of the waiting thread (0: the slot is free).
    pub pid_tgid: u64,
    pub start_ns: u64,
    pub uaddr: u64,
}
const _: () = assert!(size_of::<FutexWait>() == 24);

/// Slots of the waits in progress: an array indexed by thread id, because an array lookup is
/// inlined by the verifier where a hash map costs helper calls on every futex call. Two
/// threads share a slot only when their ids are equal modulo this and both wait at once: the
/// second's wait replaces the first's, whose exit then finds another thread's slot and is not
/// counted.
pub const FUTEX_WAIT_SLOTS: u32 = 1 << 16;

/// Set in a [`SampleKey::stack_id`] counted in odd read windows. Userspace flips the window
/// (map `WINDOW`), then reads and removes the previous window's counts, which no program
/// adds to any more: nothing counted is lost to the read. Stack ids are below 2^31.
pub const WINDOW_BIT: u32 = 1 << 31;

/// A process's samples with one user stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub tgid: u32,
    /// The stack map's id of the stack, with [`WINDOW_BIT`] for odd windows.
    pub stack_id: u32,
}
const _: () = assert!(size_of::<SampleKey>() == 8);

/// A thread asleep since `start_ns`, switched out with user stack `stack_id` (`OFFCPU_SLOTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffCpuSlot {
    /// The thread's `task_struct` address; 0 when the slot is free.
    pub task: u64,
    pub tgid: u32,
    pub reserved: u32,
    pub start_ns: u64,
    /// `OFFCPU_STACKS` id, or negative when the stack could not be taken.
    pub stack_id: i64,
}
const _: () = assert!(size_of::<OffCpuSlot>() == 32);

/// Off-CPU time of one (process, stack at the switch-out): see `OFFCPU`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OffCpu {
    /// Nanoseconds asleep, summed over the sleeps.
    pub ns: u64,
    pub sleeps: u64,
}
const _: () = assert!(size_of::<OffCpu>() == 16);

/// How the futex programs run, set by the loader.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FutexConfig {
    /// Nonzero: every process; zero: those in `FUTEX_SELECTED`.
    pub select_all: u32,
    /// The agent's own process, never measured (its threads idle in futex waits by design).
    pub agent_tgid: u32,
    /// Waits at least this long record their user stack.
    pub stack_threshold_ns: u64,
}
const _: () = assert!(size_of::<FutexConfig>() == 16);

impl FutexConfig {
    pub const DEFAULT: Self = Self {
        select_all: 1,
        agent_tgid: 0,
        stack_threshold_ns: 1_000_000,
    };
}

/// Byte offsets of the kernel struct fields the programs read, taken from the running kernel's BTF.
///
/// Rust eBPF has no CO-RE relocations, so the loader fills this in before loading. A field the
/// kernel lacks is [`OFFSET_UNKNOWN`]; the programs then skip the reads that need it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.pid`.
    pub task_pid: u32,
    /// `task_struct.tgid`.
    pub task_tgid: u32,
    /// `task_struct.comm`.
    pub task_comm: u32,
    /// `task_struct.cgroups` (a `struct css_set *`).
    pub task_cgroups: u32,
    /// `css_set.dfl_cgrp` (the task's cgroup on the v2 hierarchy).
    pub css_set_dfl_cgrp: u32,
    /// `cgroup.kn` (the cgroup's kernfs directory).
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (cgroup id = inode number).
    pub kernfs_node_id: u32,
    /// `kernfs_node.parent`, named `__parent` since 6.15.
    pub kernfs_node_parent: u32,
    /// `kernfs_open_file.kn` (the file being written).
    pub kernfs_open_file_kn: u32,
    /// `kernfs_node.name` (a `const char *`).
    pub kernfs_node_name: u32,
    /// `task_struct.files`.
    pub task_files: u32,
    /// `files_struct.fdt`.
    pub files_struct_fdt: u32,
    /// `fdtable.max_fds`.
    pub fdtable_max_fds: u32,
    /// `fdtable.fd` (the `struct file *` array).
    pub fdtable_fd: u32,
    /// `file.f_inode`.
    pub file_f_inode: u32,
    /// `inode.i_sb`.
    pub inode_i_sb: u32,
    /// `super_block.s_magic`.
    pub super_block_s_magic: u32,
    /// `inode.i_private` (kernfs keeps the file's `kernfs_node` there).
    pub inode_i_private: u32,
    /// `files_struct.fdtab`, the fd table a process starts with (`fdt` points at it until the
    /// process has more than 64 fds open).
    pub files_struct_fdtab: u32,
    /// `files_struct.fd_array`, that first table's `struct file *` slots.
    pub files_struct_fd_array: u32,
    /// `task_struct.mm`.
    pub task_mm: u32,
    /// `task_struct.signal`.
    pub task_signal: u32,
    /// `signal_struct.oom_score_adj` (a `short`).
    pub signal_oom_score_adj: u32,
    /// `mm_struct.total_vm`.
    pub mm_total_vm: u32,
    /// The first RSS counter's value in `mm_struct` (`rss_stat.count[0]` before 6.2,
    /// `rss_stat[0].count` since): a signed 64-bit page count.
    pub mm_rss_counters: u32,
    /// Bytes from one RSS counter to the next (8, or `sizeof(struct percpu_counter)`).
    pub mm_rss_stride: u32,
    /// `oom_control.memcg` (NULL for a global OOM).
    pub oom_control_memcg: u32,
    /// `oom_control.constraint`.
    pub oom_control_constraint: u32,
    /// `oom_control.totalpages`.
    pub oom_control_totalpages: u32,
    /// `mem_cgroup.css.cgroup`: the memory cgroup's `struct cgroup *`.
    pub mem_cgroup_css_cgroup: u32,
    /// `mem_cgroup.memory.usage` (pages, an `atomic_long_t`).
    pub mem_cgroup_usage: u32,
    /// `mem_cgroup.memory.max` (pages).
    pub mem_cgroup_max: u32,
    /// `linux_binprm.file` (the executable being exec'd).
    pub linux_binprm_file: u32,
    /// `inode.i_ino`.
    pub inode_i_ino: u32,
    /// `super_block.s_dev`.
    pub super_block_s_dev: u32,
    /// `mm_struct.exe_file` (the executable a process runs).
    pub mm_exe_file: u32,
    /// `task_struct.real_parent`.
    pub task_real_parent: u32,
    /// `file.f_mode` (`FMODE_WRITE`: opened for writing).
    pub file_f_mode: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 152);

/// Marks a field the running kernel does not have.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

impl KernelOffsets {
    /// Every field unknown: what the programs see when the loader found no BTF.
    pub const UNKNOWN: Self = Self {
        task_pid: OFFSET_UNKNOWN,
        task_tgid: OFFSET_UNKNOWN,
        task_comm: OFFSET_UNKNOWN,
        task_cgroups: OFFSET_UNKNOWN,
        css_set_dfl_cgrp: OFFSET_UNKNOWN,
        cgroup_kn: OFFSET_UNKNOWN,
        kernfs_node_id: OFFSET_UNKNOWN,
        kernfs_node_parent: OFFSET_UNKNOWN,
        kernfs_open_file_kn: OFFSET_UNKNOWN,
        kernfs_node_name: OFFSET_UNKNOWN,
        task_files: OFFSET_UNKNOWN,
        files_struct_fdt: OFFSET_UNKNOWN,
        fdtable_max_fds: OFFSET_UNKNOWN,
        fdtable_fd: OFFSET_UNKNOWN,
        file_f_inode: OFFSET_UNKNOWN,
        inode_i_sb: OFFSET_UNKNOWN,
        super_block_s_magic: OFFSET_UNKNOWN,
        inode_i_private: OFFSET_UNKNOWN,
        files_struct_fdtab: OFFSET_UNKNOWN,
        files_struct_fd_array: OFFSET_UNKNOWN,
        task_mm: OFFSET_UNKNOWN,
        task_signal: OFFSET_UNKNOWN,
        signal_oom_score_adj: OFFSET_UNKNOWN,
        mm_total_vm: OFFSET_UNKNOWN,
        mm_rss_counters: OFFSET_UNKNOWN,
        mm_rss_stride: OFFSET_UNKNOWN,
        oom_control_memcg: OFFSET_UNKNOWN,
        oom_control_constraint: OFFSET_UNKNOWN,
        oom_control_totalpages: OFFSET_UNKNOWN,
        mem_cgroup_css_cgroup: OFFSET_UNKNOWN,
        mem_cgroup_usage: OFFSET_UNKNOWN,
        mem_cgroup_max: OFFSET_UNKNOWN,
        linux_binprm_file: OFFSET_UNKNOWN,
        inode_i_ino: OFFSET_UNKNOWN,
        super_block_s_dev: OFFSET_UNKNOWN,
        mm_exe_file: OFFSET_UNKNOWN,
        task_real_parent: OFFSET_UNKNOWN,
        file_f_mode: OFFSET_UNKNOWN,
    };

    /// Whether a task's cgroup id can be read (`task->cgroups->dfl_cgrp->kn->id`).
    #[must_use]
    pub const fn has_task_cgroup(&self) -> bool {
        self.task_cgroups != OFFSET_UNKNOWN
            && self.css_set_dfl_cgrp != OFFSET_UNKNOWN
            && self.cgroup_kn != OFFSET_UNKNOWN
            && self.kernfs_node_id != OFFSET_UNKNOWN
    }

    /// Whether a syscall's fd can be followed to its kernfs node on a cgroup2 superblock
    /// (`current->files->fdt->fd[fd]->f_inode->{i_sb->s_magic, i_private}`).
    #[must_use]
    pub const fn has_fd_to_kernfs(&self) -> bool {
        self.task_files != OFFSET_UNKNOWN
            && self.files_struct_fdt != OFFSET_UNKNOWN
            && self.fdtable_max_fds != OFFSET_UNKNOWN
            && self.fdtable_fd != OFFSET_UNKNOWN
            && self.file_f_inode != OFFSET_UNKNOWN
            && self.inode_i_sb != OFFSET_UNKNOWN
            && self.super_block_s_magic != OFFSET_UNKNOWN
            && self.inode_i_private != OFFSET_UNKNOWN
    }

    /// Whether an `out_of_memory` call's limit can be read (`oc->memcg->css.cgroup->kn->id`,
    /// `oc->constraint`).
    #[must_use]
    pub const fn has_oom_control(&self) -> bool {
        self.oom_control_memcg != OFFSET_UNKNOWN
            && self.oom_control_constraint != OFFSET_UNKNOWN
            && self.mem_cgroup_css_cgroup != OFFSET_UNKNOWN
            && self.cgroup_kn != OFFSET_UNKNOWN
            && self.kernfs_node_id != OFFSET_UNKNOWN
    }

    /// Whether an exec's executable can be told apart (`bprm->file->f_inode->{i_ino,
    /// i_sb->s_dev}`), for reporting each executable once.
    #[must_use]
    pub const fn has_exec_file(&self) -> bool {
        self.linux_binprm_file != OFFSET_UNKNOWN
            && self.file_f_inode != OFFSET_UNKNOWN
            && self.inode_i_ino != OFFSET_UNKNOWN
            && self.inode_i_sb != OFFSET_UNKNOWN
            && self.super_block_s_dev != OFFSET_UNKNOWN
    }

    /// Whether a writer's executable and its parent's can be read (`task->mm->exe_file`,
    /// `task->real_parent`), to tell trusted writers by executable.
    #[must_use]
    pub const fn has_writer_identity(&self) -> bool {
        self.task_mm != OFFSET_UNKNOWN
            && self.mm_exe_file != OFFSET_UNKNOWN
            && self.task_real_parent != OFFSET_UNKNOWN
            && self.task_tgid != OFFSET_UNKNOWN
            && self.file_f_inode != OFFSET_UNKNOWN
            && self.inode_i_ino != OFFSET_UNKNOWN
            && self.inode_i_sb != OFFSET_UNKNOWN
            && self.super_block_s_dev != OFFSET_UNKNOWN
    }

    /// Whether a written file's name and cgroup id can be read (`of->kn->name`,
    /// `of->kn->parent->id`): without them a write cannot be attributed at all.
    #[must_use]
    pub const fn has_written_file(&self) -> bool {
        self.kernfs_open_file_kn != OFFSET_UNKNOWN
            && self.kernfs_node_parent != OFFSET_UNKNOWN
            && self.kernfs_node_id != OFFSET_UNKNOWN
            && self.kernfs_node_name != OFFSET_UNKNOWN
    }

    /// Whether the guard can tell an open of a cgroup2 file for writing, its inode, and the
    /// opener (`file->{f_mode, f_inode->{i_ino, i_sb->s_magic}}`, and the writer identity).
    #[must_use]
    pub const fn has_guard(&self) -> bool {
        self.file_f_mode != OFFSET_UNKNOWN
            && self.super_block_s_magic != OFFSET_UNKNOWN
            && self.has_writer_identity()
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and byte arrays, with
    // no padding (checked by the size assertions above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::KilledTask {}
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::LimitWriteEvent {}
    unsafe impl aya::Pod for super::CgroupEvent {}
    unsafe impl aya::Pod for super::LimitWriteArgs {}
    unsafe impl aya::Pod for super::PendingWrite {}
    unsafe impl aya::Pod for super::OomKillEvent {}
    unsafe impl aya::Pod for super::OomEntry {}
    unsafe impl aya::Pod for super::GoFatalEvent {}
    unsafe impl aya::Pod for super::SampleKey {}
    unsafe impl aya::Pod for super::OffCpu {}
    unsafe impl aya::Pod for super::FutexProcess {}
    unsafe impl aya::Pod for super::FutexLockKey {}
    unsafe impl aya::Pod for super::FutexLock {}
    unsafe impl aya::Pod for super::FutexWait {}
    unsafe impl aya::Pod for super::FutexConfig {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::ExecKey {}
    unsafe impl aya::Pod for super::LossCounts {}
    unsafe impl aya::Pod for super::GuardEntry {}
    unsafe impl aya::Pod for super::GuardTrust {}
    unsafe impl aya::Pod for super::GuardEvent {}
}
