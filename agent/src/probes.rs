//! Loading and attaching the eBPF programs. Each probe attaches or fails on its own: a kernel
//! that refuses one probe still gets the others, and the report says which and why.

use std::fmt;

use agent_common::{KernelOffsets, maps, programs};
use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{FExit, RawTracePoint, TracePoint},
};

/// The eBPF object built by build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// One probe and how it went.
#[derive(Debug, Clone)]
pub struct ProbeStatus {
    /// What it observes (a stable name, used as a metric label).
    pub capability: &'static str,
    /// The kernel hook, as `type:target`.
    pub hook: &'static str,
    /// `None` when attached; else why not.
    pub error: Option<String>,
}

impl ProbeStatus {
    #[must_use]
    pub fn attached(&self) -> bool {
        self.error.is_none()
    }
}

impl fmt::Display for ProbeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            None => write!(f, "{:<14} {:<32} attached", self.capability, self.hook),
            Some(e) => write!(
                f,
                "{:<14} {:<32} UNAVAILABLE: {e}",
                self.capability, self.hook
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
}

/// The loaded object (which owns every attached link) and the status of each probe.
#[derive(Debug)]
pub struct Probes {
    pub ebpf: Ebpf,
    pub status: Vec<ProbeStatus>,
}

/// Loads the object with `offsets` set, then loads and attaches every probe it can.
pub fn load(offsets: &KernelOffsets) -> Result<Probes, ProbeError> {
    raise_memlock_limit();
    ensure_tracefs();
    let mut ebpf = EbpfLoader::new()
        .override_global(maps::OFFSETS, offsets, true)
        .load(EBPF_OBJECT)?;
    // Kernel BTF is needed by fexit programs only; its absence is reported per probe.
    let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {e}"));

    let status = vec![
        attach("limit_writes", "fexit:memory_max_write", || {
            let btf = btf.as_ref().map_err(Clone::clone)?;
            let p: &mut FExit = program(&mut ebpf, programs::MEMORY_MAX_WRITE_FEXIT)?;
            p.load("memory_max_write", btf).map_err(chain)?;
            p.attach().map_err(chain)?;
            Ok(())
        }),
        attach("oom_victims", "raw_tp:signal_generate", || {
            let p: &mut RawTracePoint = program(&mut ebpf, programs::SIGNAL_GENERATE)?;
            p.load().map_err(chain)?;
            p.attach("signal_generate").map_err(chain)?;
            Ok(())
        }),
        attach("oom_kills", "tracepoint:oom/mark_victim", || {
            let p: &mut TracePoint = program(&mut ebpf, programs::OOM_MARK_VICTIM)?;
            p.load().map_err(chain)?;
            p.attach("oom", "mark_victim").map_err(chain)?;
            Ok(())
        }),
    ];
    Ok(Probes { ebpf, status })
}

fn attach(
    capability: &'static str,
    hook: &'static str,
    f: impl FnOnce() -> Result<(), String>,
) -> ProbeStatus {
    ProbeStatus {
        capability,
        hook,
        error: f().err(),
    }
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
