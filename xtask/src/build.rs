//! Building the agent (whose build.rs builds the eBPF programs) for the host or for aarch64.

use std::{path::PathBuf, process::Command};

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

/// Builds a release `nodewarden` for `target` and returns its path. The host target uses the
/// machine's cargo; aarch64 uses Debian's toolchain, the only one here with an aarch64 std.
pub fn dist(target: &str) -> Result<PathBuf> {
    setup::ebpf_toolchain()?;
    let root = vm::workspace_root();
    let host = host_triple()?;
    if target == host {
        let mut cmd = Command::new(cargo());
        cmd.args(["build", "--release", "-p", "agent", "--target", target])
            .args(["--target-dir", DIST_TARGET_DIR])
            .current_dir(&root);
        setup::step(&format!("cargo build --release --target {target}"), || {
            setup::run(&mut cmd)
        })?;
    } else if target == "aarch64-unknown-linux-gnu" {
        setup::dpkg_add_arch("arm64")?;
        setup::apt_install(&[
            "libstd-rust-web-dev:arm64",
            "gcc-aarch64-linux-gnu",
            "libc6-dev-arm64-cross",
        ])?;
        let mut cmd = Command::new(format!("{}/bin/cargo", setup::DEBIAN_SYSROOT));
        cmd.args(["build", "--release", "-p", "agent", "--target", target])
            .args(["--target-dir", DIST_TARGET_DIR])
            .current_dir(&root)
            // rustup's proxies and variables would pick rustup's compiler, which has no aarch64 std.
            .env("RUSTC", format!("{}/bin/rustc", setup::DEBIAN_SYSROOT))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC_WRAPPER")
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
                "aarch64-linux-gnu-gcc",
            );
        setup::step(
            &format!("cargo build --release --target {target} (Debian toolchain)"),
            || setup::run(&mut cmd),
        )?;
    } else {
        bail!("unsupported target {target}: use {host} or aarch64-unknown-linux-gnu");
    }
    let bin = root
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

/// The host's target triple, from `rustc -vV`.
pub fn host_triple() -> Result<String> {
    let vv = setup::output(Command::new("rustc").arg("-vV"))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` printed no host")
}
