//! The kernel's run statistics of the agent's own eBPF programs: turned on at start-up
//! (`BPF_ENABLE_STATS`) and read per program at scrape time (`BPF_OBJ_GET_INFO_BY_FD`), so the
//! agent reports what its probes cost the node.

use std::{collections::HashSet, io, os::fd::OwnedFd, sync::PoisonError, time::Duration};

use aya::{
    programs::{ProgramInfo, loaded_links},
    sys::{Stats, enable_stats},
};

use super::go::SharedEbpf;
use crate::{
    config::BpfStats,
    model::probe::{ProbeMode, ProbeStatus},
};

/// The kernel's switch for counting without an fd (`sysctl kernel.bpf_stats_enabled`).
const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// One program's counters as the kernel kept them when read.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramRuns {
    /// The program's name in the object (its function's name).
    pub program: String,
    pub runs: u64,
    pub run_time: Duration,
}

/// What the metrics read at scrape time: a trait, so that they are tested without a kernel.
pub trait RunStats: Send + Sync + std::fmt::Debug {
    /// Whether the kernel counts runs now.
    fn enabled(&self) -> bool;
    /// The counters of each of the agent's programs that is loaded and attached.
    fn programs(&self) -> Vec<ProgramRuns>;
}

/// Why the kernel would not count.
#[derive(Debug, thiserror::Error)]
pub enum EnableError {
    #[error("the kernel does not know BPF_ENABLE_STATS (added in 5.8): {0}")]
    Unsupported(io::Error),
    #[error("not permitted (BPF_ENABLE_STATS needs CAP_SYS_ADMIN): {0}")]
    NotPermitted(io::Error),
    #[error("BPF_ENABLE_STATS: {0}")]
    Other(io::Error),
}

impl From<io::Error> for EnableError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EINVAL) => Self::Unsupported(e),
            Some(libc::EPERM | libc::EACCES) => Self::NotPermitted(e),
            _ => Self::Other(e),
        }
    }
}

/// Has the kernel count every program's runs and run time while the returned fd is open.
pub fn enable() -> Result<OwnedFd, EnableError> {
    enable_stats(Stats::RunTime).map_err(|e| e.io_error.into())
}

/// Turns the statistics on as `choice` says, given the probes' `status`, and says in one log
/// line whether the kernel counts. The fd returned is to be held for the agent's lifetime.
#[must_use]
pub fn start(choice: BpfStats, status: &[ProbeStatus]) -> Option<OwnedFd> {
    let counting = if sysctl_on() {
        "counted anyway: kernel.bpf_stats_enabled is 1"
    } else {
        "not counted: nodewarden_bpf_stats_enabled is 0"
    };
    let on_syscalls = status.iter().any(|s| s.mode == ProbeMode::Syscalls);
    match choice {
        BpfStats::Off => {
            tracing::info!("eBPF program run statistics off (metrics.bpf_stats): {counting}");
            return None;
        }
        BpfStats::Auto if on_syscalls => {
            tracing::info!(
                "eBPF program run statistics off: programs on syscall tracepoints run at every such syscall of the node, and counting adds two clock reads to each run (metrics.bpf_stats = \"on\" turns them on): {counting}"
            );
            return None;
        }
        BpfStats::Auto | BpfStats::On => {}
    }
    match enable() {
        Ok(fd) => {
            tracing::info!(
                "eBPF program run statistics on: every run of every eBPF program on the node takes two clock reads more while the agent runs"
            );
            Some(fd)
        }
        Err(e) => {
            tracing::warn!("eBPF program run statistics unavailable: {e}; {counting}");
            None
        }
    }
}

fn sysctl_on() -> bool {
    std::fs::read_to_string(SYSCTL).is_ok_and(|s| s.trim() == "1")
}

/// The run statistics of the programs of the agent's loaded object.
#[derive(Debug)]
pub struct KernelRunStats {
    ebpf: SharedEbpf,
    /// The kernel counts while this is open.
    held: Option<OwnedFd>,
}

impl KernelRunStats {
    /// Reads the programs of `ebpf`; keeps `enabled` (from [`start`]) open as long as it lives.
    #[must_use]
    pub fn new(ebpf: SharedEbpf, enabled: Option<OwnedFd>) -> Self {
        Self {
            ebpf,
            held: enabled,
        }
    }
}

impl RunStats for KernelRunStats {
    fn enabled(&self) -> bool {
        self.held.is_some() || sysctl_on()
    }

    fn programs(&self) -> Vec<ProgramRuns> {
        // The lock is held for one info call per program (the Go watcher holds it while it
        // attaches uprobes, for milliseconds).
        let loaded: Vec<(String, ProgramInfo)> = {
            let guard = self.ebpf.lock().unwrap_or_else(PoisonError::into_inner);
            // Taken at shutdown: the programs are being unloaded.
            let Some(ebpf) = guard.as_ref() else {
                return Vec::new();
            };
            // A program not loaded has no info (`NotLoaded`), and no series.
            ebpf.programs()
                .filter_map(|(name, p)| Some((name.to_owned(), p.info().ok()?)))
                .collect()
        };
        let linked = linked_programs();
        loaded
            .into_iter()
            .filter(|(_, info)| linked.as_ref().is_none_or(|ids| ids.contains(&info.id())))
            .map(|(program, info)| ProgramRuns {
                program,
                runs: info.run_count(),
                run_time: info.run_time(),
            })
            .collect()
    }
}

/// The ids of the programs BPF links hold: the attached ones. `None` where links do not show
/// every attachment (before 5.15 tracepoints, kprobes, uprobes and perf events attach without
/// one) or cannot be listed: then every loaded program counts as attached. Every link on the
/// node is read, a few syscalls each, at every scrape.
fn linked_programs() -> Option<HashSet<u32>> {
    if !aya::features().bpf_perf_link() {
        return None;
    }
    let (mut ids, mut failed) = (HashSet::new(), false);
    for link in loaded_links() {
        match link {
            Ok(link) => {
                ids.insert(link.program_id());
            }
            // A link gone since it was listed; or, alone, the listing refused (no
            // CAP_SYS_ADMIN).
            Err(_) => failed = true,
        }
    }
    if ids.is_empty() && failed {
        None
    } else {
        Some(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_apart_by_errno() {
        let of = |errno| EnableError::from(io::Error::from_raw_os_error(errno));
        assert!(matches!(of(libc::EINVAL), EnableError::Unsupported(_)));
        assert!(matches!(of(libc::EPERM), EnableError::NotPermitted(_)));
        assert!(matches!(of(libc::ENOMEM), EnableError::Other(_)));
    }
}
