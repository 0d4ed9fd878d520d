//! Building the agent (whose build.rs builds the eBPF programs) for the host, aarch64 or riscv64.

use std::{
    fs::{self, File},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, vm};

/// Cargo profile of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    Debug,
    Release,
}

/// Builds `nodewarden` for the host with the machine's cargo; returns the binary's path.
pub fn agent(profile: Profile) -> Result<PathBuf> {
    setup::ebpf_toolchain()?;
    setup::step("cargo build -p agent", || {
        let mut cmd = Command::new(cargo());
        cmd.args(["build", "-p", "agent"])
            .current_dir(vm::workspace_root());
        if profile == Profile::Release {
            cmd.arg("--release");
        }
        setup::run(&mut cmd)
    })?;
    let dir = if profile == Profile::Release {
        "release"
    } else {
        "debug"
    };
    Ok(vm::workspace_root()
        .join("target")
        .join(dir)
        .join("nodewarden"))
}

/// The cargo that runs this xtask (rustup's), so builds share its toolchain and target dir.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Target directory of cross builds: Debian's compiler must not share fingerprints with rustup's.
const DIST_TARGET_DIR: &str = "target/dist";

/// The aarch64 target, built with Debian's toolchain (rustup has no aarch64 std here).
pub const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// The riscv64 target, built with Debian's toolchain and trixie's riscv64 standard library
/// (bookworm has no riscv64 architecture; rustup has no riscv64 std here).
pub const RISCV64: &str = "riscv64gc-unknown-linux-gnu";

/// Where the riscv64 sysroot is assembled: trixie's riscv64 `lib/rustlib` alone. Only the
/// riscv64 crates are compiled with it; build scripts and proc macros keep the compiler's own.
const RISCV64_SYSROOT: &str = "target/riscv64-sysroot";

/// A release `cargo SUBCOMMAND -p agent --target TARGET` into the dist target dir: the machine's
/// cargo for the host target, Debian's for aarch64 and riscv64. Installs the cross toolchain
/// when needed.
fn dist_cargo(subcommand: &str, target: &str) -> Result<Command> {
    setup::ebpf_toolchain()?;
    let host = host_triple()?;
    let mut cmd = if target == host {
        Command::new(cargo())
    } else if target == AARCH64 {
        setup::dpkg_add_arch("arm64")?;
        setup::apt_install(&[
            "libstd-rust-web-dev:arm64",
            "gcc-aarch64-linux-gnu",
            "libc6-dev-arm64-cross",
        ])?;
        let mut c = debian_cargo();
        c.env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        );
        c
    } else if target == RISCV64 {
        setup::apt_install(&["gcc-riscv64-linux-gnu", "libc6-dev-riscv64-cross"])?;
        let sysroot = riscv64_sysroot()?;
        let mut c = debian_cargo();
        // Target units only: build scripts and proc macros keep the compiler's own sysroot.
        c.env(
            "CARGO_TARGET_RISCV64GC_UNKNOWN_LINUX_GNU_LINKER",
            "riscv64-linux-gnu-gcc",
        )
        .env(
            "CARGO_TARGET_RISCV64GC_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            format!("--sysroot={}", sysroot.display()),
        );
        c
    } else {
        bail!("unsupported target {target}: use {host}, {AARCH64} or {RISCV64}");
    };
    cmd.args([subcommand, "--release", "-p", "agent", "--target", target])
        .args(["--target-dir", DIST_TARGET_DIR])
        .current_dir(vm::workspace_root());
    Ok(cmd)
}

/// Debian's cargo and rustc: rustup's proxies and variables would pick rustup's compiler, which
/// has no std for the cross targets.
fn debian_cargo() -> Command {
    let mut c = Command::new(format!("{}/bin/cargo", setup::DEBIAN_SYSROOT));
    c.env("RUSTC", format!("{}/bin/rustc", setup::DEBIAN_SYSROOT))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC_WRAPPER");
    c
}

/// A sysroot for Debian's rustc with the riscv64 standard library of trixie (whose
/// `libstd-rust-web-dev` is the same upstream version as bookworm's `rustc-web`), made once;
/// a compiler update that moves the version away makes it again, or fails saying why.
fn riscv64_sysroot() -> Result<PathBuf> {
    let root = vm::workspace_root().join(RISCV64_SYSROOT);
    let stamp = root.join("std.version");
    let rustc =
        setup::output(Command::new(format!("{}/bin/rustc", setup::DEBIAN_SYSROOT)).arg("-V"))?;
    // "rustc 1.96.0 (ac68faa20 2026-...)" -> "1.96.0"
    let version = rustc
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("`rustc -V` printed {rustc:?}"))?
        .to_owned();
    if fs::read_to_string(&stamp).is_ok_and(|v| v.starts_with(&format!("{version}+"))) {
        return Ok(root);
    }
    setup::step(
        &format!("assembling a riscv64 sysroot for rustc {version} in {RISCV64_SYSROOT}"),
        || {
            if root.exists() {
                fs::remove_dir_all(&root)
                    .with_context(|| format!("removing {}", root.display()))?;
            }
            let debs = root.join("debs");
            let unpacked = root.join("unpacked");
            fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
            let deb =
                vm::download_package("trixie", vm::Arch::Riscv64, "libstd-rust-web-dev", &debs)?;
            let deb_version =
                setup::output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?
                    .trim()
                    .to_owned();
            if !deb_version.starts_with(&format!("{version}+")) {
                bail!(
                    "trixie's libstd-rust-web-dev:riscv64 is {deb_version}, which does not match \
                     rustc {version}: rustc refuses a standard library of another version"
                );
            }
            setup::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
            let rustlib = root.join("lib/rustlib");
            fs::create_dir_all(&rustlib)
                .with_context(|| format!("creating {}", rustlib.display()))?;
            let riscv = unpacked.join("usr/lib/rustlib").join(RISCV64);
            fs::rename(&riscv, rustlib.join(RISCV64))
                .with_context(|| format!("moving {}", riscv.display()))?;
            for scratch in [&unpacked, &debs] {
                fs::remove_dir_all(scratch)
                    .with_context(|| format!("removing {}", scratch.display()))?;
            }
            fs::write(&stamp, &deb_version).context("writing the sysroot's stamp")?;
            Ok(root.clone())
        },
    )
}

/// Builds a release `nodewarden` for `target` and returns its path.
pub fn dist(target: &str) -> Result<PathBuf> {
    let mut cmd = dist_cargo("build", target)?;
    setup::step(&format!("cargo build --release --target {target}"), || {
        setup::run(&mut cmd)
    })?;
    dist_binary(target)
}

/// The release `nodewarden` built for `target`.
fn dist_binary(target: &str) -> Result<PathBuf> {
    let bin = vm::workspace_root()
        .join(DIST_TARGET_DIR)
        .join(target)
        .join("release")
        .join("nodewarden");
    if !bin.exists() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    eprintln!("xtask: built {}", bin.display());
    Ok(bin)
}

/// A release build for another target: the agent and one of its integration tests.
#[derive(Debug)]
pub struct Dist {
    pub agent: PathBuf,
    pub test: PathBuf,
}

/// Installs what building for `target` needs, now, and returns the build of the release agent
/// and its integration test `test`, to run later on another thread (apt must not run beside
/// the caller's own apt steps; the build can): cargo's messages go to the file `log`, whose
/// last lines a failure carries.
pub fn dist_later(
    target: &str,
    test: &'static str,
    log: PathBuf,
) -> Result<impl FnOnce() -> Result<Dist> + Send + use<>> {
    let mut build = dist_cargo("build", target)?;
    let mut tests = dist_cargo("test", target)?;
    tests.args(["--test", test, "--no-run", "--message-format=json"]);
    let target = target.to_owned();
    Ok(move || {
        let mut make = || -> Result<Dist> {
            let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            setup::step(&format!("cargo build --release --target {target}"), || {
                setup::run(setup::logged(&mut build, Some(&file))?)
            })?;
            let agent = dist_binary(&target)?;
            // stdout carries the JSON messages.
            tests.stderr(file);
            let out = setup::step(
                &format!("cargo test --no-run --test {test} --target {target}"),
                || setup::output(&mut tests),
            )?;
            Ok(Dist {
                agent,
                test: test_executable_from(&out, test)?,
            })
        };
        make().map_err(|e| e.context(setup::log_tail(&log)))
    })
}

/// The executable of test target `name` in cargo's JSON messages.
pub fn test_executable_from(messages: &str, name: &str) -> Result<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no executable for test {name}"))
}

/// The host's target triple, from `rustc -vV`.
pub fn host_triple() -> Result<String> {
    let vv = setup::output(Command::new("rustc").arg("-vV"))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` printed no host")
}
