//! Installs what a fresh Debian/Ubuntu machine lacks: the eBPF toolchain, bpf-linker, QEMU.
//!
//! Every step is idempotent (it checks before it installs), prints what it does and how long it took.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// The bpf-linker release known to build against Debian's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Set once `apt-get update` ran in this process, so several installs share one update.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Runs `f`, printing `what` before and its duration after.
pub fn step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("xtask: {what} ...");
    let start = Instant::now();
    let out = f();
    let secs = start.elapsed().as_secs_f64();
    match &out {
        Ok(_) => eprintln!("xtask: {what}: done in {secs:.1}s"),
        Err(e) => eprintln!("xtask: {what}: FAILED after {secs:.1}s: {e:#}"),
    }
    out
}

/// Runs a command to completion, failing with its command line when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout, failing when it exits non-zero.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a Debian package is installed (for the given architecture suffix, e.g. `pkg:arm64`).
fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the Debian packages that are not installed yet (one `apt-get update` per process).
pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("apt-get install {}", missing.join(" ")), || {
        if !APT_UPDATED.swap(true, Ordering::SeqCst) {
            run(Command::new("apt-get").args(["update", "-q"]))?;
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    })
}

/// Adds a foreign dpkg architecture (for cross-building and arm64 guests) if it is not there yet.
pub fn dpkg_add_arch(arch: &str) -> Result<()> {
    let archs = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if archs.lines().any(|a| a.trim() == arch) {
        return Ok(());
    }
    step(&format!("dpkg --add-architecture {arch}"), || {
        run(Command::new("dpkg").args(["--add-architecture", arch]))?;
        // The package lists must be read again to see the new architecture.
        APT_UPDATED.store(false, Ordering::SeqCst);
        Ok(())
    })
}

/// Debian's rustc (rustc-web) ships a prebuilt `core` for bpfel-unknown-none; this is the route
/// that works on machines whose rustup cannot download rust-src.
pub const DEBIAN_SYSROOT: &str = "/usr";

/// The LLVM major version Debian's rustc was built with: bpf-linker must use the same one.
pub fn debian_llvm_major() -> Result<u32> {
    let vv = output(Command::new(format!("{DEBIAN_SYSROOT}/bin/rustc")).arg("-vV"))?;
    let ver = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc -vV` printed no LLVM version")?;
    let major = ver.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("LLVM version {ver:?} of Debian's rustc"))
}

/// Where `cargo install` puts binaries: `$CARGO_HOME/bin`, which rustup puts on PATH.
fn cargo_bin_dir() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    );
    home.join("bin")
}

/// Installs the eBPF toolchain: Debian's rustc with the bpf `core`, and bpf-linker on its LLVM.
pub fn ebpf_toolchain() -> Result<()> {
    apt_install(&["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf"])?;
    let llvm = debian_llvm_major()?;
    apt_install(&[&format!("llvm-{llvm}-dev")])?;
    let linker = cargo_bin_dir().join("bpf-linker");
    if linker_matches(&linker, llvm) {
        return Ok(());
    }
    step(
        &format!("cargo install bpf-linker@{BPF_LINKER_VERSION} (LLVM {llvm})"),
        || {
            let path = format!(
                "/usr/lib/llvm-{llvm}/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            );
            run(Command::new("cargo")
                .args(["install", "--locked", "--force", "--no-default-features"])
                .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
                .args(["--features", &format!("llvm-{llvm}")])
                .env("PATH", path))
        },
    )
}

/// An installed bpf-linker is kept only when it is the pinned version and links the same LLVM.
fn linker_matches(linker: &Path, llvm: u32) -> bool {
    let Ok(version) = output(Command::new(linker).arg("--version")) else {
        return false;
    };
    let Ok(libs) = output(Command::new("ldd").arg(linker)) else {
        return false;
    };
    version.contains(BPF_LINKER_VERSION) && libs.contains(&format!("libLLVM.so.{llvm}"))
}

/// The cargo-fuzz release the fuzz targets are built and run with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs the packages the fuzz targets need besides the eBPF toolchain (the agent's build
/// script builds its programs): a C++ compiler for libFuzzer. They build on rustup's nightly
/// compiler (sanitizer flags), which must be there. Then [`cargo_fuzz`] installs cargo-fuzz.
pub fn fuzz_packages() -> Result<()> {
    output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]))
        .context("the fuzz targets need rustup's nightly toolchain")?;
    apt_install(&["g++"])
}

/// Installs cargo-fuzz unless it is there; cargo's messages go to `log` when given. No apt: this
/// may run on a background thread.
pub fn cargo_fuzz(log: Option<&File>) -> Result<()> {
    let installed = output(Command::new(cargo_bin_dir().join("cargo-fuzz")).arg("--version"));
    if installed.is_ok_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    step(
        &format!("cargo install cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        || {
            let mut cmd = Command::new("cargo");
            cmd.args(["install", "--locked", "--force"])
                .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"));
            run(logged(&mut cmd, log)?)
        },
    )
}

/// `cmd` with its stdout and stderr sent to `log`, when given (work on a background thread
/// keeps its output out of the foreground's).
pub fn logged<'a>(cmd: &'a mut Command, log: Option<&File>) -> Result<&'a mut Command> {
    if let Some(f) = log {
        cmd.stdout(f.try_clone()?).stderr(f.try_clone()?);
    }
    Ok(cmd)
}

/// The last lines of the log at `path`, headed by its name: what a failed step in the
/// background printed.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "the end of {}:\n{}",
        path.display(),
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}
