//! Lock contention, a sub-pipeline of its own on a thread of its own (symbolizing can take
//! seconds; the event loop must not wait): every 2 s, in this order, the CPU samples, the
//! processes `contention.select` names, the futex aggregates, and the off-CPU time of the
//! watched processes; then what they found is published for the metrics and `nodewarden top`.

pub mod classify;
pub mod futex;
pub mod offcpu;
pub mod samples;
pub mod selection;
pub mod symbols;
pub mod windows;

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use self::{
    futex::{FutexMaps, FutexReader},
    offcpu::{OffCpuMaps, OffCpuReader},
    samples::{SampleMaps, Sampler},
    symbols::Symbols,
    windows::Window,
};
use crate::{
    config::Selector,
    enrich::{k8s, kubelet::KubeletNames, procfs},
    model::{
        cache::Evictions,
        cgroup::Who,
        contention::{Episode, Published},
        label::Folded,
        loss::Losses,
    },
};

/// How often the kernel's contention aggregates are read (and processes selected).
pub const EVERY: Duration = Duration::from_secs(2);

/// The contention maps that attached.
#[derive(Debug, Default)]
pub struct Maps {
    pub futex: Option<FutexMaps>,
    pub samples: Option<SampleMaps>,
    /// With the kernel's cap on watched processes.
    pub offcpu: Option<(OffCpuMaps, u32)>,
    /// The read window of the samples and off-CPU counts.
    pub window: Option<Window>,
}

impl Maps {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.futex.is_none() && self.samples.is_none() && self.offcpu.is_none()
    }
}

/// What the readers' thread needs besides the maps.
#[derive(Debug, Clone)]
pub struct Context {
    pub selectors: Vec<Selector>,
    pub kubelet_dir: PathBuf,
    pub published: Arc<Mutex<Published>>,
    pub evictions: Evictions,
    pub losses: Losses,
    pub folded: Folded,
}

/// Reads the maps every [`EVERY`] until `stop`; futex words with a new long wait go to
/// `episodes` (dropped, and said in the log, when the event loop is behind).
pub fn run(
    maps: Maps,
    cx: &Context,
    episodes: &tokio::sync::mpsc::Sender<Episode>,
    stop: &AtomicBool,
) {
    let Maps {
        futex,
        samples,
        offcpu,
        mut window,
    } = maps;
    let mut futex =
        futex.map(|m| FutexReader::new(m, &cx.evictions, cx.losses.clone(), cx.folded.clone()));
    let mut sampler = samples.map(|m| Sampler::new(m, &cx.evictions, cx.losses.clone()));
    let mut offcpu =
        offcpu.map(|(m, cap)| OffCpuReader::new(m, cap, &cx.evictions, cx.losses.clone()));
    let mut symbols = Symbols::new(&cx.evictions);
    // Cgroups by the process's own /proc entry (the readers' processes are alive).
    let mut names = KubeletNames::new(cx.kubelet_dir.clone(), cx.evictions.clone());
    let mut who = |pid: u32| {
        let path = procfs::cgroup_of(pid).unwrap_or_else(|| "unknown".to_owned());
        let k8s = k8s::identity(&path, &mut names);
        Who::of(&path, k8s.as_ref())
    };
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        // The window the samples and off-CPU counts just ended.
        let bit = window.as_mut().map_or(0, Window::flip);
        // Samples first: the selection and the off-CPU watch list follow them.
        let mut cpu = sampler
            .as_mut()
            .map(|s| s.refresh(bit, &mut symbols, |pid| who(pid).cgroup))
            .unwrap_or_default();
        let selected = if cx.selectors.is_empty() {
            HashSet::new()
        } else {
            selection::selected(&cx.selectors, &cpu, &mut who)
        };
        let read = futex.as_mut().map(|f| {
            if !cx.selectors.is_empty() {
                f.select(&selected);
            }
            f.refresh(&mut symbols, &mut who)
        });
        if let Some(o) = offcpu.as_mut() {
            o.refresh(bit, &mut symbols, &mut cpu, &selected, |pid| {
                who(pid).cgroup
            });
        }
        symbols.window_done();
        let new_episodes = if let Ok(mut p) = cx.published.lock() {
            p.snapshot.cpu = cpu;
            match read {
                Some(r) => {
                    p.futex = r.series;
                    p.snapshot.processes = r.processes;
                    p.snapshot.hot = r.hot;
                    r.episodes
                }
                None => Vec::new(),
            }
        } else {
            Vec::new()
        };
        for e in new_episodes {
            if episodes.try_send(e).is_err() {
                tracing::debug!("a futex contention span dropped: the event loop is behind");
            }
        }
        // Woken early by the worker's stop.
        while let Some(left) = EVERY.checked_sub(start.elapsed())
            && !stop.load(Ordering::Relaxed)
        {
            std::thread::park_timeout(left);
        }
    }
}
