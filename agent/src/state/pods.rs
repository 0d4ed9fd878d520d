//! The pods of this node, as the API server last listed and watched them. Used once a full list
//! came; before it, the other sources of desired values and kubelet's directories stand in.
//! A watch that breaks resumes where it was, so the view stays complete (when the API server
//! cannot resume it, the watcher lists again).

use crate::model::{
    cache::{Bounded, Cache, Evictions},
    pods::{PodChange, PodView},
};

/// Pods kept at most (kubelet's default is 110 per node).
const MAX_PODS: usize = 4096;

/// The pods by UID.
#[derive(Debug)]
pub struct Pods {
    by_uid: Bounded<String, PodView>,
    /// Listed once: the view is complete.
    synced: bool,
}

impl Pods {
    #[must_use]
    pub fn new(evictions: &Evictions) -> Self {
        Self {
            by_uid: Bounded::new(Cache::Pods, MAX_PODS, evictions.clone()),
            synced: false,
        }
    }

    pub fn apply(&mut self, change: PodChange) {
        match change {
            PodChange::Applied(pod) => {
                self.by_uid.put(pod.uid.clone(), pod);
            }
            PodChange::Deleted { uid } => {
                self.by_uid.remove(&uid);
            }
            PodChange::Listed(pods) => {
                self.by_uid.retain(|_, _| false);
                for pod in pods {
                    self.by_uid.put(pod.uid.clone(), pod);
                }
                self.synced = true;
            }
        }
    }

    /// The pod with `uid`, once the view is complete.
    #[must_use]
    pub fn get(&self, uid: &str) -> Option<&PodView> {
        if self.synced {
            self.by_uid.peek(&uid.to_owned())
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::pods::Limits;

    fn pod(uid: &str) -> PodView {
        PodView {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            containers: Vec::new(),
            overhead: Limits::default(),
            pod_limits: Limits::default(),
            resizing: false,
        }
    }

    #[test]
    fn used_from_the_first_list_on() {
        let mut p = Pods::new(&Evictions::default());
        p.apply(PodChange::Applied(pod("a")));
        assert!(p.get("a").is_none(), "not listed yet");
        p.apply(PodChange::Listed(vec![pod("b")]));
        assert!(p.get("a").is_none(), "not in the list: gone");
        assert!(p.get("b").is_some());
        p.apply(PodChange::Applied(pod("c")));
        p.apply(PodChange::Deleted { uid: "b".into() });
        assert!(p.get("c").is_some() && p.get("b").is_none());
    }
}
