//! `nodewarden run`: the daemon. Wiring only: the probes, the pipeline, the outputs, the
//! workers, the event loop, and a bounded shutdown.

mod attach;
mod ebpf_logs;
mod event_loop;
mod heal;
mod unseen;
mod workers;

use std::{
    sync::{Arc, atomic::Ordering, mpsc},
    time::Instant,
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use self::{
    attach::Attached,
    event_loop::{EventLoop, Exit},
};
use crate::{
    config::Config,
    enrich::{cgroupfs::CgroupFs, kubelet::KubeletNames, procfs::ProcFs},
    kernel::{bpf_stats, go::GoWatcher},
    model::{probe::ProbeMode, update::ResyncReason},
    outputs::{
        Outputs, feed, http,
        metrics::{Metrics, Shared},
        traces::Traces,
    },
    pipeline::{Pipeline, Settings, Sources, clock::SystemClock},
};

/// Execs waiting for the Go watcher; beyond, they are dropped and counted (and the kernel
/// reports the file again at its next exec).
const EXEC_QUEUE: usize = 4096;

/// Contention spans waiting for the event loop.
const EPISODE_QUEUE: usize = 1024;

/// Pod changes waiting for the event loop (the watcher waits when it is full: nothing lost).
const POD_QUEUE: usize = 256;

/// Runs until SIGTERM or SIGINT, then stops by `config.shutdown_drain` after it. Returns how it
/// ended and that deadline, which bounds what the caller still flushes.
pub async fn run(config: &Config, traces: &Traces) -> (Result<()>, Instant) {
    let mut deadline = None;
    let result = run_until_stopped(config, traces, &mut deadline).await;
    let deadline = deadline.unwrap_or_else(|| Instant::now() + config.shutdown_drain);
    (result, deadline)
}

#[expect(
    clippy::too_many_lines,
    reason = "start-up in its order, read top to bottom"
)]
async fn run_until_stopped(
    config: &Config,
    traces: &Traces,
    deadline: &mut Option<Instant>,
) -> Result<()> {
    // First, so that a signal during start-up also stops the agent cleanly.
    let sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    // The rules and the check that enforce can be honoured come before the kernel is touched.
    let cgroupfs = hierarchy(config);
    let mut heal_settings = heal::settings(config)?;
    heal::preflight(config, cgroupfs.as_ref())?;
    let shared = Shared::default();
    let metrics = Metrics::new(shared.clone());
    http::raise_open_files_limit();
    let listener = http::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", config.metrics_listen))?;
    let events_listener = match &config.events_socket {
        Some(path) => Some((feed::bind(path).await?, path.clone())),
        None => None,
    };

    let mut attached = attach::attach(config, &metrics)?;
    let bpf_stats = bpf_stats::start(config.bpf_stats, &attached.status);
    metrics.bpf_programs(Box::new(bpf_stats::KernelRunStats::new(
        attached.ebpf.clone(),
        bpf_stats,
    )));
    let (panics_tx, panics) = tokio::sync::mpsc::unbounded_channel();
    let (episodes_tx, episodes) = tokio::sync::mpsc::channel(EPISODE_QUEUE);
    let (execs_tx, execs_rx) = mpsc::sync_channel(EXEC_QUEUE);
    let exec_seen = attached
        .exec_seen
        .take()
        .map(|m| Arc::new(std::sync::Mutex::new(m)));
    let maps = std::mem::take(&mut attached.contention);
    let workers: Vec<workers::Worker> = [
        start_contention(config, maps, &shared, &metrics, &panics_tx, episodes_tx)?,
        match exec_seen.clone() {
            Some(seen) => {
                let go = GoWatcher::new(attached.ebpf.clone(), seen, &shared.evictions);
                let wake = execs_tx.clone();
                // A full queue needs no wake-up: the watcher looks at its stop between execs.
                Some(
                    start_go(go, execs_rx, &metrics, &panics_tx)?.waking(move || {
                        let _ = wake.try_send(None);
                    }),
                )
            }
            None => None,
        },
    ]
    .into_iter()
    .flatten()
    .collect();

    let guard_maps = attached.guard.take();
    heal_settings.guard_active = guard_maps.is_some();
    guard_report(config, &heal_settings, guard_maps.is_some());
    let mut pipeline = pipeline(config, &attached, cgroupfs.as_ref(), &shared, heal_settings);
    let feed = feed::Feed::new();
    let (queue, jobs) = crate::executor::queue(&shared.losses);
    let executor = heal::start_executor(
        config,
        cgroupfs.as_ref(),
        page_size(),
        jobs,
        &metrics,
        feed.clone(),
        traces.clone(),
        &panics_tx,
        guard_maps,
    )?
    .waking({
        let queue = queue.clone();
        move || queue.submit(crate::executor::Job::Wake)
    });
    let mut outputs = Outputs::new(
        metrics.clone(),
        traces.clone(),
        feed.clone(),
        Some(queue),
        &shared.evictions,
    );
    // The state starts from the hierarchy as it is now.
    if let Some(fs) = &cgroupfs {
        let mut out = Vec::new();
        let since = pipeline.scan_starts();
        pipeline.apply_scan(&fs.scan(), since, ResyncReason::Start, &mut out);
        outputs.apply_all(out);
    }
    // In syscalls mode inotify backs the tracepoints up (see `unseen`).
    let backed_up = attached.limit_mode == ProbeMode::Syscalls;
    let watcher = match (
        &cgroupfs,
        attached.limit_mode == ProbeMode::Inotify || backed_up,
    ) {
        (Some(fs), true) => Some(event_loop::start_watcher(fs.root())?),
        _ => None,
    };
    if backed_up {
        tracing::info!(
            "{}",
            crate::model::probe::limit_write_coverage(ProbeMode::Syscalls)
        );
    }

    shared.health.ready(Instant::now());
    let (stop_tx, endpoints) = serve(listener, events_listener, &metrics, feed, &panics_tx);
    tracing::info!(
        "nodewarden running (mode {:?}, profile {}); metrics at http://{}/metrics",
        config.mode,
        config.profile.as_str(),
        config.metrics_listen
    );

    let pods = kubernetes(config, &metrics);
    let mut event_loop = EventLoop {
        pods,
        pipeline,
        outputs,
        losses: shared.losses.clone(),
        health: shared.health.clone(),
        loss_map: attached.losses.take(),
        cgroupfs,
        execs: execs_tx,
        exec_seen,
        episodes,
        panics,
        scan: None,
        reload: event_loop::Reload::new(config.clone(), metrics.clone()),
        guard_changes_lost: 0,
        unseen: (backed_up && watcher.is_some()).then(unseen::Unseen::default),
    };
    let (mut rings, watcher) = event_loop::register(attached.rings.take(), watcher)?;
    let signals = event_loop::Signals {
        sigterm,
        sigint,
        sighup,
    };
    let exit = event_loop.run(&mut rings, watcher, signals).await;

    let stop_by = Instant::now() + config.shutdown_drain;
    *deadline = Some(stop_by);
    let stopping = Stopping {
        deadline: stop_by,
        workers,
        executor,
        attached: &attached,
        stop: stop_tx,
    };
    stopping.stop(&mut event_loop, &mut rings, endpoints).await;
    match exit {
        Exit::Signal => Ok(()),
        Exit::Failed(e) => Err(e),
    }
}

/// What a bounded shutdown stops.
struct Stopping<'a> {
    deadline: Instant,
    workers: Vec<workers::Worker>,
    /// Stopped after the drain: what the drain decides is still carried out and recorded.
    executor: workers::Worker,
    attached: &'a Attached,
    /// Tells the endpoints to stop.
    stop: watch::Sender<bool>,
}

impl Stopping<'_> {
    /// The programs detach first (nothing new comes in), what they left in the rings is
    /// handled, the open incidents are reported, the endpoints stop, and the threads are
    /// joined, all by the deadline.
    async fn stop(
        self,
        event_loop: &mut EventLoop,
        rings: &mut Option<event_loop::AsyncRings>,
        endpoints: impl Future<Output = ()>,
    ) {
        let start = Instant::now();
        for w in &self.workers {
            w.stop();
        }
        let mut aggregators = detach(self.attached, self.deadline);
        let detached = start.elapsed();
        event_loop.drain(rings, self.deadline);
        self.executor.stop();
        let drained = start.elapsed();
        let _ = self.stop.send(true);
        let left = self.deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, endpoints).await.is_err() {
            tracing::warn!("the endpoints did not stop within the drain time");
        }
        for w in self.workers.into_iter().chain([self.executor]) {
            w.join(self.deadline);
        }
        let stopped = start.elapsed();
        // Kernel time, after the drain: nothing they did is lost by now.
        if let Some(ebpf) = aggregators.as_mut() {
            crate::kernel::loader::unload_where(ebpf, |_| true);
        }
        tracing::info!(
            ?detached,
            ?drained,
            ?stopped,
            aggregators_detached = ?start.elapsed(),
            "programs detached, events drained, endpoints and workers stopped"
        );
    }
}

/// Serves `/metrics` and the event socket (events, contention) until told to stop; a panic in
/// either stops the agent.
/// Returns the stop signal and what ends when both have stopped.
fn serve(
    metrics_listener: tokio::net::TcpListener,
    events_listener: Option<(tokio::net::UnixListener, std::path::PathBuf)>,
    metrics: &Metrics,
    feed: feed::Feed,
    panics: &workers::Panics,
) -> (watch::Sender<bool>, impl Future<Output = ()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = workers::watch(
        "metrics endpoint",
        tokio::spawn(http::serve(
            metrics_listener,
            metrics.clone(),
            stop_rx.clone(),
        )),
        metrics,
        panics,
    );
    let feed_server = events_listener.map(|(l, path)| {
        workers::watch(
            "event feed",
            tokio::spawn(feed::serve(
                l,
                path,
                feed,
                metrics.shared.contention.clone(),
                stop_rx,
            )),
            metrics,
            panics,
        )
    });
    let endpoints = async {
        if let Some(f) = feed_server {
            let _ = f.await;
        }
        let _ = server.await;
    };
    (stop_tx, endpoints)
}

/// Says at start-up what the rules with `protect` get: the guard, and that it fails open; or
/// restoring only, and why.
fn guard_report(config: &Config, heal: &crate::pipeline::HealSettings, attached: bool) {
    let protecting = heal.rules.rules.iter().filter(|r| r.protect).count();
    if attached {
        tracing::info!(
            mode = config.mode.as_str(),
            rules = protecting,
            "guard attached (BPF LSM on file_open): rules with protect refuse untrusted writers; it fails open: protection ends when the agent stops or crashes (nothing is pinned)"
        );
    } else if protecting > 0 {
        tracing::warn!(
            rules = protecting,
            "guard not attached (nodewarden check says why): rules with protect fall back to restoring"
        );
    }
}

/// The pods of this node from the API server, watched by a task of their own.
fn kubernetes(
    config: &Config,
    metrics: &Metrics,
) -> Option<tokio::sync::mpsc::Receiver<crate::model::pods::PodChange>> {
    if config.kubernetes.api == crate::config::KubernetesApi::Off {
        tracing::info!("Kubernetes API: off (kubernetes.api = \"off\")");
        return None;
    }
    let Some(node) = crate::enrich::kube_api::node_name(&config.kubernetes.node_name) else {
        tracing::warn!(
            "Kubernetes API: not used: no node name (set kubernetes.node_name or $NODE_NAME)"
        );
        return None;
    };
    let (tx, rx) = tokio::sync::mpsc::channel(POD_QUEUE);
    tokio::spawn(crate::enrich::kube_api::run(
        None,
        node,
        tx,
        metrics.kubernetes_api_up.clone(),
    ));
    Some(rx)
}

/// The cgroup v2 hierarchy: configured, or found mounted.
fn hierarchy(config: &Config) -> Option<Arc<CgroupFs>> {
    let root = config
        .cgroup_root
        .clone()
        .or_else(crate::enrich::cgroupfs::find_mount);
    if root.is_none() {
        tracing::warn!("no cgroup v2 mount found: cgroup paths will be unknown");
    }
    root.map(|r| {
        tracing::info!("cgroup v2 hierarchy at {}", r.display());
        Arc::new(CgroupFs::new(r))
    })
}

/// The contention readers' thread, when any of their probes attached.
fn start_contention(
    config: &Config,
    maps: crate::contention::Maps,
    shared: &Shared,
    metrics: &Metrics,
    panics: &workers::Panics,
    episodes: tokio::sync::mpsc::Sender<crate::model::contention::Episode>,
) -> std::io::Result<Option<workers::Worker>> {
    if maps.is_empty() {
        return Ok(None);
    }
    let cx = crate::contention::Context {
        selectors: config.selectors.clone(),
        kubelet_dir: config.kubelet_log_dir.clone(),
        published: shared.contention.clone(),
        evictions: shared.evictions.clone(),
        losses: shared.losses.clone(),
        folded: shared.folded.clone(),
    };
    workers::spawn("contention", metrics, panics, move |stop| {
        crate::contention::run(maps, &cx, &episodes, stop);
    })
    .map(Some)
}

/// The Go watcher's thread: the processes running now, then each new executable.
fn start_go(
    mut go: GoWatcher,
    execs: mpsc::Receiver<Option<crate::model::event::Exec>>,
    metrics: &Metrics,
    panics: &workers::Panics,
) -> std::io::Result<workers::Worker> {
    workers::spawn("go", metrics, panics, move |stop| {
        for pid in crate::enrich::procfs::pids() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            go.consider(pid);
        }
        // No timeout: each would be a wake-up of an idle agent. A stop sends `None`.
        while !stop.load(Ordering::Relaxed) {
            match execs.recv() {
                Ok(Some(e)) => go.exec(e.tgid, e.key),
                Ok(None) => {}
                Err(mpsc::RecvError) => return,
            }
        }
    })
}

/// The pipeline over the node's real sources.
fn pipeline(
    config: &Config,
    attached: &Attached,
    cgroupfs: Option<&Arc<CgroupFs>>,
    shared: &Shared,
    heal: crate::pipeline::HealSettings,
) -> Pipeline {
    Pipeline::new(
        Sources {
            cgroups: match cgroupfs {
                Some(fs) => Box::new(fs.clone()),
                None => Box::new(NoCgroups),
            },
            procs: Box::new(ProcFs),
            names: Box::new(KubeletNames::new(
                config.kubelet_log_dir.clone(),
                shared.evictions.clone(),
            )),
            clock: Box::new(SystemClock::new()),
        },
        Settings {
            limit_writes: attached.seen_by(),
            deleted_ttl_ns: u64::try_from(config.deleted_cgroup_ttl.as_nanos()).unwrap_or(u64::MAX),
            page_size: page_size(),
        },
        heal,
        &shared.evictions,
    )
}

/// Takes the loaded object from the Go watcher (waiting at most until `deadline` for it to let
/// go) and detaches every program that writes to the event rings; returns the object with the
/// programs that only aggregate into maps still attached, to be detached after the drain.
fn detach(attached: &Attached, deadline: Instant) -> Option<aya::Ebpf> {
    let taken = loop {
        match attached.ebpf.try_lock() {
            Ok(mut ebpf) => break ebpf.take(),
            Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner().take(),
            Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                tracing::warn!(
                    "programs still attached at the drain's end: the exit detaches them"
                );
                return None;
            }
        }
    };
    let mut ebpf = taken?;
    crate::kernel::loader::unload_where(&mut ebpf, |name| {
        !crate::kernel::loader::aggregates_only(name)
    });
    Some(ebpf)
}

/// The kernel's page size.
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// No cgroup v2 hierarchy: nothing resolves.
#[derive(Debug)]
struct NoCgroups;

impl crate::enrich::Cgroups for NoCgroups {
    fn path_of(&self, _: u64) -> Option<String> {
        None
    }
    fn oom_count(&self, _: &str) -> Option<u64> {
        None
    }
    fn usage_and_limit(&self, _: &str) -> (Option<u64>, Option<u64>) {
        (None, None)
    }
}
