//! The event loop: the rings, inotify, the clock and the signals. It decodes, runs the
//! pipeline and hands what changed to the outputs; everything slow (a scan of the hierarchy,
//! reading executables, symbolizing stacks) runs elsewhere and comes back as a message.

use std::{
    os::fd::AsRawFd,
    path::Path,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use agent_common::{LossKind, LossReason};
use anyhow::{Context as _, Result, anyhow};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::Signal,
    sync::mpsc::UnboundedReceiver,
    task::JoinHandle,
};

use super::unseen::Unseen;
use crate::{
    config::Config,
    enrich::{
        Cgroups as _,
        cgroupfs::{CgroupFs, Scan},
    },
    kernel::{
        decode::{decode, decode_exec},
        go::{ExecSeen, forget},
        inotify::Watcher,
        rings::{LossMap, Rings},
    },
    model::{
        contention::Episode,
        event::{Exec, Observed},
        loss::Losses,
        trust::TrustSet,
        update::ResyncReason,
    },
    outputs::{
        Outputs,
        health::Health,
        metrics::{Metrics, labelled},
    },
    pipeline::Pipeline,
    rules::{Ruleset, file::RulesError},
};

/// How often the inotify mode rereads every limit file, to catch what inotify missed.
const POLL_EVERY: Duration = Duration::from_secs(10);

/// How often time-driven work runs while some waits on time (an OOM incident to end, a
/// notified file, a limit to look at again) or after anything happened: ended incidents,
/// expired series, the kernel's loss counts.
const TICK_EVERY: Duration = Duration::from_millis(250);

/// How often the loop wakes when nothing happens and nothing waits on time: its liveness and
/// the kernel's loss counts (read with every batch of events too). Each wake-up of an idle
/// agent costs two threads' CPU: at [`TICK_EVERY`] that was most of its idle CPU.
const IDLE_TICK_EVERY: Duration = Duration::from_secs(5);

/// Records handled per wake-up at most, so that a flood on one ring cannot starve the rest.
const BATCH: usize = 4096;

/// Batches of the event ring read before the notified files are judged (the 1 MiB ring holds
/// about 5,200 limit writes: two batches).
const RING_BATCHES_BEFORE_UNSEEN: usize = 2;

/// How often the rules file is looked at for a change.
const RULES_CHECK_EVERY: Duration = Duration::from_secs(2);

/// The signals the loop answers.
#[derive(Debug)]
pub struct Signals {
    pub sigterm: Signal,
    pub sigint: Signal,
    /// Reloads the rules file.
    pub sighup: Signal,
}

/// What a reload task found.
#[derive(Debug)]
enum Reloaded {
    /// The rules file, read and validated (or refused whole), and its stamp.
    Rules(Option<Stamp>, Result<Ruleset, RulesError>),
    /// The rules file did not change.
    Unchanged,
    /// The trusted writers' executables, resolved again.
    Trust(TrustSet),
}

type Stamp = (u64, u64, i64, i64);

/// Reloads of the rules file and the trusted writers, run off the loop one at a time.
#[derive(Debug)]
pub struct Reload {
    config: Config,
    metrics: Metrics,
    /// The rules file as last loaded.
    stamp: Option<Stamp>,
    task: Option<JoinHandle<Reloaded>>,
}

impl Reload {
    #[must_use]
    pub fn new(config: Config, metrics: Metrics) -> Self {
        let stamp = config.rules.as_deref().and_then(super::heal::stamp);
        Self {
            config,
            metrics,
            stamp,
            task: None,
        }
    }

    /// Reads the rules file again if it changed (or whatever, when `forced`: SIGHUP).
    fn rules(&mut self, forced: bool) {
        if self.task.is_some() {
            return;
        }
        let path = self.config.rules.clone();
        let known = self.stamp;
        self.task = Some(tokio::task::spawn_blocking(move || {
            let now = path.as_deref().and_then(super::heal::stamp);
            if !forced && now == known {
                return Reloaded::Unchanged;
            }
            Reloaded::Rules(now, super::heal::rules(path.as_deref()))
        }));
    }

    /// Resolves the trusted writers' executables again, keeping the keys `before` had.
    fn trust(&mut self, before: TrustSet) {
        if self.task.is_some() {
            return;
        }
        let config = self.config.clone();
        self.task = Some(tokio::task::spawn_blocking(move || {
            Reloaded::Trust(super::heal::trust(&config, &before))
        }));
    }
}

/// Why the loop ended.
#[derive(Debug)]
pub enum Exit {
    /// SIGTERM or SIGINT.
    Signal,
    /// A worker died, or a ring could not be polled.
    Failed(anyhow::Error),
}

/// The rings, registered with the runtime.
pub struct AsyncRings {
    events: AsyncFd<RingBuf<MapData>>,
    execs: AsyncFd<RingBuf<MapData>>,
}

impl std::fmt::Debug for AsyncRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncRings").finish_non_exhaustive()
    }
}

/// Registers the rings and the inotify watcher with the runtime.
pub fn register(
    rings: Option<Rings>,
    watcher: Option<Watcher>,
) -> Result<(Option<AsyncRings>, Option<AsyncFd<Watcher>>)> {
    let rings = match rings {
        Some(r) => Some(AsyncRings {
            events: async_fd(r.events).context("registering the event ring with the runtime")?,
            execs: async_fd(r.execs).context("registering the exec ring with the runtime")?,
        }),
        None => None,
    };
    let watcher = match watcher {
        Some(w) => Some(async_fd(w).context("registering inotify with the runtime")?),
        None => None,
    };
    Ok((rings, watcher))
}

fn async_fd<T: AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd, open as long as the AsyncFd owns `inner`.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// The inotify watcher over the whole hierarchy.
pub fn start_watcher(root: &Path) -> Result<Watcher> {
    let w = Watcher::new(root).with_context(|| format!("inotify on {}", root.display()))?;
    tracing::info!(
        "limit writes seen by inotify on {} cgroup directories",
        w.watched()
    );
    Ok(w)
}

/// What the loop owns.
pub struct EventLoop {
    /// From the Kubernetes API watcher, when it runs.
    pub pods: Option<tokio::sync::mpsc::Receiver<crate::model::pods::PodChange>>,
    pub pipeline: Pipeline,
    pub outputs: Outputs,
    pub losses: Losses,
    /// Marked at every tick: `/healthz` fails when the loop stops turning.
    pub health: Health,
    pub loss_map: Option<LossMap>,
    pub cgroupfs: Option<Arc<CgroupFs>>,
    /// New executables for the Go watcher (`None` only wakes it to stop).
    pub execs: mpsc::SyncSender<Option<Exec>>,
    pub exec_seen: Option<ExecSeen>,
    /// Futex contention episodes from the contention thread, for the traces.
    pub episodes: tokio::sync::mpsc::Receiver<Episode>,
    /// From workers that panicked.
    pub panics: UnboundedReceiver<&'static str>,
    /// The scan running off the loop: why, when it started (monotonic ns), and its task.
    pub scan: Option<(ResyncReason, u64, JoinHandle<Scan>)>,
    pub reload: Reload,
    /// Guard changes lost so far (the executor's queue was full), as last acted on.
    pub guard_changes_lost: u64,
    /// In syscalls mode: inotify's notifications waiting for the ring (writes by paths the
    /// tracepoints do not see are reported from them).
    pub unseen: Option<Unseen>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

impl EventLoop {
    /// Runs until a signal, or a failure.
    pub async fn run(
        &mut self,
        rings: &mut Option<AsyncRings>,
        mut watcher: Option<AsyncFd<Watcher>>,
        signals: Signals,
    ) -> Exit {
        let Signals {
            mut sigterm,
            mut sigint,
            mut sighup,
        } = signals;
        let (mut events, mut execs) = match rings.as_mut() {
            Some(r) => (Some(&mut r.events), Some(&mut r.execs)),
            None => (None, None),
        };
        let mut poll = tokio::time::interval(POLL_EVERY);
        let tick = tokio::time::sleep(TICK_EVERY);
        tokio::pin!(tick);
        let every = Duration::from_secs(self.reload.config.remediation.reconcile_interval_s);
        let mut reconcile = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut rules_check = tokio::time::interval(RULES_CHECK_EVERY);
        let watch_rules = self.reload.config.rules.is_some();
        loop {
            // Set by the branches that only look at time: any other may have left work due
            // soon (an incident opened, a retry set), and brings the next tick forward.
            let mut timer = false;
            tokio::select! {
                guard = readable(events.as_deref_mut()) => {
                    let mut guard = match guard {
                        Ok(g) => g,
                        Err(e) => return Exit::Failed(anyhow!("polling the event ring: {e}")),
                    };
                    if self.events(guard.get_inner_mut(), BATCH) {
                        guard.clear_ready();
                    }
                }
                guard = readable(execs.as_deref_mut()) => {
                    let mut guard = match guard {
                        Ok(g) => g,
                        Err(e) => return Exit::Failed(anyhow!("polling the exec ring: {e}")),
                    };
                    if self.execs(guard.get_inner_mut(), BATCH) {
                        guard.clear_ready();
                    }
                }
                guard = readable(watcher.as_mut()) => {
                    let mut guard = match guard {
                        Ok(g) => g,
                        Err(e) => return Exit::Failed(anyhow!("polling inotify: {e}")),
                    };
                    match guard.get_inner_mut().read() {
                        Ok(batch) => self.observed(&batch),
                        Err(e) => return Exit::Failed(anyhow!("reading inotify: {e}")),
                    }
                    guard.clear_ready();
                }
                _ = poll.tick(), if watcher.is_some() && self.unseen.is_none() => self.pipeline.poll(),
                () = &mut tick => {
                    // select! takes ready branches in random order: an agent running behind
                    // could judge a notified file's wait over before reading the ring that
                    // holds its write, and report that write twice. What the ring holds now
                    // comes first (at most a ring's worth, as the ring's own branch reads).
                    if self.unseen.is_some()
                        && let Some(ring) = events.as_deref_mut()
                    {
                        for _ in 0..RING_BATCHES_BEFORE_UNSEEN {
                            if self.events(ring.get_mut(), BATCH) {
                                break;
                            }
                        }
                    }
                    self.tick();
                    tick.as_mut().reset(tokio::time::Instant::now() + self.next_tick());
                    timer = true;
                }
                scan = finished(&mut self.scan) => self.scanned(scan),
                change = pod_change(self.pods.as_mut()) => match change {
                    Some(change) => self.pipeline.pods(change),
                    None => self.pods = None,
                },
                _ = reconcile.tick() => {
                    let mut out = Vec::new();
                    self.pipeline.reconcile(&mut out);
                    self.apply(out);
                    self.reload.trust(self.pipeline.trust().clone());
                }
                _ = rules_check.tick(), if watch_rules => {
                    self.reload.rules(false);
                    timer = true;
                }
                _ = sighup.recv() => {
                    tracing::info!("SIGHUP: reloading the rules");
                    self.reload.rules(true);
                }
                done = reloaded(&mut self.reload.task) => self.reloaded(done),
                Some(e) = self.episodes.recv() => self.outputs.contention_episode(&e),
                Some(worker) = self.panics.recv() => {
                    return Exit::Failed(anyhow!("the {worker} worker panicked"));
                }
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); return Exit::Signal; }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); return Exit::Signal; }
            }
            if !timer {
                let soon = tokio::time::Instant::now() + TICK_EVERY;
                if tick.deadline() > soon {
                    tick.as_mut().reset(soon);
                }
            }
            self.start_scan();
        }
    }

    /// How long until the next tick: soon while a notified file waits or the pipeline has
    /// time-driven work within [`TICK_EVERY`], at most [`IDLE_TICK_EVERY`] otherwise.
    fn next_tick(&self) -> Duration {
        if self.unseen.as_ref().is_some_and(Unseen::waiting) {
            return TICK_EVERY;
        }
        self.pipeline
            .tick_due_in()
            .unwrap_or(IDLE_TICK_EVERY)
            .clamp(TICK_EVERY, IDLE_TICK_EVERY)
    }

    /// Handles up to `max` records of the events ring; `true` when it is empty. The kernel's
    /// loss counts are read after the records and before they are acted on: a record that
    /// survived a full ring must not be acted on as if nothing after it was lost.
    fn events(&mut self, ring: &mut RingBuf<MapData>, max: usize) -> bool {
        let mut decoded = Vec::new();
        let mut empty = false;
        for _ in 0..max {
            let Some(record) = ring.next() else {
                empty = true;
                break;
            };
            decoded.push(decode(&record));
        }
        if !decoded.is_empty() {
            self.kernel_losses();
        }
        let mut events = Vec::with_capacity(decoded.len());
        for d in decoded {
            match d {
                Ok(e) => events.push(e),
                Err(e) => {
                    // It may have been a limit write or a cgroup change.
                    self.losses.add(LossKind::Record, LossReason::Decode, 1);
                    self.pipeline.events_lost();
                    tracing::warn!("dropped a kernel event: {e}");
                }
            }
        }
        let mut out = Vec::new();
        self.pipeline.handle_all(events, &mut out);
        self.apply(out);
        empty
    }

    /// The kernel's loss counts: a loss of limit writes or cgroup changes wants a resync
    /// before anything acts on the limits.
    fn kernel_losses(&mut self) {
        if let Some(totals) = self.loss_map.as_ref().and_then(LossMap::totals) {
            let more = self.losses.set_kernel(&totals);
            if more.iter().any(|k| k.stales_limits()) {
                tracing::warn!(
                    ?more,
                    "the kernel lost events: the limit state is read again"
                );
                self.pipeline.events_lost();
            }
        }
    }

    /// Passes up to `max` exec records to the Go watcher; `true` when the ring is empty.
    fn execs(&mut self, ring: &mut RingBuf<MapData>, max: usize) -> bool {
        for _ in 0..max {
            let Some(record) = ring.next() else {
                return true;
            };
            let exec = match decode_exec(&record) {
                Ok(e) => e,
                Err(e) => {
                    self.losses.add(LossKind::Exec, LossReason::Decode, 1);
                    tracing::warn!("dropped an exec record: {e}");
                    continue;
                }
            };
            if let Err(mpsc::TrySendError::Full(Some(e))) = self.execs.try_send(Some(exec)) {
                // The kernel forgets the file too: its next exec is reported again.
                self.losses.add(LossKind::Exec, LossReason::QueueFull, 1);
                if let Some(seen) = &self.exec_seen {
                    forget(seen, &e.key);
                }
            }
        }
        false
    }

    fn observed(&mut self, batch: &crate::kernel::inotify::Batch) {
        let mut out = Vec::new();
        if batch.overflowed {
            self.losses
                .add(LossKind::LimitWrite, LossReason::InotifyOverflow, 1);
            self.pipeline.events_lost();
        }
        if let Some(unseen) = &mut self.unseen {
            if !unseen.notified(&batch.observed, Instant::now()) {
                self.losses
                    .add(LossKind::LimitWrite, LossReason::InotifyOverflow, 1);
                self.pipeline.events_lost();
            }
            return;
        }
        for o in &batch.observed {
            self.pipeline.observed(o, &mut out);
        }
        self.apply(out);
    }

    /// The notified files whose wait for the ring is over, read again: what the probes did
    /// not report is reported (see `unseen`).
    fn unseen_writes(&mut self) {
        let (Some(unseen), Some(fs)) = (&mut self.unseen, &self.cgroupfs) else {
            return;
        };
        let mut out = Vec::new();
        for (id, path, limit) in unseen.due(Instant::now()) {
            // Gone meanwhile: its removal says the rest.
            let Some(text) = fs.limit(id, &path, limit) else {
                continue;
            };
            let o = Observed {
                id,
                path,
                limit,
                value: text.trim().to_owned(),
            };
            self.pipeline.observed(&o, &mut out);
        }
        self.apply(out);
    }

    /// Time-driven work, and the kernel's loss counts (a loss of limit writes or cgroup
    /// changes wants a resync).
    fn tick(&mut self) {
        self.health.turned(Instant::now());
        self.kernel_losses();
        self.unseen_writes();
        let dropped = self
            .losses
            .get(LossKind::GuardChange, LossReason::QueueFull);
        if dropped > self.guard_changes_lost {
            self.guard_changes_lost = dropped;
            tracing::warn!("a change to the guard's maps was lost: they are rebuilt");
            let mut out = Vec::new();
            self.pipeline.guard_lost(&mut out);
            self.apply(out);
        }
        let mut out = Vec::new();
        self.pipeline.tick(&mut out);
        self.apply(out);
    }

    /// Starts a scan off the loop when the pipeline wants one and none runs.
    fn start_scan(&mut self) {
        if self.scan.is_some() {
            return;
        }
        let Some(fs) = self.cgroupfs.clone() else {
            // Nothing to scan: there is no hierarchy.
            let _ = self.pipeline.take_resync();
            return;
        };
        if let Some((reason, since)) = self.pipeline.take_resync() {
            self.scan = Some((
                reason,
                since,
                tokio::task::spawn_blocking(move || fs.scan()),
            ));
        }
    }

    fn scanned(&mut self, done: (ResyncReason, u64, Result<Scan, tokio::task::JoinError>)) {
        let (reason, since, scan) = done;
        match scan {
            Ok(scan) => {
                let mut out = Vec::new();
                self.pipeline.apply_scan(&scan, since, reason, &mut out);
                self.apply(out);
            }
            Err(e) => tracing::error!("scanning the cgroup hierarchy: {e}"),
        }
    }

    fn reloaded(&mut self, done: Result<Reloaded, tokio::task::JoinError>) {
        let count = |m: &Metrics, result: &str| {
            if let Some(c) = labelled(&m.rules_reloads, &[result]) {
                c.inc();
            }
        };
        match done {
            Ok(Reloaded::Unchanged) => {}
            Ok(Reloaded::Trust(set)) => {
                let mut out = Vec::new();
                self.pipeline.set_trust(set, &mut out);
                self.apply(out);
            }
            Ok(Reloaded::Rules(stamp, Ok(rules))) => {
                tracing::info!(rules = rules.rules.len(), "rules reloaded");
                self.reload.stamp = stamp;
                self.pipeline.set_rules(rules);
                count(&self.reload.metrics, "ok");
            }
            Ok(Reloaded::Rules(stamp, Err(e))) => {
                tracing::error!("rules not reloaded, the previous ones stay: {e}");
                self.reload.stamp = stamp;
                count(&self.reload.metrics, "invalid");
            }
            Err(e) => tracing::error!("reloading: {e}"),
        }
    }

    fn apply(&mut self, out: Vec<crate::model::update::Update>) {
        self.outputs.apply_all(out);
    }

    /// At shutdown, with the programs detached: handles what they left in the rings until
    /// `deadline` (execs left are not looked at: the agent is stopping), then reports the
    /// incidents still open.
    pub fn drain(&mut self, rings: &mut Option<AsyncRings>, deadline: Instant) {
        if let Some(r) = rings.as_mut() {
            while Instant::now() < deadline && !self.events(r.events.get_mut(), 256) {}
        }
        let mut out = Vec::new();
        self.pipeline.finish(&mut out);
        self.apply(out);
    }
}

/// Readiness of an optional fd; never ready when there is none.
async fn readable<T: AsRawFd>(
    fd: Option<&mut AsyncFd<T>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, T>> {
    match fd {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// The next pod change; never when there is no watcher (`None` once it ended).
async fn pod_change(
    rx: Option<&mut tokio::sync::mpsc::Receiver<crate::model::pods::PodChange>>,
) -> Option<crate::model::pods::PodChange> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The running reload's result when it ends; never when none runs.
async fn reloaded(
    task: &mut Option<JoinHandle<Reloaded>>,
) -> Result<Reloaded, tokio::task::JoinError> {
    match task {
        Some(handle) => {
            let result = handle.await;
            *task = None;
            result
        }
        None => std::future::pending().await,
    }
}

/// The running scan's result when it ends; never when none runs.
async fn finished(
    scan: &mut Option<(ResyncReason, u64, JoinHandle<Scan>)>,
) -> (ResyncReason, u64, Result<Scan, tokio::task::JoinError>) {
    match scan {
        Some((reason, since, handle)) => {
            let result = handle.await;
            let (reason, since) = (*reason, *since);
            *scan = None;
            (reason, since, result)
        }
        None => std::future::pending().await,
    }
}
