//! `nodewarden run`: the daemon. Wiring of probes, pipeline and endpoints, and a bounded drain.

use std::{
    collections::HashSet,
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use agent_common::maps;
use anyhow::{Context as _, Result};
use aya::maps::RingBuf;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    cgroups::{self, CgroupResolver},
    config::Config,
    config::Selector,
    contention::{Episode, FutexMaps, FutexReader, Published},
    feed::{self, Feed},
    golang::GoWatcher,
    http,
    inotify::Watcher,
    kubelet::KubeletNames,
    metrics::{Metrics, labelled},
    offcpu::{OffCpuMaps, OffCpuReader},
    offsets,
    outputs::Outputs,
    pipeline::Pipeline,
    probes,
    record::K8s,
    sampling::{self, SampleMaps, Sampler},
    selection,
    telemetry::Traces,
};

/// How often the inotify mode rereads every limit file, to catch what inotify missed.
const POLL_EVERY: Duration = Duration::from_secs(10);

/// How often time-driven work runs: ended OOM incidents, expired series.
const TICK_EVERY: Duration = Duration::from_millis(250);

/// How often the kernel's contention aggregates are read (and processes selected).
const CONTENTION_EVERY: Duration = Duration::from_secs(2);

/// Runs until SIGTERM or SIGINT, then drains for at most `config.shutdown_drain`.
pub async fn run(config: &Config, traces: &Traces) -> Result<()> {
    // First, so that a signal during start-up also stops the agent cleanly.
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let metrics = Metrics::new();
    let listener = http::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics endpoint {}", config.metrics_listen))?;
    let events_listener = match &config.events_socket {
        Some(path) => Some((feed::bind(path).await?, path.clone())),
        None => None,
    };

    // Kept to the end: dropping the object detaches the programs.
    let Attached {
        mut ebpf,
        mut ring,
        limit_mode,
        readers,
        mut go,
    } = attach(config, &metrics)?;

    let contention = spawn_contention(
        readers,
        config.selectors.clone(),
        config.kubelet_log_dir.clone(),
        metrics.contention.clone(),
    );
    let feed = Feed::new();
    let (mut pipeline, mut watcher) = pipeline(config, &metrics, traces, &feed, limit_mode)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(listener, metrics, stop_rx.clone()));
    let feed_server =
        events_listener.map(|(l, path)| tokio::spawn(feed::serve(l, path, feed, stop_rx)));
    tracing::info!(
        "nodewarden running (mode {:?}); metrics at http://{}/metrics",
        config.mode,
        config.metrics_listen
    );

    let mut poll = tokio::time::interval(POLL_EVERY);
    let mut tick = tokio::time::interval(TICK_EVERY);
    loop {
        tokio::select! {
            guard = readable(ring.as_mut()) => {
                let mut guard = guard.context("polling the event ring buffer")?;
                let rb = guard.get_inner_mut();
                while let Some(record) = rb.next() {
                    pipeline.handle(&record);
                }
                guard.clear_ready();
                if let (Some(go), Some(ebpf)) = (go.as_mut(), ebpf.as_mut()) {
                    for pid in pipeline.take_execs() {
                        go.consider(ebpf, pid);
                    }
                }
            }
            guard = readable(watcher.as_mut()) => {
                let mut guard = guard.context("polling inotify")?;
                for o in guard.get_inner_mut().read().context("reading inotify")? {
                    pipeline.observed(&o, probes::INOTIFY);
                }
                guard.clear_ready();
            }
            _ = poll.tick(), if watcher.is_some() => pipeline.poll(),
            _ = tick.tick() => {
                pipeline.tick();
                if let Some((_, episodes, _)) = &contention {
                    for e in episodes.try_iter() {
                        pipeline.contention_episode(&e);
                    }
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
        }
    }

    // Bounded drain: events already in the ring buffer are handled, the endpoints stop.
    if let Some(ring) = ring.as_mut() {
        let rb = ring.get_mut();
        while let Some(record) = rb.next() {
            pipeline.handle(&record);
        }
    }
    pipeline.finish();
    if let Some((stop, _, thread)) = contention {
        stop.store(true, Ordering::Relaxed);
        let _ = thread.join();
    }
    let _ = stop_tx.send(true);
    if let Some(f) = feed_server {
        let _ = tokio::time::timeout(config.shutdown_drain, f).await;
    }
    if tokio::time::timeout(config.shutdown_drain, server)
        .await
        .is_err()
    {
        tracing::warn!(
            "metrics endpoint did not stop within {:?}",
            config.shutdown_drain
        );
    }
    Ok(())
}

/// The contention readers' thread: reading the kernel's aggregates and symbolizing stacks can
/// take seconds (a big binary's symbols), which must never hold up the event loop. Returns its
/// stop flag, the futex episodes it finds, and its handle.
type ContentionThread = (
    Arc<AtomicBool>,
    mpsc::Receiver<Episode>,
    std::thread::JoinHandle<()>,
);

/// The contention maps that attached, for the readers' thread.
#[derive(Debug, Default)]
struct ContentionMaps {
    futex: Option<FutexMaps>,
    sampler: Option<SampleMaps>,
    /// With the kernel's cap on watched processes.
    offcpu: Option<(OffCpuMaps, u32)>,
}

fn spawn_contention(
    maps: ContentionMaps,
    selectors: Vec<Selector>,
    kubelet_dir: std::path::PathBuf,
    published: Arc<Mutex<Published>>,
) -> Option<ContentionThread> {
    let ContentionMaps {
        futex,
        sampler,
        offcpu,
    } = maps;
    if futex.is_none() && sampler.is_none() && offcpu.is_none() {
        return None;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("nw-contention".to_owned())
        .spawn(move || {
            let mut futex = futex.map(|m| FutexReader::new(m, published.clone()));
            let mut sampler = sampler.map(Sampler::new);
            let mut offcpu = offcpu.map(|(m, cap)| OffCpuReader::new(m, cap));
            // Cgroups by the process's own /proc entry (the readers' processes are alive).
            let mut kubelet = KubeletNames::new(kubelet_dir);
            let mut who = |pid: u32| {
                let path = cgroups::path_of_pid(pid).unwrap_or_else(|| "unknown".to_owned());
                K8s::who(&path, K8s::from_path(&path, &mut kubelet).as_ref())
            };
            while !flag.load(Ordering::Relaxed) {
                // Samples first: the selection and the off-CPU watch list follow them.
                let mut cpu = sampler
                    .as_mut()
                    .map(|s| s.refresh(&mut who))
                    .unwrap_or_default();
                let selected = if selectors.is_empty() {
                    HashSet::new()
                } else {
                    selection::selected(&selectors, &cpu, &mut who)
                };
                if let Some(f) = futex.as_mut() {
                    if !selectors.is_empty() {
                        f.select(&selected);
                    }
                    for e in f.refresh(&mut who) {
                        let _ = tx.send(e);
                    }
                }
                if let Some(o) = offcpu.as_mut() {
                    o.refresh(&mut cpu, &selected);
                }
                if (sampler.is_some() || offcpu.is_some())
                    && let Ok(mut p) = published.lock()
                {
                    p.cpu_text = sampling::render(&cpu);
                    p.snapshot.cpu = cpu;
                }
                let start = std::time::Instant::now();
                while start.elapsed() < CONTENTION_EVERY && !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
    match thread {
        Ok(t) => Some((stop, rx, t)),
        Err(e) => {
            tracing::error!("contention reader thread: {e}");
            None
        }
    }
}

/// The pipeline over the cgroup v2 hierarchy, and the inotify watcher when limit writes are
/// seen without BPF.
fn pipeline<'a>(
    config: &Config,
    metrics: &Metrics,
    traces: &'a Traces,
    feed: &Feed,
    limit_mode: &'static str,
) -> Result<(Pipeline<'a>, Option<AsyncFd<Watcher>>)> {
    let root = config
        .cgroup_root
        .clone()
        .or_else(cgroups::find_cgroup2_mount);
    if let Some(r) = &root {
        tracing::info!("cgroup v2 hierarchy at {}", r.display());
    } else {
        tracing::warn!("no cgroup v2 mount found: cgroup paths will be unknown");
    }
    let watcher = match (&root, limit_mode == probes::INOTIFY) {
        (Some(root), true) => Some(start_watcher(root)?),
        _ => None,
    };
    let outputs = Outputs {
        metrics: metrics.clone(),
        traces,
        feed: feed.clone(),
    };
    let kubelet = KubeletNames::new(config.kubelet_log_dir.clone());
    let pipeline = Pipeline::new(
        CgroupResolver::new(root),
        kubelet,
        outputs,
        limit_mode,
        config.deleted_cgroup_ttl,
    );
    Ok((pipeline, watcher))
}

/// The loaded object, its event ring, how limit writes are seen, and the readers of the
/// contention maps and of Go executables, where those probes attached.
struct Attached {
    ebpf: Option<aya::Ebpf>,
    ring: Option<AsyncFd<RingBuf<aya::maps::MapData>>>,
    limit_mode: &'static str,
    readers: ContentionMaps,
    go: Option<GoWatcher>,
}

/// Loads and attaches the probes, reports how (log, metric), and opens their event ring.
/// Without BPF at all the agent still runs: limit writes are then seen by inotify.
fn attach(config: &Config, metrics: &Metrics) -> Result<Attached> {
    let (mut ebpf, status) =
        match probes::load(&kernel_offsets(), &config.probes, &config.contention) {
            Ok(p) => (Some(p.ebpf), p.status),
            Err(e) => {
                tracing::error!("no eBPF probes: {e}");
                (
                    None,
                    probes::without_bpf(&e.to_string(), config.probes.limit_writes),
                )
            }
        };
    report(&status, metrics);
    let limit_mode = status
        .iter()
        .find(|s| s.capability == "limit_writes")
        .map_or(probes::UNAVAILABLE, |s| s.mode);
    let attached = |capability: &str| {
        status
            .iter()
            .any(|s| s.capability == capability && s.attached())
    };
    let (mut readers, mut go, mut ring) = (ContentionMaps::default(), None, None);
    if let Some(ebpf) = ebpf.as_mut() {
        spawn_ebpf_logs(ebpf);
        ring = Some(event_ring(ebpf)?);
        if attached("futex_waits") {
            readers.futex = Some(FutexMaps::take(ebpf)?);
        }
        if attached("go_fatal_errors") {
            go = Some(GoWatcher::start(ebpf));
        }
        if attached("cpu_samples") {
            readers.sampler = Some(SampleMaps::take(ebpf)?);
        }
        if attached("off_cpu") {
            readers.offcpu = Some((
                OffCpuMaps::take(ebpf)?,
                config.contention.off_cpu_max_processes,
            ));
        }
    }
    Ok(Attached {
        ebpf,
        ring,
        limit_mode,
        readers,
        go,
    })
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

/// Kernel struct offsets from BTF; missing ones make the probes that need them degrade.
fn kernel_offsets() -> agent_common::KernelOffsets {
    match offsets::resolve(Path::new(offsets::VMLINUX_BTF)) {
        Ok(r) => {
            if !r.missing.is_empty() {
                tracing::warn!(
                    "kernel BTF lacks {}: probes that need them degrade",
                    r.missing.join(", ")
                );
            }
            r.offsets
        }
        Err(e) => {
            tracing::warn!("{e}: probes that read kernel structs degrade");
            agent_common::KernelOffsets::UNKNOWN
        }
    }
}

/// The programs' event ring buffer, registered with the runtime.
fn event_ring(ebpf: &mut aya::Ebpf) -> Result<AsyncFd<RingBuf<aya::maps::MapData>>> {
    let ring = ebpf
        .take_map(maps::EVENTS)
        .context("map EVENTS missing from the eBPF object")?;
    let ring = RingBuf::try_from(ring).context("map EVENTS is not a ring buffer")?;
    // SAFETY: the ring buffer owns its map fd, which stays open as long as the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the event ring buffer with the runtime")
}

/// The inotify watcher over the whole hierarchy, registered with the runtime.
fn start_watcher(root: &Path) -> Result<AsyncFd<Watcher>> {
    let w = Watcher::new(root).with_context(|| format!("inotify on {}", root.display()))?;
    tracing::info!(
        "limit writes seen by inotify on {} cgroup directories",
        w.watched()
    );
    // SAFETY: the watcher owns its inotify fd, open as long as the AsyncFd owns the watcher.
    unsafe { AsyncFd::register_with_interest(w, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering inotify with the runtime")
}

/// Logs how each capability attached (or why not) and sets `nodewarden_probe_info`.
fn report(status: &[probes::ProbeStatus], metrics: &Metrics) {
    for s in status {
        if let Some(g) = labelled(&metrics.probe_info, &[s.capability, s.mode]) {
            g.set(1);
        }
        if s.attached() {
            tracing::info!(
                capability = s.capability,
                mode = s.mode,
                hooks = %s.hooks.join(","),
                "probe attached"
            );
        }
        for e in &s.fallbacks {
            tracing::info!(capability = s.capability, "preferred mode passed over: {e}");
        }
        for e in &s.errors {
            let note = if s.attached() {
                "partly attached"
            } else {
                "probe unavailable on this kernel"
            };
            tracing::warn!(capability = s.capability, "{note}: {e}");
        }
    }
}

/// Forwards aya-log records from the programs to the agent's log.
fn spawn_ebpf_logs(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("eBPF program logs unavailable: {e}");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, open as long as the AsyncFd owns the logger.
    let mut logger = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("eBPF program logs unavailable: {}", e.into_parts().1);
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
