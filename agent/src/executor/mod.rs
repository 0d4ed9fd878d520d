//! The executor: the only code that writes cgroupfs. It takes the pipeline's decisions on a
//! thread of its own, so that a restore never waits behind the event loop's other work; carries
//! out restores (enforce) and their checks (dry-run); and records every decision: the audit
//! log, the metrics, the event feed, the log and a span. It also keeps the state file of
//! desired values.

pub mod audit;
pub mod files;
pub mod guard;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use agent_common::{LossKind, LossReason};

use self::{
    audit::AuditLog,
    files::{Attempt, LimitFiles},
    guard::Guard,
};
use crate::{
    model::{
        guard::GuardChange,
        heal::{Mode, Outcome, Reason, StateFile, Verdict},
        limit,
        loss::Losses,
        record::{Decision, GuardDenial, Record, Trigger},
    },
    outputs::{
        feed::Feed,
        logs,
        metrics::{Metrics, labelled},
        traces::Traces,
    },
};

/// Decisions and state snapshots waiting for the executor; beyond, they are counted as lost.
pub const QUEUE: usize = 4096;

/// What the executor is given.
#[derive(Debug)]
pub enum Job {
    Decide(Box<Decision>),
    /// The desired values, to keep in the state file.
    Keep(StateFile),
    /// A change to the guard's kernel maps.
    Guard(GuardChange),
    /// A guard denial, to record.
    Denial(Box<GuardDenial>),
    /// Nothing: wakes the executor to look at its stop flag.
    Wake,
}

/// Where jobs go: a bounded queue that never blocks the sender.
#[derive(Debug, Clone)]
pub struct Queue {
    tx: mpsc::SyncSender<Job>,
    losses: Losses,
}

impl Queue {
    /// Hands `job` over; a full queue drops it, counted.
    pub fn submit(&self, job: Job) {
        if let Err(mpsc::TrySendError::Full(j) | mpsc::TrySendError::Disconnected(j)) =
            self.tx.try_send(job)
        {
            match j {
                Job::Decide(d) => {
                    tracing::warn!(cgroup = %d.cgroup, rule = %d.rule, "the executor's queue is full: a decision is dropped");
                    self.losses
                        .add(LossKind::Decision, LossReason::QueueFull, 1);
                }
                Job::Denial(_) => {
                    self.losses
                        .add(LossKind::GuardDenial, LossReason::QueueFull, 1);
                }
                Job::Guard(c) => {
                    // Counted, and the event loop has the guard's state rebuilt for it.
                    tracing::warn!(
                        ?c,
                        "the executor's queue is full: a guard change is dropped"
                    );
                    self.losses
                        .add(LossKind::GuardChange, LossReason::QueueFull, 1);
                }
                Job::Keep(_) => {
                    self.losses
                        .add(LossKind::Decision, LossReason::QueueFull, 1);
                }
                // A full queue wakes the executor anyway.
                Job::Wake => {}
            }
        }
    }
}

/// A queue and its receiving end.
#[must_use]
pub fn queue(losses: &Losses) -> (Queue, mpsc::Receiver<Job>) {
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    (
        Queue {
            tx,
            losses: losses.clone(),
        },
        rx,
    )
}

/// Where the executor's records go.
#[derive(Debug)]
pub struct Sinks {
    pub metrics: Metrics,
    pub feed: Feed,
    pub traces: Traces,
    pub audit: Option<AuditLog>,
    pub state_file: Option<PathBuf>,
}

/// The executor's state.
pub struct Executor {
    files: Box<dyn LimitFiles + Send>,
    sinks: Sinks,
    /// The guard's maps, when it is attached.
    guard: Option<Guard>,
    /// A snapshot to write, and since when it waits.
    pending: Option<(StateFile, Instant)>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor").finish_non_exhaustive()
    }
}

/// How long a state snapshot may wait for quieter moments.
const KEEP_WITHIN: Duration = Duration::from_secs(1);

/// The longest the executor waits for a job when it has nothing to do: it is woken to stop.
const IDLE_WAIT: Duration = Duration::from_secs(60);

/// `CLOCK_MONOTONIC` now, in ns: the kernel's event timestamps' clock.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl Executor {
    #[must_use]
    pub fn new(files: Box<dyn LimitFiles + Send>, sinks: Sinks) -> Self {
        Self {
            files,
            sinks,
            guard: None,
            pending: None,
        }
    }

    /// With the guard's maps to keep.
    #[must_use]
    pub fn with_guard(mut self, guard: Guard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Takes jobs until `stop`, or until the queue's senders are gone; what is queued then is
    /// still done (restores first: they are at the head).
    pub fn run(mut self, jobs: &mpsc::Receiver<Job>, stop: &AtomicBool) {
        loop {
            // Idle, it sleeps until a job (or [`Job::Wake`]) comes; a snapshot waits its time.
            let wait = self.pending.as_ref().map_or(IDLE_WAIT, |(_, since)| {
                KEEP_WITHIN.saturating_sub(since.elapsed())
            });
            match jobs.recv_timeout(wait) {
                Ok(job) => self.take(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if stop.load(Ordering::Relaxed) {
                while let Ok(job) = jobs.try_recv() {
                    self.take(job);
                }
                break;
            }
            self.keep(false);
        }
        self.keep(true);
    }

    fn take(&mut self, job: Job) {
        match job {
            Job::Decide(d) => self.decide(*d),
            Job::Keep(s) => {
                let since = self.pending.as_ref().map_or_else(Instant::now, |p| p.1);
                self.pending = Some((s, since));
            }
            Job::Guard(c) => self.guard(&c),
            Job::Denial(d) => self.denial(*d),
            Job::Wake => {}
        }
    }

    /// Changes the guard's maps; a failure leaves that file unprotected, counted and said.
    fn guard(&mut self, change: &GuardChange) {
        let Some(guard) = &mut self.guard else {
            return;
        };
        if let Err(e) = guard.apply(change, self.files.as_ref()) {
            self.sinks.metrics.guard_errors.inc();
            tracing::warn!(?change, "guard: {e}");
        }
        self.sinks
            .metrics
            .guard_files
            .set(i64::try_from(guard.files()).unwrap_or(i64::MAX));
    }

    /// Records a guard denial: metrics, span, audit log, log, feed.
    fn denial(&mut self, d: GuardDenial) {
        if let Some(c) = labelled(
            &self.sinks.metrics.guard_denials,
            &[&d.rule, d.limit.file_name(), d.result.as_str()],
        ) {
            c.inc();
        }
        self.sinks.traces.guard_denial(&d);
        self.write_out(&Record::GuardDenial(Box::new(d)));
    }

    /// Writes the pending snapshot when it waited long enough (or `now`).
    fn keep(&mut self, now: bool) {
        let due = self
            .pending
            .as_ref()
            .is_some_and(|(_, since)| now || since.elapsed() >= KEEP_WITHIN);
        if !due {
            return;
        }
        let Some((snapshot, _)) = self.pending.take() else {
            return;
        };
        if let Some(path) = &self.sinks.state_file
            && let Err(e) = save(path, &snapshot)
        {
            tracing::warn!("keeping desired values in {}: {e}", path.display());
        }
    }

    /// Carries out `d` as its verdict and mode say, then records it.
    pub fn decide(&mut self, mut d: Decision) {
        let to = d
            .desired
            .as_deref()
            .and_then(|v| limit::parse(d.limit, v).ok());
        let outcome = match (d.verdict, d.mode, to) {
            (Verdict::Restore, Mode::Enforce, Some(to)) => {
                match self.files.restore(d.cgroup_id, d.limit, to, true) {
                    Attempt::Written { read_back } => {
                        #[expect(clippy::cast_precision_loss, reason = "seconds, for a histogram")]
                        let seconds = monotonic_ns().saturating_sub(d.changed_ns) as f64 / 1e9;
                        if d.trigger == Trigger::Write {
                            self.sinks.metrics.remediation_latency.observe(seconds);
                        }
                        Outcome::Restored {
                            read_back,
                            latency_seconds: seconds,
                        }
                    }
                    other => outcome_of(other),
                }
            }
            (Verdict::WouldRestore, Mode::DryRun, Some(to)) => {
                outcome_of(self.files.restore(d.cgroup_id, d.limit, to, false))
            }
            _ => Outcome::Recorded,
        };
        d.outcome = Some(outcome);
        self.record(d);
    }

    fn record(&mut self, d: Decision) {
        let result = d.outcome.as_ref().map_or("recorded", Outcome::label);
        if let Some(c) = labelled(
            &self.sinks.metrics.remediations,
            &[&d.rule, d.verdict.as_str(), result],
        ) {
            c.inc();
        }
        if d.verdict == Verdict::Alert
            && d.reason == Some(Reason::Fight)
            && let Some(c) = labelled(&self.sinks.metrics.remediation_fights, &[&d.rule])
        {
            c.inc();
        }
        self.sinks.traces.decision(&d);
        self.write_out(&Record::Decision(Box::new(d)));
    }

    /// The audit log's line, the log's and the feed's.
    fn write_out(&mut self, record: &Record) {
        if let Some(audit) = &mut self.sinks.audit {
            match serde_json::to_string(record) {
                Ok(line) => {
                    if let Err(e) = audit.append(&line) {
                        tracing::warn!("audit log: {e}");
                    }
                }
                Err(e) => tracing::warn!("audit log: encoding a record: {e}"),
            }
        }
        logs::record(record);
        self.sinks.feed.publish(record);
    }
}

fn outcome_of(a: Attempt) -> Outcome {
    match a {
        Attempt::Written { read_back } => Outcome::Restored {
            read_back,
            latency_seconds: 0.0,
        },
        Attempt::Checked => Outcome::Checked,
        Attempt::NotWritten(reason) => Outcome::NotWritten { reason },
        Attempt::Failed(error) => Outcome::Failed { error },
    }
}

/// Writes `snapshot` to `path` whole (a new file renamed over the old one).
pub fn save(path: &Path, snapshot: &StateFile) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let text = serde_json::to_vec(snapshot).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The state file at `path`; `None` when there is none, or it does not parse (said so).
#[must_use]
pub fn load(path: &Path) -> Option<StateFile> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("desired values in {}: {e}", path.display());
            return None;
        }
    };
    serde_json::from_slice(&text)
        .map_err(|e| tracing::warn!("desired values in {}: not read: {e}", path.display()))
        .ok()
}

/// The kernel's boot id: cgroup ids are meaningful within one boot only.
#[must_use]
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
