//! Enrichment: what the kernel's ids mean. Each source sits behind a small trait, so the
//! pipeline is tested against fakes without root; the real ones read cgroupfs, `/proc` and
//! kubelet's directories.

pub mod cgroupfs;
pub mod elf;
pub mod k8s;
pub mod kube_api;
pub mod kubelet;
pub mod paths;
pub mod procfs;
pub mod trust;

use agent_common::LimitFile;

/// The cgroup v2 hierarchy, as the pipeline asks it (one cgroup, a few small files at most).
pub trait Cgroups {
    /// The path (relative to the mount, `/` for the root) of the cgroup with id `id`, asked of
    /// the kernel; `None` when no cgroup has it now, or the kernel cannot say.
    fn path_of(&self, id: u64) -> Option<String>;
    /// The `oom` count of `<path>/memory.events.local`; `None` when there is none.
    fn oom_count(&self, path: &str) -> Option<u64>;
    /// `memory.current` and `memory.max` of `path`, in bytes (`max`: `None`).
    fn usage_and_limit(&self, path: &str) -> (Option<u64>, Option<u64>);
    /// A usage file's figure (`memory.current`, `pids.current`...) of `path`.
    fn usage(&self, path: &str, file: &str) -> Option<u64> {
        let _ = (path, file);
        None
    }
    /// The text of a limit file of cgroup `id` (at `path`) as the kernel shows it now; `None`
    /// when the cgroup or the file is gone.
    fn limit(&self, id: u64, path: &str, limit: LimitFile) -> Option<String> {
        let _ = (id, path, limit);
        None
    }
}

/// Processes and the node, as `/proc` shows them.
pub trait Procs {
    /// The executable's path; `None` once the process is gone.
    fn exe(&self, pid: u32) -> Option<String>;
    /// The key (device and inode) of the process's executable now.
    fn exe_key(&self, pid: u32) -> Option<agent_common::ExecKey> {
        let _ = pid;
        None
    }
    fn comm(&self, pid: u32) -> Option<String>;
    /// The process's cgroup v2 path.
    fn cgroup(&self, pid: u32) -> Option<String>;
    /// The node's memory in use and its total (RAM and swap), in bytes.
    fn node_memory(&self) -> (Option<u64>, Option<u64>);
}

/// Names of Kubernetes pods and containers on this node.
pub trait Names {
    /// Names for a pod UID and, if any, a container ID; `None` when unknown.
    fn names(&mut self, pod_uid: &str, container_id: Option<&str>) -> Option<kubelet::Names>;
}

impl<T: Cgroups + ?Sized> Cgroups for std::sync::Arc<T> {
    fn path_of(&self, id: u64) -> Option<String> {
        (**self).path_of(id)
    }
    fn oom_count(&self, path: &str) -> Option<u64> {
        (**self).oom_count(path)
    }
    fn usage_and_limit(&self, path: &str) -> (Option<u64>, Option<u64>) {
        (**self).usage_and_limit(path)
    }
    fn usage(&self, path: &str, file: &str) -> Option<u64> {
        (**self).usage(path, file)
    }
    fn limit(&self, id: u64, path: &str, limit: LimitFile) -> Option<String> {
        (**self).limit(id, path, limit)
    }
}
