//! `nodewarden bench-write` (hidden): the cost the syscalls mode adds to an ordinary write(2),
//! measured in-process so `cargo xtask bench` can compare, in one run, no program, empty programs
//! on the same tracepoints, and the real probe.

use std::{io::Write as _, time::Instant};

use agent_common::programs;
use anyhow::{Context as _, Result};
use aya::programs::TracePoint;

use crate::{
    config::{ContentionConfig, LimitWriteMode, ProbesConfig},
    kernel::{btf, loader},
    model::probe::{Capability, ProbeMode},
};

/// What is attached while the loop runs.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Attached {
    /// Nothing.
    None,
    /// Empty programs on `syscalls/sys_{enter,exit}_write`.
    Empty,
    /// The limit-write probe in syscalls mode (all six write tracepoints).
    Syscalls,
}

/// Has a fresh process write one byte to /dev/null `iterations` times with `attached` attached,
/// and prints its mean ns per write. The writer is started before anything is loaded: this
/// process comes to hold dozens of BPF fds, and a process with more than 64 fds (which a child
/// inherits across exec) takes the probe's slower path; `open_files` measures that one.
pub fn bench_write(attached: Attached, iterations: u64, open_files: u32) -> Result<()> {
    // A child's fd table is sized by the highest fd open at fork, and stray descriptors
    // inherited from whatever started us (a CI runner's fd 251, say) would give the writer a
    // big table. Closing them first gives it the table an ordinary process starts with.
    // SAFETY: nothing in this process uses a descriptor above stderr yet.
    if unsafe { libc::close_range(3, u32::MAX, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("close_range");
    }
    let mut writer = std::process::Command::new(std::env::current_exe()?)
        .args(["bench-write", "--attached", "none", "--loop-only"])
        .args(["--iterations", &iterations.to_string()])
        .args(["--open-files", &open_files.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let kernel = btf::resolve(std::path::Path::new(btf::VMLINUX_BTF))?;
    // Kept alive (attached) until the loop ends.
    let _probes = match attached {
        Attached::None => None,
        Attached::Syscalls => {
            let choices = ProbesConfig {
                limit_writes: LimitWriteMode::Syscalls,
                ..ProbesConfig::default()
            };
            let p = loader::load(
                &kernel.offsets,
                &kernel.functions,
                &choices,
                &ContentionConfig::default(),
                loader::GuardAttach::No("not measured here"),
            )?;
            let s = p
                .status
                .iter()
                .find(|s| s.capability == Capability::LimitWrites)
                .context("no limit_writes status")?;
            anyhow::ensure!(
                s.mode == ProbeMode::Syscalls,
                "syscalls mode did not attach: {s}"
            );
            Some(p.ebpf)
        }
        Attached::Empty => {
            let mut ebpf = loader::load_object(
                &kernel.offsets,
                &ProbesConfig::default(),
                &ContentionConfig::default(),
                1,
            )?;
            for (name, tracepoint) in programs::BENCH_EMPTY {
                let p: &mut TracePoint = ebpf
                    .program_mut(name)
                    .with_context(|| format!("{name} missing"))?
                    .try_into()?;
                p.load()?;
                p.attach("syscalls", tracepoint)?;
            }
            Some(ebpf)
        }
    };
    // The go signal: a line on its stdin.
    writer
        .stdin
        .take()
        .context("writer stdin")?
        .write_all(b"go\n")?;
    let out = writer.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "the write loop failed: {}",
        out.status
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// The measured loop: `open_files` files held open, then one-byte writes to /dev/null.
pub fn write_loop(iterations: u64, open_files: u32) -> Result<()> {
    let _held = (0..open_files)
        .map(|_| std::fs::File::open("/dev/null"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let mut go = String::new();
    std::io::stdin().read_line(&mut go)?;
    // Warm-up, then the measured loop.
    for _ in 0..iterations / 10 {
        null.write_all(b"x")?;
    }
    let start = Instant::now();
    for _ in 0..iterations {
        null.write_all(b"x")?;
    }
    let elapsed = start.elapsed();
    #[expect(clippy::cast_precision_loss, reason = "a mean over millions of writes")]
    let ns = elapsed.as_nanos() as f64 / iterations as f64;
    println!("{ns:.1}");
    Ok(())
}
