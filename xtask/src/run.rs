//! `cargo xtask run`: install what is missing, build, and run the agent as root.

use std::process::Command;

use anyhow::{Context as _, Result};

use crate::build::{self, Profile};

/// Builds and runs `nodewarden run ARGS` in the foreground; returns its exit status.
pub fn main(profile: Profile, args: &[String]) -> Result<i32> {
    let bin = build::agent(profile)?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        Command::new(&bin)
    } else {
        // Loading eBPF programs needs root; sudo keeps the environment (RUST_LOG, OTEL_*).
        let mut c = Command::new("sudo");
        c.arg("-E").arg(&bin);
        c
    };
    cmd.arg("run").args(args);
    eprintln!("xtask: running {cmd:?} (Ctrl-C stops it)");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // Ctrl-C reaches the agent too (same process group): let it drain and report its own status.
    // SAFETY: setting a signal disposition; the child already runs with its own handlers.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = child.wait().context("waiting for the agent")?;
    Ok(status.code().unwrap_or(1))
}
