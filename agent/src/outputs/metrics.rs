//! Prometheus metrics: one place defines every name, label and help text. Event counts and
//! limit gauges are the client library's vectors; what other parts of the agent own (losses,
//! cache evictions, contention) is read at scrape time by registered collectors. The library
//! encodes everything.

use agent_common::{LimitFile, LossKind};
use prometheus::{
    IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
    core::{Collector, Desc, MetricVec, MetricVecBuilder},
    proto::{Counter, LabelPair, Metric, MetricFamily, MetricType},
};

use std::sync::{Arc, Mutex};

use crate::kernel::bpf_stats::{ProgramRuns, RunStats};
use crate::model::{
    cache::{Cache, Evictions},
    cgroup::Who,
    contention::Published,
    label::{Folded, Label},
    limit::LimitValue,
    loss::Losses,
    probe::ProbeStatus,
    update::ResyncReason,
};

/// The series of `vec` with these label values; a wrong count of values (a bug) is logged
/// instead of panicking as `with_label_values` would.
pub fn labelled<T: MetricVecBuilder>(vec: &MetricVec<T>, values: &[&str]) -> Option<T::M> {
    vec.get_metric_with_label_values(values)
        .map_err(|e| tracing::error!("metric {:?}: {e}", vec.desc().first().map(|d| &d.fq_name)))
        .ok()
}

/// What the agent's own threads share with the metrics.
#[derive(Debug, Clone, Default)]
pub struct Shared {
    pub losses: Losses,
    pub evictions: Evictions,
    /// Label values folded into `other`.
    pub folded: Folded,
    /// Contention, as its readers last published it.
    pub contention: Arc<Mutex<Published>>,
    /// Whether the event loop turns and start-up is over, for `/healthz` and `/readyz`.
    pub health: super::health::Health,
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
    pub limit_bytes: prometheus::GaugeVec,
    /// Current pids.max.
    pub pids_limit: prometheus::GaugeVec,
    /// Current cpu.max as cores (quota / period; `max` is +Inf).
    pub cpu_limit_cores: prometheus::GaugeVec,
    /// Rescans of the hierarchy, by why.
    pub resyncs: IntCounterVec,
    /// Worker threads that panicked (the agent then stops).
    pub worker_panics: IntCounterVec,
    /// Decisions about watched limits, by rule, verdict and what the executor made of them.
    pub remediations: IntCounterVec,
    /// From a bad change's kernel timestamp to the restored value read back.
    pub remediation_latency: prometheus::Histogram,
    /// Fights detected (another writer rewriting a limit after restores), by rule.
    pub remediation_fights: IntCounterVec,
    /// Loads of the rules file after start-up (SIGHUP, or the file changed), by result.
    pub rules_reloads: IntCounterVec,
    /// 1 while the pods of this node are listed and watched from the API server.
    pub kubernetes_api_up: prometheus::IntGauge,
    /// Untrusted opens of protected limit files for writing, by rule, limit and result.
    pub guard_denials: IntCounterVec,
    /// Limit files the guard protects now.
    pub guard_files: prometheus::IntGauge,
    /// Changes to the guard's kernel maps that failed (a file not found, a full map).
    pub guard_errors: prometheus::IntCounter,
    pub shared: Shared,
}

const OOM_LABELS: [&str; 5] = ["cgroup", "namespace", "pod", "container", "scope"];
const GO_FATAL_LABELS: [&str; 5] = ["cgroup", "namespace", "pod", "container", "reason"];
const LIMIT_LABELS: [&str; 5] = ["cgroup", "namespace", "pod", "container", "limit"];
const LIMIT_WRITE_LABELS: [&str; 7] = [
    "cgroup",
    "namespace",
    "pod",
    "container",
    "limit",
    "writer",
    "result",
];

impl Metrics {
    /// Creates and registers every metric.
    #[must_use]
    #[expect(clippy::too_many_lines, reason = "one definition per metric")]
    pub fn new(shared: Shared) -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(OmitEmptyLabels(c.clone())))
                .expect("metric names are unique");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = prometheus::GaugeVec::new(Opts::new(name, help), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(OmitEmptyLabels(g.clone())))
                .expect("metric names are unique");
            g
        };
        let m = Self {
            oom_kills: counter(
                "nodewarden_oom_kills_total",
                "Processes killed by the kernel's OOM killer, by the victim's cgroup and where the limit was hit (scope: container, pod, node).",
                &OOM_LABELS,
            ),
            oom_incidents: counter(
                "nodewarden_oom_incidents_total",
                "OOM limit hits, counted once however many processes were killed, by the cgroup whose limit was hit (/ for the node) and scope.",
                &OOM_LABELS,
            ),
            go_fatal_errors: counter(
                "nodewarden_go_fatal_errors_total",
                "Go processes that hit a fatal error (concurrent map writes...), by reason and cgroup.",
                &GO_FATAL_LABELS,
            ),
            limit_writes: counter(
                "nodewarden_cgroup_limit_writes_total",
                "Writes to cgroup limit files, by target cgroup, limit file, writer comm and result.",
                &LIMIT_WRITE_LABELS,
            ),
            resyncs: counter(
                "nodewarden_resyncs_total",
                "Reads of every cgroup's limit files, by why: start, events_lost, unknown_cgroup, poll, reconcile.",
                &["reason"],
            ),
            worker_panics: counter(
                "nodewarden_worker_panics_total",
                "Agent threads that panicked, by thread (the agent then exits with an error).",
                &["worker"],
            ),
            remediations: counter(
                "nodewarden_remediations_total",
                "Decisions about watched limits, by rule, action (restore, would_restore, alert, skip, accept) and result (restored, failed, checked, not_written, recorded).",
                &["rule", "action", "result"],
            ),
            remediation_fights: counter(
                "nodewarden_remediation_fights_total",
                "Fights detected: another writer put its value back again and again after restores; the agent then leaves the cgroup alone for remediation.fight_backoff_s.",
                &["rule"],
            ),
            guard_denials: counter(
                "nodewarden_guard_denials_total",
                "Opens of protected limit files for writing by untrusted processes, by rule, limit and result: denied (the open failed with EPERM, the value was never written), or would_deny (dry-run: it went through).",
                &["rule", "limit", "result"],
            ),
            guard_files: {
                let g = prometheus::IntGauge::new(
                    "nodewarden_guard_protected_files",
                    "Limit files the guard protects now (rules with protect, in mode dry-run or enforce, where the guard is attached).",
                )
                .expect("static metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric names are unique");
                g
            },
            guard_errors: {
                let c = prometheus::IntCounter::new(
                    "nodewarden_guard_errors_total",
                    "Changes to the guard's kernel maps that failed (a limit file that could not be found, a full map): such a file is not protected; the log says why.",
                )
                .expect("static metric definition");
                registry
                    .register(Box::new(c.clone()))
                    .expect("metric names are unique");
                c
            },
            rules_reloads: counter(
                "nodewarden_rules_reloads_total",
                "Loads of the rules file after start-up (SIGHUP or a change of the file), by result: ok, or invalid (the previous rules stay).",
                &["result"],
            ),
            remediation_latency: {
                let h = prometheus::Histogram::with_opts(
                    prometheus::HistogramOpts::new(
                        "nodewarden_remediation_latency_seconds",
                        "From a bad limit change (the kernel's timestamp of the write) to the restored value read back.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
                    ]),
                )
                .expect("static metric definition");
                registry
                    .register(Box::new(h.clone()))
                    .expect("metric names are unique");
                h
            },
            limit_bytes: gauge(
                "nodewarden_cgroup_limit_bytes",
                "Current memory limits of each cgroup (memory.max, .high, .low, .min, .swap.max); max is +Inf.",
                &LIMIT_LABELS,
            ),
            pids_limit: gauge(
                "nodewarden_cgroup_pids_limit",
                "Current pids.max of each cgroup; max is +Inf.",
                &Who::LABELS,
            ),
            cpu_limit_cores: gauge(
                "nodewarden_cgroup_cpu_limit_cores",
                "Current cpu.max of each cgroup as cores (quota / period); max is +Inf.",
                &Who::LABELS,
            ),
            kubernetes_api_up: {
                let g = prometheus::IntGauge::new(
                    "nodewarden_kubernetes_api_up",
                    "1 while the pods of this node are listed and watched from the API server (desired limits, names); 0 outside a cluster, when turned off, or while it is unreachable.",
                )
                .expect("static metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric names are unique");
                g
            },
            probe_info: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "nodewarden_probe_info",
                        "Always 1; mode says how each capability is attached (unavailable: not at all).",
                    ),
                    &["capability", "mode"],
                )
                .expect("static metric definition");
                registry
                    .register(Box::new(g.clone()))
                    .expect("metric names are unique");
                g
            },
            registry,
            shared,
        };
        for r in ResyncReason::ALL {
            m.resyncs.with_label_values(&[r.as_str()]);
        }
        for r in ["ok", "invalid"] {
            m.rules_reloads.with_label_values(&[r]);
        }
        m.registry
            .register(Box::new(losses(m.shared.losses.clone())))
            .expect("metric names are unique");
        m.registry
            .register(Box::new(evictions(m.shared.evictions.clone())))
            .expect("metric names are unique");
        m.registry
            .register(Box::new(folded(m.shared.folded.clone())))
            .expect("metric names are unique");
        m.registry
            .register(Box::new(super::contention::ContentionCollector::new(
                m.shared.contention.clone(),
            )))
            .expect("metric names are unique");
        m.registry
            .register(Box::new(build_info()))
            .expect("metric names are unique");
        // What the agent itself costs: CPU seconds, resident memory, open files.
        m.registry
            .register(Box::new(super::process::ProcessCollector::new()))
            .expect("metric names are unique");
        m
    }

    /// Exports the run counts and run time of the agent's eBPF programs, read from `stats` at
    /// every scrape, and whether the kernel counts them.
    pub fn bpf_programs(&self, stats: Box<dyn RunStats>) {
        if let Err(e) = self.registry.register(Box::new(BpfRuns::new(stats))) {
            tracing::error!("eBPF program run metrics: {e}");
        }
    }

    /// Sets `nodewarden_probe_info` for each capability's status.
    pub fn probes(&self, status: &[ProbeStatus]) {
        for s in status {
            if let Some(g) = labelled(&self.probe_info, &[s.capability.as_str(), s.mode.as_str()]) {
                g.set(1);
            }
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
        remove_series(&self.pids_limit, &Who::LABELS, cgroup);
        remove_series(&self.cpu_limit_cores, &Who::LABELS, cgroup);
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
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    /// Every metric name the registry exports (for the documentation test).
    #[cfg(test)]
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.registry
            .gather()
            .iter()
            .map(|f| f.name().to_owned())
            .collect()
    }
}

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

/// A vector whose series leave out labels with empty values: Prometheus treats an empty label
/// as absent, and the Kubernetes labels are empty outside Kubernetes, so a host's series stay
/// short.
#[derive(Debug)]
struct OmitEmptyLabels<C>(C);

impl<C: Collector> Collector for OmitEmptyLabels<C> {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.0.collect();
        for f in &mut families {
            for m in f.mut_metric() {
                let kept: Vec<LabelPair> = m
                    .get_label()
                    .iter()
                    .filter(|l| !l.value().is_empty())
                    .cloned()
                    .collect();
                m.set_label(kept);
            }
        }
        families
    }
}

/// The description of a family a collector serves.
pub fn desc(name: &str, help: &str, labels: &[&str]) -> Desc {
    Desc::new(
        name.to_owned(),
        help.to_owned(),
        labels.iter().map(|l| (*l).to_owned()).collect(),
        std::collections::HashMap::new(),
    )
    .expect("static metric definition")
}

/// A label pair.
pub fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

/// A counter family from (labels, value) series.
#[expect(clippy::cast_precision_loss, reason = "counts exposed as floats")]
pub fn counter_family(
    name: &str,
    help: &str,
    series: impl Iterator<Item = (Vec<LabelPair>, u64)>,
) -> MetricFamily {
    float_counter_family(name, help, series.map(|(labels, v)| (labels, v as f64)))
}

/// A counter family of fractional values (seconds) from (labels, value) series.
pub fn float_counter_family(
    name: &str,
    help: &str,
    series: impl Iterator<Item = (Vec<LabelPair>, f64)>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(MetricType::COUNTER);
    for (labels, value) in series {
        let mut c = Counter::default();
        c.set_value(value);
        let mut m = Metric::default();
        m.set_label(labels);
        m.set_counter(c);
        f.mut_metric().push(m);
    }
    f
}

/// Series of one counter family that another part of the agent counts, read at scrape time.
type Series = Box<dyn Fn() -> Vec<(Vec<LabelPair>, u64)> + Send + Sync>;

/// A counter family whose values are read at scrape time from counts the agent's parts keep
/// (losses, cache evictions, folded label values), every series from zero.
struct Counts {
    name: &'static str,
    help: &'static str,
    desc: Desc,
    series: Series,
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counts")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Counts {
    fn new(name: &'static str, help: &'static str, labels: &[&str], series: Series) -> Self {
        Self {
            name,
            help,
            desc: desc(name, help, labels),
            series,
        }
    }
}

impl Collector for Counts {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        vec![counter_family(
            self.name,
            self.help,
            (self.series)().into_iter(),
        )]
    }
}

/// `nodewarden_events_lost_total{kind,reason}`: what the kernel and the agent could not record.
const LOST: &str = "nodewarden_events_lost_total";
const LOST_HELP: &str = "Events the agent could not record, by what (kind) and why (reason): ring buffer or map full, stack map collisions, slots taken, undecodable records, queues full. Counted in the kernel per CPU and in the agent; a loss of limit writes or cgroup changes is followed by a resync.";

fn losses(losses: Losses) -> Counts {
    let series = move || {
        let losses = &losses;
        LossKind::ALL
            .into_iter()
            .flat_map(|kind| {
                kind.reasons().iter().map(move |reason| {
                    let labels = vec![
                        label("kind", kind.as_str()),
                        label("reason", reason.as_str()),
                    ];
                    (labels, losses.get(kind, *reason))
                })
            })
            .collect()
    };
    Counts::new(LOST, LOST_HELP, &["kind", "reason"], Box::new(series))
}

/// `nodewarden_cache_evictions_total{cache}`.
const EVICTIONS: &str = "nodewarden_cache_evictions_total";
const EVICTIONS_HELP: &str = "Entries the agent's bounded caches pushed out to stay within their caps, by cache: a cap too small for this node shows here.";

fn evictions(evictions: Evictions) -> Counts {
    let series = move || {
        Cache::ALL
            .into_iter()
            .map(|c| (vec![label("cache", c.as_str())], evictions.get(c)))
            .collect()
    };
    Counts::new(EVICTIONS, EVICTIONS_HELP, &["cache"], Box::new(series))
}

/// `nodewarden_label_values_folded_total{label}`.
const FOLDED: &str = "nodewarden_label_values_folded_total";
const FOLDED_HELP: &str = "Series updates whose label value (a writer's comm, a Go fatal message, a process's comm) was counted under `other` because the label already has as many distinct values as it keeps, by label.";

fn folded(folded: Folded) -> Counts {
    let series = move || {
        Label::ALL
            .into_iter()
            .map(|l| (vec![label("label", l.as_str())], folded.get(l)))
            .collect()
    };
    Counts::new(FOLDED, FOLDED_HELP, &["label"], Box::new(series))
}

/// `nodewarden_build_info{version,commit}`, always 1.
fn build_info() -> prometheus::IntGauge {
    let g = prometheus::IntGauge::with_opts(
        Opts::new(
            "nodewarden_build_info",
            "Always 1; the agent's version and the git commit it was built from (unknown when built outside a git checkout).",
        )
        .const_label("version", env!("CARGO_PKG_VERSION"))
        .const_label("commit", env!("NODEWARDEN_COMMIT")),
    )
    .expect("static metric definition");
    g.set(1);
    g
}

const BPF_STATS_ENABLED: &str = "nodewarden_bpf_stats_enabled";
const BPF_STATS_ENABLED_HELP: &str = "1 while the kernel counts eBPF program runs and run time (the agent holds BPF_ENABLE_STATS, or sysctl kernel.bpf_stats_enabled is 1); 0: the program counters below do not move.";
const BPF_RUNS: &str = "nodewarden_bpf_program_runs_total";
const BPF_RUNS_HELP: &str = "Runs of each of the agent's loaded and attached eBPF programs, by the program's name in the object, counted by the kernel while nodewarden_bpf_stats_enabled is 1.";
const BPF_RUN_SECONDS: &str = "nodewarden_bpf_program_run_seconds_total";
const BPF_RUN_SECONDS_HELP: &str = "Time each of the agent's loaded and attached eBPF programs ran, by the program's name in the object, measured by the kernel while nodewarden_bpf_stats_enabled is 1.";

/// The agent's eBPF programs' run statistics, read from the kernel at scrape time. The
/// `program` label is bounded: its values are the programs of the agent's object (a few
/// dozen), never anything the node chooses.
#[derive(Debug)]
struct BpfRuns {
    stats: Box<dyn RunStats>,
    enabled: prometheus::IntGauge,
    descs: [Desc; 2],
}

impl BpfRuns {
    fn new(stats: Box<dyn RunStats>) -> Self {
        Self {
            stats,
            enabled: prometheus::IntGauge::new(BPF_STATS_ENABLED, BPF_STATS_ENABLED_HELP)
                .expect("static metric definition"),
            descs: [
                desc(BPF_RUNS, BPF_RUNS_HELP, &["program"]),
                desc(BPF_RUN_SECONDS, BPF_RUN_SECONDS_HELP, &["program"]),
            ],
        }
    }
}

impl Collector for BpfRuns {
    fn desc(&self) -> Vec<&Desc> {
        self.enabled.desc().into_iter().chain(&self.descs).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.enabled.set(i64::from(self.stats.enabled()));
        let programs = self.stats.programs();
        let labels = |p: &ProgramRuns| vec![label("program", &p.program)];
        let mut families = self.enabled.collect();
        families.push(counter_family(
            BPF_RUNS,
            BPF_RUNS_HELP,
            programs.iter().map(|p| (labels(p), p.runs)),
        ));
        families.push(float_counter_family(
            BPF_RUN_SECONDS,
            BPF_RUN_SECONDS_HELP,
            programs
                .iter()
                .map(|p| (labels(p), p.run_time.as_secs_f64())),
        ));
        families
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashMap};

    use agent_common::LossReason;

    use super::*;

    #[test]
    fn renders_counters_and_gauges_without_empty_labels() {
        let m = Metrics::new(Shared::default());
        m.oom_kills
            .with_label_values(&["/a", "", "", "", "container"])
            .inc();
        m.oom_incidents
            .with_label_values(&["/b", "", "", "", "pod"])
            .inc();
        m.limit_writes
            .with_label_values(&["/a", "", "", "", "memory.max", "sh", "ok"])
            .inc_by(2);
        let a = Who::cgroup("/a");
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
        // The library writes infinity as Rust prints it; Prometheus reads it as +Inf.
        assert!(
            text.contains("nodewarden_cgroup_limit_bytes{cgroup=\"/a\",limit=\"memory.max\"} inf"),
            "{text}"
        );
        assert!(
            text.contains("nodewarden_cgroup_cpu_limit_cores{cgroup=\"/a\"} 0.5"),
            "{text}"
        );
        m.forget_cgroup("/a");
        assert!(!m.render().contains("nodewarden_cgroup_limit_bytes{"));
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

    /// A registry with a series of every metric the agent exports.
    fn every_metric() -> Metrics {
        let shared = Shared::default();
        let m = Metrics::new(shared.clone());
        // Pod and container names too: an empty label is left out of the exposition.
        let who = ["/a", "ns", "pod", "c"];
        m.oom_kills
            .with_label_values(&[&who[..], &["pod"]].concat());
        m.oom_incidents
            .with_label_values(&[&who[..], &["pod"]].concat());
        m.go_fatal_errors
            .with_label_values(&[&who[..], &["x"]].concat());
        m.limit_writes
            .with_label_values(&[&who[..], &["memory.max", "sh", "ok"]].concat());
        m.worker_panics.with_label_values(&["go"]);
        m.remediations
            .with_label_values(&["r", "restore", "restored"]);
        m.remediation_fights.with_label_values(&["r"]);
        m.guard_denials
            .with_label_values(&["r", "memory.max", "denied"]);
        m.probe_info.with_label_values(&["limit_writes", "fexit"]);
        for limit in LimitFile::ALL {
            m.set_limit(&Who::cgroup("/a"), limit, LimitValue::Max);
        }
        {
            let mut p = shared.contention.lock().expect("lock");
            p.futex.push((
                crate::model::contention::FutexLabels {
                    comm: "c".into(),
                    who: Who::cgroup("/a"),
                },
                crate::model::contention::FutexCounts::default(),
            ));
            let mut cpu = crate::model::contention::ProcessCpu::empty(1, "c".into(), "/a".into());
            cpu.off_cpu = Some(crate::model::contention::OffCpuFigures {
                watched_seconds: 1.0,
                cpu_seconds: 1.0,
                lock_seconds: 0.0,
                total_seconds: 0.0,
                lock_share: 0.0,
                lock_call_site: None,
            });
            p.snapshot.cpu.push(cpu);
        }
        m.bpf_programs(Box::new(FakeRuns {
            enabled: true,
            programs: vec![runs("p", 1, 1)],
        }));
        m
    }

    /// docs/metrics.md names every metric the agent exports.
    #[test]
    fn every_metric_is_documented() {
        let m = every_metric();
        let docs = include_str!("../../../docs/metrics.md");
        let names = m.names();
        // Ours, the process collector's seven and the eBPF programs' three.
        assert_eq!(names.len(), 37, "{names:?}");
        for name in names {
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} is not in docs/metrics.md"
            );
        }
    }

    /// Labels Prometheus adds to every series it scrapes.
    const TARGET_LABELS: [&str; 2] = ["job", "instance"];

    /// Series Prometheus makes itself, with their labels (the target's).
    const PROMETHEUS_SERIES: [&str; 1] = ["up"];

    /// Every series name the agent exports (a histogram's `_bucket`, `_sum` and `_count`), with
    /// the label names it has.
    fn exported_series(m: &Metrics) -> HashMap<String, BTreeSet<String>> {
        use prometheus::proto::MetricType;
        let mut series: HashMap<String, BTreeSet<String>> = HashMap::new();
        for family in m.registry.gather() {
            let labels: BTreeSet<String> = family
                .get_metric()
                .iter()
                .flat_map(|m| m.get_label().iter().map(|l| l.name().to_owned()))
                .chain(TARGET_LABELS.map(str::to_owned))
                .collect();
            let name = family.name();
            if family.get_field_type() == MetricType::HISTOGRAM {
                let mut bucket = labels.clone();
                bucket.insert("le".to_owned());
                series.insert(format!("{name}_bucket"), bucket);
                series.insert(format!("{name}_sum"), labels.clone());
                series.insert(format!("{name}_count"), labels);
            } else {
                series.insert(name.to_owned(), labels);
            }
        }
        for name in PROMETHEUS_SERIES {
            series.insert(name.to_owned(), TARGET_LABELS.map(str::to_owned).into());
        }
        series
    }

    /// The series an expression selects (name and the labels it matches on) and the labels it
    /// groups or matches by.
    #[derive(Default)]
    struct Named {
        selectors: Vec<(String, Vec<String>)>,
        grouping: Vec<String>,
    }

    fn walk(e: &promql_parser::parser::Expr, out: &mut Named) {
        use promql_parser::parser::Expr;
        let mut selector = |vs: &promql_parser::parser::VectorSelector| {
            let labels = vs
                .matchers
                .matchers
                .iter()
                .chain(vs.matchers.or_matchers.iter().flatten())
                .map(|m| m.name.clone())
                .filter(|n| n != "__name__")
                .collect();
            out.selectors
                .push((vs.name.clone().unwrap_or_default(), labels));
        };
        match e {
            Expr::VectorSelector(vs) => selector(vs),
            Expr::MatrixSelector(ms) => selector(&ms.vs),
            Expr::Aggregate(a) => {
                if let Some(m) = &a.modifier {
                    out.grouping.extend(m.labels().labels.iter().cloned());
                }
                walk(&a.expr, out);
                if let Some(p) = &a.param {
                    walk(p, out);
                }
            }
            Expr::Binary(b) => {
                if let Some(m) = b.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                    out.grouping.extend(m.labels().labels.iter().cloned());
                }
                walk(&b.lhs, out);
                walk(&b.rhs, out);
            }
            Expr::Unary(u) => walk(&u.expr, out),
            Expr::Paren(p) => walk(&p.expr, out),
            Expr::Subquery(q) => walk(&q.expr, out),
            Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, out)),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
        }
    }

    /// Checks that every series `expr` selects is exported with the labels it matches on, and
    /// that the labels it groups by are among theirs. Returns the labels of the series selected
    /// and the grouping labels.
    fn check_query(
        what: &str,
        expr: &str,
        exported: &HashMap<String, BTreeSet<String>>,
    ) -> (BTreeSet<String>, Vec<String>) {
        let ast =
            promql_parser::parser::parse(expr).unwrap_or_else(|e| panic!("{what}: {e}\n{expr}"));
        let mut named = Named::default();
        walk(&ast, &mut named);
        assert!(!named.selectors.is_empty(), "{what} selects nothing");
        let mut known = BTreeSet::new();
        for (series, labels) in &named.selectors {
            let Some(has) = exported.get(series) else {
                panic!("{what}: {series:?} is not a series the agent exports");
            };
            for l in labels {
                assert!(has.contains(l), "{what}: {series} has no label {l:?}");
            }
            known.extend(has.iter().cloned());
        }
        for l in &named.grouping {
            assert!(
                known.contains(l),
                "{what}: groups by {l:?}, which its series lack"
            );
        }
        (known, named.grouping)
    }

    /// Every metric and label the alert rules (deploy/prometheus) name, in their expressions and
    /// in the labels their annotations print, is one the agent exports (or Prometheus adds):
    /// an alert on a renamed metric would never fire, and nothing else would say so.
    #[test]
    fn the_alert_rules_name_only_what_the_agent_exports() {
        let exported = exported_series(&every_metric());
        let text = include_str!("../../../deploy/prometheus/nodewarden-alerts.yaml");
        let file: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).expect("rules YAML");
        let mut alerts = 0;
        for group in file["groups"].as_sequence().expect("groups") {
            for rule in group["rules"].as_sequence().expect("rules") {
                let name = rule["alert"].as_str().expect("alert name");
                let expr = rule["expr"].as_str().expect("expr");
                let (known, grouping) = check_query(name, expr, &exported);
                // The labels an annotation prints: `{{ $labels.x }}`.
                let annotations = serde_yaml_ng::to_string(&rule["annotations"]).expect("YAML");
                for part in annotations.split("$labels.").skip(1) {
                    let label: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    let kept = if grouping.is_empty() {
                        known.contains(&label)
                    } else {
                        grouping.contains(&label)
                    };
                    assert!(
                        kept,
                        "{name}: an annotation prints {label:?}, which the alert lacks"
                    );
                }
                alerts += 1;
            }
        }
        assert_eq!(alerts, 10, "alerts checked");
    }

    /// Every query of the Grafana dashboard (deploy/grafana), its panels' and its template
    /// variables', names only series and labels the agent exports.
    #[test]
    fn the_dashboard_queries_name_only_what_the_agent_exports() {
        fn queries(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
            match v {
                serde_json::Value::Object(o) => {
                    let title = o.get("title").and_then(|t| t.as_str()).unwrap_or(title);
                    if let Some(e) = o.get("expr").and_then(|e| e.as_str()) {
                        out.push((title.to_owned(), e.to_owned()));
                    }
                    o.values().for_each(|v| queries(v, title, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, title, out)),
                _ => {}
            }
        }
        let exported = exported_series(&every_metric());
        let text = include_str!("../../../deploy/grafana/nodewarden-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(text).expect("dashboard JSON");
        let mut found = Vec::new();
        queries(&dashboard["panels"], "", &mut found);
        assert_eq!(found.len(), 20, "panel queries: {found:?}");
        for (title, expr) in &found {
            // Grafana's variables, as it would fill them in.
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            check_query(title, &expr, &exported);
        }
        let variables = dashboard["templating"]["list"]
            .as_array()
            .expect("variables");
        let mut label_values = 0;
        for v in variables {
            let Some(q) = v["query"]["query"].as_str() else {
                continue;
            };
            let (series, label) = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|r| r.split_once(", "))
                .unwrap_or_else(|| {
                    panic!("variable query {q:?} is not label_values(series, label)")
                });
            let has = exported
                .get(series)
                .unwrap_or_else(|| panic!("variable: {series:?} is not exported"));
            assert!(
                has.contains(label),
                "variable: {series} has no label {label:?}"
            );
            label_values += 1;
        }
        assert_eq!(label_values, 1, "variables checked");
    }

    /// Run statistics as a kernel would give them.
    #[derive(Debug)]
    struct FakeRuns {
        enabled: bool,
        programs: Vec<ProgramRuns>,
    }

    impl RunStats for FakeRuns {
        fn enabled(&self) -> bool {
            self.enabled
        }
        fn programs(&self) -> Vec<ProgramRuns> {
            self.programs.clone()
        }
    }

    fn runs(program: &str, runs: u64, run_time_ns: u64) -> ProgramRuns {
        ProgramRuns {
            program: program.to_owned(),
            runs,
            run_time: std::time::Duration::from_nanos(run_time_ns),
        }
    }

    #[test]
    fn bpf_program_runs_are_exported_with_whether_they_are_counted() {
        let m = Metrics::new(Shared::default());
        assert!(!m.render().contains("nodewarden_bpf_"));
        m.bpf_programs(Box::new(FakeRuns {
            enabled: true,
            programs: vec![
                runs("sched_switch", 12_345, 2_500_000_000),
                runs("futex_exit", 0, 0),
            ],
        }));
        let text = m.render();
        for line in [
            "nodewarden_bpf_stats_enabled 1",
            "nodewarden_bpf_program_runs_total{program=\"sched_switch\"} 12345",
            "nodewarden_bpf_program_run_seconds_total{program=\"sched_switch\"} 2.5",
            "nodewarden_bpf_program_runs_total{program=\"futex_exit\"} 0",
            "nodewarden_bpf_program_run_seconds_total{program=\"futex_exit\"} 0",
            "# TYPE nodewarden_bpf_program_run_seconds_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }

        // Not counted, and no program loaded: the gauge says so, and no program has series.
        let m = Metrics::new(Shared::default());
        m.bpf_programs(Box::new(FakeRuns {
            enabled: false,
            programs: Vec::new(),
        }));
        let text = m.render();
        assert!(
            text.lines().any(|l| l == "nodewarden_bpf_stats_enabled 0"),
            "{text}"
        );
        assert!(!text.contains("nodewarden_bpf_program_"), "{text}");
    }

    #[test]
    fn build_info_and_process_metrics_are_exported() {
        let text = Metrics::new(Shared::default()).render();
        let info = format!(
            "nodewarden_build_info{{commit=\"{}\",version=\"{}\"}} 1",
            env!("NODEWARDEN_COMMIT"),
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == info), "no {info:?} in:\n{text}");
        assert!(!env!("NODEWARDEN_COMMIT").is_empty());
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse::<f64>().ok());
        assert!(rss.is_some_and(|r| r > 0.0), "{text}");
        assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
    }

    #[test]
    fn losses_and_evictions_are_exported_from_zero() {
        let shared = Shared::default();
        let m = Metrics::new(shared.clone());
        let text = m.render();
        assert!(
            text.contains(
                "nodewarden_events_lost_total{kind=\"limit_write\",reason=\"ring_full\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("nodewarden_cache_evictions_total{cache=\"cgroup_paths\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("nodewarden_resyncs_total{reason=\"events_lost\"} 0"),
            "{text}"
        );
        shared.losses.add(LossKind::Exec, LossReason::QueueFull, 3);
        shared.evictions.add(Cache::Stacks, 2);
        let text = m.render();
        assert!(
            text.contains("nodewarden_events_lost_total{kind=\"exec\",reason=\"queue_full\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("nodewarden_cache_evictions_total{cache=\"stacks\"} 2"),
            "{text}"
        );
    }
}
