//! `cargo xtask bench`: what the syscalls-mode limit-write probe adds to an ordinary write(2), as
//! a ratio to what empty programs on the same tracepoints add, all measured in one run on this
//! machine's kernel. Results go to docs/benchmarks.md.

use std::{fmt::Write as _, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{build, setup, vm};

/// Rounds of the three configurations, interleaved so drift hits them alike.
const ROUNDS: usize = 7;
const ITERATIONS: &str = "2000000";
const CONFIGS: [&str; 3] = ["none", "empty", "syscalls"];

pub fn main() -> Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs and needs root");
    }
    let bin = build::agent(build::Profile::Release)?;
    let mut samples: [Vec<f64>; 3] = Default::default();
    setup::step(
        &format!("{ROUNDS} rounds of {ITERATIONS} writes x 3 configurations"),
        || {
            for _ in 0..ROUNDS {
                for (i, config) in CONFIGS.iter().enumerate() {
                    let out = setup::output(
                        Command::new(&bin)
                            .args([
                                "bench-write",
                                "--attached",
                                config,
                                "--iterations",
                                ITERATIONS,
                            ])
                            .env("RUST_LOG", "warn"),
                    )?;
                    let ns: f64 = out
                        .trim()
                        .parse()
                        .with_context(|| format!("bench-write printed {out:?}"))?;
                    samples[i].push(ns);
                }
            }
            Ok(())
        },
    )?;
    let [none, empty, syscalls] = samples.map(|mut s| median(&mut s));
    let added_empty = empty - none;
    let added_probe = syscalls - none;
    let ratio = added_probe / added_empty;
    let kernel = setup::output(Command::new("uname").arg("-srm"))?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(str::trim)
                    .map(str::to_owned)
            })
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let date = setup::output(Command::new("date").arg("-u").arg("+%Y-%m-%d"))?;

    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench`; every figure comes from one run, as a ratio to a baseline in"
    );
    let _ = writeln!(
        md,
        "the same run. Medians of {ROUNDS} interleaved rounds of {ITERATIONS} one-byte writes to /dev/null.\n"
    );
    let _ = writeln!(
        md,
        "## Limit writes, syscalls mode: cost added to an ordinary write(2)\n"
    );
    let _ = writeln!(md, "Run {} on `{}`, {cpu}.\n", date.trim(), kernel.trim());
    let _ = writeln!(md, "| attached | ns per write | added ns |");
    let _ = writeln!(md, "|---|---|---|");
    let _ = writeln!(md, "| nothing | {none:.1} | |");
    let _ = writeln!(
        md,
        "| empty programs on sys_enter_write and sys_exit_write | {empty:.1} | {added_empty:.1} |"
    );
    let _ = writeln!(
        md,
        "| the syscalls-mode probe (write, pwrite64, writev: enter and exit) | {syscalls:.1} | {added_probe:.1} |"
    );
    let _ = writeln!(
        md,
        "\n**Ratio of added cost, probe / empty programs on the same hooks: {ratio:.2}** (target: at most 1.30)."
    );
    let _ = writeln!(
        md,
        "\nThe probe follows the fd to its file on every write (task, files, fd table, file, inode,"
    );
    let _ = writeln!(
        md,
        "superblock: six kernel reads through bpf_probe_read_kernel) before it can drop a write that is"
    );
    let _ = writeln!(
        md,
        "not to a cgroup2 file; the tracepoint record's own fields are loaded directly."
    );
    let path = vm::workspace_root().join("docs/benchmarks.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    print!("{md}");
    eprintln!("xtask: wrote {}", path.display());
    Ok(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
