//! Which processes `contention.select` names, found afresh on each read: by comm, executable,
//! cgroup glob, Kubernetes pod (namespace and name globs), or by what the CPU samples show
//! (`map-heavy`: a Go map runtime share of at least [`MAP_HEAVY_SHARE`]).

use std::collections::HashSet;

use crate::{
    config::Selector,
    enrich::procfs,
    model::{cgroup::Who, contention::ProcessCpu},
};

/// The Go map runtime share of its sampled CPU that makes a process map-heavy.
pub const MAP_HEAVY_SHARE: f64 = 0.05;

/// The processes that `selectors` select now. `cpu` is the latest sampled shares; `who` names
/// a process's cgroup and Kubernetes identity.
pub fn selected(
    selectors: &[Selector],
    cpu: &[ProcessCpu],
    mut who: impl FnMut(u32) -> Who,
) -> HashSet<u32> {
    let mut want = HashSet::new();
    if selectors.contains(&Selector::MapHeavy) {
        want.extend(
            cpu.iter()
                .filter(|p| p.map_share >= MAP_HEAVY_SHARE)
                .map(|p| p.pid),
        );
    }
    // The other selectors look at each process in /proc.
    if selectors.iter().all(|s| *s == Selector::MapHeavy) {
        return want;
    }
    for tgid in procfs::pids() {
        let base = std::path::PathBuf::from(format!("/proc/{tgid}"));
        let mut identity = None;
        let matches = selectors.iter().any(|s| match s {
            Selector::Comm(c) => procfs::comm(tgid).is_some_and(|comm| comm == *c),
            Selector::Exe(p) => std::fs::read_link(base.join("exe")).is_ok_and(|e| e == *p),
            Selector::Cgroup(g) => procfs::cgroup_of(tgid).is_some_and(|path| g.matches(&path)),
            Selector::Pod { namespace, pod } => {
                let w = identity.get_or_insert_with(|| who(tgid));
                !w.pod.is_empty() && namespace.matches(&w.namespace) && pod.matches(&w.pod)
            }
            Selector::MapHeavy => false,
        });
        if matches {
            want.insert(tgid);
        }
    }
    want
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::pattern::Pattern;

    fn cpu(pid: u32, map_share: f64) -> ProcessCpu {
        ProcessCpu {
            samples: 100,
            map_share,
            ..ProcessCpu::empty(pid, String::new(), String::new())
        }
    }

    #[test]
    fn map_heavy_takes_the_sampled_shares() {
        let shares = [cpu(10, 0.5), cpu(11, 0.01), cpu(12, MAP_HEAVY_SHARE)];
        let got = selected(&[Selector::MapHeavy], &shares, |_| Who::default());
        assert_eq!(got, HashSet::from([10, 12]));
    }

    #[test]
    fn pods_are_matched_by_namespace_and_name() {
        let me = std::process::id();
        let who = |pid: u32| Who {
            cgroup: "/kubepods/x".to_owned(),
            namespace: "shop".to_owned(),
            pod: if pid == me {
                "cart-7d9f".to_owned()
            } else {
                String::new()
            },
            container: "c".to_owned(),
        };
        let pick = |namespace: &str, pod: &str| {
            selected(
                &[Selector::Pod {
                    namespace: Pattern::new(namespace).expect("glob"),
                    pod: Pattern::new(pod).expect("glob"),
                }],
                &[],
                who,
            )
        };
        assert_eq!(pick("shop", "cart-*"), HashSet::from([me]));
        assert_eq!(pick("*", "cart-7d9f"), HashSet::from([me]));
        assert!(pick("shop", "payments-*").is_empty());
        assert!(pick("other", "*").is_empty());
    }
}
