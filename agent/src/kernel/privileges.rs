//! The capabilities the agent holds against those it uses (docs/operations.md, "Privileges"):
//! `nodewarden check` reports them, so that an operator who limits the agent sees what each
//! missing one costs before running it.

/// A capability the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Bpf,
    Perfmon,
    SysPtrace,
    DacReadSearch,
    SysResource,
    SysAdmin,
}

impl Cap {
    pub const ALL: [Self; 6] = [
        Self::Bpf,
        Self::Perfmon,
        Self::SysPtrace,
        Self::DacReadSearch,
        Self::SysResource,
        Self::SysAdmin,
    ];

    /// Linux's number for it (`include/uapi/linux/capability.h`).
    pub const fn number(self) -> u32 {
        match self {
            Self::DacReadSearch => 2,
            Self::SysPtrace => 19,
            Self::SysAdmin => 21,
            Self::SysResource => 24,
            Self::Perfmon => 38,
            Self::Bpf => 39,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Bpf => "CAP_BPF",
            Self::Perfmon => "CAP_PERFMON",
            Self::SysPtrace => "CAP_SYS_PTRACE",
            Self::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Self::SysResource => "CAP_SYS_RESOURCE",
            Self::SysAdmin => "CAP_SYS_ADMIN",
        }
    }

    /// What the agent goes without when it lacks this one.
    const fn without(self) -> &'static str {
        match self {
            Self::Bpf => "no eBPF program or map is created, unless CAP_SYS_ADMIN is held",
            Self::Perfmon => "no tracing program loads or attaches, unless CAP_SYS_ADMIN is held",
            Self::SysPtrace => {
                "executables of writers and Go programs that hold capabilities the agent lacks go unnamed"
            }
            Self::DacReadSearch => {
                "cgroup ids are resolved by a scan of the hierarchy, and mode enforce refuses to start"
            }
            Self::SysResource => {
                "kernels before 5.11 may refuse the maps (they charge them to the locked-memory limit)"
            }
            Self::SysAdmin => {
                "no BPF run statistics, no mounting of tracefs or securityfs where they are missing"
            }
        }
    }

    /// Whether the agent uses it after start. `CAP_SYS_RESOURCE` has one use, raising the
    /// locked-memory limit, which [`restrict`] makes before it drops the capability: kernels
    /// before 5.11 charge maps to the limit itself, not to the capability.
    pub const fn used_after_start(self) -> bool {
        !matches!(self, Self::SysResource)
    }

    const fn bit(self) -> u64 {
        1 << self.number()
    }
}

/// The agent's own credentials, as /proc/self/status has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// `CapEff`: the effective capability mask.
    pub effective: u64,
    pub no_new_privs: bool,
}

/// Reads the agent's credentials.
pub fn held() -> procfs::ProcResult<Held> {
    let status = procfs::process::Process::myself()?.status()?;
    Ok(Held {
        effective: status.capeff,
        no_new_privs: status.nonewprivs == Some(1),
    })
}

/// What [`restrict`] left the agent.
#[derive(Debug)]
pub struct Restricted {
    /// Capabilities dropped from the permitted set: `CAP_SYS_RESOURCE` where it was held, and
    /// every one the agent never uses.
    pub dropped: u32,
    /// Whether the bounding set was cut too (it needs `CAP_SETPCAP`, which root has).
    pub bounding: bool,
    /// Why the locked-memory limit could not be raised, if it could not.
    pub memlock: Option<nix::errno::Errno>,
}

/// Raises the locked-memory limit to infinity, then drops every capability the agent does not
/// use from here on ([`Cap::used_after_start`]: all but `CAP_SYS_RESOURCE` of [`Cap::ALL`], where
/// held) from its effective, permitted, inheritable and ambient sets, and from the bounding set
/// where it may, and sets `no_new_privs`. Called before the agent starts any thread:
/// capabilities and `no_new_privs` belong to each thread, and new threads inherit the
/// creator's (the limit belongs to the process). What it keeps it needs for as long as it runs
/// (docs/operations.md, "Privileges").
pub fn restrict() -> Result<Restricted, caps::errors::CapsError> {
    use caps::{CapSet, Capability};
    let memlock = raise_memlock_limit().err();
    let keep: caps::CapsHashSet = caps::all()
        .into_iter()
        .filter(|c| {
            Cap::ALL
                .iter()
                .any(|k| k.used_after_start() && u32::from(c.index()) == k.number())
        })
        .collect();
    let bounding = caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)?;
    if bounding {
        for cap in caps::read(None, CapSet::Bounding)?.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: caps::CapsHashSet = permitted.intersection(&keep).copied().collect();
    // The effective set first: it may never exceed the permitted one.
    let effective = caps::read(None, CapSet::Effective)?;
    caps::set(
        None,
        CapSet::Effective,
        &effective.intersection(&keep).copied().collect(),
    )?;
    caps::set(None, CapSet::Permitted, &kept)?;
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| caps::errors::CapsError::from(format!("PR_SET_NO_NEW_PRIVS: {e}")))?;
    Ok(Restricted {
        dropped: u32::try_from(permitted.len() - kept.len()).unwrap_or(u32::MAX),
        bounding,
        memlock,
    })
}

/// Kernels before 5.11 charge BPF maps and programs to `RLIMIT_MEMLOCK`; later ones ignore it.
/// Raising the hard limit takes `CAP_SYS_RESOURCE`; once raised, the limit is the process's
/// and no capability is checked against it again.
pub fn raise_memlock_limit() -> nix::Result<()> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY)
}

/// `kernel.perf_event_paranoid`, if readable.
pub fn perf_event_paranoid() -> Option<i64> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The report's lines: the capabilities held and missing, with what each missing one costs,
/// the others held that the agent does not use, and `no_new_privs`.
pub fn report(held: Held, paranoid: Option<i64>) -> Vec<String> {
    let has = |c: Cap| held.effective & c.bit() != 0;
    let names = |caps: &[Cap]| caps.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ");
    let (present, missing): (Vec<Cap>, Vec<Cap>) = Cap::ALL.iter().partition(|c| has(**c));
    let mut lines = Vec::new();
    if missing.is_empty() {
        lines.push(format!(
            "capabilities: every one the agent uses ({})",
            names(&present)
        ));
    } else {
        lines.push(format!(
            "capabilities: held {}",
            if present.is_empty() {
                "none the agent uses".to_owned()
            } else {
                names(&present)
            }
        ));
    }
    for cap in missing {
        lines.push(format!("  missing {}: {}", cap.name(), cap.without()));
    }
    // Debian's and Ubuntu's kernels allow perf_event_open only to CAP_SYS_ADMIN at 3 and more.
    match paranoid {
        Some(p) if p >= 3 && !has(Cap::SysAdmin) => lines.push(format!(
            "  kernel.perf_event_paranoid is {p}: perf_event_open (CPU samples, oom/mark_victim, kprobes, uprobes) needs CAP_SYS_ADMIN on Debian's and Ubuntu's kernels"
        )),
        Some(p) if p >= 3 => lines.push(format!(
            "  kernel.perf_event_paranoid is {p}: CAP_SYS_ADMIN is what lets perf_event_open through on Debian's and Ubuntu's kernels"
        )),
        Some(p) if has(Cap::SysAdmin) => lines.push(format!(
            "  kernel.perf_event_paranoid is {p}: CAP_PERFMON is enough for perf_event_open, CAP_SYS_ADMIN only adds the BPF run statistics"
        )),
        _ => {}
    }
    let used = Cap::ALL.iter().fold(0, |m, c| m | c.bit());
    let others = (held.effective & !used).count_ones();
    if others > 0 {
        lines.push(format!(
            "  also held, not used by the agent: {others} other capabilities (docs/operations.md lists the six it needs)"
        ));
    }
    lines.push(format!(
        "no_new_privs: {}",
        if held.no_new_privs { "set" } else { "not set" }
    ));
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(caps: &[Cap]) -> u64 {
        caps.iter().fold(0, |m, c| m | c.bit())
    }

    #[test]
    fn root_holds_every_one_and_more() {
        // Root's CapEff on a 6.x kernel: capabilities 0 to 40.
        let lines = report(
            Held {
                effective: (1 << 41) - 1,
                no_new_privs: false,
            },
            Some(2),
        );
        assert!(
            lines[0].starts_with("capabilities: every one the agent uses"),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("35 other capabilities")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("CAP_PERFMON is enough")),
            "{lines:?}"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some("no_new_privs: not set")
        );
    }

    #[test]
    fn the_daemonsets_five_at_paranoid_3_say_what_sys_admin_costs() {
        let five = mask(&[
            Cap::Bpf,
            Cap::Perfmon,
            Cap::SysPtrace,
            Cap::DacReadSearch,
            Cap::SysResource,
        ]);
        let lines = report(
            Held {
                effective: five,
                no_new_privs: true,
            },
            Some(3),
        );
        assert_eq!(
            lines[0],
            "capabilities: held CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_SYS_RESOURCE"
        );
        assert!(lines[1].starts_with("  missing CAP_SYS_ADMIN: no BPF run statistics"));
        assert!(
            lines[2].contains("is 3: perf_event_open") && lines[2].contains("needs CAP_SYS_ADMIN")
        );
        assert!(!lines.iter().any(|l| l.contains("also held")), "{lines:?}");
        assert_eq!(lines.last().map(String::as_str), Some("no_new_privs: set"));
    }

    #[test]
    fn none_held_lists_every_cost() {
        let lines = report(
            Held {
                effective: 0,
                no_new_privs: false,
            },
            None,
        );
        assert_eq!(lines[0], "capabilities: held none the agent uses");
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("  missing ")).count(),
            Cap::ALL.len()
        );
    }
}
