//! A cgroup's Kubernetes identity: what its path says (the pod UID, QoS class and container
//! ID), named through what the node knows of its pods.

use super::Names;
use crate::model::record::K8s;

/// The identity in a cgroup path, named through `names` where possible; `None` outside
/// Kubernetes' pod hierarchy.
pub fn identity(path: &str, names: &mut dyn Names) -> Option<K8s> {
    let mut k = K8s::unnamed(path)?;
    if let Some(n) = names.names(&k.pod_uid, k.container_id.as_deref()) {
        let some = |s: String| (!s.is_empty()).then_some(s);
        k.namespace = some(n.namespace);
        k.pod = some(n.pod);
        k.container = some(n.container);
    }
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{enrich::kubelet, model::cgroup::Qos};

    struct Known;

    impl Names for Known {
        fn names(&mut self, pod_uid: &str, container_id: Option<&str>) -> Option<kubelet::Names> {
            (pod_uid == "3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a6b").then(|| kubelet::Names {
                namespace: "shop".into(),
                pod: "cart".into(),
                container: container_id.map(|_| "app".into()).unwrap_or_default(),
            })
        }
    }

    #[test]
    fn names_what_the_path_identifies() {
        let pod = "/kubepods/burstable/pod3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a6b";
        let k = identity(pod, &mut Known).expect("a pod");
        assert_eq!(k.qos, Qos::Burstable);
        assert_eq!(
            (k.namespace.as_deref(), k.pod.as_deref(), k.container),
            (Some("shop"), Some("cart"), None)
        );
        let ctr = format!("{pod}/{}", "ab".repeat(32));
        let k = identity(&ctr, &mut Known).expect("a container");
        assert_eq!(k.container.as_deref(), Some("app"));
        let other = "/kubepods/pod00000000-0000-0000-0000-000000000000";
        let k = identity(other, &mut Known).expect("a pod");
        assert_eq!(k.pod, None, "unknown to the node: not named");
        assert_eq!(identity("/user.slice", &mut Known), None);
    }
}
