//! Prometheus metrics: one place defines every name, label and help text.

use agent_common::LimitFile;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::limits::LimitValue;

/// The agent's metrics, registered in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Processes killed by the OOM killer, by the victim's cgroup.
    pub oom_kills: IntCounterVec,
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
            &["cgroup", "limit"],
        )
        .expect("static metric definition");
        let pids_limit = GaugeVec::new(
            Opts::new(
                "nodewarden_cgroup_pids_limit",
                "Current pids.max of each cgroup; max is +Inf.",
            ),
            &["cgroup"],
        )
        .expect("static metric definition");
        let cpu_limit_cores = GaugeVec::new(
            Opts::new(
                "nodewarden_cgroup_cpu_limit_cores",
                "Current cpu.max of each cgroup as cores (quota / period); max is +Inf.",
            ),
            &["cgroup"],
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
            limit_writes,
            probe_info,
            limit_bytes,
            pids_limit,
            cpu_limit_cores,
            decode_errors,
        }
    }

    /// Sets the gauge of one limit of one cgroup.
    pub fn set_limit(&self, cgroup: &str, limit: LimitFile, value: LimitValue) {
        let v = value.as_f64();
        match limit {
            LimitFile::PidsMax => self.pids_limit.with_label_values(&[cgroup]).set(v),
            LimitFile::CpuMax => self.cpu_limit_cores.with_label_values(&[cgroup]).set(v),
            _ => self
                .limit_bytes
                .with_label_values(&[cgroup, limit.file_name()])
                .set(v),
        }
    }

    /// Drops the limit gauges of a removed cgroup (its counters stay).
    pub fn forget_cgroup(&self, cgroup: &str) {
        for limit in LimitFile::ALL {
            let _ = match limit {
                LimitFile::PidsMax => self.pids_limit.remove_label_values(&[cgroup]),
                LimitFile::CpuMax => self.cpu_limit_cores.remove_label_values(&[cgroup]),
                _ => self
                    .limit_bytes
                    .remove_label_values(&[cgroup, limit.file_name()]),
            };
        }
    }

    /// The Prometheus text exposition of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let text = TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
        spell_infinities(&text)
    }
}

/// The encoder prints sample values with Rust's `Display`, which spells infinity `inf`; the
/// exposition format spells it `+Inf`/`-Inf` (an unlimited cgroup's limit is +Inf). Sample lines
/// end with the value (no timestamps are set), and label values are quoted, so only the last
/// token of a line is touched.
fn spell_infinities(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let fixed = if line.starts_with('#') {
            None
        } else if let Some(head) = line.strip_suffix(" inf") {
            Some((head, " +Inf"))
        } else {
            line.strip_suffix(" -inf").map(|head| (head, " -Inf"))
        };
        match fixed {
            Some((head, value)) => {
                out.push_str(head);
                out.push_str(value);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
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
        m.set_limit("/a", LimitFile::MemoryMax, LimitValue::Max);
        m.set_limit(
            "/a",
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
