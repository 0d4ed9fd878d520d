//! Builds the eBPF programs (agent-ebpf) and leaves the object in `OUT_DIR` for `include_bytes!`.
//!
//! Two toolchain routes: Debian's rustc-web, which ships a prebuilt `core` for bpfel-unknown-none
//! (the route `cargo xtask` installs; needed where rustup cannot download rust-src), or a rustup
//! nightly with rust-src (aya's usual route). `NODEWARDEN_EBPF_TOOLCHAIN` overrides the choice.

use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

const EBPF_PACKAGE: &str = "agent-ebpf";
const DEBIAN_SYSROOT: &str = "/usr";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NODEWARDEN_EBPF_TOOLCHAIN");
    git_commit();
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("package {EBPF_PACKAGE} not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;

    let chosen = std::env::var("NODEWARDEN_EBPF_TOOLCHAIN").ok();
    let toolchain = match chosen.as_deref() {
        Some(t) => t.to_owned(),
        None if has_debian_bpf_core() => DEBIAN_SYSROOT.to_owned(),
        None => "nightly".to_owned(),
    };
    if toolchain == DEBIAN_SYSROOT {
        // aya-ebpf uses one unstable feature on bpf (asm_experimental_arch) and our programs one
        // (core_intrinsics, for an atomic add); allow them for those crates only. A value of
        // "1" would make aya-build ask for -Z build-std, which the prebuilt core makes
        // unnecessary.
        // SAFETY: this build script is single-threaded; the variable is read by the child cargo.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,agent_ebpf") };
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}

/// Whether Debian's rustc with its prebuilt `core` for bpfel-unknown-none is installed.
fn has_debian_bpf_core() -> bool {
    Path::new(DEBIAN_SYSROOT).join("bin/cargo").exists()
        && Path::new(DEBIAN_SYSROOT)
            .join("lib/rustlib/bpfel-unknown-none/lib")
            .is_dir()
}

/// Sets `NODEWARDEN_COMMIT` (for `nodewarden_build_info`): the commit built, or "unknown"
/// without git or a repository.
fn git_commit() {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=NODEWARDEN_COMMIT={commit}");
    // HEAD changes on a checkout, the branch it names on a commit. Only files that exist:
    // cargo would run this script at every build for a path that does not.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    for name in std::iter::once("HEAD").chain(branch.as_deref()) {
        if let Some(path) = git(&["rev-parse", "--git-path", name])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
