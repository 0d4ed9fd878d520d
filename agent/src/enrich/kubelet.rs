//! Kubernetes names (namespace, pod, container) for the pod UIDs and container IDs found in
//! cgroup paths, read from the log directories kubelet keeps on every node:
//! `containers/<pod>_<namespace>_<container>-<container id>.log` and
//! `pods/<namespace>_<pod>_<pod uid>/`. No API server access is needed.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::model::cache::{Cache, Evictions};

/// The kubelet log root on a node.
pub const DEFAULT_LOG_DIR: &str = "/var/log";

/// Shortest time between two rereads of the directories (a miss on an unknown id rereads).
const REREAD_EVERY: Duration = Duration::from_secs(1);

/// At most this many containers and as many pods are named (a node runs a few hundred); a
/// directory listing more is cut, and what is cut counted as evicted.
const MAX_NAMES: usize = 16_384;

/// Names of a pod and, for a container's cgroup, of the container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// The names kubelet's log directories give. Each reread replaces what was known, so pods
/// that left the node leave the maps too.
#[derive(Debug)]
pub struct KubeletNames {
    dir: PathBuf,
    containers: HashMap<String, Names>,
    pods: HashMap<String, (String, String)>,
    last_read: Option<Instant>,
    evictions: Evictions,
}

impl KubeletNames {
    #[must_use]
    pub fn new(dir: PathBuf, evictions: Evictions) -> Self {
        Self {
            dir,
            containers: HashMap::new(),
            pods: HashMap::new(),
            last_read: None,
            evictions,
        }
    }
}

impl super::Names for KubeletNames {
    /// `None` when kubelet's directories do not know the pod (not a Kubernetes node, or the
    /// pod is gone and its logs with it).
    fn names(&mut self, pod_uid: &str, container_id: Option<&str>) -> Option<Names> {
        if let Some(found) = self.lookup(pod_uid, container_id) {
            return Some(found);
        }
        if self.last_read.is_some_and(|t| t.elapsed() < REREAD_EVERY) {
            return None;
        }
        self.reread();
        self.lookup(pod_uid, container_id)
    }
}

impl KubeletNames {
    fn lookup(&self, pod_uid: &str, container_id: Option<&str>) -> Option<Names> {
        if let Some(n) = container_id.and_then(|id| self.containers.get(id)) {
            return Some(n.clone());
        }
        self.pods.get(pod_uid).map(|(namespace, pod)| Names {
            namespace: namespace.clone(),
            pod: pod.clone(),
            container: String::new(),
        })
    }

    fn reread(&mut self) {
        self.last_read = Some(Instant::now());
        let (containers, cut_c) = capped(
            list(&self.dir.join("containers"))
                .iter()
                .filter_map(|n| parse_container_log(n)),
        );
        let (pods, cut_p) = capped(
            list(&self.dir.join("pods"))
                .iter()
                .filter_map(|n| parse_pod_dir(n))
                .map(|(uid, ns, pod)| (uid, (ns, pod))),
        );
        self.evictions.add(Cache::KubeletNames, cut_c + cut_p);
        self.containers = containers;
        self.pods = pods;
    }
}

/// At most [`MAX_NAMES`] entries, and how many more there were.
fn capped<V>(entries: impl Iterator<Item = (String, V)>) -> (HashMap<String, V>, u64) {
    let mut map = HashMap::new();
    let mut cut = 0;
    for (k, v) in entries {
        if map.len() < MAX_NAMES {
            map.insert(k, v);
        } else {
            cut += 1;
        }
    }
    (map, cut)
}

fn list(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `<pod>_<namespace>_<container>-<64 hex>.log`: names are DNS labels, so `_` only separates.
fn parse_container_log(file: &str) -> Option<(String, Names)> {
    let stem = file.strip_suffix(".log")?;
    let (names, id) = stem.rsplit_once('-')?;
    if id.len() != 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut parts = names.splitn(3, '_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    Some((
        id.to_owned(),
        Names {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container: container.to_owned(),
        },
    ))
}

/// `<namespace>_<pod>_<uid>`.
fn parse_pod_dir(dir: &str) -> Option<(String, String, String)> {
    let mut parts = dir.splitn(3, '_');
    let (ns, pod, uid) = (parts.next()?, parts.next()?, parts.next()?);
    (uid.len() == 36).then(|| (uid.to_owned(), ns.to_owned(), pod.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::Names as _;

    const UID: &str = "3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a6b";
    const ID: &str = "4c01db0b339c2c4e3a1f0d9e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b";

    /// No kubelet runs here: a directory with kubelet's layout stands in for /var/log.
    #[test]
    fn names_from_kubelet_log_directories() {
        let dir = std::env::temp_dir().join(format!("nw-kubelet-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("containers")).expect("mkdir");
        std::fs::create_dir_all(dir.join(format!("pods/shop_cart-7d9f_{UID}/app"))).expect("mkdir");
        std::fs::write(
            dir.join(format!("containers/cart-7d9f_shop_app-{ID}.log")),
            "",
        )
        .expect("write");
        std::fs::write(dir.join("containers/not-a-log.txt"), "").expect("write");
        let mut k = KubeletNames::new(dir.clone(), Evictions::default());
        let n = k.names(UID, Some(ID)).expect("container known");
        assert_eq!(
            n,
            Names {
                namespace: "shop".into(),
                pod: "cart-7d9f".into(),
                container: "app".into()
            }
        );
        let pod_only = k.names(UID, None).expect("pod known");
        assert_eq!(
            (pod_only.namespace.as_str(), pod_only.container.as_str()),
            ("shop", "")
        );
        assert_eq!(k.names("00000000-0000-0000-0000-000000000000", None), None);
        // The pod leaves the node: the next reread forgets it.
        std::fs::remove_dir_all(dir.join("pods")).expect("rm");
        std::fs::remove_dir_all(dir.join("containers")).expect("rm");
        k.last_read = None;
        assert_eq!(k.names("00000000-0000-0000-0000-000000000001", None), None);
        assert_eq!(k.names(UID, None), None, "forgotten with its directories");
        std::fs::remove_dir_all(&dir).expect("rm");
    }
}
