//! Cgroup identity: the labels a cgroup carries on every metric, the Kubernetes identity its
//! path gives (both kubelet cgroup drivers and the common runtimes: the QoS class, the pod UID
//! and the container ID; names come from elsewhere and are not guessed here), and where an OOM
//! kill's limit sat relative to its victim.

/// A cgroup's identity labels: its path, and its Kubernetes names (empty outside Kubernetes).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Who {
    pub cgroup: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl Who {
    /// Label names, in the order of [`Self::labels`]: first in every per-cgroup metric.
    pub const LABELS: [&str; 4] = ["cgroup", "namespace", "pod", "container"];

    /// A cgroup outside Kubernetes (or whose names are unknown).
    #[cfg(test)]
    #[must_use]
    pub fn cgroup(path: &str) -> Self {
        Self {
            cgroup: path.to_owned(),
            ..Self::default()
        }
    }

    /// `cgroup`, `namespace`, `pod`, `container`, in the metrics' label order.
    #[must_use]
    pub fn labels(&self) -> [&str; 4] {
        [&self.cgroup, &self.namespace, &self.pod, &self.container]
    }
}

use std::fmt::Write as _;

/// A path's bytes as text: valid UTF-8 as it is, each byte that is not as `\xNN`. Cgroup
/// names are bytes (anyone with a delegated subtree names them), and replacing what is not
/// UTF-8 would give two cgroups one label; the escape keeps them apart and shows what is there.
#[must_use]
pub fn path_text(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(text, "\\x{b:02x}");
        }
    }
    text
}

/// The bytes [`path_text`] made `text` from, for opening a path that had bytes escaped.
#[must_use]
pub fn path_bytes(text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let escaped = (b == b'\\')
            .then(|| tail.strip_prefix(b"x")?.get(..2))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            // Only bytes that are not UTF-8 were escaped: an escape of one that is (`\x2d`,
            // as systemd writes `-` in unit names) is the name's own text.
            Some(byte) if byte >= 0x80 => {
                bytes.push(byte);
                rest = &tail[3..];
            }
            _ => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    bytes
}

/// Where a limit was hit, relative to the victim of an OOM kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The victim's own cgroup, or a Kubernetes container's.
    Container,
    /// A pod cgroup, or any other ancestor.
    Pod,
    /// A global OOM, or a node-wide cgroup: `kubepods` and its QoS classes.
    Node,
}

impl Scope {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Container => "container",
            Self::Pod => "pod",
            Self::Node => "node",
        }
    }

    /// The scope of a limit hit in `limit_cgroup` (`None`: a global OOM) for a victim in
    /// `victim_cgroup`.
    #[must_use]
    pub fn of(limit_cgroup: Option<&str>, victim_cgroup: &str) -> Self {
        let Some(limit) = limit_cgroup else {
            return Self::Node;
        };
        match parse(limit) {
            Some(id) if id.container.is_some() => Self::Container,
            None if limit == "/" || is_node_level(limit) => Self::Node,
            None if limit == victim_cgroup => Self::Container,
            Some(_) | None => Self::Pod,
        }
    }
}

/// The kubepods root or one of its QoS levels (`burstable`, `kubepods-besteffort.slice`...): the
/// node's share, above any pod. Only the real hierarchy counts (see [`kubepods_at`]).
fn is_node_level(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    kubepods_at(&parts).is_some_and(|at| match &parts[at + 1..] {
        [] => true,
        [qos] => qos_of(qos).is_some(),
        _ => false,
    })
}

/// Where the kubepods root is in `parts`, if the path is in kubelet's real hierarchy: the
/// cgroupfs driver's `kubepods` at the top, or the systemd driver's `kubepods.slice` (or
/// `<parent>-kubepods.slice`, as kind and other nested nodes name it) reached from the top
/// through slices only, each named after its parent as systemd requires. Anyone may name a
/// cgroup `kubepods` in a subtree delegated to them, but such a subtree sits under a service or
/// a scope (`user@1000.service`, a container's scope), never under root's slices alone: so a
/// `kubepods` found anywhere else gives no pod identity.
fn kubepods_at(parts: &[&str]) -> Option<usize> {
    if parts.first() == Some(&"kubepods") {
        return Some(0);
    }
    let mut parent: Option<&str> = None;
    for (at, part) in parts.iter().enumerate() {
        let name = part.strip_suffix(".slice")?;
        let chained = match parent {
            None => !name.contains('-'),
            Some(p) => name.strip_prefix(p).is_some_and(|r| r.starts_with('-')),
        };
        if !chained || name.is_empty() {
            return None;
        }
        if name == "kubepods" || name.ends_with("-kubepods") {
            return Some(at);
        }
        parent = Some(name);
    }
    None
}

/// The pod's QoS class, from its parent cgroup.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "guaranteed",
            Self::Burstable => "burstable",
            Self::BestEffort => "besteffort",
        }
    }
}

/// The container runtime, from the container cgroup's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// The cgroupfs driver names the cgroup by the bare container id.
    Unknown,
}

/// What a cgroup path says about a pod and container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub qos: Qos,
    /// The pod UID with dashes (the systemd driver writes it with underscores).
    pub pod_uid: String,
    /// Set when the path reaches a container's cgroup (or below it).
    pub container: Option<Container>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub runtime: Runtime,
}

/// Parses a cgroup v2 path (relative to the mount, leading `/`), returning `None` for paths
/// outside Kubernetes' pod hierarchy.
///
/// systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
/// cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`; Guaranteed pods sit right under `kubepods`.
#[must_use]
pub fn parse(path: &str) -> Option<Identity> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let start = kubepods_at(&parts)?;
    let mut rest = parts[start + 1..].iter();
    let mut next = rest.next()?;
    let qos = match qos_of(next) {
        Some(q) => {
            next = rest.next()?;
            q
        }
        None => Qos::Guaranteed,
    };
    let pod_uid = pod_uid_of(next)?;
    let container = rest.next().and_then(|c| container_of(c));
    Some(Identity {
        qos,
        pod_uid,
        container,
    })
}

/// `burstable`, `besteffort` (cgroupfs) or `kubepods-burstable.slice` (systemd).
fn qos_of(part: &str) -> Option<Qos> {
    let name = part
        .strip_suffix(".slice")
        .map_or(part, |s| s.rsplit('-').next().unwrap_or(s));
    match name {
        "burstable" => Some(Qos::Burstable),
        "besteffort" => Some(Qos::BestEffort),
        _ => None,
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(part: &str) -> Option<String> {
    let name = part.strip_suffix(".slice").unwrap_or(part);
    let at = name.rfind("pod")?;
    if at != 0 && !name[..at].ends_with('-') {
        return None;
    }
    let uid = &name[at + 3..];
    let valid = !uid.is_empty()
        && uid
            .chars()
            .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_');
    valid.then(|| uid.replace('_', "-"))
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` (systemd), or
/// `<id>`, `crio-<id>`, `cri-containerd-<id>` (cgroupfs). CRI-O's `crio-conmon-<id>` is the
/// monitor process, not the container.
fn container_of(part: &str) -> Option<Container> {
    let name = part.strip_suffix(".scope").unwrap_or(part);
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let (runtime, id) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, id)
    } else if let Some(id) = name.strip_prefix("crio-") {
        (Runtime::CriO, id)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (Runtime::Docker, id)
    } else {
        (Runtime::Unknown, name)
    };
    let valid = id.len() >= 12 && id.chars().all(|c| c.is_ascii_hexdigit());
    valid.then(|| Container {
        id: id.to_owned(),
        runtime,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a6b";
    const ID: &str = "4c01db0b339c2c4e3a1f0d9e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b";

    fn container(path: &str) -> (Qos, String, Option<(String, Runtime)>) {
        let i = parse(path).unwrap_or_else(|| panic!("no identity in {path}"));
        (i.qos, i.pod_uid, i.container.map(|c| (c.id, c.runtime)))
    }

    #[test]
    fn systemd_driver_paths() {
        let u = UID.replace('-', "_");
        for (runtime_prefix, runtime) in [
            ("cri-containerd-", Runtime::Containerd),
            ("crio-", Runtime::CriO),
            ("docker-", Runtime::Docker),
        ] {
            let p = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/{runtime_prefix}{ID}.scope"
            );
            assert_eq!(
                container(&p),
                (
                    Qos::Burstable,
                    UID.to_owned(),
                    Some((ID.to_owned(), runtime))
                )
            );
        }
        let guaranteed = format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope");
        assert_eq!(container(&guaranteed).0, Qos::Guaranteed);
        let besteffort =
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice");
        assert_eq!(
            container(&besteffort),
            (Qos::BestEffort, UID.to_owned(), None)
        );
        // CRI-O's monitor is not a container.
        let conmon = format!("/kubepods.slice/kubepods-pod{u}.slice/crio-conmon-{ID}.scope");
        assert_eq!(container(&conmon).2, None);
        // kind and other nested nodes put the hierarchy under kubelet's own slice.
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(container(&kind).0, Qos::Burstable);
        assert_eq!(container(&kind).1, UID);
    }

    #[test]
    fn cgroupfs_driver_paths() {
        assert_eq!(
            container(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            (
                Qos::Burstable,
                UID.to_owned(),
                Some((ID.to_owned(), Runtime::Unknown))
            )
        );
        assert_eq!(
            container(&format!("/kubepods/pod{UID}/crio-{ID}")),
            (
                Qos::Guaranteed,
                UID.to_owned(),
                Some((ID.to_owned(), Runtime::CriO))
            )
        );
        assert_eq!(
            container(&format!("/kubepods/besteffort/pod{UID}")),
            (Qos::BestEffort, UID.to_owned(), None)
        );
    }

    #[test]
    fn scopes() {
        let pod = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice";
        let ctr = format!("{pod}/cri-containerd-{}.scope", "ab".repeat(32));
        assert_eq!(Scope::of(Some(&ctr), &ctr), Scope::Container);
        assert_eq!(Scope::of(Some(pod), &ctr), Scope::Pod);
        assert_eq!(
            Scope::of(Some("/kubepods.slice/kubepods-burstable.slice"), &ctr),
            Scope::Node
        );
        assert_eq!(Scope::of(None, &ctr), Scope::Node);
        assert_eq!(
            Scope::of(Some("/app/worker"), "/app/worker"),
            Scope::Container
        );
        assert_eq!(Scope::of(Some("/app"), "/app/worker"), Scope::Pod);
    }

    #[test]
    fn other_paths_have_no_identity() {
        for p in [
            "/",
            "/system.slice/containerd.service",
            "/kubepods",
            "/kubepods.slice/kubepods-burstable.slice",
            "/user.slice/user-1000.slice/session-2.scope",
            "/kubepods/burstable/notapod",
        ] {
            assert_eq!(parse(p), None, "{p}");
        }
    }

    #[test]
    fn paths_that_are_not_utf8_are_escaped_and_opened_again() {
        let raw = b"/user.slice/nw-\xff\xfe/\xc3\xa9t\xc3";
        let text = path_text(raw);
        assert_eq!(text, "/user.slice/nw-\\xff\\xfe/\u{e9}t\\xc3");
        assert_eq!(path_bytes(&text), raw);
        // systemd's own escapes are text, and stay as they are.
        let unit = "/system.slice/systemd-fsck@dev-disk-by\\x2duuid-1.service";
        assert_eq!(path_text(unit.as_bytes()), unit);
        assert_eq!(path_bytes(unit), unit.as_bytes());
    }

    /// A user (or a container) may create `kubepods` trees in the subtree delegated to them;
    /// they must not take a pod's identity, nor be counted as the node's share.
    #[test]
    fn kubepods_trees_outside_the_real_hierarchy_are_not_pods() {
        let u = UID.replace('-', "_");
        let systemd = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
        );
        let cgroupfs = format!("kubepods/burstable/pod{UID}/{ID}");
        for spoof in [
            format!("/user.slice/user-1000.slice/user@1000.service/{systemd}"),
            format!("/user.slice/user-1000.slice/user@1000.service/app.slice/{systemd}"),
            format!("/user.slice/user-1000.slice/session-2.scope/{cgroupfs}"),
            format!("/system.slice/docker-{ID}.scope/{cgroupfs}"),
            format!("/system.slice/evil.service/{systemd}"),
            // A slice not named after its parent is not one systemd made.
            format!(
                "/user.slice/kubepods.slice/{}",
                &systemd["kubepods.slice/".len()..]
            ),
            format!("/app/{cgroupfs}"),
        ] {
            assert_eq!(parse(&spoof), None, "{spoof}");
            let parent = spoof.rsplit_once('/').map_or("/", |(p, _)| p);
            let qos = parent.rsplit_once('/').map_or("/", |(p, _)| p);
            assert_eq!(Scope::of(Some(qos), &spoof), Scope::Pod, "{qos}");
        }
        // The real hierarchy (under root's slices, as kind has it: `systemd_driver_paths`).
        assert!(parse(&format!("/{systemd}")).is_some());
        assert!(parse(&format!("/{cgroupfs}")).is_some());
        assert_eq!(
            Scope::of(Some("/kubepods/burstable"), &format!("/{cgroupfs}")),
            Scope::Node
        );
    }
}
