//! Lock contention as metric families, built at scrape time from what the contention readers
//! published: the futex histograms come aggregated from the kernel (log2 buckets), which the
//! client library's histogram type cannot take, so the families are built here.

use std::sync::{Arc, Mutex};

use prometheus::{
    core::{Collector, Desc},
    proto::{Bucket, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use super::metrics::{counter_family, desc, label};
use crate::model::contention::{FutexCounts, FutexLabels, OUTCOME_NAMES, ProcessCpu, Published};

/// The histogram's bucket bounds are 2^(k+1) ns for k in this range (2 µs to 69 s); shorter
/// waits fall in the first bucket, longer ones only in `+Inf`.
const LE_EXPONENTS: std::ops::RangeInclusive<usize> = 10..=35;

const WAIT: &str = "nodewarden_futex_wait_seconds";
const WAIT_HELP: &str = "Time threads waited in futex(2) until woken, by process (comm) and cgroup; measured in the kernel.";
const WAITS: &str = "nodewarden_futex_waits_total";
const WAITS_HELP: &str = "Futex waits by outcome: woken, timeout, eagain (the word had changed: no sleep), interrupted, error.";
const LOCK_SHARE: &str = "nodewarden_lock_slowpath_cpu_share";
const LOCK_SHARE_HELP: &str = "Share of a process's sampled on-CPU time over the last minute spent in lock slow paths (Go sync and runtime locks, C library lock waits).";
const MAP_SHARE: &str = "nodewarden_go_map_cpu_share";
const MAP_SHARE_HELP: &str = "Share of a process's sampled on-CPU time over the last minute spent in the Go map runtime (and sync.Map).";
const OFFCPU_SHARE: &str = "nodewarden_lock_offcpu_share";
const OFFCPU_SHARE_HELP: &str = "Of the time a watched process's threads ran or slept blocked on a lock, the share they slept (lost CPU); only processes watched off CPU.";

/// Serves the latest contention figures as metric families.
#[derive(Debug)]
pub struct ContentionCollector {
    published: Arc<Mutex<Published>>,
    descs: Vec<Desc>,
}

impl ContentionCollector {
    #[must_use]
    pub fn new(published: Arc<Mutex<Published>>) -> Self {
        let who = ["comm", "cgroup", "namespace", "pod", "container"];
        let process = ["comm", "cgroup", "pid"];
        Self {
            published,
            descs: vec![
                desc(WAIT, WAIT_HELP, &who),
                desc(
                    WAITS,
                    WAITS_HELP,
                    &["comm", "cgroup", "namespace", "pod", "container", "outcome"],
                ),
                desc(LOCK_SHARE, LOCK_SHARE_HELP, &process),
                desc(MAP_SHARE, MAP_SHARE_HELP, &process),
                desc(OFFCPU_SHARE, OFFCPU_SHARE_HELP, &process),
            ],
        }
    }
}

impl Collector for ContentionCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(p) = self.published.lock() else {
            return Vec::new();
        };
        families(&p)
    }
}

/// The families of `p`; those without series are left out (the encoder refuses them).
fn families(p: &Published) -> Vec<MetricFamily> {
    let mut out = vec![
        wait_histograms(&p.futex),
        counter_family(
            WAITS,
            WAITS_HELP,
            p.futex.iter().flat_map(|(labels, c)| {
                OUTCOME_NAMES.iter().zip(c.outcomes).map(|(name, n)| {
                    let mut l = futex_labels(labels);
                    l.push(label("outcome", name));
                    (l, n)
                })
            }),
        ),
        shares(LOCK_SHARE, LOCK_SHARE_HELP, &p.snapshot.cpu, |c| {
            Some(c.lock_share)
        }),
        shares(MAP_SHARE, MAP_SHARE_HELP, &p.snapshot.cpu, |c| {
            Some(c.map_share)
        }),
        shares(OFFCPU_SHARE, OFFCPU_SHARE_HELP, &p.snapshot.cpu, |c| {
            c.off_cpu.as_ref().map(|o| o.lock_share)
        }),
    ];
    out.retain(|f| !f.get_metric().is_empty());
    out
}

/// `comm`, `cgroup`, then the Kubernetes names where set (empty labels are left out, as in the
/// other metrics).
fn futex_labels(l: &FutexLabels) -> Vec<LabelPair> {
    let mut pairs = vec![label("comm", &l.comm)];
    for (name, value) in ["cgroup", "namespace", "pod", "container"]
        .iter()
        .zip(l.who.labels())
    {
        if !value.is_empty() {
            pairs.push(label(name, value));
        }
    }
    pairs
}

fn wait_histograms(series: &[(FutexLabels, FutexCounts)]) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(WAIT.to_owned());
    f.set_help(WAIT_HELP.to_owned());
    f.set_field_type(MetricType::HISTOGRAM);
    for (labels, c) in series {
        let mut cumulative = c.buckets[..*LE_EXPONENTS.start()]
            .iter()
            .fold(0u64, |a, b| a.saturating_add(*b));
        let buckets = LE_EXPONENTS
            .map(|k| {
                cumulative = cumulative.saturating_add(c.buckets[k]);
                let mut b = Bucket::default();
                #[expect(clippy::cast_precision_loss, reason = "2^36 ns fits an f64 exactly")]
                b.set_upper_bound((1u64 << (k + 1)) as f64 / 1e9);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut h = Histogram::default();
        h.set_bucket(buckets);
        // The encoder adds the +Inf bucket with this count.
        h.set_sample_count(c.outcomes[agent_common::OUTCOME_WOKEN]);
        #[expect(clippy::cast_precision_loss, reason = "a sum in seconds")]
        h.set_sample_sum(c.woken_ns as f64 / 1e9);
        let mut m = Metric::default();
        m.set_label(futex_labels(labels));
        m.set_histogram(h);
        f.mut_metric().push(m);
    }
    f
}

/// A gauge family with a series per process that has a value.
fn shares(
    name: &str,
    help: &str,
    cpu: &[ProcessCpu],
    value: impl Fn(&ProcessCpu) -> Option<f64>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(MetricType::GAUGE);
    for p in cpu {
        let Some(v) = value(p) else { continue };
        let mut g = Gauge::default();
        g.set_value(v);
        let mut m = Metric::default();
        m.set_label(vec![
            label("comm", &p.comm),
            label("cgroup", &p.cgroup),
            label("pid", &p.pid.to_string()),
        ]);
        m.set_gauge(g);
        f.mut_metric().push(m);
    }
    f
}

#[cfg(test)]
mod tests {
    use prometheus::Encoder as _;

    use super::*;
    use crate::model::cgroup::Who;

    #[test]
    fn futex_histograms_have_cumulative_buckets_sum_and_outcomes() {
        let mut c = FutexCounts::default();
        c.buckets[3] = 2; // under 1 µs: counted in the first bucket
        c.buckets[12] = 5; // [4096, 8192) ns
        c.buckets[40] = 1; // over 34 s: only in +Inf
        c.outcomes = [8, 1, 100, 0, 0];
        c.woken_ns = 1_500_000_000;
        let labels = FutexLabels {
            comm: "m\"x".into(),
            who: Who::cgroup("/a"),
        };
        let p = Published {
            futex: vec![(labels, c)],
            ..Published::default()
        };
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&families(&p), &mut buf)
            .expect("encodes");
        let text = String::from_utf8(buf).expect("utf-8");
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit_once(' ')
                .map(|(_, v)| v.to_owned())
                .expect("value")
        };
        let b = "nodewarden_futex_wait_seconds_bucket{comm=\"m\\\"x\",cgroup=\"/a\",";
        assert_eq!(line(&format!("{b}le=\"0.000002048\"}}")), "2");
        assert_eq!(line(&format!("{b}le=\"0.000004096\"}}")), "2");
        assert_eq!(line(&format!("{b}le=\"0.000008192\"}}")), "7");
        assert_eq!(line(&format!("{b}le=\"68.719476736\"}}")), "7");
        assert_eq!(line(&format!("{b}le=\"+Inf\"}}")), "8");
        assert_eq!(
            line("nodewarden_futex_wait_seconds_sum{comm=\"m\\\"x\",cgroup=\"/a\"}"),
            "1.5"
        );
        assert_eq!(
            line("nodewarden_futex_waits_total{comm=\"m\\\"x\",cgroup=\"/a\",outcome=\"eagain\"}"),
            "100"
        );
        assert!(!text.contains("cpu_share"), "no samples, no family: {text}");
    }
}
