//! Builds the eBPF programs (agent-ebpf) and leaves the object in `OUT_DIR` for `include_bytes!`.
//!
//! Two toolchain routes: Debian's rustc-web, which ships a prebuilt `core` for bpfel-unknown-none
//! (the route `cargo xtask` installs; needed where rustup cannot download rust-src), or a rustup
//! nightly with rust-src (aya's usual route). `NODEWARDEN_EBPF_TOOLCHAIN` overrides the choice.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

const EBPF_PACKAGE: &str = "agent-ebpf";
const DEBIAN_SYSROOT: &str = "/usr";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NODEWARDEN_EBPF_TOOLCHAIN");
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
