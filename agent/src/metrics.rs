//! Prometheus metrics: one place defines every name, label and help text.

use agent_common::LimitFile;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use prometheus::core::{Collector as _, MetricVec, MetricVecBuilder};

use std::sync::{Arc, Mutex};

use crate::{contention::Published, limits::LimitValue};

/// The series of `vec` with these label values; a wrong count of values (a bug) is logged
/// instead of panicking as `with_label_values` would.
pub fn labelled<T: MetricVecBuilder>(vec: &MetricVec<T>, values: &[&str]) -> Option<T::M> {
    vec.get_metric_with_label_values(values)
        .map_err(|e| tracing::error!("metric {:?}: {e}", vec.desc().first().map(|d| &d.fq_name)))
        .ok()
}

/// A cgroup's identity labels: its path, and its Kubernetes names (empty outside Kubernetes).
#[derive(Debug, Clone, Default)]
pub struct Who {
    pub cgroup: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl Who {
    /// `cgroup`, `namespace`, `pod`, `container`, in the metrics' label order.
    #[must_use]
    pub fn labels(&self) -> [&str; 4] {
        [&self.cgroup, &self.namespace, &self.pod, &self.container]
    }
}

/// The agent's metrics, registered in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Processes killed by the OOM killer, by the victim's cgroup and the scope of the limit.
    pub oom_kills: IntCounterVec,
    /// Limit hits (one however many processes were killed), by the limiting cgroup and scope.
    pub oom_incidents: IntCounterVec,
    /// Go programs that hit a fatal error, by reason.
    pub go_fatal_errors: IntCounterVec,
    /// Writes to cgroup limit files.
    pub limit_writes: IntCounterVec,
    /// 1 for each capability, labelled with the mode it runs in.
    pub probe_info: IntGaugeVec,
    /// Current memory limits in bytes (`max` is +Inf).
    pub limit_bytes: GaugeVec,
    /// Current pids.max.
    pub pids_limit: GaugeVec,
    /// Current cpu.max as cores (quota / period; `max` is +Inf).
    pub cpu_limit_cores: GaugeVec,
    /// Ring buffer records that could not be decoded.
    pub decode_errors: IntCounter,
    /// Futex contention, rendered by its reader (its histograms come aggregated from the
    /// kernel, which the client library's types cannot take).
    pub contention: Arc<Mutex<Published>>,
}

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let registry = Registry::new();
        let oom_kills = IntCounterVec::new(
            Opts::new(
                "nodewarden_oom_kills_total",
                "Processes killed by the kernel's OOM killer, by the victim's cgroup and where the limit was hit (scope: container, pod, node).",
            ),
            &OOM_LABELS,
        )
        .expect("static metric definition");
        let oom_incidents = IntCounterVec::new(
            Opts::new(
                "nodewarden_oom_incidents_total",
                "OOM limit hits, counted once however many processes were killed, by the cgroup whose limit was hit (/ for the node) and scope.",
            ),
            &OOM_LABELS,
        )
        .expect("static metric definition");
        let go_fatal_errors = IntCounterVec::new(
            Opts::new(
                "nodewarden_go_fatal_errors_total",
                "Go processes that hit a fatal error (concurrent map writes...), by reason and cgroup.",
            ),
            &GO_FATAL_LABELS,
        )
        .expect("static metric definition");
        let limit_writes = IntCounterVec::new(
            Opts::new(
                "nodewarden_cgroup_limit_writes_total",
                "Writes to cgroup limit files, by target cgroup, limit file, writer comm and result.",
            ),
            &LIMIT_WRITE_LABELS,
        )
        .expect("static metric definition");
        let probe_info = IntGaugeVec::new(
            Opts::new(
                "nodewarden_probe_info",
                "Always 1; mode says how each capability is attached (unavailable: not at all).",
            ),
            &["capability", "mode"],
        )
        .expect("static metric definition");
        let limit_bytes = GaugeVec::new(
            Opts::new(
                "nodewarden_cgroup_limit_bytes",
                "Current memory limits of each cgroup (memory.max, .high, .low, .min, .swap.max); max is +Inf.",
            ),
            &["cgroup", "namespace", "pod", "container", "limit"],
        )
        .expect("static metric definition");
        let pids_limit = GaugeVec::new(
            Opts::new(
                "nodewarden_cgroup_pids_limit",
                "Current pids.max of each cgroup; max is +Inf.",
            ),
            &["cgroup", "namespace", "pod", "container"],
        )
        .expect("static metric definition");
        let cpu_limit_cores = GaugeVec::new(
            Opts::new(
                "nodewarden_cgroup_cpu_limit_cores",
                "Current cpu.max of each cgroup as cores (quota / period); max is +Inf.",
            ),
            &["cgroup", "namespace", "pod", "container"],
        )
        .expect("static metric definition");
        let decode_errors = IntCounter::new(
            "nodewarden_event_decode_errors_total",
            "Kernel event records that could not be decoded (dropped).",
        )
        .expect("static metric definition");
        for c in [
            Box::new(oom_kills.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(oom_incidents.clone()),
            Box::new(go_fatal_errors.clone()),
            Box::new(limit_writes.clone()),
            Box::new(probe_info.clone()),
            Box::new(limit_bytes.clone()),
            Box::new(pids_limit.clone()),
            Box::new(cpu_limit_cores.clone()),
            Box::new(decode_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            oom_kills,
            oom_incidents,
            go_fatal_errors,
            limit_writes,
            probe_info,
            limit_bytes,
            pids_limit,
            cpu_limit_cores,
            decode_errors,
            contention: Arc::default(),
        }
    }

    /// Sets the gauge of one limit of one cgroup; `who` is the cgroup's identity labels.
    pub fn set_limit(&self, who: &Who, limit: LimitFile, value: LimitValue) {
        let v = value.as_f64();
        let w = who.labels();
        let gauge = match limit {
            LimitFile::PidsMax => labelled(&self.pids_limit, &w),
            LimitFile::CpuMax => labelled(&self.cpu_limit_cores, &w),
            _ => labelled(
                &self.limit_bytes,
                &[w[0], w[1], w[2], w[3], limit.file_name()],
            ),
        };
        if let Some(g) = gauge {
            g.set(v);
        }
    }

    /// Drops the limit gauges of a removed cgroup, whatever names they carry: a removed cgroup
    /// has no limits. Its counters stay (see [`Self::forget_cgroup_counters`]).
    pub fn forget_cgroup(&self, cgroup: &str) {
        remove_series(&self.limit_bytes, &LIMIT_LABELS, cgroup);
        remove_series(&self.pids_limit, &WHO_LABELS, cgroup);
        remove_series(&self.cpu_limit_cores, &WHO_LABELS, cgroup);
    }

    /// Drops the counters of a cgroup removed long enough ago (`metrics.deleted_cgroup_ttl_s`).
    pub fn forget_cgroup_counters(&self, cgroup: &str) {
        remove_series(&self.oom_kills, &OOM_LABELS, cgroup);
        remove_series(&self.oom_incidents, &OOM_LABELS, cgroup);
        remove_series(&self.go_fatal_errors, &GO_FATAL_LABELS, cgroup);
        remove_series(&self.limit_writes, &LIMIT_WRITE_LABELS, cgroup);
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let text = TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
        let mut text = tidy(&text);
        if let Ok(c) = self.contention.lock() {
            text.push_str(&c.text);
            text.push_str(&c.cpu_text);
        }
        text
    }
}

/// A cgroup's identity labels, first in every per-cgroup metric.
const WHO_LABELS: [&str; 4] = ["cgroup", "namespace", "pod", "container"];
const LIMIT_LABELS: [&str; 5] = ["cgroup", "namespace", "pod", "container", "limit"];
const OOM_LABELS: [&str; 5] = ["cgroup", "namespace", "pod", "container", "scope"];
const GO_FATAL_LABELS: [&str; 5] = ["cgroup", "namespace", "pod", "container", "reason"];
const LIMIT_WRITE_LABELS: [&str; 7] = [
    "cgroup",
    "namespace",
    "pod",
    "container",
    "limit",
    "writer",
    "result",
];

/// Removes every series of `vec` whose `cgroup` label is `cgroup`; `names` are its labels in
/// definition order.
fn remove_series<T: MetricVecBuilder>(vec: &MetricVec<T>, names: &[&str], cgroup: &str) {
    for family in vec.collect() {
        for m in family.get_metric() {
            // Label pairs come sorted by name; removal wants definition order.
            let label = |n: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == n)
                    .map_or("", |l| l.value())
            };
            if label("cgroup") != cgroup {
                continue;
            }
            let values: Vec<&str> = names.iter().map(|n| label(n)).collect();
            let _ = vec.remove_label_values(&values);
        }
    }
}

/// Two fixes to the encoder's text, line by line:
/// - it prints sample values with Rust's `Display`, which spells infinity `inf`; the exposition
///   format spells it `+Inf`/`-Inf` (an unlimited cgroup's limit is +Inf);
/// - a label with an empty value means the same as no label to Prometheus, and the Kubernetes
///   labels are empty outside Kubernetes: they are left out, so a host's series stay short.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with('#') {
            out.push_str(line);
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or((line, ""));
            out.push_str(&drop_empty_labels(series));
            out.push(' ');
            out.push_str(match value {
                "inf" => "+Inf",
                "-inf" => "-Inf",
                v => v,
            });
        }
        out.push('\n');
    }
    out
}

/// `name{a="1",b="",c="x"}` to `name{a="1",c="x"}` (quoted values may hold escaped quotes).
fn drop_empty_labels(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_owned();
    };
    let labels = labels.strip_suffix('}').unwrap_or(labels);
    let mut kept: Vec<&str> = Vec::new();
    let mut rest = labels;
    while !rest.is_empty() {
        // A pair ends at the first unescaped quote after its opening one.
        let Some(open) = rest.find("=\"") else {
            break;
        };
        let value_start = open + 2;
        let mut end = value_start;
        let bytes = rest.as_bytes();
        while end < bytes.len() && bytes[end] != b'"' {
            end += if bytes[end] == b'\\' { 2 } else { 1 };
        }
        let pair = &rest[..=end.min(rest.len() - 1)];
        if end > value_start {
            kept.push(pair);
        }
        rest = rest[(end + 1).min(rest.len())..].trim_start_matches(',');
    }
    if kept.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{}}}", kept.join(","))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.oom_kills
            .with_label_values(&["/a", "", "", "", "container"])
            .inc();
        m.oom_incidents
            .with_label_values(&["/b", "", "", "", "pod"])
            .inc();
        m.limit_writes
            .with_label_values(&["/a", "", "", "", "memory.max", "sh", "ok"])
            .inc_by(2);
        let a = Who {
            cgroup: "/a".into(),
            ..Who::default()
        };
        for limit in LimitFile::ALL {
            m.set_limit(&a, limit, LimitValue::Count(1));
        }
        m.set_limit(&a, LimitFile::MemoryMax, LimitValue::Max);
        m.set_limit(
            &a,
            LimitFile::CpuMax,
            LimitValue::Cpu {
                quota_us: Some(50_000),
                period_us: 100_000,
            },
        );
        let text = m.render();
        assert!(
            text.contains("nodewarden_cgroup_limit_bytes{cgroup=\"/a\",limit=\"memory.max\"} +Inf"),
            "{text}"
        );
        assert!(
            text.contains("nodewarden_cgroup_cpu_limit_cores{cgroup=\"/a\"} 0.5"),
            "{text}"
        );
        m.forget_cgroup("/a");
        assert!(!m.render().contains("nodewarden_cgroup_limit_bytes{"));
        assert_eq!(
            drop_empty_labels(r#"x{a="1",b="",c="q\"u,o}te",d=""}"#),
            r#"x{a="1",c="q\"u,o}te"}"#
        );
        assert_eq!(drop_empty_labels(r#"x{b=""}"#), "x");
        assert!(
            text.contains("nodewarden_oom_kills_total{cgroup=\"/a\",scope=\"container\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("nodewarden_oom_incidents_total{cgroup=\"/b\",scope=\"pod\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "nodewarden_cgroup_limit_writes_total{cgroup=\"/a\",limit=\"memory.max\",result=\"ok\",writer=\"sh\"} 2"
            ),
            "{text}"
        );
        // Counters go only when asked (a removed cgroup's, after the configured time).
        assert!(m.render().contains("nodewarden_oom_kills_total{"));
        m.forget_cgroup_counters("/a");
        let text = m.render();
        assert!(!text.contains("nodewarden_oom_kills_total{"), "{text}");
        assert!(
            !text.contains("nodewarden_cgroup_limit_writes_total{"),
            "{text}"
        );
        assert!(
            text.contains("nodewarden_oom_incidents_total{cgroup=\"/b\""),
            "{text}"
        );
    }
}
