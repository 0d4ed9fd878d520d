//! Where the pipeline's updates go: Prometheus metrics, the log, OpenTelemetry spans, and the
//! live event feed. Each sink takes what it needs from each update.

pub mod contention;
pub mod feed;
pub mod health;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod process;
pub mod traces;

use crate::executor::{Job, Queue};
use crate::model::{
    cache::{Bounded, Cache, Evictions},
    cgroup::Who,
    contention::Episode,
    label::{Bound, Label},
    record::{OomKill, Record, SeenBy},
    update::Update,
};

use self::{
    feed::Feed,
    metrics::{Metrics, labelled},
    traces::{IncidentTrace, Traces},
};

/// Incidents whose traces are open at once, at most (the pipeline closes them a second after
/// their last kill, and caps how many are open too).
const MAX_OPEN_TRACES: usize = 1024;

/// The sinks.
#[derive(Debug)]
pub struct Outputs {
    pub metrics: Metrics,
    traces: Traces,
    feed: Feed,
    /// The root spans of the incidents still open, by incident id.
    incidents: Bounded<String, IncidentTrace>,
    /// Decisions and desired values go to the executor (which records decisions itself).
    executor: Option<Queue>,
    /// The writers' comms and Go's fatal messages, as labels: chosen by whoever runs.
    writers: Bound,
    go_reasons: Bound,
}

impl Outputs {
    #[must_use]
    pub fn new(
        metrics: Metrics,
        traces: Traces,
        feed: Feed,
        executor: Option<Queue>,
        evictions: &Evictions,
    ) -> Self {
        Self {
            traces,
            feed,
            incidents: Bounded::new(Cache::OomIncidents, MAX_OPEN_TRACES, evictions.clone()),
            executor,
            writers: Bound::new(Label::Writer, metrics.shared.folded.clone()),
            go_reasons: Bound::new(Label::GoReason, metrics.shared.folded.clone()),
            metrics,
        }
    }

    /// Takes updates to every sink, in order; decisions first, so that a restore never waits
    /// behind the records' exports.
    pub fn apply_all(&mut self, updates: Vec<Update>) {
        let (decisions, rest): (Vec<Update>, Vec<Update>) = updates
            .into_iter()
            .partition(|u| matches!(u, Update::Decision(_)));
        for u in decisions.into_iter().chain(rest) {
            self.apply(u);
        }
    }

    /// Takes one update to every sink.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Record(r) => self.record(&r),
            Update::Limit { who, limit, value } => self.metrics.set_limit(&who, limit, value),
            Update::Expired(cgroup) => self.metrics.forget_cgroup_counters(&cgroup),
            Update::Decision(d) => {
                if let Some(q) = &self.executor {
                    q.submit(Job::Decide(d));
                } else {
                    tracing::warn!(cgroup = %d.cgroup, "no executor: a decision is dropped");
                }
            }
            Update::Desired(s) => {
                if let Some(q) = &self.executor {
                    q.submit(Job::Keep(s));
                }
            }
            Update::Guard(c) => {
                if let Some(q) = &self.executor {
                    q.submit(Job::Guard(c));
                }
            }
            Update::Denial(d) => {
                if let Some(q) = &self.executor {
                    q.submit(Job::Denial(d));
                }
            }
            Update::Resynced(reason) => {
                tracing::info!(
                    reason = reason.as_str(),
                    "limit state read again from cgroupfs"
                );
                if let Some(c) = labelled(&self.metrics.resyncs, &[reason.as_str()]) {
                    c.inc();
                }
            }
        }
    }

    fn record(&mut self, record: &Record) {
        self.feed.publish(record);
        logs::record(record);
        let count = |vec: &prometheus::IntCounterVec, who: &Who, extra: &[&str]| {
            let mut values = who.labels().to_vec();
            values.extend_from_slice(extra);
            if let Some(c) = labelled(vec, &values) {
                c.inc();
            }
        };
        match record {
            Record::LimitWrite(r) => {
                // A change a resync found was made by writes counted already: as lost, or
                // reported without their value. Counted again, one write would count twice.
                if r.seen_by != SeenBy::Resync {
                    let writer = r.writer.as_ref().map_or("unknown", |w| w.comm.as_str());
                    let writer = self.writers.value(writer);
                    count(
                        &self.metrics.limit_writes,
                        &Who::of(&r.cgroup, r.k8s.as_ref()),
                        &[r.limit.file_name(), writer, &r.result],
                    );
                }
                let incident = r.incident.as_ref().and_then(|i| self.incidents.peek(i));
                self.traces.limit_write(r, incident);
            }
            Record::OomKill(r) => self.oom_kill(r),
            Record::OomIncident(r) => {
                Traces::incident_closed(r, self.incidents.remove(&r.id));
            }
            Record::GoFatal(r) => {
                count(
                    &self.metrics.go_fatal_errors,
                    &Who::of(&r.cgroup, r.k8s.as_ref()),
                    &[self.go_reasons.value(&r.reason)],
                );
                self.traces.go_fatal(r);
            }
            // Decisions and denials are the executor's to record.
            Record::CgroupCreated(_) | Record::Decision(_) | Record::GuardDenial(_) => {}
            Record::CgroupRemoved(r) => self.metrics.forget_cgroup(&r.cgroup),
        }
    }

    /// A kill: the first of an incident counts the incident and starts its trace.
    fn oom_kill(&mut self, r: &OomKill) {
        let scope = r.limit.scope.as_str();
        if r.opens_incident {
            let who = Who::of(&r.limit.cgroup, r.limit.k8s.as_ref());
            let mut values = who.labels().to_vec();
            values.push(scope);
            if let Some(c) = labelled(&self.metrics.oom_incidents, &values) {
                c.inc();
            }
            let trace = self.traces.incident_opened(r);
            self.incidents.put(r.incident.clone(), trace);
        }
        let who = Who::of(&r.cgroup, r.k8s.as_ref());
        let mut values = who.labels().to_vec();
        values.push(scope);
        if let Some(c) = labelled(&self.metrics.oom_kills, &values) {
            c.inc();
        }
        self.traces.oom_kill(r, self.incidents.peek(&r.incident));
    }

    /// A futex word with a new long wait (see `contention`).
    pub fn contention_episode(&self, e: &Episode) {
        let l = &e.lock;
        tracing::debug!(pid = l.pid, comm = %l.comm, max_wait_ns = l.max_ns, "futex contention");
        self.traces.contention(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::record::{GoFatal, tests::limit_write_example};

    /// Outputs with metrics only, and a limit write to give them.
    fn outputs_and_a_write() -> (Metrics, Outputs, Box<crate::model::record::LimitWrite>) {
        let metrics = Metrics::new(metrics::Shared::default());
        let outputs = Outputs::new(
            metrics.clone(),
            Traces::disabled(),
            Feed::new(),
            None,
            &Evictions::default(),
        );
        let Record::LimitWrite(write) = limit_write_example() else {
            unreachable!("the example is a limit write");
        };
        (metrics, outputs, write)
    }

    /// 100,000 writers and Go crashes, each with a name of its own (anyone names a process):
    /// the series stay bounded and every fold is counted.
    #[test]
    fn names_chosen_by_processes_cannot_grow_the_series_without_bound() {
        let (metrics, mut outputs, write) = outputs_and_a_write();
        let n = 100_000;
        for i in 0..n {
            let mut w = write.clone();
            if let Some(p) = w.writer.as_mut() {
                p.comm = format!("w{i:x}");
            }
            outputs.apply(Update::Record(Record::LimitWrite(w)));
            outputs.apply(Update::Record(Record::GoFatal(Box::new(GoFatal {
                time_unix_nano: 0,
                cgroup: "/a".into(),
                k8s: None,
                process: write.writer.clone().expect("a writer"),
                reason: format!("fatal {i}"),
                function: "runtime.fatal".into(),
            }))));
        }
        let text = metrics.render();
        let series = |name: &str| text.lines().filter(|l| l.starts_with(name)).count();
        assert_eq!(
            series("nodewarden_cgroup_limit_writes_total{"),
            Label::Writer.cap() + 1
        );
        assert_eq!(
            series("nodewarden_go_fatal_errors_total{"),
            Label::GoReason.cap() + 1
        );
        let folded = |l: Label| metrics.shared.folded.get(l);
        assert_eq!(folded(Label::Writer), (n - Label::Writer.cap()) as u64);
        assert_eq!(folded(Label::GoReason), (n - Label::GoReason.cap()) as u64);
        assert!(text.contains("writer=\"other\""), "{text}");
        assert!(
            text.contains(&format!(
                "nodewarden_label_values_folded_total{{label=\"writer\"}} {}",
                n - Label::Writer.cap()
            )),
            "{text}"
        );
        assert!(text.len() < 1 << 20, "{} bytes", text.len());
    }

    /// A change found by a resync is in the log and the feed, not in the write counter: the
    /// writes that made it were counted (as lost, or reported) when they happened.
    #[test]
    fn a_change_a_resync_found_is_not_counted_as_a_write_again() {
        let (metrics, mut outputs, write) = outputs_and_a_write();
        for seen_by in [SeenBy::Fexit, SeenBy::Resync, SeenBy::Poll] {
            let mut w = write.clone();
            w.seen_by = seen_by;
            w.writer = (seen_by == SeenBy::Fexit)
                .then(|| write.writer.clone())
                .flatten();
            outputs.apply(Update::Record(Record::LimitWrite(w)));
        }
        let text = metrics.render();
        let counted: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("nodewarden_cgroup_limit_writes_total{"))
            .collect();
        assert_eq!(counted.len(), 2, "{text}");
        assert!(
            counted
                .iter()
                .any(|l| l.contains("writer=\"unknown\"") && l.ends_with(" 1")),
            "the poll's change counts once: {text}"
        );
    }
}
