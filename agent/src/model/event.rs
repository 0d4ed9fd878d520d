//! Kernel events as typed values, decoded from the ring buffers (see `kernel::decode`).

use agent_common::{ExecKey, LimitFile};

/// The task that was running when a probe fired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub tgid: u32,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

/// A writer's executable and parentage, taken in the kernel at the write: what trust is
/// decided by (a comm is whatever the process chose).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The writer's executable file; `None` when the kernel could not read it.
    pub exe: Option<ExecKey>,
    /// Its parent's tgid (0 when unknown).
    pub parent_tgid: u32,
    pub parent_exe: Option<ExecKey>,
}

/// A write to a cgroup limit file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitWrite {
    pub timestamp_ns: u64,
    pub writer: Task,
    pub identity: Identity,
    pub target_cgroup_id: u64,
    pub limit: LimitFile,
    /// The value as the kernel parsed it (surrounding whitespace stripped).
    pub value: String,
    /// Bytes consumed, or the errno the kernel returned.
    pub result: Result<u64, i32>,
}

/// The OOM killer chose a victim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OomKill {
    pub timestamp_ns: u64,
    /// The task whose allocation triggered the kill.
    pub trigger: Task,
    pub victim_pid: u32,
    /// Known when the kernel probe read the victim's task; else userspace must find them.
    pub victim: Option<VictimTask>,
    /// The victim's memory when it was killed, when its task could be read.
    pub memory: Option<VictimMemory>,
    /// The limit hit, when the `out_of_memory` call was seen; else userspace derives it.
    pub control: Option<OomControl>,
}

/// What the kernel probe read from the victim's task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VictimTask {
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

/// The victim's memory, in pages, and its `oom_score_adj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VictimMemory {
    pub anon_rss_pages: u64,
    pub file_rss_pages: u64,
    pub shmem_rss_pages: u64,
    pub swap_pages: u64,
    pub total_vm_pages: u64,
    pub oom_score_adj: i32,
}

/// What the kernel's `struct oom_control` said about the limit that was hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OomControl {
    /// The memory cgroup whose limit was hit; `None` for a global OOM.
    pub limit_cgroup_id: Option<u64>,
    pub usage_pages: u64,
    pub max_pages: u64,
    pub total_pages: u64,
    /// When the `out_of_memory` call began: the same for all victims of one limit hit.
    pub incident_ns: u64,
    pub constraint: Constraint,
}

/// `enum oom_constraint`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Constraint {
    None,
    Cpuset,
    MemoryPolicy,
    Memcg,
    /// A number this agent does not know (a newer kernel): kept, not dropped.
    Other(u32),
}

impl Constraint {
    #[must_use]
    pub fn from_kernel(n: u32) -> Self {
        match n {
            0 => Self::None,
            1 => Self::Cpuset,
            2 => Self::MemoryPolicy,
            3 => Self::Memcg,
            n => Self::Other(n),
        }
    }

    /// The name the kernel prints in its `oom-kill:constraint=` line.
    #[must_use]
    pub fn kernel_name(self) -> String {
        match self {
            Self::None => "CONSTRAINT_NONE".to_owned(),
            Self::Cpuset => "CONSTRAINT_CPUSET".to_owned(),
            Self::MemoryPolicy => "CONSTRAINT_MEMORY_POLICY".to_owned(),
            Self::Memcg => "CONSTRAINT_MEMCG".to_owned(),
            Self::Other(n) => format!("CONSTRAINT_{n}"),
        }
    }

    /// The constraint a kernel name stands for (the inverse of [`Self::kernel_name`]).
    #[must_use]
    pub fn from_kernel_name(name: &str) -> Option<Self> {
        Some(match name {
            "CONSTRAINT_NONE" => Self::None,
            "CONSTRAINT_CPUSET" => Self::Cpuset,
            "CONSTRAINT_MEMORY_POLICY" => Self::MemoryPolicy,
            "CONSTRAINT_MEMCG" => Self::Memcg,
            other => Self::Other(other.strip_prefix("CONSTRAINT_")?.parse().ok()?),
        })
    }
}

/// A cgroup was created or removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupChange {
    pub timestamp_ns: u64,
    pub id: u64,
    /// Path relative to the hierarchy's root, with a leading `/`.
    pub path: String,
    pub created: bool,
    /// The kernel program kept only the path's first bytes: the whole path is to be asked for.
    pub truncated: bool,
}

/// Which Go runtime function reported a fatal error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoFunction {
    /// `runtime.fatal` (Go 1.19+: map races, deadlocks...).
    Fatal,
    /// `runtime.throw` (the runtime's other fatal errors; map races before 1.19).
    Throw,
}

impl GoFunction {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Fatal => "runtime.fatal",
            Self::Throw => "runtime.throw",
        }
    }
}

/// A Go program entered its fatal error path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoFatal {
    pub timestamp_ns: u64,
    /// The thread that called it.
    pub task: Task,
    pub function: GoFunction,
    /// The message ("concurrent map writes"), lossily decoded.
    pub message: String,
}

/// A process exec'd a program the kernel had not reported yet (execs are de-duplicated in the
/// kernel by executable file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exec {
    pub tgid: u32,
    /// The executable file, as the kernel keys it.
    pub key: ExecKey,
}

/// The guard refused an untrusted open of a protected limit file for writing, or (dry-run)
/// would have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardDenial {
    pub timestamp_ns: u64,
    /// The opener.
    pub task: Task,
    pub identity: Identity,
    pub target_cgroup_id: u64,
    pub limit: LimitFile,
    /// The file's inode number.
    pub file_ino: u64,
    /// The open failed with `EPERM` (enforce); else it went through (dry-run).
    pub enforced: bool,
}

/// A record from the critical ring (`EVENTS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    LimitWrite(LimitWrite),
    OomKill(OomKill),
    Cgroup(CgroupChange),
    GoFatal(GoFatal),
    GuardDenial(GuardDenial),
}

/// A limit file's content after it was modified, seen without BPF (inotify on its directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Cgroup id (the directory's inode number).
    pub id: u64,
    /// Path relative to the hierarchy root.
    pub path: String,
    pub limit: LimitFile,
    /// The file's content after the write, trimmed.
    pub value: String,
}
