//! What the agent observes (capabilities), how each is attached (modes), and why a mode could
//! not be used: reported by `nodewarden check`, the start-up log and `nodewarden_probe_info`.

use std::fmt;

/// Something the agent observes, each attached (or not) on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    LimitWrites,
    OomKills,
    OomVictims,
    OomLimits,
    CgroupChanges,
    FutexWaits,
    CpuSamples,
    OffCpu,
    GoFatalErrors,
    /// Refusing untrusted opens of protected limit files (BPF LSM).
    Guard,
}

impl Capability {
    /// Every capability, in the order `nodewarden check` lists them.
    pub const ALL: [Self; 10] = [
        Self::FutexWaits,
        Self::CpuSamples,
        Self::OffCpu,
        Self::GoFatalErrors,
        Self::LimitWrites,
        Self::OomLimits,
        Self::OomVictims,
        Self::OomKills,
        Self::CgroupChanges,
        Self::Guard,
    ];

    /// The stable name (a metric label value).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LimitWrites => "limit_writes",
            Self::OomKills => "oom_kills",
            Self::OomVictims => "oom_victims",
            Self::OomLimits => "oom_limits",
            Self::CgroupChanges => "cgroup_changes",
            Self::FutexWaits => "futex_waits",
            Self::CpuSamples => "cpu_samples",
            Self::OffCpu => "off_cpu",
            Self::GoFatalErrors => "go_fatal_errors",
            Self::Guard => "guard",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a capability is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeMode {
    Fexit,
    Fentry,
    Kprobe,
    /// Tracepoints on the write syscalls.
    Syscalls,
    Tracepoint,
    RawTp,
    PerfEvent,
    Uprobe,
    /// A BPF LSM program.
    Lsm,
    /// No BPF: inotify on the cgroup directories, and polling.
    Inotify,
    /// No probe: derived in userspace from `memory.events.local`.
    MemoryEvents,
    Unavailable,
}

impl ProbeMode {
    /// The stable name (a metric label value).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fexit => "fexit",
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
            Self::Syscalls => "syscalls",
            Self::Tracepoint => "tracepoint",
            Self::RawTp => "raw_tp",
            Self::PerfEvent => "perf_event",
            Self::Uprobe => "uprobe",
            Self::Lsm => "lsm",
            Self::Inotify => "inotify",
            Self::MemoryEvents => "memory.events",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Which writes of limit files a mode of the limit writes capability sees, and how: what
/// `nodewarden check` and the start-up log tell the operator.
#[must_use]
pub const fn limit_write_coverage(mode: ProbeMode) -> &'static str {
    match mode {
        ProbeMode::Fexit | ProbeMode::Kprobe => {
            "limit writes: every path (write, pwrite, writev, pwritev, io_uring, sendfile, splice, copy_file_range) with its writer: the kernel's handler of each limit file is hooked"
        }
        ProbeMode::Syscalls => {
            "limit writes: write(2), pwrite64(2) and writev(2) with their writer (the value kept is the file read back); pwritev(2), io_uring, sendfile(2), splice(2) and copy_file_range(2) are seen by inotify, without the writer (seen_by inotify, writer unknown), and a rejected one not at all"
        }
        ProbeMode::Inotify => {
            "limit writes: by inotify only: every successful write, without its writer; rejected writes are not seen"
        }
        _ => "limit writes: not seen",
    }
}

/// What the syscall tracepoints in use cost the whole node, or `None` when no capability uses
/// them: while any is attached, every syscall of every task takes the kernel's slower entry
/// path, whichever syscall the programs are on. `nodewarden check` and the start-up log say so.
#[must_use]
pub fn syscall_tracepoint_cost(status: &[ProbeStatus]) -> Option<String> {
    let users: Vec<&str> = status
        .iter()
        .filter(|s| s.mode == ProbeMode::Syscalls)
        .map(|s| s.capability.as_str())
        .collect();
    if users.is_empty() {
        return None;
    }
    let mut text = format!(
        "syscall tracepoints attached ({}): every syscall of every process on the node takes the kernel's slower entry path while they are (measured: getppid() 38% to 59% slower; docs/benchmarks.md)",
        users.join(", ")
    );
    if users.contains(&Capability::FutexWaits.as_str()) {
        text.push_str(
            "; futex_waits avoids them where the kernel allows fexit, or with contention.futex_waits = false",
        );
    }
    if users.contains(&Capability::LimitWrites.as_str()) {
        text.push_str(
            "; limit_writes also runs a program at every write(2), pwrite64(2) and writev(2) of the node (a one-byte write() measured 4.6 times slower) and avoids them with probes.limit_writes = \"inotify\" (writers then unknown)",
        );
    }
    Some(text)
}

impl fmt::Display for ProbeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a mode could not be used, or could not attach to one of its hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The mode that failed; `None` for a reason that holds for every mode (the capability is
    /// off in the configuration, the kernel's BTF lacks a field...).
    pub mode: Option<ProbeMode>,
    pub message: String,
}

impl Failure {
    #[must_use]
    pub fn of(mode: ProbeMode, message: impl Into<String>) -> Self {
        Self {
            mode: Some(mode),
            message: message.into(),
        }
    }

    #[must_use]
    pub fn general(message: impl Into<String>) -> Self {
        Self {
            mode: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.mode {
            Some(m) => write!(f, "{m}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// One capability and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStatus {
    pub capability: Capability,
    /// How it is attached, or [`ProbeMode::Unavailable`].
    pub mode: ProbeMode,
    /// The kernel hooks it attached to.
    pub hooks: Vec<String>,
    /// Why hooks of the chosen mode (or, when unavailable, of every mode) could not attach.
    pub errors: Vec<Failure>,
    /// Why preferred modes were passed over for the one in use.
    pub fallbacks: Vec<Failure>,
}

impl ProbeStatus {
    /// A capability not attached, for `why`.
    #[must_use]
    pub fn unavailable(capability: Capability, why: Failure) -> Self {
        Self {
            capability,
            mode: ProbeMode::Unavailable,
            hooks: Vec::new(),
            errors: vec![why],
            fallbacks: Vec::new(),
        }
    }

    #[must_use]
    pub fn attached(&self) -> bool {
        self.mode != ProbeMode::Unavailable
    }
}

impl fmt::Display for ProbeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attached() {
            write!(
                f,
                "{:<14} {:<11} attached: {}",
                self.capability.as_str(),
                self.mode.as_str(),
                self.hooks.join(", ")
            )?;
        } else {
            write!(f, "{:<14} UNAVAILABLE", self.capability.as_str())?;
        }
        for e in &self.errors {
            write!(f, "\n{:<17}{e}", "")?;
        }
        for e in &self.fallbacks {
            write!(f, "\n{:<17}(passed over) {e}", "")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(capability: Capability, mode: ProbeMode) -> ProbeStatus {
        ProbeStatus {
            capability,
            mode,
            hooks: vec!["h".to_owned()],
            errors: Vec::new(),
            fallbacks: Vec::new(),
        }
    }

    #[test]
    fn the_cost_of_syscall_tracepoints_is_told_with_the_way_out() {
        let none = [
            status(Capability::FutexWaits, ProbeMode::Fexit),
            status(Capability::LimitWrites, ProbeMode::Fexit),
            status(Capability::OomKills, ProbeMode::Tracepoint),
        ];
        assert_eq!(syscall_tracepoint_cost(&none), None);
        let futex = [
            status(Capability::FutexWaits, ProbeMode::Syscalls),
            status(Capability::LimitWrites, ProbeMode::Fexit),
        ];
        let text = syscall_tracepoint_cost(&futex).expect("futex on syscalls");
        assert!(text.contains("(futex_waits)"), "{text}");
        assert!(text.contains("contention.futex_waits = false"), "{text}");
        assert!(!text.contains("limit_writes"), "{text}");
        let both = [
            status(Capability::FutexWaits, ProbeMode::Syscalls),
            status(Capability::LimitWrites, ProbeMode::Syscalls),
        ];
        let text = syscall_tracepoint_cost(&both).expect("both on syscalls");
        assert!(text.contains("(futex_waits, limit_writes)"), "{text}");
        assert!(text.contains("probes.limit_writes = \"inotify\""), "{text}");
    }
}
