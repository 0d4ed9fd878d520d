//! Prometheus metrics: one place defines every name, label and help text.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// The agent's metrics, registered in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Processes killed by the OOM killer, by the victim's cgroup.
    pub oom_kills: IntCounterVec,
    /// Writes to cgroup limit files.
    pub limit_writes: IntCounterVec,
    /// 1 when a probe is attached, 0 when the kernel refused it.
    pub probe_attached: IntGaugeVec,
    /// Ring buffer records that could not be decoded.
    pub decode_errors: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let registry = Registry::new();
        let oom_kills = IntCounterVec::new(
            Opts::new(
                "nodewarden_oom_kills_total",
                "Processes killed by the kernel's OOM killer, by the victim's cgroup.",
            ),
            &["cgroup"],
        )
        .expect("static metric definition");
        let limit_writes = IntCounterVec::new(
            Opts::new(
                "nodewarden_cgroup_limit_writes_total",
                "Writes to cgroup limit files, by target cgroup, limit file, writer comm and result.",
            ),
            &["cgroup", "limit", "writer", "result"],
        )
        .expect("static metric definition");
        let probe_attached = IntGaugeVec::new(
            Opts::new(
                "nodewarden_probe_attached",
                "1 if the probe is attached to the running kernel, 0 if the kernel refused it.",
            ),
            &["capability", "hook"],
        )
        .expect("static metric definition");
        let decode_errors = IntCounter::new(
            "nodewarden_event_decode_errors_total",
            "Kernel event records that could not be decoded (dropped).",
        )
        .expect("static metric definition");
        for c in [
            Box::new(oom_kills.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(limit_writes.clone()),
            Box::new(probe_attached.clone()),
            Box::new(decode_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            oom_kills,
            limit_writes,
            probe_attached,
            decode_errors,
        }
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
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
        m.oom_kills.with_label_values(&["/a"]).inc();
        m.limit_writes
            .with_label_values(&["/a", "memory.max", "sh", "ok"])
            .inc_by(2);
        let text = m.render();
        assert!(
            text.contains("nodewarden_oom_kills_total{cgroup=\"/a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "nodewarden_cgroup_limit_writes_total{cgroup=\"/a\",limit=\"memory.max\",result=\"ok\",writer=\"sh\"} 2"
            ),
            "{text}"
        );
    }
}
