//! Go programs' fatal errors: uprobes on `runtime.fatal` and `runtime.throw` of each Go
//! executable, attached once per executable file for every process that runs it. Executables
//! are looked at when the kernel reports the first exec of each file, and once at start-up, on
//! a thread of their own: reading an executable's tables takes time the event loop has not.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use agent_common::{ExecKey, programs};
use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::{UProbe, uprobe::UProbeScope},
};

use super::loader::{AttachError, program};
use crate::{
    enrich::elf::{self, GoBinary},
    model::cache::{Bounded, Cache, Evictions},
};

/// At most this many executables get uprobes (each costs the kernel an uprobe per function).
const MAX_BINARIES: usize = 512;

/// Executables remembered as looked at (Go or not).
const MAX_SEEN: usize = 16_384;

/// The functions probed, with the programs for the register and the stack ABI.
const FUNCTIONS: [(&str, &str, &str); 2] = [
    (
        "runtime.fatal",
        programs::GO_FATAL_REGS,
        programs::GO_FATAL_STACK,
    ),
    (
        "runtime.throw",
        programs::GO_THROW_REGS,
        programs::GO_THROW_STACK,
    ),
];

/// Loads the uprobe programs and attaches the exec tracepoint (the probe loader's part).
pub fn load(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    for (_, regs, stack) in FUNCTIONS {
        for name in [regs, stack] {
            program::<UProbe>(ebpf, name)?.load()?;
        }
    }
    let exec: &mut aya::programs::RawTracePoint = program(ebpf, programs::PROCESS_EXEC)?;
    exec.load()?;
    exec.attach("sched_process_exec")?;
    Ok(())
}

/// The loaded object, shared by the loop (which detaches everything at shutdown by taking it)
/// and this watcher (which attaches uprobes while it is there).
pub type SharedEbpf = Arc<Mutex<Option<Ebpf>>>;

/// The kernel's record of executables reported by an exec (`EXEC_SEEN`), shared by the watcher
/// and the loop (which forgets a file whose exec it had no room to pass on).
pub type ExecSeen = Arc<Mutex<BpfHashMap<MapData, ExecKey, u8>>>;

/// Removes `key` from the kernel's record, so that the file's next exec is reported again.
pub fn forget(seen: &ExecSeen, key: &ExecKey) {
    if let Ok(mut m) = seen.lock() {
        let _ = m.remove(key);
    }
}

/// Attaches the fatal error probes to the Go executables processes run.
pub struct GoWatcher {
    ebpf: SharedEbpf,
    /// The kernel's record of executables reported: a file that could not be looked at is
    /// removed from it, so its next exec is reported again.
    exec_seen: ExecSeen,
    /// Executables looked at, by (device, inode) as `stat` gives them: attached or not Go.
    seen: Bounded<(u64, u64), ()>,
    attached: usize,
}

impl std::fmt::Debug for GoWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoWatcher")
            .field("seen", &self.seen.len())
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl GoWatcher {
    #[must_use]
    pub fn new(ebpf: SharedEbpf, exec_seen: ExecSeen, evictions: &Evictions) -> Self {
        Self {
            ebpf,
            exec_seen,
            seen: Bounded::new(Cache::Executables, MAX_SEEN, evictions.clone()),
            attached: 0,
        }
    }

    /// The executable process `pid` runs, reported by the kernel as `key`: a Go one not seen
    /// before gets the probes. One that cannot be looked at (the process is gone) is forgotten
    /// by the kernel, so that it is reported again at its next exec.
    pub fn exec(&mut self, pid: u32, key: ExecKey) {
        if !self.consider(pid) {
            forget(&self.exec_seen, &key);
        }
    }

    /// Looks at the executable `pid` runs; `false` when it could not be looked at.
    pub fn consider(&mut self, pid: u32) -> bool {
        // The magic link reaches the file in the process's own mount namespace (a container's).
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let Ok(meta) = std::fs::metadata(&exe) else {
            return false;
        };
        let file = (meta.dev(), meta.ino());
        if self.seen.contains(&file) {
            return true;
        }
        self.seen.put(file, ());
        if self.attached >= MAX_BINARIES {
            return true;
        }
        let name = std::fs::read_link(&exe).unwrap_or_default();
        let wanted = FUNCTIONS.map(|f| f.0);
        let go = match elf::inspect_file(&exe, &wanted) {
            Ok(Some(go)) => go,
            Ok(None) => {
                tracing::debug!(exe = %name.display(), "not a Go program");
                return true;
            }
            Err(elf::ElfError::Open(_)) => {
                self.seen.remove(&file);
                return false;
            }
            Err(e) => {
                tracing::debug!(exe = %name.display(), "not looked at for Go: {e}");
                return true;
            }
        };
        match self.attach(&exe, &go) {
            Ok(n) if n > 0 => {
                self.attached += 1;
                let functions: Vec<&str> = go.functions.iter().map(|f| f.0).collect();
                tracing::info!(
                    exe = %name.display(),
                    version = %go.version,
                    register_abi = go.register_abi,
                    functions = %functions.join(","),
                    "Go fatal error probes attached"
                );
            }
            Ok(_) => tracing::info!(
                exe = %name.display(),
                version = %go.version,
                "Go program without runtime.fatal or runtime.throw symbols (stripped): its fatal errors are not seen"
            ),
            Err(e) => tracing::warn!(exe = %name.display(), "Go fatal error probes: {e}"),
        }
        true
    }

    /// Attaches the ABI's program to each function `go` has; returns how many.
    fn attach(&self, exe: &Path, go: &GoBinary) -> Result<usize, AttachError> {
        // A poisoned lock: another thread panicked holding it, and the agent is stopping.
        let Ok(mut guard) = self.ebpf.lock() else {
            return Ok(0);
        };
        // Gone: the agent is stopping.
        let Some(ebpf) = guard.as_mut() else {
            return Ok(0);
        };
        let mut n = 0;
        for (function, offset) in &go.functions {
            let Some((_, regs, stack)) = FUNCTIONS.iter().find(|f| f.0 == *function) else {
                continue;
            };
            let name = if go.register_abi { regs } else { stack };
            program::<UProbe>(ebpf, name)?.attach(*offset, exe, UProbeScope::AllProcesses)?;
            n += 1;
        }
        Ok(n)
    }
}
