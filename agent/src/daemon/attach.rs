//! Start-up: the kernel's struct offsets, the probes each capability attaches (reported in the
//! log and as `nodewarden_probe_info`), and the maps the readers take out of the object.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use agent_common::{ExecKey, KernelOffsets, maps};
use aya::maps::{HashMap as BpfHashMap, MapData};

use crate::{
    config::{Config, GuardChoice},
    contention::{
        self, futex::FutexMaps, offcpu::OffCpuMaps, samples::SampleMaps, windows::Window,
    },
    kernel::{
        btf,
        go::SharedEbpf,
        guard::GuardMaps,
        loader::{self, LoadError, take_map},
        rings::{LossMap, Rings},
    },
    model::{
        heal::Mode,
        probe::{Capability, ProbeMode, ProbeStatus},
        record::SeenBy,
    },
    outputs::metrics::Metrics,
};

/// The loaded object and what was taken out of it.
#[derive(Debug)]
pub struct Attached {
    /// Shared with the Go watcher; taken (and dropped: every program detached) at shutdown.
    pub ebpf: SharedEbpf,
    pub rings: Option<Rings>,
    pub losses: Option<LossMap>,
    pub contention: contention::Maps,
    /// The kernel's record of reported executables, when Go fatal errors are probed.
    pub exec_seen: Option<BpfHashMap<MapData, ExecKey, u8>>,
    /// The guard's maps, when its program attached (for the executor).
    pub guard: Option<GuardMaps>,
    /// How limit writes are seen.
    pub limit_mode: ProbeMode,
    pub status: Vec<ProbeStatus>,
}

impl Attached {
    /// Whether `capability` attached.
    #[must_use]
    pub fn has(&self, capability: Capability) -> bool {
        self.status
            .iter()
            .any(|s| s.capability == capability && s.attached())
    }

    /// What the limit write records say they were seen by.
    #[must_use]
    pub fn seen_by(&self) -> SeenBy {
        match self.limit_mode {
            ProbeMode::Kprobe => SeenBy::Kprobe,
            ProbeMode::Syscalls => SeenBy::Syscalls,
            ProbeMode::Inotify | ProbeMode::Unavailable => SeenBy::Inotify,
            _ => SeenBy::Fexit,
        }
    }
}

/// Loads and attaches the probes, reports how (log, metric), and takes their maps. Without BPF
/// at all the agent still runs: limit writes are then seen by inotify.
pub fn attach(config: &Config, metrics: &Metrics) -> Result<Attached, LoadError> {
    let (offsets, functions) = on_own_arena(kernel_btf);
    let (ebpf, status) = match loader::load(
        &offsets,
        &functions,
        &config.probes,
        &config.contention,
        guard_attach(config),
    ) {
        Ok(p) => (Some(p.ebpf), p.status),
        Err(e) => {
            tracing::error!("no eBPF probes: {e}");
            (
                None,
                loader::without_bpf(&e.to_string(), config.probes.limit_writes),
            )
        }
    };
    report(&status);
    metrics.probes(&status);
    release_freed_memory();
    let limit_mode = status
        .iter()
        .find(|s| s.capability == Capability::LimitWrites)
        .map_or(ProbeMode::Unavailable, |s| s.mode);
    let mut attached = Attached {
        ebpf: Arc::new(Mutex::new(None)),
        rings: None,
        losses: None,
        contention: contention::Maps::default(),
        exec_seen: None,
        guard: None,
        limit_mode,
        status,
    };
    let Some(mut ebpf) = ebpf else {
        return Ok(attached);
    };
    super::ebpf_logs::spawn(&mut ebpf);
    attached.rings = Some(Rings::take(&mut ebpf)?);
    attached.losses = Some(LossMap::take(&mut ebpf)?);
    if attached.has(Capability::FutexWaits) {
        attached.contention.futex = Some(FutexMaps::take(&mut ebpf)?);
    }
    if attached.has(Capability::GoFatalErrors) {
        attached.exec_seen = Some(take_map(&mut ebpf, maps::EXEC_SEEN)?);
    }
    if attached.has(Capability::CpuSamples) {
        attached.contention.samples = Some(SampleMaps::take(&mut ebpf)?);
    }
    if attached.has(Capability::OffCpu) {
        attached.contention.offcpu = Some((
            OffCpuMaps::take(&mut ebpf)?,
            config.contention.off_cpu_max_processes,
        ));
    }
    if attached.has(Capability::Guard) {
        attached.guard = Some(GuardMaps::take(&mut ebpf)?);
    }
    if attached.contention.samples.is_some() || attached.contention.offcpu.is_some() {
        attached.contention.window = Some(Window::take(&mut ebpf)?);
    }
    attached.ebpf = Arc::new(Mutex::new(Some(ebpf)));
    Ok(attached)
}

/// Whether the guard is attached: in modes dry-run and enforce, unless turned off.
fn guard_attach(config: &Config) -> loader::GuardAttach {
    match (config.mode, config.probes.guard) {
        (_, GuardChoice::Off) => loader::GuardAttach::No("off in the configuration (probes.guard)"),
        (Mode::Observe, GuardChoice::Auto) => {
            loader::GuardAttach::No("mode observe: the guard acts in dry-run and enforce only")
        }
        (_, GuardChoice::Auto) => loader::GuardAttach::Yes {
            max_files: config.remediation.guard_max_files,
        },
    }
}

/// Runs `f` on a thread of its own, for its allocations: glibc gives a new thread an arena of
/// its own, so what `f` allocates and frees (parsing the kernel's BTF takes tens of megabytes in
/// small blocks) is given back whole when it ends, instead of leaving the main heap's pages
/// half-used under the blocks the agent keeps.
fn on_own_arena<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Kernel struct offsets and functions from BTF; missing ones make the probes that need them
/// degrade.
fn kernel_btf() -> (KernelOffsets, btf::Functions) {
    match btf::resolve(Path::new(btf::VMLINUX_BTF)) {
        Ok(r) => {
            if !r.missing.is_empty() {
                tracing::warn!(
                    "kernel BTF lacks {}: probes that need them degrade",
                    r.missing.join(", ")
                );
            }
            (r.offsets, r.functions)
        }
        Err(e) => {
            tracing::warn!("{e}: probes that read kernel structs degrade");
            (KernelOffsets::UNKNOWN, btf::Functions::default())
        }
    }
}

/// How often freed heap memory is given back to the kernel. Each trim walks the free heap and
/// asks the kernel to drop what it finds (about 150 `madvise` calls in an idle agent): every
/// 10 s, that was 0.05 to 0.1% of a core under the test VM's emulation.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// ...but every 10 s over the first minute, where most churn is: the Go watcher's first look at
/// every executable, the first scans. What they free stays resident until a trim (with the
/// kernel's BTF parsed on the main heap, a first trim at 60 s left an idle agent 20 MiB more
/// resident than trims every 10 s).
const TRIM_EARLY: [std::time::Duration; 5] = [std::time::Duration::from_secs(10); 5];

/// Gives freed heap memory back to the kernel, now and every [`TRIM_EVERY`] on a thread of its
/// own. Parsing the kernel's BTF (by the agent for offsets and by aya for relocations) takes
/// tens of megabytes for a moment, and so does a burst of events; glibc's allocator keeps what
/// it freed resident otherwise, and the agent would report the high-water mark of every burst
/// as its footprint for the rest of its life.
fn release_freed_memory() {
    trim();
    let spawned = std::thread::Builder::new()
        .name("nw-trim".into())
        .spawn(|| {
            for pause in TRIM_EARLY.into_iter().chain(std::iter::repeat(TRIM_EVERY)) {
                std::thread::sleep(pause);
                trim();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no thread to give freed memory back: {e}");
    }
}

fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Logs how each capability attached, or why not.
fn report(status: &[ProbeStatus]) {
    for s in status {
        let capability = s.capability.as_str();
        if s.attached() {
            tracing::info!(
                capability,
                mode = s.mode.as_str(),
                hooks = %s.hooks.join(","),
                "probe attached"
            );
        }
        for e in &s.fallbacks {
            tracing::info!(capability, "preferred mode passed over: {e}");
        }
        for e in &s.errors {
            let note = if s.attached() {
                "partly attached"
            } else {
                "probe unavailable on this kernel"
            };
            tracing::warn!(capability, "{note}: {e}");
        }
    }
    if let Some(cost) = crate::model::probe::syscall_tracepoint_cost(status) {
        tracing::warn!("{cost}");
    }
}
