//! The pods of this node as the API server describes them, reduced to what the agent needs:
//! names, and what each limit of a pod's and its containers' cgroups should be. The limits
//! come from the spec; during an in-place resize the status's (what kubelet applied last) is
//! legitimate too. Values are put in the kernel's units the way kubelet and runc write them.

use agent_common::LimitFile;

use super::{
    heal::{Desired, DesiredSource},
    limit::LimitValue,
};

/// kubelet's CFS period (µs); it writes no other.
const CPU_PERIOD_US: u64 = 100_000;
/// The smallest quota kubelet writes (µs), as `MinQuotaPeriod`.
const MIN_QUOTA_US: u64 = 1000;

/// A container's limits, or a pod's, where set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes.
    pub memory: Option<u64>,
    /// Millicores.
    pub cpu_milli: Option<u64>,
}

/// One container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    pub name: String,
    /// The runtime's ID, without its `containerd://` prefix; `None` before it started.
    pub id: Option<String>,
    /// The spec's limits: what the container should have.
    pub spec: Limits,
    /// The limits kubelet reports applied (`status.containerStatuses[].resources`).
    pub status: Option<Limits>,
}

/// Which of a pod's containers a container is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `spec.containers`.
    Regular,
    /// `spec.initContainers` with `restartPolicy: Always`: runs beside the others.
    Sidecar,
    /// `spec.initContainers`, run one at a time before the others.
    Init,
}

/// A pod of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub containers: Vec<(Kind, ContainerView)>,
    /// `spec.overhead` (a runtime class's cost), added to the pod's cgroup.
    pub overhead: Limits,
    /// Pod-level limits (`spec.resources`), which the pod's cgroup takes when set.
    pub pod_limits: Limits,
    /// A resize is pending or in progress: the status's values are legitimate too.
    pub resizing: bool,
}

/// What the API server said changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodChange {
    Applied(PodView),
    Deleted {
        uid: String,
    },
    /// A full list (at start, and when a watch could not resume): pods not in it are gone.
    Listed(Vec<PodView>),
}

impl PodView {
    /// The container with runtime ID `id`.
    #[must_use]
    pub fn container(&self, id: &str) -> Option<&ContainerView> {
        self.containers
            .iter()
            .map(|(_, c)| c)
            .find(|c| c.id.as_deref() == Some(id))
    }

    /// The desired value of `limit` for the pod's cgroup (`container: None`) or one of its
    /// containers', in the kernel's units (`page_size` rounds memory as the kernel does).
    /// `None` when Kubernetes says nothing about that limit (memory.high, swap, pids; an
    /// unknown container).
    #[must_use]
    pub fn desired(
        &self,
        container: Option<&str>,
        limit: LimitFile,
        page_size: u64,
    ) -> Option<Desired> {
        let (spec, status) = match container {
            Some(id) => {
                let c = self.container(id)?;
                (c.spec, c.status.unwrap_or(c.spec))
            }
            None => (
                self.pod_total(|c| c.spec),
                self.pod_total(|c| c.status.unwrap_or(c.spec)),
            ),
        };
        let value = |l: Limits| kernel_value(l, limit, page_size);
        let want = value(spec)?;
        let mut desired = Desired::new(want, DesiredSource::Kubernetes);
        if self.resizing
            && let Some(applied) = value(status)
            && applied != want
        {
            desired.also = Some(applied);
        }
        Some(desired)
    }

    /// The pod cgroup's limits from its containers' (`of` picks spec or status), as kubelet
    /// sums them: set only when every container has one; the larger of what runs together
    /// (regular containers and sidecars) and each init container; plus the overhead.
    fn pod_total(&self, of: impl Fn(&ContainerView) -> Limits) -> Limits {
        let total = |pick: fn(Limits) -> Option<u64>| -> Option<u64> {
            if let Some(v) = pick(self.pod_limits) {
                return Some(v);
            }
            let mut running = 0u64;
            let mut init = 0u64;
            for (kind, c) in &self.containers {
                let v = pick(of(c))?;
                match kind {
                    Kind::Regular | Kind::Sidecar => running = running.saturating_add(v),
                    Kind::Init => init = init.max(v),
                }
            }
            Some(
                running
                    .max(init)
                    .saturating_add(pick(self.overhead).unwrap_or(0)),
            )
        };
        Limits {
            memory: total(|l| l.memory),
            cpu_milli: total(|l| l.cpu_milli),
        }
    }
}

/// `limits` as the value of `limit` that kubelet or runc writes and the kernel keeps.
fn kernel_value(limits: Limits, limit: LimitFile, page_size: u64) -> Option<LimitValue> {
    match limit {
        LimitFile::MemoryMax => Some(match limits.memory {
            Some(bytes) => LimitValue::Bytes(bytes - bytes % page_size.max(1)),
            None => LimitValue::Max,
        }),
        LimitFile::CpuMax => Some(LimitValue::Cpu {
            quota_us: limits
                .cpu_milli
                .filter(|m| *m > 0)
                .map(|m| (m.saturating_mul(CPU_PERIOD_US) / 1000).max(MIN_QUOTA_US)),
            period_us: CPU_PERIOD_US,
        }),
        _ => None,
    }
}

/// Why a quantity is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a Kubernetes quantity: {0:?}")]
pub struct BadQuantity(pub String);

/// A Kubernetes quantity (`512Mi`, `1.5G`, `250m`, `1e9`) times `scale` (1 for bytes, 1000
/// for millicores), rounded up as Kubernetes' `Value()` and `MilliValue()` do. Exact:
/// `kube_quantity`'s integer conversions drop the fraction before scaling (`1.5Gi` is 1Gi there).
pub fn quantity(text: &str, scale: u64) -> Result<u64, BadQuantity> {
    let bad = || BadQuantity(text.to_owned());
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    // The value is digits / 10^frac_len * multiplier * scale; multiplier = num / den.
    let digits: u128 = format!("{int}{frac}").parse().map_err(|_| bad())?;
    let frac_len = u32::try_from(frac.len()).map_err(|_| bad())?;
    let (num, den): (u128, u128) = match suffix {
        "" => (1, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1000),
        "k" => (1000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (10u128.pow(12), 1),
        "P" => (10u128.pow(15), 1),
        "E" => (10u128.pow(18), 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        e => {
            let exp: i32 = e
                .strip_prefix(['e', 'E'])
                .and_then(|x| x.parse().ok())
                .ok_or_else(bad)?;
            let p = 10u128.checked_pow(exp.unsigned_abs()).ok_or_else(bad)?;
            if exp >= 0 { (p, 1) } else { (1, p) }
        }
    };
    let den = 10u128
        .checked_pow(frac_len)
        .and_then(|f| f.checked_mul(den))
        .ok_or_else(bad)?;
    let num = digits
        .checked_mul(num)
        .and_then(|n| n.checked_mul(u128::from(scale)))
        .ok_or_else(bad)?;
    u64::try_from(num.div_ceil(den)).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_are_exact() {
        let cases = [
            ("512Mi", 1, 512 << 20),
            ("1.5Gi", 1, 3 << 29),
            ("1G", 1, 1_000_000_000),
            ("1.1G", 1, 1_100_000_000),
            ("129e6", 1, 129_000_000),
            ("0.1", 1, 1),
            ("250m", 1000, 250),
            ("2", 1000, 2000),
            ("0.5", 1000, 500),
            ("100u", 1000, 1),
            ("1E", 1, 10u64.pow(18)),
        ];
        for (text, scale, want) in cases {
            assert_eq!(quantity(text, scale), Ok(want), "{text}");
        }
        for bad in ["", "Mi", "-1", "1X", "1e", "16Ei", "1.2.3", "1e40"] {
            assert!(quantity(bad, 1).is_err(), "{bad:?}");
        }
    }

    fn container(name: &str, mem: Option<u64>, status: Option<u64>) -> ContainerView {
        ContainerView {
            name: name.into(),
            id: Some(format!("{name}-id")),
            spec: Limits {
                memory: mem,
                cpu_milli: Some(500),
            },
            status: status.map(|m| Limits {
                memory: Some(m),
                cpu_milli: Some(500),
            }),
        }
    }

    fn pod(containers: Vec<(Kind, ContainerView)>, resizing: bool) -> PodView {
        PodView {
            uid: "u".into(),
            namespace: "shop".into(),
            name: "cart".into(),
            containers,
            overhead: Limits::default(),
            pod_limits: Limits::default(),
            resizing,
        }
    }

    #[test]
    fn desired_values_in_the_kernels_units() {
        let p = pod(
            vec![
                (Kind::Regular, container("app", Some(1 << 30), None)),
                (
                    Kind::Sidecar,
                    container("proxy", Some((256 << 20) + 100), None),
                ),
                (Kind::Init, container("setup", Some(2 << 30), None)),
            ],
            false,
        );
        let d = |c, l| p.desired(c, l, 4096).map(|d| (d.value, d.also));
        assert_eq!(
            d(Some("proxy-id"), LimitFile::MemoryMax),
            Some((LimitValue::Bytes(256 << 20), None)),
            "rounded down to a page"
        );
        assert_eq!(
            d(None, LimitFile::MemoryMax),
            Some((LimitValue::Bytes(2 << 30), None)),
            "the init container needs more than the others together"
        );
        assert_eq!(
            d(None, LimitFile::CpuMax),
            Some((
                LimitValue::Cpu {
                    quota_us: Some(100_000),
                    period_us: 100_000
                },
                None
            )),
            "the larger of 500m+500m and 500m"
        );
        assert_eq!(d(Some("app-id"), LimitFile::MemoryHigh), None);
        assert_eq!(d(Some("other"), LimitFile::MemoryMax), None);

        let unlimited = pod(
            vec![
                (Kind::Regular, container("app", Some(1 << 30), None)),
                (Kind::Regular, container("log", None, None)),
            ],
            false,
        );
        assert_eq!(
            unlimited
                .desired(None, LimitFile::MemoryMax, 4096)
                .map(|d| d.value),
            Some(LimitValue::Max),
            "one container without a limit: the pod has none"
        );
    }

    #[test]
    fn a_resize_in_progress_allows_both_values() {
        let mut p = pod(
            vec![(
                Kind::Regular,
                container("app", Some(3 << 30), Some(2 << 30)),
            )],
            true,
        );
        let d = p
            .desired(Some("app-id"), LimitFile::MemoryMax, 4096)
            .expect("a limit");
        assert_eq!(
            (d.value, d.also, d.source),
            (
                LimitValue::Bytes(3 << 30),
                Some(LimitValue::Bytes(2 << 30)),
                DesiredSource::Kubernetes
            )
        );
        let pod_level = p
            .desired(None, LimitFile::MemoryMax, 4096)
            .expect("a limit");
        assert_eq!(pod_level.also, Some(LimitValue::Bytes(2 << 30)));
        p.resizing = false;
        let d = p
            .desired(Some("app-id"), LimitFile::MemoryMax, 4096)
            .expect("a limit");
        assert_eq!(d.also, None, "done resizing: the spec alone");
    }
}
