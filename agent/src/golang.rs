//! Go programs: which executables are Go (their build info), which ABI passes a function's
//! arguments (registers since Go 1.17 on amd64 and 1.18 on arm64, the stack before), and the
//! uprobes on their fatal error functions, attached once per executable file for every process
//! that runs it. Executables are looked at when a process execs, and once at start-up.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_common::programs;
use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeScope},
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

/// At most this many executables get uprobes (each costs the kernel an uprobe per function).
const MAX_BINARIES: usize = 512;

/// Larger executables are not read (the whole file is, to find its build info and symbols).
const MAX_BINARY_BYTES: u64 = 1 << 30;

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

/// What an executable is, for the fatal error probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoBinary {
    /// `go1.19.8`, or empty when the build info does not say.
    pub version: String,
    /// Whether arguments come in registers.
    pub register_abi: bool,
    /// Which of [`FUNCTIONS`] it has symbols for.
    pub functions: Vec<&'static str>,
}

/// Parses an ELF executable: `None` when it is not a Go program.
#[must_use]
pub fn inspect(data: &[u8]) -> Option<GoBinary> {
    let file = object::File::parse(data).ok()?;
    let buildinfo = file.section_by_name(".go.buildinfo")?.data().ok()?;
    let version = build_version(&file, buildinfo).unwrap_or_default();
    let (major, minor) = go_version(&version).unwrap_or((1, 0));
    let register_abi = match file.architecture() {
        object::Architecture::X86_64 => (major, minor) >= (1, 17),
        object::Architecture::Aarch64 => (major, minor) >= (1, 18),
        _ => false,
    };
    let names: HashSet<&str> = file.symbols().filter_map(|s| s.name().ok()).collect();
    let functions = FUNCTIONS
        .iter()
        .map(|f| f.0)
        .filter(|f| names.contains(f))
        .collect();
    Some(GoBinary {
        version,
        register_abi,
        functions,
    })
}

/// The Go version in `.go.buildinfo`: inline after the 32-byte header since Go 1.18 (flag
/// bit 2), else behind a pointer to its string header (as Go's debug/buildinfo reads it).
fn build_version(file: &object::File<'_>, info: &[u8]) -> Option<String> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if !info.starts_with(MAGIC) || info.len() < 32 {
        return None;
    }
    let (ptr_size, flags) = (usize::from(info[14]), info[15]);
    if flags & 2 != 0 {
        let (len, used) = uvarint(&info[32..])?;
        let start = 32 + used;
        let bytes = info.get(start..start.checked_add(usize::try_from(len).ok()?)?)?;
        return String::from_utf8(bytes.to_vec()).ok();
    }
    // Before 1.18: a pointer to the version's string header (pointer, length).
    let little = flags & 1 == 0;
    let word = |b: &[u8]| -> Option<u64> {
        Some(match (ptr_size, little) {
            (8, true) => u64::from_le_bytes(b.get(..8)?.try_into().ok()?),
            (8, false) => u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
            (4, true) => u64::from(u32::from_le_bytes(b.get(..4)?.try_into().ok()?)),
            (4, false) => u64::from(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)),
            _ => return None,
        })
    };
    let at = |addr: u64, len: usize| -> Option<Vec<u8>> {
        file.sections().find_map(|s| {
            let offset = addr.checked_sub(s.address())?;
            (offset < s.size()).then(|| {
                let data = s.data().ok()?;
                let start = usize::try_from(offset).ok()?;
                data.get(start..start.checked_add(len)?).map(<[u8]>::to_vec)
            })?
        })
    };
    let header = at(word(&info[16..])?, ptr_size * 2)?;
    let (ptr, len) = (word(&header)?, word(&header[ptr_size..])?);
    String::from_utf8(at(ptr, usize::try_from(len).ok()?.min(64))?).ok()
}

/// A Go unsigned varint and the bytes it took.
fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// `go1.19.8` to (1, 19); `devel go1.22-abc` to (1, 22).
fn go_version(v: &str) -> Option<(u32, u32)> {
    let rest = &v[v.find("go1.")? + 2..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Attaches the fatal error probes to the Go executables processes run.
#[derive(Debug)]
pub struct GoWatcher {
    /// Executables looked at, by (device, inode): attached or not Go.
    seen: HashSet<(u64, u64)>,
    attached: usize,
}

impl GoWatcher {
    /// Loads the uprobe programs and attaches the exec tracepoint (the probe loader's part).
    pub fn load(ebpf: &mut Ebpf) -> Result<(), String> {
        for (_, regs, stack) in FUNCTIONS {
            for name in [regs, stack] {
                let p: &mut UProbe = program(ebpf, name)?;
                p.load().map_err(|e| format!("{name}: {e}"))?;
            }
        }
        let exec: &mut aya::programs::RawTracePoint = program(ebpf, programs::PROCESS_EXEC)?;
        exec.load().map_err(|e| format!("process_exec: {e}"))?;
        exec.attach("sched_process_exec")
            .map_err(|e| format!("sched_process_exec: {e}"))?;
        Ok(())
    }

    /// Looks at every running process (after [`Self::load`]).
    pub fn start(ebpf: &mut Ebpf) -> Self {
        let mut w = Self {
            seen: HashSet::new(),
            attached: 0,
        };
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
                    w.consider(ebpf, pid);
                }
            }
        }
        w
    }

    /// Looks at the executable `pid` runs; a Go one not seen before gets the probes.
    pub fn consider(&mut self, ebpf: &mut Ebpf, pid: u32) {
        // The magic link reaches the file in the process's own mount namespace (a container's).
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let Ok(meta) = std::fs::metadata(&exe) else {
            return;
        };
        if !self.seen.insert((meta.dev(), meta.ino()))
            || self.attached >= MAX_BINARIES
            || meta.len() > MAX_BINARY_BYTES
        {
            return;
        }
        let Ok(data) = std::fs::read(&exe) else {
            return;
        };
        let Some(go) = inspect(&data) else {
            return;
        };
        let name = std::fs::read_link(&exe).unwrap_or_default();
        match attach(ebpf, &exe, &go) {
            Ok(n) if n > 0 => {
                self.attached += 1;
                tracing::info!(
                    exe = %name.display(),
                    version = %go.version,
                    register_abi = go.register_abi,
                    functions = %go.functions.join(","),
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
    }
}

/// Attaches the ABI's program to each function `go` has; returns how many.
fn attach(ebpf: &mut Ebpf, exe: &Path, go: &GoBinary) -> Result<usize, String> {
    let mut n = 0;
    for (function, regs, stack) in FUNCTIONS {
        if !go.functions.contains(&function) {
            continue;
        }
        let name = if go.register_abi { regs } else { stack };
        let p: &mut UProbe = program(ebpf, name)?;
        p.attach(function, exe, UProbeScope::AllProcesses)
            .map_err(|e| format!("{function}: {e}"))?;
        n += 1;
    }
    Ok(n)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_varints() {
        assert_eq!(go_version("go1.19.8"), Some((1, 19)));
        assert_eq!(go_version("devel go1.22-abc123"), Some((1, 22)));
        assert_eq!(go_version("rustc"), None);
        assert_eq!(uvarint(&[0x08]), Some((8, 1)));
        assert_eq!(uvarint(&[0x96, 0x01]), Some((150, 2)));
        assert_eq!(uvarint(&[0x80]), None);
    }

    #[test]
    fn this_test_binary_is_not_go() {
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        assert_eq!(inspect(&me), None);
    }
}
