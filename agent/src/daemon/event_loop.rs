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

use crate::{
    enrich::cgroupfs::{CgroupFs, Scan},
    kernel::{
        decode::{decode, decode_exec},
        go::{ExecSeen, forget},
        inotify::Watcher,
        rings::{LossMap, Rings},
    },
    model::{contention::Episode, event::Exec, loss::Losses, update::ResyncReason},
    outputs::Outputs,
    pipeline::Pipeline,
};

/// How often the inotify mode rereads every limit file, to catch what inotify missed.
const POLL_EVERY: Duration = Duration::from_secs(10);

/// How often time-driven work runs: ended OOM incidents, expired series, the kernel's loss
/// counts.
const TICK_EVERY: Duration = Duration::from_millis(250);

/// Records handled per wake-up at most, so that a flood on one ring cannot starve the rest.
const BATCH: usize = 4096;

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
    pub pipeline: Pipeline,
    pub outputs: Outputs,
    pub losses: Losses,
    pub loss_map: Option<LossMap>,
    pub cgroupfs: Option<Arc<CgroupFs>>,
    /// To the Go watcher.
    pub execs: mpsc::SyncSender<Exec>,
    pub exec_seen: Option<ExecSeen>,
    /// From the contention readers.
    pub episodes: mpsc::Receiver<Episode>,
    /// From workers that panicked.
    pub panics: UnboundedReceiver<&'static str>,
    /// The scan running off the loop: why, when it started (monotonic ns), and its task.
    pub scan: Option<(ResyncReason, u64, JoinHandle<Scan>)>,
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
        mut sigterm: Signal,
        mut sigint: Signal,
    ) -> Exit {
        let (mut events, mut execs) = match rings.as_mut() {
            Some(r) => (Some(&mut r.events), Some(&mut r.execs)),
            None => (None, None),
        };
        let mut poll = tokio::time::interval(POLL_EVERY);
        let mut tick = tokio::time::interval(TICK_EVERY);
        loop {
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
                _ = poll.tick(), if watcher.is_some() => self.pipeline.poll(),
                _ = tick.tick() => self.tick(),
                scan = finished(&mut self.scan) => self.scanned(scan),
                Some(worker) = self.panics.recv() => {
                    return Exit::Failed(anyhow!("the {worker} worker panicked"));
                }
                _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); return Exit::Signal; }
                _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); return Exit::Signal; }
            }
            self.start_scan();
        }
    }

    /// Handles up to `max` records of the events ring; `true` when it is empty.
    fn events(&mut self, ring: &mut RingBuf<MapData>, max: usize) -> bool {
        let mut out = Vec::new();
        let mut empty = false;
        for _ in 0..max {
            let Some(record) = ring.next() else {
                empty = true;
                break;
            };
            match decode(&record) {
                Ok(e) => self.pipeline.handle(e, &mut out),
                Err(e) => {
                    // It may have been a limit write or a cgroup change.
                    self.losses.add(LossKind::Record, LossReason::Decode, 1);
                    self.pipeline.events_lost();
                    tracing::warn!("dropped a kernel event: {e}");
                }
            }
        }
        self.apply(out);
        empty
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
            if let Err(mpsc::TrySendError::Full(e)) = self.execs.try_send(exec) {
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
        for o in &batch.observed {
            self.pipeline.observed(o, &mut out);
        }
        self.apply(out);
    }

    /// Time-driven work, the kernel's loss counts (a loss of limit writes or cgroup changes
    /// wants a resync), and the contention spans.
    fn tick(&mut self) {
        let mut out = Vec::new();
        self.pipeline.tick(&mut out);
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
        self.apply(out);
        for e in self.episodes.try_iter() {
            self.outputs.contention_episode(&e);
        }
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
