//! Loading and attaching the eBPF programs. Each capability attaches or fails on its own: a
//! kernel that refuses one still gets the others, and the report says which mode each uses, or
//! why none could attach.

use std::fmt::Write as _;

use agent_common::{FutexConfig, KernelOffsets, LimitFile, maps, programs};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        FEntry, FExit, KProbe, Lsm, PerfEvent, RawTracePoint, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};

use crate::{
    config::{ContentionConfig, FutexMode, LimitWriteMode, OomLimitMode, ProbesConfig},
    kernel::btf::Functions,
    model::probe::{Capability, Failure, ProbeMode, ProbeStatus},
};

/// The eBPF object built by build.rs from agent-ebpf.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
}

/// The loaded object (which owns every attached link) and the status of each capability.
#[derive(Debug)]
pub struct Probes {
    pub ebpf: Ebpf,
    pub status: Vec<ProbeStatus>,
}

/// Whether the guard is attached, and how large its map of protected files is.
#[derive(Debug, Clone, Copy)]
pub enum GuardAttach {
    /// Attach it (where the kernel allows), protecting at most `max_files` files.
    Yes { max_files: u32 },
    /// Not attached, for this reason.
    No(&'static str),
}

/// Loads the object with `offsets` set, then loads and attaches every capability it can
/// (`functions`: what the kernel's BTF says of the functions fentry/fexit programs attach to).
pub fn load(
    offsets: &KernelOffsets,
    functions: &Functions,
    choices: &ProbesConfig,
    contention: &ContentionConfig,
    guard: GuardAttach,
) -> Result<Probes, LoadError> {
    let max_files = match guard {
        GuardAttach::Yes { max_files } => max_files,
        GuardAttach::No(_) => 1,
    };
    let start = std::time::Instant::now();
    let mut ebpf = load_object(offsets, choices, contention, max_files)?;
    tracing::debug!(took = ?start.elapsed(), "eBPF object loaded");
    let btf = KernelBtf::default();
    let go = if offsets.has_exec_file() {
        single(
            Capability::GoFatalErrors,
            ProbeMode::Uprobe,
            "runtime.fatal and runtime.throw of each Go executable; raw_tp sched_process_exec",
            || super::go::load(&mut ebpf),
        )
    } else {
        ProbeStatus::unavailable(
            Capability::GoFatalErrors,
            Failure::general("kernel BTF lacks the fields to tell an exec's executable"),
        )
    };
    let status = vec![
        timed(|| attach_futex(&mut ebpf, &btf, functions, choices.futex_waits, contention)),
        attach_sampling(&mut ebpf, contention),
        timed(|| attach_offcpu(&mut ebpf, contention)),
        go,
        timed(|| attach_limit_writes(&mut ebpf, &btf, offsets, choices.limit_writes)),
        timed(|| attach_oom_limits(&mut ebpf, &btf, offsets, choices.oom_limits)),
        single(
            Capability::OomVictims,
            ProbeMode::RawTp,
            "signal_generate",
            || {
                let p: &mut RawTracePoint = program(&mut ebpf, programs::SIGNAL_GENERATE)?;
                p.load().map_err(AttachError::from)?;
                p.attach("signal_generate").map_err(AttachError::from)?;
                Ok(())
            },
        ),
        single(
            Capability::OomKills,
            ProbeMode::Tracepoint,
            "oom/mark_victim",
            || {
                let p: &mut TracePoint = program(&mut ebpf, programs::OOM_MARK_VICTIM)?;
                p.load().map_err(AttachError::from)?;
                p.attach("oom", "mark_victim").map_err(AttachError::from)?;
                Ok(())
            },
        ),
        single(
            Capability::CgroupChanges,
            ProbeMode::RawTp,
            "cgroup_mkdir, cgroup_rmdir",
            || {
                for (name, tp) in [
                    (programs::CGROUP_MKDIR, "cgroup_mkdir"),
                    (programs::CGROUP_RMDIR, "cgroup_rmdir"),
                ] {
                    let p: &mut RawTracePoint = program(&mut ebpf, name)?;
                    p.load().map_err(AttachError::from)?;
                    p.attach(tp).map_err(AttachError::from)?;
                }
                Ok(())
            },
        ),
        timed(|| attach_guard(&mut ebpf, &btf, offsets, guard)),
    ];
    Ok(Probes { ebpf, status })
}

/// Runs one capability's attach step and logs how long it took: a start-up that hangs in the
/// kernel (a grace period, text patching) shows in the debug log where it stopped.
fn timed(step: impl FnOnce() -> ProbeStatus) -> ProbeStatus {
    let start = std::time::Instant::now();
    let status = step();
    tracing::debug!(
        capability = status.capability.as_str(),
        took = ?start.elapsed(),
        "attach step done"
    );
    status
}

/// The kernel's BTF as aya parses it, for loading fentry, fexit and LSM programs: parsed once,
/// when first needed, and dropped when loading ends (it takes tens of megabytes while held,
/// and each parse a noticeable share of the start-up).
#[derive(Default)]
struct KernelBtf(std::cell::OnceCell<Result<Btf, String>>);

impl KernelBtf {
    fn get(&self) -> Result<&Btf, AttachError> {
        self.0
            .get_or_init(|| Btf::from_sys_fs().map_err(|e| AttachError::from(e).to_string()))
            .as_ref()
            .map_err(|e| AttachError::KernelBtf(e.clone()))
    }
}

/// Where the kernel lists its active LSMs.
const ACTIVE_LSMS: &str = "/sys/kernel/security/lsm";

/// The guard: the BPF LSM program on `file_open`, where BPF LSM is active.
fn attach_guard(
    ebpf: &mut Ebpf,
    btf: &KernelBtf,
    offsets: &KernelOffsets,
    guard: GuardAttach,
) -> ProbeStatus {
    if let GuardAttach::No(why) = guard {
        return ProbeStatus::unavailable(Capability::Guard, Failure::general(why));
    }
    if !offsets.has_guard() {
        return ProbeStatus::unavailable(
            Capability::Guard,
            Failure::general("kernel BTF lacks the file and task fields the guard reads"),
        );
    }
    if let Err(why) = bpf_lsm_active() {
        return ProbeStatus::unavailable(Capability::Guard, Failure::of(ProbeMode::Lsm, why));
    }
    let mut status = single(
        Capability::Guard,
        ProbeMode::Lsm,
        programs::FILE_OPEN_HOOK,
        || {
            let p: &mut Lsm = program(ebpf, programs::GUARD_FILE_OPEN)?;
            p.load(programs::FILE_OPEN_HOOK, btf.get()?)
                .map_err(AttachError::from)?;
            p.attach().map(drop).map_err(AttachError::from)
        },
    );
    // A refusal to load says little by itself; the lockdown level is the usual suspect.
    if let Ok(lockdown) = std::fs::read_to_string("/sys/kernel/security/lockdown") {
        for e in &mut status.errors {
            if e.message.contains("Operation not permitted") {
                let _ = write!(e.message, " (kernel lockdown: {})", lockdown.trim());
            }
        }
    }
    status
}

/// Loads the object (maps, program definitions) with `offsets` and the contention settings
/// set; attaches nothing.
pub fn load_object(
    offsets: &KernelOffsets,
    choices: &ProbesConfig,
    contention: &ContentionConfig,
    guard_max_files: u32,
) -> Result<Ebpf, LoadError> {
    // `run` raised it already, before dropping `CAP_SYS_RESOURCE`; `check` and the benches
    // did not. Some sandboxes refuse to change it, so failing is only worth a debug line.
    if let Err(e) = super::privileges::raise_memlock_limit() {
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK): {e}");
    }
    ensure_tracefs();
    let futex = FutexConfig {
        select_all: u32::from(contention.select.is_empty()),
        agent_tgid: std::process::id(),
        stack_threshold_ns: contention.stack_threshold_us.saturating_mul(1000),
    };
    Ok(EbpfLoader::new()
        .override_global(maps::OFFSETS, offsets, true)
        .override_global(maps::FUTEX_CONFIG, &futex, true)
        .map_max_entries(maps::FUTEX_PROCESSES, contention.max_processes)
        .map_max_entries(maps::FUTEX_SELECTED, contention.max_processes)
        // A few contended words per process.
        .map_max_entries(
            maps::FUTEX_LOCKS,
            contention.max_processes.saturating_mul(16),
        )
        // Ring buffers are sized in bytes.
        .map_max_entries(maps::EVENTS, choices.events_ring_kib.saturating_mul(1024))
        .map_max_entries(maps::SAMPLE_STACKS, contention.max_stacks)
        .map_max_entries(maps::CPU_SAMPLES, contention.max_stacks)
        .map_max_entries(maps::OFFCPU_STACKS, contention.max_stacks)
        .map_max_entries(maps::OFFCPU, contention.max_stacks)
        .map_max_entries(maps::FUTEX_STACKS, contention.max_stacks / 4)
        .map_max_entries(maps::DIAG_STACKS, contention.max_stacks / 4)
        .map_max_entries(maps::DIAG_COUNTS, contention.max_stacks / 4)
        .map_max_entries(maps::GUARD_FILES, guard_max_files)
        .map_max_entries(maps::GUARD_CGROUPS, guard_max_files)
        .load(EBPF_OBJECT)?)
}

/// Takes map `name` out of the loaded object as a `T`, for a reader that owns it from then on.
pub fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

/// CPU sampling: the perf event program on every online CPU's software clock.
fn attach_sampling(ebpf: &mut Ebpf, contention: &ContentionConfig) -> ProbeStatus {
    let hook = format!(
        "software CPU clock at {} Hz on every CPU",
        contention.sample_hz
    );
    if contention.sample_hz == 0 {
        return ProbeStatus::unavailable(
            Capability::CpuSamples,
            Failure::general("off in the configuration (contention.sample_hz = 0)"),
        );
    }
    single(Capability::CpuSamples, ProbeMode::PerfEvent, &hook, || {
        let cpus = aya::util::online_cpus()
            .map_err(|(what, source)| AttachError::Cpus { what, source })?;
        let p: &mut PerfEvent = program(ebpf, programs::CPU_SAMPLE)?;
        p.load().map_err(AttachError::from)?;
        for cpu in cpus {
            p.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(contention.sample_hz),
                true,
            )
            .map_err(AttachError::from)?;
        }
        Ok(())
    })
}

/// Off-CPU time: the raw tracepoint `sched_switch`.
fn attach_offcpu(ebpf: &mut Ebpf, contention: &ContentionConfig) -> ProbeStatus {
    if !contention.off_cpu {
        return ProbeStatus::unavailable(
            Capability::OffCpu,
            Failure::general("off in the configuration (contention.off_cpu)"),
        );
    }
    // Each kernel takes one of the two: a program reading the state argument does not attach
    // where the tracepoint has no such argument.
    let mut errors = Vec::new();
    for (name, hook) in [
        (programs::SCHED_SWITCH, "sched_switch (with prev_state)"),
        (programs::SCHED_SWITCH_COMPAT, "sched_switch (before 5.18)"),
    ] {
        let r = program::<RawTracePoint>(ebpf, name).and_then(|p| {
            p.load().map_err(AttachError::from)?;
            p.attach("sched_switch")
                .map(drop)
                .map_err(AttachError::from)
        });
        match r {
            Ok(()) => {
                return ProbeStatus {
                    capability: Capability::OffCpu,
                    mode: ProbeMode::RawTp,
                    hooks: vec![hook.to_owned()],
                    errors: Vec::new(),
                    fallbacks: errors,
                };
            }
            Err(e) => errors.push(Failure::of(ProbeMode::RawTp, format!("{hook}: {e}"))),
        }
    }
    ProbeStatus {
        capability: Capability::OffCpu,
        mode: ProbeMode::Unavailable,
        hooks: Vec::new(),
        errors,
        fallbacks: Vec::new(),
    }
}

/// Futex waits: fentry/fexit on the kernel's futex wait functions, else (or when forced) the
/// tracepoints of the futex syscalls, which every syscall on the node pays for while attached.
fn attach_futex(
    ebpf: &mut Ebpf,
    btf: &KernelBtf,
    functions: &Functions,
    choice: FutexMode,
    contention: &ContentionConfig,
) -> ProbeStatus {
    if !contention.futex_waits {
        return ProbeStatus::unavailable(
            Capability::FutexWaits,
            Failure::general("off in the configuration (contention.futex_waits)"),
        );
    }
    let modes: &[ProbeMode] = match choice {
        FutexMode::Auto => &[ProbeMode::Fexit, ProbeMode::Syscalls],
        FutexMode::Fexit => &[ProbeMode::Fexit],
        FutexMode::Syscalls => &[ProbeMode::Syscalls],
    };
    let mut passed_over = Vec::new();
    for &mode in modes {
        let attempt = if mode == ProbeMode::Fexit {
            attach_futex_functions(ebpf, btf, functions)
        } else {
            attach_futex_syscalls(ebpf)
        };
        match attempt {
            Ok((hooks, skipped)) => {
                return ProbeStatus {
                    capability: Capability::FutexWaits,
                    mode,
                    hooks,
                    errors: skipped.into_iter().map(|e| Failure::of(mode, e)).collect(),
                    fallbacks: passed_over,
                };
            }
            Err(e) => passed_over.push(Failure::of(mode, e)),
        }
    }
    ProbeStatus {
        capability: Capability::FutexWaits,
        mode: ProbeMode::Unavailable,
        hooks: Vec::new(),
        errors: passed_over,
        fallbacks: Vec::new(),
    }
}

/// The hooks attached, and what an optional hook could not attach to.
type FutexAttempt = Result<(Vec<String>, Vec<String>), String>;

/// fexit then fentry on each futex wait function the kernel has: all required ones or none.
/// Each exit before its entry, so that no wait is seen starting without its end.
fn attach_futex_functions(ebpf: &mut Ebpf, btf: &KernelBtf, functions: &Functions) -> FutexAttempt {
    let btf = btf.get().map_err(|e| e.to_string())?;
    let mut hooks = Vec::new();
    let mut skipped = Vec::new();
    let undo = |ebpf: &mut Ebpf| {
        for f in programs::FUTEX_FUNCTIONS {
            if let Ok(p) = program::<FExit>(ebpf, f.exit) {
                let _ = p.unload();
            }
            if let Ok(p) = program::<FEntry>(ebpf, f.entry) {
                let _ = p.unload();
            }
        }
    };
    for f in programs::FUTEX_FUNCTIONS {
        let r = match f
            .kernel
            .iter()
            .find_map(|k| Some((*k, functions.params(k)?)))
        {
            None => Err(format!("kernel BTF has no {}", f.kernel.join(" or "))),
            Some((kernel, n)) if n != f.params => Err(format!(
                "{kernel} takes {n} parameters, the program expects {}",
                f.params
            )),
            Some((kernel, _)) => (|| {
                let exit: &mut FExit = program(ebpf, f.exit)?;
                exit.load(kernel, btf)?;
                exit.attach()?;
                let entry: &mut FEntry = program(ebpf, f.entry)?;
                entry.load(kernel, btf)?;
                entry.attach()?;
                Ok::<_, AttachError>(kernel)
            })()
            .map_err(|e| format!("{kernel}: {e}")),
        };
        match r {
            Ok(kernel) => hooks.push(kernel.to_owned()),
            // An older kernel without `futex_waitv(2)`: nothing to say.
            Err(_) if !f.required && f.kernel.iter().all(|k| functions.params(k).is_none()) => {}
            Err(e) if !f.required => {
                // Its exit may have attached before its entry failed: not kept for nothing.
                let _ = program::<FExit>(ebpf, f.exit).map(FExit::unload);
                let _ = program::<FEntry>(ebpf, f.entry).map(FEntry::unload);
                skipped.push(format!("not attached to {e}"));
            }
            Err(e) => {
                undo(ebpf);
                return Err(e);
            }
        }
    }
    Ok((hooks, skipped))
}

/// The futex syscalls' tracepoints: futex(2), and `futex_waitv(2)` and `futex_wait(2)` where
/// the kernel has them (5.16, 6.7).
fn attach_futex_syscalls(ebpf: &mut Ebpf) -> FutexAttempt {
    // Each exit before its entry: an entry seen without its exit would leave a wait whose
    // thread's next futex call (a wake) ended it with a made-up duration.
    let required = [
        (programs::FUTEX_EXIT, "sys_exit_futex"),
        (programs::FUTEX_ENTER, "sys_enter_futex"),
    ];
    let optional = [
        (programs::FUTEX_EXIT, "sys_exit_futex_waitv"),
        (programs::FUTEX_WAITV_ENTER, "sys_enter_futex_waitv"),
        (programs::FUTEX_EXIT, "sys_exit_futex_wait"),
        (programs::FUTEX_WAITV_ENTER, "sys_enter_futex_wait"),
    ];
    let unload = |ebpf: &mut Ebpf| {
        for (name, _) in required.iter().chain(&optional) {
            if let Ok(p) = program::<TracePoint>(ebpf, name) {
                let _ = p.unload();
            }
        }
    };
    for name in [
        programs::FUTEX_EXIT,
        programs::FUTEX_ENTER,
        programs::FUTEX_WAITV_ENTER,
    ] {
        if let Err(e) =
            program::<TracePoint>(ebpf, name).and_then(|p| p.load().map_err(AttachError::from))
        {
            unload(ebpf);
            return Err(format!("{name}: {e}"));
        }
    }
    let mut hooks = Vec::new();
    for (i, (name, tracepoint)) in required.iter().chain(&optional).enumerate() {
        let r = program::<TracePoint>(ebpf, name).and_then(|p| {
            p.attach("syscalls", tracepoint)
                .map(drop)
                .map_err(AttachError::from)
        });
        match r {
            Ok(()) => hooks.push(format!("syscalls/{tracepoint}")),
            // An older kernel without the newer syscalls: not an error.
            Err(_) if i >= required.len() => {}
            Err(e) => {
                unload(ebpf);
                return Err(format!("syscalls/{tracepoint}: {e}"));
            }
        }
    }
    Ok((hooks, Vec::new()))
}

/// A capability with one way to attach.
fn single(
    capability: Capability,
    mode: ProbeMode,
    hook: &str,
    f: impl FnOnce() -> Result<(), AttachError>,
) -> ProbeStatus {
    timed(|| match f() {
        Ok(()) => ProbeStatus {
            capability,
            mode,
            hooks: vec![hook.to_owned()],
            errors: Vec::new(),
            fallbacks: Vec::new(),
        },
        Err(e) => ProbeStatus::unavailable(capability, Failure::of(mode, format!("{hook}: {e}"))),
    })
}

/// Limit writes: fexit on each handler, else one kprobe/kretprobe pair on all of them. A mode is
/// used when it attaches to at least one handler; handlers it could not attach to are reported.
fn attach_limit_writes(
    ebpf: &mut Ebpf,
    btf: &KernelBtf,
    offsets: &KernelOffsets,
    choice: LimitWriteMode,
) -> ProbeStatus {
    if !offsets.has_written_file() {
        return ProbeStatus::unavailable(
            Capability::LimitWrites,
            Failure::general(
                "kernel BTF lacks the kernfs fields needed to tell which file was written",
            ),
        );
    }
    let modes: &[ProbeMode] = match choice {
        LimitWriteMode::Auto => &[ProbeMode::Fexit, ProbeMode::Kprobe, ProbeMode::Syscalls],
        LimitWriteMode::Fexit => &[ProbeMode::Fexit],
        LimitWriteMode::Kprobe => &[ProbeMode::Kprobe],
        LimitWriteMode::Syscalls => &[ProbeMode::Syscalls],
        LimitWriteMode::Inotify => &[],
    };
    let mut passed_over = Vec::new();
    for &mode in modes {
        let (hooks, failures) = match mode {
            ProbeMode::Kprobe => attach_kprobes(ebpf),
            ProbeMode::Syscalls => attach_syscalls(ebpf, offsets),
            _ => attach_fexits(ebpf, btf),
        };
        let attached = !hooks.is_empty();
        let errors = grouped(mode, attached, failures);
        if attached {
            return ProbeStatus {
                capability: Capability::LimitWrites,
                mode,
                hooks,
                errors,
                fallbacks: passed_over,
            };
        }
        passed_over.extend(errors);
    }
    if matches!(choice, LimitWriteMode::Auto | LimitWriteMode::Inotify) {
        return inotify_status(passed_over);
    }
    ProbeStatus {
        capability: Capability::LimitWrites,
        mode: ProbeMode::Unavailable,
        hooks: Vec::new(),
        errors: passed_over,
        fallbacks: Vec::new(),
    }
}

/// The limit an OOM kill hit: fentry on `out_of_memory`, else a kprobe there; without either,
/// userspace derives it from the cgroups' `memory.events.local` (mode `memory.events`).
fn attach_oom_limits(
    ebpf: &mut Ebpf,
    btf: &KernelBtf,
    offsets: &KernelOffsets,
    choice: OomLimitMode,
) -> ProbeStatus {
    let modes: &[ProbeMode] = match choice {
        OomLimitMode::Auto => &[ProbeMode::Fentry, ProbeMode::Kprobe],
        OomLimitMode::Fentry => &[ProbeMode::Fentry],
        OomLimitMode::Kprobe => &[ProbeMode::Kprobe],
        OomLimitMode::MemoryEvents => &[],
    };
    let mut tried = Vec::new();
    if !offsets.has_oom_control() && !modes.is_empty() {
        tried.push(Failure::general("kernel BTF lacks the oom_control fields"));
    } else {
        for &mode in modes {
            let r = match mode {
                ProbeMode::Kprobe => {
                    program::<KProbe>(ebpf, programs::OOM_ENTER_KPROBE).and_then(|p| {
                        p.load().map_err(AttachError::from)?;
                        p.attach(programs::OUT_OF_MEMORY, 0).map(drop).map_err(|e| {
                            // Not kept loaded for nothing.
                            let _ = p.unload();
                            AttachError::from(e)
                        })
                    })
                }
                _ => program::<FEntry>(ebpf, programs::OOM_ENTER_FENTRY).and_then(|p| {
                    p.load(programs::OUT_OF_MEMORY, btf.get()?)
                        .map_err(AttachError::from)?;
                    p.attach().map(drop).map_err(AttachError::from)
                }),
            };
            match r {
                Ok(()) => {
                    return ProbeStatus {
                        capability: Capability::OomLimits,
                        mode,
                        hooks: vec![programs::OUT_OF_MEMORY.to_owned()],
                        errors: Vec::new(),
                        fallbacks: tried,
                    };
                }
                Err(e) => tried.push(Failure::of(mode, e.to_string())),
            }
        }
    }
    // No probe: derived in userspace, which always works, and is said to be derived.
    ProbeStatus {
        capability: Capability::OomLimits,
        mode: ProbeMode::MemoryEvents,
        hooks: vec![
            "memory.events.local of the victim's cgroup and its ancestors (derived)".to_owned(),
        ],
        errors: Vec::new(),
        fallbacks: tried,
    }
}

/// Limit writes seen without BPF (the agent runs the watcher); `fallbacks` say why.
#[must_use]
pub fn inotify_status(fallbacks: Vec<Failure>) -> ProbeStatus {
    ProbeStatus {
        capability: Capability::LimitWrites,
        mode: ProbeMode::Inotify,
        hooks: vec!["inotify on every cgroup directory, and polling (writer unknown)".to_owned()],
        errors: Vec::new(),
        fallbacks,
    }
}

/// Every capability's status when the eBPF object could not be loaded at all.
#[must_use]
pub fn without_bpf(why: &str, limit_writes: LimitWriteMode) -> Vec<ProbeStatus> {
    let no_bpf = || Failure::general(format!("no BPF: {why}"));
    Capability::ALL
        .into_iter()
        .map(|c| match (c, limit_writes) {
            (Capability::LimitWrites, LimitWriteMode::Auto | LimitWriteMode::Inotify) => {
                inotify_status(vec![no_bpf()])
            }
            (c, _) => ProbeStatus::unavailable(c, no_bpf()),
        })
        .collect()
}

/// The handlers a mode attached to, and (handler, error) for the others.
type Attempt = (Vec<String>, Vec<(&'static str, String)>);

/// One failure per distinct error, naming its handlers ("every handler" when all failed alike).
fn grouped(mode: ProbeMode, attached: bool, failures: Vec<(&'static str, String)>) -> Vec<Failure> {
    let total = failures.len();
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for (handler, error) in failures {
        match groups.iter_mut().find(|(e, _)| *e == error) {
            Some((_, handlers)) => handlers.push(handler),
            None => groups.push((error, vec![handler])),
        }
    }
    groups
        .into_iter()
        .map(|(error, handlers)| {
            let which = if !attached && handlers.len() == total && total == LimitFile::ALL.len() {
                "every handler".to_owned()
            } else {
                handlers.join(", ")
            };
            let verb = if attached {
                "not attached to"
            } else {
                "failed on"
            };
            Failure::of(mode, format!("{verb} {which}: {error}"))
        })
        .collect()
}

fn attach_fexits(ebpf: &mut Ebpf, btf: &KernelBtf) -> Attempt {
    let btf = match btf.get() {
        Ok(b) => b,
        Err(e) => return (Vec::new(), vec![("kernel BTF", e.to_string())]),
    };
    let mut attempt: Attempt = (Vec::new(), Vec::new());
    for limit in LimitFile::ALL {
        let handler = limit.kernel_handler();
        let r = (|| {
            let p: &mut FExit = program(ebpf, limit.fexit_program())?;
            p.load(handler, btf).map_err(AttachError::from)?;
            p.attach().map_err(AttachError::from)?;
            Ok::<_, AttachError>(())
        })();
        match r {
            Ok(()) => attempt.0.push(handler.to_owned()),
            Err(e) => attempt.1.push((handler, e.to_string())),
        }
    }
    attempt
}

fn attach_kprobes(ebpf: &mut Ebpf) -> Attempt {
    let mut attempt: Attempt = (Vec::new(), Vec::new());
    for name in [
        programs::LIMIT_WRITE_KPROBE,
        programs::LIMIT_WRITE_KRETPROBE,
    ] {
        let loaded =
            program::<KProbe>(ebpf, name).and_then(|p| p.load().map_err(AttachError::from));
        if let Err(e) = loaded {
            attempt.1.push((name, format!("loading: {e}")));
            return attempt;
        }
    }
    for limit in LimitFile::ALL {
        let handler = limit.kernel_handler();
        let r = [
            programs::LIMIT_WRITE_KPROBE,
            programs::LIMIT_WRITE_KRETPROBE,
        ]
        .into_iter()
        .try_for_each(|name| {
            let p: &mut KProbe = program(ebpf, name)?;
            p.attach(handler, 0).map(drop).map_err(AttachError::from)
        });
        match r {
            Ok(()) => attempt.0.push(handler.to_owned()),
            Err(e) => attempt.1.push((handler, e.to_string())),
        }
    }
    if attempt.0.is_empty() {
        // Attached nowhere: not kept loaded for nothing.
        for name in [
            programs::LIMIT_WRITE_KPROBE,
            programs::LIMIT_WRITE_KRETPROBE,
        ] {
            if let Ok(p) = program::<KProbe>(ebpf, name) {
                let _ = p.unload();
            }
        }
    }
    attempt
}

/// The write syscalls' entry and exit tracepoints: all six or none (an entry without its exit
/// would keep writes that are never reported). The entries that load the task by BTF are tried
/// first; where the kernel refuses them, the helper-reading entries.
fn attach_syscalls(ebpf: &mut Ebpf, offsets: &KernelOffsets) -> Attempt {
    if !offsets.has_fd_to_kernfs() {
        let why = "kernel BTF lacks the fields to follow an fd to its file";
        return (Vec::new(), vec![("write syscalls", why.to_owned())]);
    }
    let (exits, btf_entries) = (
        &programs::SYSCALL_WRITES[3..],
        &programs::SYSCALL_WRITES[..3],
    );
    let mut refused = Vec::new();
    for entries in [btf_entries, &programs::SYSCALL_WRITES_COMPAT[..]] {
        let set: Vec<_> = entries.iter().chain(exits).collect();
        match attach_tracepoints(ebpf, &set) {
            Ok(hooks) => {
                for (name, e) in &refused {
                    tracing::info!("syscalls mode reads the task through helpers: {name}: {e}");
                }
                return (hooks, Vec::new());
            }
            Err((name, e)) => refused.push((name, e.to_string())),
        }
    }
    (Vec::new(), refused)
}

/// Loads and attaches `syscalls/*` tracepoint programs, all or none.
fn attach_tracepoints(
    ebpf: &mut Ebpf,
    set: &[&(&'static str, &'static str)],
) -> Result<Vec<String>, (&'static str, AttachError)> {
    let mut hooks = Vec::new();
    for &&(name, tracepoint) in set {
        let r = program::<TracePoint>(ebpf, name).and_then(|p| {
            p.load().map_err(AttachError::from)?;
            p.attach("syscalls", tracepoint)
                .map(drop)
                .map_err(AttachError::from)
        });
        if let Err(e) = r {
            // Unloading detaches the ones already attached.
            for &&(other, _) in set {
                if let Ok(p) = program::<TracePoint>(ebpf, other) {
                    let _ = p.unload();
                }
            }
            return Err((name, e));
        }
        hooks.push(format!("syscalls/{tracepoint}"));
    }
    Ok(hooks)
}

/// Whether program `name` only adds to maps the agent reads periodically (futex waits, CPU
/// samples, off-CPU time) and writes nothing to the event rings: at shutdown these detach after
/// the rings are drained, so the kernel's time to remove their trampolines does not eat into
/// the drain.
#[must_use]
pub fn aggregates_only(name: &str) -> bool {
    [
        programs::FUTEX_ENTER,
        programs::FUTEX_WAITV_ENTER,
        programs::FUTEX_EXIT,
        programs::CPU_SAMPLE,
        programs::SCHED_SWITCH,
        programs::SCHED_SWITCH_COMPAT,
    ]
    .contains(&name)
        || programs::FUTEX_FUNCTIONS
            .iter()
            .any(|f| f.entry == name || f.exit == name)
}

/// Detaches and unloads the programs of `ebpf` that `which` names, each on a thread of its own:
/// detaching some hooks waits for the kernel (an RCU grace period, for a trampoline one of RCU
/// tasks, which takes long on a busy machine), and programs detached together share those
/// waits where the kernel allows.
pub fn unload_where(ebpf: &mut Ebpf, which: impl Fn(&str) -> bool + Sync) {
    let which = &which;
    std::thread::scope(|s| {
        for (name, program) in ebpf.programs_mut() {
            if !which(name) {
                continue;
            }
            s.spawn(move || {
                let start = std::time::Instant::now();
                let r = match program {
                    aya::programs::Program::FExit(p) => p.unload(),
                    aya::programs::Program::FEntry(p) => p.unload(),
                    aya::programs::Program::KProbe(p) => p.unload(),
                    aya::programs::Program::UProbe(p) => p.unload(),
                    aya::programs::Program::TracePoint(p) => p.unload(),
                    aya::programs::Program::RawTracePoint(p) => p.unload(),
                    aya::programs::Program::PerfEvent(p) => p.unload(),
                    aya::programs::Program::Lsm(p) => p.unload(),
                    // None of ours: dropped with the object.
                    _ => Ok(()),
                };
                match r {
                    // Most were never loaded (another mode attached): nothing to say.
                    Ok(()) | Err(aya::programs::ProgramError::NotLoaded) => {}
                    Err(e) => tracing::warn!(program = name, "unloading: {e}"),
                }
                tracing::debug!(program = name, took = ?start.elapsed(), "unloaded");
            });
        }
    });
}

/// Why a program could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(String),
    #[error("{}", explain(.0))]
    Program(#[from] aya::programs::ProgramError),
    #[error("{}", explain(.0))]
    Btf(#[from] aya::BtfError),
    #[error("kernel BTF: {0}")]
    KernelBtf(String),
    #[error("{what}: {source}")]
    Cpus {
        what: &'static str,
        source: std::io::Error,
    },
}

/// The program `name` as type `T`.
pub(crate) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, AttachError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| AttachError::MissingProgram(name.to_owned()))?;
    Ok(p.try_into()?)
}

/// An error and its sources on one line (aya's errors keep the errno in a source), and what
/// the kernel's answer means where it is cryptic.
pub(crate) fn explain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    if s.contains("devices/kprobe/type") {
        s.push_str(" (this kernel has no kprobe support)");
    }
    // 524 is the kernel-internal ENOTSUPP, which libc has no name for.
    if s.contains("os error 524") {
        s.push_str(
            " (ENOTSUPP: this kernel has no BPF trampoline for this hook on this architecture)",
        );
    }
    s
}

/// Whether BPF LSM is active, and if not why. An LSM program attaches even where BPF LSM is
/// not active, and then never runs: the kernel's list of active LSMs decides.
pub fn bpf_lsm_active() -> Result<(), String> {
    match active_lsms() {
        Ok(list) if list.trim().split(',').any(|l| l == "bpf") => Ok(()),
        Ok(list) => Err(format!(
            "BPF LSM is not active ({ACTIVE_LSMS}: {}); boot with `bpf` in lsm= to enable it",
            list.trim()
        )),
        Err(e) => Err(format!(
            "cannot tell whether BPF LSM is active: reading {ACTIVE_LSMS}: {e}"
        )),
    }
}

/// The kernel's active LSMs, securityfs mounted at its standard place first where it is not
/// (what `mount -t securityfs securityfs /sys/kernel/security` does; systemd does it at boot).
fn active_lsms() -> std::io::Result<String> {
    match std::fs::read_to_string(ACTIVE_LSMS) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // SAFETY: all arguments are valid NUL-terminated strings; data may be null.
            let rc = unsafe {
                libc::mount(
                    c"securityfs".as_ptr(),
                    c"/sys/kernel/security".as_ptr(),
                    c"securityfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(std::io::Error::other(format!(
                    "securityfs is not mounted and mounting it failed: {}",
                    std::io::Error::last_os_error()
                )));
            }
            tracing::info!("mounted securityfs at /sys/kernel/security");
            std::fs::read_to_string(ACTIVE_LSMS)
        }
        other => other,
    }
}

/// Where tracepoints are looked up; aya also tries debugfs's `tracing` directory.
const TRACEFS: &str = "/sys/kernel/tracing";

/// Tracepoint probes need tracefs; hosts that boot without it mounted get it mounted at its
/// standard place (what `mount -t tracefs nodev /sys/kernel/tracing` does).
fn ensure_tracefs() {
    let events = std::path::Path::new(TRACEFS).join("events");
    let debugfs_events = std::path::Path::new("/sys/kernel/debug/tracing/events");
    if events.exists() || debugfs_events.exists() {
        return;
    }
    let rc = {
        let target = c"/sys/kernel/tracing";
        // SAFETY: all arguments are valid NUL-terminated strings; data may be null.
        unsafe {
            libc::mount(
                c"nodev".as_ptr(),
                target.as_ptr(),
                c"tracefs".as_ptr(),
                0,
                std::ptr::null(),
            )
        }
    };
    if rc == 0 {
        tracing::info!("mounted tracefs at {TRACEFS}");
    } else {
        tracing::warn!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use agent_common::{LimitFile, maps, programs};

    use super::EBPF_OBJECT;

    /// The names the agent looks maps and programs up by are those of the built object (read
    /// without loading it), and every program in it is one the agent knows of.
    #[test]
    fn names_match_the_built_object() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the built object parses");
        let used_maps = [
            maps::EVENTS,
            maps::EXECS,
            maps::EXEC_SEEN,
            maps::LOST,
            maps::KILLED,
            maps::PENDING_WRITES,
            maps::LIMIT_WRITE_ARGS,
            maps::OFFSETS,
            maps::OOM_ENTRIES,
            maps::FUTEX_WAITS,
            maps::FUTEX_PROCESSES,
            maps::FUTEX_LOCKS,
            maps::FUTEX_STACKS,
            maps::FUTEX_SELECTED,
            maps::FUTEX_CONFIG,
            maps::CPU_SAMPLES,
            maps::SAMPLE_STACKS,
            maps::WINDOW,
            maps::OFFCPU_SLOTS,
            maps::OFFCPU,
            maps::OFFCPU_STACKS,
            maps::OFFCPU_WATCH,
            maps::DIAG_COUNTS,
            maps::DIAG_STACKS,
            maps::DIAG_LOST,
            maps::GUARD_FILES,
            maps::GUARD_EXES,
            maps::GUARD_PARENTS,
            maps::GUARD_PIDS,
            maps::GUARD_CGROUPS,
            maps::GUARD_TRUST,
        ];
        // Globals live in a data section; their symbols name them.
        let elf = object::File::parse(EBPF_OBJECT).expect("ELF");
        let symbols: HashSet<&str> = object::Object::symbols(&elf)
            .filter_map(|s| object::ObjectSymbol::name(&s).ok())
            .collect();
        for name in used_maps {
            assert!(
                obj.maps.contains_key(name) || symbols.contains(name),
                "map {name} is not in the built object: {:?}",
                obj.maps.keys().collect::<Vec<_>>()
            );
        }
        let mut known: HashSet<&str> = [
            programs::LIMIT_WRITE_KPROBE,
            programs::LIMIT_WRITE_KRETPROBE,
            programs::CGROUP_MKDIR,
            programs::CGROUP_RMDIR,
            programs::OOM_MARK_VICTIM,
            programs::SIGNAL_GENERATE,
            programs::OOM_ENTER_FENTRY,
            programs::OOM_ENTER_KPROBE,
            programs::FUTEX_ENTER,
            programs::FUTEX_WAITV_ENTER,
            programs::FUTEX_EXIT,
            programs::GO_FATAL_REGS,
            programs::GO_THROW_REGS,
            programs::GO_FATAL_STACK,
            programs::GO_THROW_STACK,
            programs::PROCESS_EXEC,
            programs::CPU_SAMPLE,
            programs::SCHED_SWITCH,
            programs::SCHED_SWITCH_COMPAT,
            programs::LOCK_DIAG,
            programs::GUARD_FILE_OPEN,
            programs::GUARD_EMPTY,
        ]
        .into_iter()
        .collect();
        known.extend(programs::SYSCALL_WRITES.map(|(p, _)| p));
        known.extend(programs::SYSCALL_WRITES_COMPAT.map(|(p, _)| p));
        known.extend(programs::BENCH_EMPTY.map(|(p, _)| p));
        known.extend(LimitFile::ALL.map(LimitFile::fexit_program));
        known.extend(
            programs::FUTEX_FUNCTIONS
                .iter()
                .flat_map(|f| [f.entry, f.exit]),
        );
        let built: HashSet<&str> = obj.programs.keys().map(String::as_str).collect();
        let missing: Vec<_> = known.difference(&built).collect();
        assert!(missing.is_empty(), "not in the built object: {missing:?}");
        let unknown: Vec<_> = built.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "built but unknown to the agent: {unknown:?}"
        );
    }
}
