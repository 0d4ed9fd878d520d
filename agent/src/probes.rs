//! Loading and attaching the eBPF programs. Each capability attaches or fails on its own: a
//! kernel that refuses one still gets the others, and the report says which mode each uses, or
//! why none could attach.

use std::fmt;

use agent_common::{FutexConfig, KernelOffsets, LimitFile, maps, programs};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{
        FEntry, FExit, KProbe, PerfEvent, RawTracePoint, TracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
};

use crate::config::{ContentionConfig, LimitWriteMode, OomLimitMode, ProbesConfig};

/// The eBPF object built by build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Label value of `mode` for a capability that could not attach.
pub const UNAVAILABLE: &str = "unavailable";

/// One capability and how it went.
#[derive(Debug, Clone)]
pub struct ProbeStatus {
    /// What it observes (a stable name, used as a metric label).
    pub capability: &'static str,
    /// How it is attached (`fexit`, `kprobe`, `tracepoint`, `raw_tp`), or [`UNAVAILABLE`].
    pub mode: &'static str,
    /// The kernel hooks it attached to.
    pub hooks: Vec<String>,
    /// Why hooks of the chosen mode (or, when unavailable, of every mode) could not attach.
    pub errors: Vec<String>,
    /// Why preferred modes were passed over for the one in use.
    pub fallbacks: Vec<String>,
}

impl ProbeStatus {
    #[must_use]
    pub fn attached(&self) -> bool {
        self.mode != UNAVAILABLE
    }
}

impl fmt::Display for ProbeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.attached() {
            write!(
                f,
                "{:<14} {:<11} attached: {}",
                self.capability,
                self.mode,
                self.hooks.join(", ")
            )?;
        } else {
            write!(f, "{:<14} UNAVAILABLE", self.capability)?;
        }
        for e in &self.errors {
            write!(f, "\n{:<17}{e}", "")?;
        }
        for e in &self.fallbacks {
            write!(f, "\n{:<17}(passed over) {e}", "")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
}

/// The loaded object (which owns every attached link) and the status of each capability.
#[derive(Debug)]
pub struct Probes {
    pub ebpf: Ebpf,
    pub status: Vec<ProbeStatus>,
}

/// Loads the object with `offsets` set, then loads and attaches every capability it can.
pub fn load(
    offsets: &KernelOffsets,
    choices: &ProbesConfig,
    contention: &ContentionConfig,
) -> Result<Probes, ProbeError> {
    let mut ebpf = load_object(offsets, contention)?;
    let status = vec![
        attach_futex(&mut ebpf, contention),
        attach_sampling(&mut ebpf, contention),
        attach_offcpu(&mut ebpf, contention),
        single(
            "go_fatal_errors",
            "uprobe",
            "runtime.fatal and runtime.throw of each Go executable; raw_tp sched_process_exec",
            || crate::golang::GoWatcher::load(&mut ebpf),
        ),
        attach_limit_writes(&mut ebpf, offsets, choices.limit_writes),
        attach_oom_limits(&mut ebpf, offsets, choices.oom_limits),
        single("oom_victims", "raw_tp", "signal_generate", || {
            let p: &mut RawTracePoint = program(&mut ebpf, programs::SIGNAL_GENERATE)?;
            p.load().map_err(chain)?;
            p.attach("signal_generate").map_err(chain)?;
            Ok(())
        }),
        single("oom_kills", "tracepoint", "oom/mark_victim", || {
            let p: &mut TracePoint = program(&mut ebpf, programs::OOM_MARK_VICTIM)?;
            p.load().map_err(chain)?;
            p.attach("oom", "mark_victim").map_err(chain)?;
            Ok(())
        }),
        single(
            "cgroup_changes",
            "raw_tp",
            "cgroup_mkdir, cgroup_rmdir",
            || {
                for (name, tp) in [
                    (programs::CGROUP_MKDIR, "cgroup_mkdir"),
                    (programs::CGROUP_RMDIR, "cgroup_rmdir"),
                ] {
                    let p: &mut RawTracePoint = program(&mut ebpf, name)?;
                    p.load().map_err(chain)?;
                    p.attach(tp).map_err(chain)?;
                }
                Ok(())
            },
        ),
    ];
    Ok(Probes { ebpf, status })
}

/// Loads the object (maps, program definitions) with `offsets` and the contention settings
/// set; attaches nothing.
pub fn load_object(
    offsets: &KernelOffsets,
    contention: &ContentionConfig,
) -> Result<Ebpf, ProbeError> {
    raise_memlock_limit();
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
        .load(EBPF_OBJECT)?)
}

/// Takes map `name` out of the loaded object, for a reader that owns it from then on.
pub fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow::anyhow!("map {name} missing from the eBPF object"))
}

/// CPU sampling: the perf event program on every online CPU's software clock.
fn attach_sampling(ebpf: &mut Ebpf, contention: &ContentionConfig) -> ProbeStatus {
    let hook = format!(
        "software CPU clock at {} Hz on every CPU",
        contention.sample_hz
    );
    if contention.sample_hz == 0 {
        return ProbeStatus {
            capability: "cpu_samples",
            mode: UNAVAILABLE,
            hooks: Vec::new(),
            errors: vec!["off in the configuration (contention.sample_hz = 0)".to_owned()],
            fallbacks: Vec::new(),
        };
    }
    single("cpu_samples", "perf_event", &hook, || {
        let cpus = aya::util::online_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
        let p: &mut PerfEvent = program(ebpf, programs::CPU_SAMPLE)?;
        p.load().map_err(chain)?;
        for cpu in cpus {
            p.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(contention.sample_hz),
                true,
            )
            .map_err(chain)?;
        }
        Ok(())
    })
}

/// Off-CPU time: the raw tracepoint `sched_switch`.
fn attach_offcpu(ebpf: &mut Ebpf, contention: &ContentionConfig) -> ProbeStatus {
    if !contention.off_cpu {
        return ProbeStatus {
            capability: "off_cpu",
            mode: UNAVAILABLE,
            hooks: Vec::new(),
            errors: vec!["off in the configuration (contention.off_cpu)".to_owned()],
            fallbacks: Vec::new(),
        };
    }
    // Each kernel takes one of the two: a program reading the state argument does not attach
    // where the tracepoint has no such argument.
    let mut errors = Vec::new();
    for (name, hook) in [
        (programs::SCHED_SWITCH, "sched_switch (with prev_state)"),
        (programs::SCHED_SWITCH_COMPAT, "sched_switch (before 5.18)"),
    ] {
        let r = program::<RawTracePoint>(ebpf, name).and_then(|p| {
            p.load().map_err(chain)?;
            p.attach("sched_switch").map(drop).map_err(chain)
        });
        match r {
            Ok(()) => {
                return ProbeStatus {
                    capability: "off_cpu",
                    mode: "raw_tp",
                    hooks: vec![hook.to_owned()],
                    errors: Vec::new(),
                    fallbacks: errors,
                };
            }
            Err(e) => errors.push(format!("raw_tp:{hook}: {e}")),
        }
    }
    ProbeStatus {
        capability: "off_cpu",
        mode: UNAVAILABLE,
        hooks: Vec::new(),
        errors,
        fallbacks: Vec::new(),
    }
}

/// Futex waits: the entries and exits of futex(2), and of `futex_waitv(2)` and `futex_wait(2)`
/// where the kernel has them (5.16, 6.7).
fn attach_futex(ebpf: &mut Ebpf, contention: &ContentionConfig) -> ProbeStatus {
    let mut status = ProbeStatus {
        capability: "futex_waits",
        mode: UNAVAILABLE,
        hooks: Vec::new(),
        errors: Vec::new(),
        fallbacks: Vec::new(),
    };
    if !contention.futex_waits {
        status
            .errors
            .push("off in the configuration (contention.futex_waits)".to_owned());
        return status;
    }
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
    for name in [
        programs::FUTEX_EXIT,
        programs::FUTEX_ENTER,
        programs::FUTEX_WAITV_ENTER,
    ] {
        if let Err(e) = program::<TracePoint>(ebpf, name).and_then(|p| p.load().map_err(chain)) {
            status.errors.push(format!("{name}: {e}"));
            return status;
        }
    }
    for (i, (name, tracepoint)) in required.iter().chain(&optional).enumerate() {
        let r = program::<TracePoint>(ebpf, name)
            .and_then(|p| p.attach("syscalls", tracepoint).map(drop).map_err(chain));
        match r {
            Ok(()) => status.hooks.push(format!("syscalls/{tracepoint}")),
            // An older kernel without the newer syscalls: not an error.
            Err(_) if i >= required.len() => {}
            Err(e) => {
                status.errors.push(format!("syscalls/{tracepoint}: {e}"));
                for (name, _) in required.iter().chain(&optional) {
                    if let Ok(p) = program::<TracePoint>(ebpf, name) {
                        let _ = p.unload();
                    }
                }
                status.hooks.clear();
                return status;
            }
        }
    }
    status.mode = "tracepoint";
    status
}

/// A capability with one way to attach.
fn single(
    capability: &'static str,
    mode: &'static str,
    hook: &str,
    f: impl FnOnce() -> Result<(), String>,
) -> ProbeStatus {
    match f() {
        Ok(()) => ProbeStatus {
            capability,
            mode,
            hooks: vec![hook.to_owned()],
            errors: Vec::new(),
            fallbacks: Vec::new(),
        },
        Err(e) => ProbeStatus {
            capability,
            mode: UNAVAILABLE,
            hooks: Vec::new(),
            errors: vec![format!("{mode}:{hook}: {e}")],
            fallbacks: Vec::new(),
        },
    }
}

/// Limit writes: fexit on each handler, else one kprobe/kretprobe pair on all of them. A mode is
/// used when it attaches to at least one handler; handlers it could not attach to are reported.
fn attach_limit_writes(
    ebpf: &mut Ebpf,
    offsets: &KernelOffsets,
    choice: LimitWriteMode,
) -> ProbeStatus {
    let mut status = ProbeStatus {
        capability: "limit_writes",
        mode: UNAVAILABLE,
        hooks: Vec::new(),
        errors: Vec::new(),
        fallbacks: Vec::new(),
    };
    if !offsets.has_written_file() {
        status.errors.push(
            "kernel BTF lacks the kernfs fields needed to tell which file was written".into(),
        );
        return status;
    }
    let modes: &[LimitWriteMode] = match choice {
        LimitWriteMode::Auto => &[
            LimitWriteMode::Fexit,
            LimitWriteMode::Kprobe,
            LimitWriteMode::Syscalls,
        ],
        LimitWriteMode::Fexit => &[LimitWriteMode::Fexit],
        LimitWriteMode::Kprobe => &[LimitWriteMode::Kprobe],
        LimitWriteMode::Syscalls => &[LimitWriteMode::Syscalls],
        LimitWriteMode::Inotify => &[],
    };
    for &mode in modes {
        let (name, (hooks, failures)) = match mode {
            LimitWriteMode::Kprobe => ("kprobe", attach_kprobes(ebpf)),
            LimitWriteMode::Syscalls => ("syscalls", attach_syscalls(ebpf, offsets)),
            LimitWriteMode::Fexit | LimitWriteMode::Auto | LimitWriteMode::Inotify => {
                ("fexit", attach_fexits(ebpf))
            }
        };
        let attached = !hooks.is_empty();
        status.errors.extend(grouped(name, attached, failures));
        if attached {
            status.mode = name;
            status.hooks = hooks;
            // Errors of the modes tried before this one explain why they were passed over.
            let (this, earlier) = status.errors.drain(..).partition(|e| e.starts_with(name));
            status.errors = this;
            status.fallbacks = earlier;
            break;
        }
    }
    if matches!(choice, LimitWriteMode::Auto | LimitWriteMode::Inotify) && !status.attached() {
        status = inotify_status(std::mem::take(&mut status.errors));
    }
    status
}

/// The limit an OOM kill hit: fentry on `out_of_memory`, else a kprobe there; without either,
/// userspace derives it from the cgroups' `memory.events.local` (mode `memory.events`).
fn attach_oom_limits(
    ebpf: &mut Ebpf,
    offsets: &KernelOffsets,
    choice: OomLimitMode,
) -> ProbeStatus {
    let mut status = ProbeStatus {
        capability: "oom_limits",
        mode: UNAVAILABLE,
        hooks: Vec::new(),
        errors: Vec::new(),
        fallbacks: Vec::new(),
    };
    let modes: &[OomLimitMode] = match choice {
        OomLimitMode::Auto => &[OomLimitMode::Fentry, OomLimitMode::Kprobe],
        OomLimitMode::Fentry => &[OomLimitMode::Fentry],
        OomLimitMode::Kprobe => &[OomLimitMode::Kprobe],
        OomLimitMode::MemoryEvents => &[],
    };
    let mut tried = Vec::new();
    if !offsets.has_oom_control() && !modes.is_empty() {
        tried.push("kernel BTF lacks the oom_control fields".to_owned());
    } else {
        for &mode in modes {
            let (name, r) = match mode {
                OomLimitMode::Kprobe => (
                    "kprobe",
                    program::<KProbe>(ebpf, programs::OOM_ENTER_KPROBE).and_then(|p| {
                        p.load().map_err(chain)?;
                        p.attach(programs::OUT_OF_MEMORY, 0)
                            .map(drop)
                            .map_err(chain)
                    }),
                ),
                _ => (
                    "fentry",
                    program::<FEntry>(ebpf, programs::OOM_ENTER_FENTRY).and_then(|p| {
                        let btf = Btf::from_sys_fs().map_err(chain)?;
                        p.load(programs::OUT_OF_MEMORY, &btf).map_err(chain)?;
                        p.attach().map(drop).map_err(chain)
                    }),
                ),
            };
            match r {
                Ok(()) => {
                    status.mode = name;
                    status.hooks = vec![programs::OUT_OF_MEMORY.to_owned()];
                    status.fallbacks = tried;
                    return status;
                }
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
    }
    // No probe: derived in userspace, which always works, and is said to be derived.
    status.mode = MEMORY_EVENTS;
    status.hooks =
        vec!["memory.events.local of the victim's cgroup and its ancestors (derived)".to_owned()];
    status.fallbacks = tried;
    status
}

/// The mode of `oom_limits` when no probe sees the `out_of_memory` call.
pub const MEMORY_EVENTS: &str = "memory.events";

/// Limit writes seen without BPF (the agent runs the watcher); `fallbacks` say why.
#[must_use]
pub fn inotify_status(fallbacks: Vec<String>) -> ProbeStatus {
    ProbeStatus {
        capability: "limit_writes",
        mode: INOTIFY,
        hooks: vec!["inotify on every cgroup directory, and polling (writer unknown)".to_owned()],
        errors: Vec::new(),
        fallbacks,
    }
}

/// The mode of `limit_writes` when no BPF probe sees them.
pub const INOTIFY: &str = "inotify";

/// Every capability's status when the eBPF object could not be loaded at all.
#[must_use]
pub fn without_bpf(why: &str, limit_writes: LimitWriteMode) -> Vec<ProbeStatus> {
    let unavailable = |capability| ProbeStatus {
        capability,
        mode: UNAVAILABLE,
        hooks: Vec::new(),
        errors: vec![format!("no BPF: {why}")],
        fallbacks: Vec::new(),
    };
    let limits = match limit_writes {
        LimitWriteMode::Auto | LimitWriteMode::Inotify => {
            inotify_status(vec![format!("no BPF: {why}")])
        }
        _ => unavailable("limit_writes"),
    };
    vec![
        limits,
        unavailable("futex_waits"),
        unavailable("go_fatal_errors"),
        unavailable("cpu_samples"),
        unavailable("off_cpu"),
        unavailable("oom_limits"),
        unavailable("oom_victims"),
        unavailable("oom_kills"),
        unavailable("cgroup_changes"),
    ]
}

/// The handlers a mode attached to, and (handler, error) for the others.
type Attempt = (Vec<String>, Vec<(&'static str, String)>);

/// One line per distinct error, naming its handlers ("all" when every handler failed alike).
fn grouped(mode: &str, attached: bool, failures: Vec<(&'static str, String)>) -> Vec<String> {
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
            format!("{mode}: {verb} {which}: {error}")
        })
        .collect()
}

fn attach_fexits(ebpf: &mut Ebpf) -> Attempt {
    let btf = match Btf::from_sys_fs() {
        Ok(b) => b,
        Err(e) => return (Vec::new(), vec![("kernel BTF", e.to_string())]),
    };
    let mut attempt: Attempt = (Vec::new(), Vec::new());
    for limit in LimitFile::ALL {
        let handler = limit.kernel_handler();
        let r = (|| {
            let p: &mut FExit = program(ebpf, limit.fexit_program())?;
            p.load(handler, &btf).map_err(chain)?;
            p.attach().map_err(chain)?;
            Ok::<_, String>(())
        })();
        match r {
            Ok(()) => attempt.0.push(handler.to_owned()),
            Err(e) => attempt.1.push((handler, e)),
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
        let loaded = program::<KProbe>(ebpf, name).and_then(|p| p.load().map_err(chain));
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
            p.attach(handler, 0).map(drop).map_err(chain)
        });
        match r {
            Ok(()) => attempt.0.push(handler.to_owned()),
            Err(e) => attempt.1.push((handler, e)),
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
            Err(e) => refused.push(e),
        }
    }
    (Vec::new(), refused)
}

/// Loads and attaches `syscalls/*` tracepoint programs, all or none.
fn attach_tracepoints(
    ebpf: &mut Ebpf,
    set: &[&(&'static str, &'static str)],
) -> Result<Vec<String>, (&'static str, String)> {
    let mut hooks = Vec::new();
    for &&(name, tracepoint) in set {
        let r = program::<TracePoint>(ebpf, name).and_then(|p| {
            p.load().map_err(chain)?;
            p.attach("syscalls", tracepoint).map(drop).map_err(chain)
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

/// The program `name` as type `T`.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the eBPF object"))?;
    p.try_into().map_err(chain)
}
/// An error and its sources on one line (aya's errors keep the errno in a source).
fn chain(e: impl std::error::Error) -> String {
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

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`; later ones ignore it and some
/// sandboxes refuse to change it, so failing here is only worth a debug line.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) } != 0 {
        tracing::debug!(
            "setrlimit(RLIMIT_MEMLOCK): {}",
            std::io::Error::last_os_error()
        );
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
