//! What `/proc` says about processes and the node, through the `procfs` crate. Every read can
//! fail (the process is gone, procfs is not mounted): the answer is then `None`.

use procfs::{Current as _, process::Process};

use super::Procs;

/// The live `/proc`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcFs;

fn process(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

impl Procs for ProcFs {
    fn exe_key(&self, pid: u32) -> Option<agent_common::ExecKey> {
        // The link followed: the file itself, whatever mount namespace named it.
        std::fs::metadata(format!("/proc/{pid}/exe"))
            .ok()
            .map(|m| super::trust::key_of_metadata(&m))
    }

    fn exe(&self, pid: u32) -> Option<String> {
        // One readlink: this runs for every limit write, on the event loop.
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string())
    }

    fn comm(&self, pid: u32) -> Option<String> {
        comm(pid)
    }

    fn cgroup(&self, pid: u32) -> Option<String> {
        cgroup_of(pid)
    }

    fn node_memory(&self) -> (Option<u64>, Option<u64>) {
        let Ok(m) = procfs::Meminfo::current() else {
            return (None, None);
        };
        let used = m.mem_available.map(|a| m.mem_total.saturating_sub(a));
        (used, Some(m.mem_total.saturating_add(m.swap_total)))
    }
}

/// A live process's comm.
#[must_use]
pub fn comm(pid: u32) -> Option<String> {
    process(pid)?.stat().ok().map(|s| s.comm)
}

/// The cgroup v2 path of a live process (`0::/path` in `/proc/<pid>/cgroup`).
#[must_use]
pub fn cgroup_of(pid: u32) -> Option<String> {
    process(pid)?
        .cgroups()
        .ok()?
        .0
        .into_iter()
        .find(|c| c.hierarchy == 0)
        .map(|c| c.pathname)
}

/// A process's user and system CPU seconds so far; `None` once it has exited.
#[must_use]
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(stat_cpu_seconds(&process(pid)?.stat().ok()?))
}

/// The user and system CPU seconds in a process's `stat`.
#[must_use]
pub fn stat_cpu_seconds(stat: &procfs::process::Stat) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "CPU seconds")]
    let seconds =
        stat.utime.saturating_add(stat.stime) as f64 / procfs::ticks_per_second().max(1) as f64;
    seconds
}

/// Whether process `pid` exists.
#[must_use]
pub fn alive(pid: u32) -> bool {
    process(pid).is_some()
}

/// Every process's id.
#[must_use]
pub fn pids() -> Vec<u32> {
    procfs::process::all_processes()
        .map(|all| {
            all.filter_map(Result::ok)
                .filter_map(|p| u32::try_from(p.pid()).ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some_and(|s| s >= 0.0));
        assert_eq!(cpu_seconds(u32::MAX), None);
        assert!(alive(me));
        assert!(pids().contains(&me));
        let exe = std::env::current_exe().expect("exe").display().to_string();
        assert_eq!(ProcFs.exe(me), Some(exe));
        let (used, total) = ProcFs.node_memory();
        assert!(
            used.zip(total).is_some_and(|(u, t)| u <= t),
            "{used:?} {total:?}"
        );
    }
}
