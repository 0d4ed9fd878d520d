//! `nodewarden bench-write` (hidden): the cost the syscalls mode adds to an ordinary write(2),
//! measured in-process so `cargo xtask bench` can compare, in one run, no program, empty programs
//! on the same tracepoints, and the real probe.

use std::{io::Write as _, time::Instant};

use agent_common::programs;
use anyhow::{Context as _, Result};
use aya::programs::TracePoint;

use crate::{config::LimitWriteMode, offsets, probes};

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

/// Writes one byte to /dev/null `iterations` times and prints the mean ns per write.
pub fn bench_write(attached: Attached, iterations: u64) -> Result<()> {
    let offsets = offsets::resolve(std::path::Path::new(offsets::VMLINUX_BTF))?.offsets;
    // Kept alive (attached) until the loop ends.
    let _probes = match attached {
        Attached::None => None,
        Attached::Syscalls => {
            let p = probes::load(&offsets, LimitWriteMode::Syscalls)?;
            let s = p
                .status
                .iter()
                .find(|s| s.capability == "limit_writes")
                .context("no limit_writes status")?;
            anyhow::ensure!(s.mode == "syscalls", "syscalls mode did not attach: {s}");
            Some(p)
        }
        Attached::Empty => {
            let mut ebpf = probes::load_object(&offsets)?;
            for (name, tracepoint) in programs::BENCH_EMPTY {
                let p: &mut TracePoint = ebpf
                    .program_mut(name)
                    .with_context(|| format!("{name} missing"))?
                    .try_into()?;
                p.load()?;
                p.attach("syscalls", tracepoint)?;
            }
            Some(probes::Probes {
                ebpf,
                status: Vec::new(),
            })
        }
    };
    let mut null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
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
