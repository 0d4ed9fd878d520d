//! rustfmt and clippy for every crate, the eBPF crate included (built for bpfel with Debian's
//! toolchain, as agent/build.rs does).

use std::process::Command;

use anyhow::Result;

use crate::{build, setup, vm};

/// `cargo fmt --check`, clippy on the host crates (all targets), clippy on the eBPF crate.
pub fn main() -> Result<()> {
    setup::ebpf_toolchain()?;
    setup::apt_install(&["rust-web-clippy"])?;
    let root = vm::workspace_root();
    setup::step("cargo fmt --check", || {
        setup::run(
            Command::new(build::cargo())
                .args(["fmt", "--all", "--check"])
                .current_dir(&root),
        )?;
        // The fuzz crate is a workspace of its own (it builds with nightly and sanitizers).
        setup::run(
            Command::new(build::cargo())
                .args(["fmt", "--all", "--check", "--manifest-path"])
                .arg(root.join("fuzz/Cargo.toml"))
                .current_dir(&root),
        )
    })?;
    // The default members: every crate but the eBPF one, linted below for its own target.
    setup::step("cargo clippy (host crates)", || {
        setup::run(
            Command::new(build::cargo())
                .args(["clippy", "--all-targets", "--", "-D", "warnings"])
                .current_dir(&root),
        )
    })?;
    setup::step("cargo clippy (agent-ebpf, bpfel-unknown-none)", || {
        let arch = std::env::consts::ARCH;
        setup::run(
            Command::new("rustup")
                .args(["run", setup::DEBIAN_SYSROOT, "cargo", "clippy"])
                .args(["--target", "bpfel-unknown-none", "--target-dir"])
                .arg(root.join("target/ebpf-clippy"))
                .args(["--", "-D", "warnings"])
                .current_dir(root.join("agent-ebpf"))
                .env("RUSTC_BOOTSTRAP", "aya_ebpf,agent_ebpf")
                .env(
                    "CARGO_ENCODED_RUSTFLAGS",
                    format!("--cfg=bpf_target_arch=\"{arch}\""),
                )
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("RUSTC"),
        )
    })
}
