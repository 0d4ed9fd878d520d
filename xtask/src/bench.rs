//! `cargo xtask bench`: what the syscalls-mode limit-write probe adds to an ordinary write(2), as
//! a ratio to what empty programs on the same tracepoints add, all measured in one run on this
//! machine's kernel. Results go to docs/benchmarks.md.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{
    bench_burst, bench_contention, bench_guard, bench_idle, bench_latency, bench_restore,
    bench_syscalls, build, setup, vm,
};

/// Rounds of the three configurations, interleaved so drift hits them alike.
const ROUNDS: usize = 7;
const ITERATIONS: &str = "2000000";
/// What is attached, and how many files the writing process holds open besides stdio: 100
/// moves its fds out of the table a process starts with, onto the probe's slower path.
const CONFIGS: [(&str, &str); 5] = [
    ("none", "0"),
    ("empty", "0"),
    ("syscalls", "0"),
    ("none", "100"),
    ("syscalls", "100"),
];

/// The parts of the benchmark, for running one alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The syscalls-mode probe's cost on write(2).
    Write,
    /// What the agent costs contended programs.
    Contention,
    /// Event latency, with and without an exec storm (in the VM).
    Latency,
    /// Restore latency (in the VM).
    Restore,
    /// The guard's cost on open(2), in the VM.
    Guard,
    /// What the agent costs syscalls it does not watch, per configuration (host and VM).
    Syscalls,
    /// The idle agent's CPU, memory and /metrics by cgroup count (in the VM).
    Idle,
    /// A burst of limit writes: reported, lost, the agent's CPU (in the VM).
    Burst,
    /// The idle agent on arm64 with the default and the edge profile (in the arm64 VM).
    IdleArm64,
}

pub fn main(baseline: Option<&str>, only: Option<Part>) -> Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads eBPF programs and needs root");
    }
    let release = || build::agent(build::Profile::Release);
    if let Some(part) = only {
        let md = match part {
            Part::Write => write_part(&release()?)?,
            Part::Contention => bench_contention::run(&release()?)?,
            Part::Latency => {
                let bin = release()?;
                let base = built_baseline(baseline)?;
                bench_latency::run(&bin, &agents(base.as_ref(), &bin))?
            }
            Part::Restore => bench_restore::run(&release()?)?,
            Part::Guard => bench_guard::run(&release()?)?,
            Part::Syscalls => bench_syscalls::run(&release()?)?,
            Part::Idle => {
                let bin = release()?;
                let base = built_baseline(baseline)?;
                bench_idle::run(&bin, base.as_ref())?
            }
            Part::Burst => bench_burst::run(&release()?)?,
            // The aarch64 build only.
            Part::IdleArm64 => bench_idle::run_arm64(&build::dist(build::AARCH64)?)?,
        };
        print!("{md}");
        return Ok(0);
    }
    let bin = release()?;
    let base = built_baseline(baseline)?;
    let mut md = write_part(&bin)?;
    md.push_str(&bench_contention::run(&bin)?);
    md.push_str(&bench_latency::run(&bin, &agents(base.as_ref(), &bin))?);
    md.push_str(&bench_restore::run(&bin)?);
    md.push_str(&bench_guard::run(&bin)?);
    md.push_str(&bench_syscalls::run(&bin)?);
    md.push_str(&bench_idle::run(&bin, base.as_ref())?);
    md.push_str(&bench_burst::run(&bin)?);
    md.push_str(&bench_idle::run_arm64(&build::dist(build::AARCH64)?)?);
    let path = vm::workspace_root().join("docs/benchmarks.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    print!("{md}");
    eprintln!("xtask: wrote {}", path.display());
    Ok(0)
}

/// A baseline revision and its agent, built.
#[derive(Debug)]
pub struct Baseline {
    pub rev: String,
    pub bin: std::path::PathBuf,
}

/// The `baseline` revision's agent, when one is given: built once for every part that measures
/// against it.
fn built_baseline(baseline: Option<&str>) -> Result<Option<Baseline>> {
    baseline
        .map(|rev| {
            Ok(Baseline {
                rev: rev.to_owned(),
                bin: bench_latency::build_revision(rev)?,
            })
        })
        .transpose()
}

/// The agents whose event latency is measured: the baseline's, then this build.
fn agents(baseline: Option<&Baseline>, bin: &std::path::Path) -> Vec<(String, std::path::PathBuf)> {
    baseline
        .map(|b| (format!("`{}` (before)", b.rev), b.bin.clone()))
        .into_iter()
        .chain([("this build".to_owned(), bin.to_owned())])
        .collect()
}

/// The write(2) part: rounds of the five configurations, interleaved.
fn write_part(bin: &std::path::Path) -> Result<String> {
    let mut samples: [Vec<f64>; CONFIGS.len()] = Default::default();
    setup::step(
        &format!(
            "{ROUNDS} rounds of {ITERATIONS} writes x {} configurations",
            CONFIGS.len()
        ),
        || {
            for _ in 0..ROUNDS {
                for (i, (config, open_files)) in CONFIGS.iter().enumerate() {
                    let out = setup::output(
                        Command::new(bin)
                            .args([
                                "bench-write",
                                "--attached",
                                config,
                                "--iterations",
                                ITERATIONS,
                                "--open-files",
                                open_files,
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
    let [none, empty, syscalls, none_many, syscalls_many] = samples.map(|mut s| median(&mut s));
    report(none, empty, syscalls, none_many, syscalls_many)
}

/// docs/benchmarks.md from the medians (ns per write).
fn report(
    none: f64,
    empty: f64,
    syscalls: f64,
    none_many: f64,
    syscalls_many: f64,
) -> Result<String> {
    let added_empty = empty - none;
    let added_probe = syscalls - none;
    let ratio = added_probe / added_empty;
    let added_many = syscalls_many - none_many;
    let ratio_many = added_many / added_empty;
    let kernel = setup::output(Command::new("uname").arg("-srm"))?;
    let cpu = cpu_model();
    let date = setup::output(Command::new("date").arg("-u").arg("+%Y-%m-%d"))?;

    let date = date.trim();
    let kernel = kernel.trim();
    Ok(format!(
        r"# Benchmarks

Written by `cargo xtask bench`; every figure comes from one run, as a ratio to a baseline in
the same run. Medians of {ROUNDS} interleaved rounds of {ITERATIONS} one-byte writes to /dev/null.

## Limit writes, syscalls mode: cost added to an ordinary write(2)

Run {date} on `{kernel}`, {cpu}.

| attached | writer's open files | ns per write | added ns | ratio |
|---|---|---|---|---|
| nothing | 4 | {none:.1} | | |
| empty programs on sys_enter_write and sys_exit_write | 4 | {empty:.1} | {added_empty:.1} | 1 |
| the syscalls-mode probe (write, pwrite64, writev: enter and exit) | 4 | {syscalls:.1} | {added_probe:.1} | **{ratio:.2}** |
| nothing | 104 | {none_many:.1} | | |
| the syscalls-mode probe | 104 | {syscalls_many:.1} | {added_many:.1} | {ratio_many:.2} |

**Ratio of added cost, probe / empty programs on the same hooks: {ratio:.2}** (target: at most
1.30) for a process in the fd table every process starts with (up to 64 fds); {ratio_many:.2} for
one that has outgrown it.

On a write, the probe loads the task's files, fd table, file, inode and superblock directly
(BTF-typed loads the JIT turns into single moves) and drops the write when the superblock is
not cgroup2's; the exit program returns at once unless a limit write is in flight. What it
adds beyond the empty programs is one helper call (the current task). A process whose fd table
was reallocated (more than 64 fds at some point, or a parent with a high fd at fork) has its
`struct file *` array out of the verifier's sight, so four more reads go through
bpf_probe_read_kernel. Kernels before 5.11 (no `bpf_get_current_task_btf`) use helper reads
throughout.
"
    ))
}

/// This machine's CPU model, from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
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
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The median of `v` (the upper one of an even count); sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `script` (sh) in the lab's VM on `kernel` as one step named `what`, and parses the JSON
/// it leaves in `json` (under target/, which the guest shares).
pub fn vm_json(
    what: &str,
    kernel: &str,
    opts: &vm::RunOptions,
    script: String,
    json: &std::path::Path,
) -> Result<serde_json::Value> {
    let argv = ["sh".to_owned(), "-c".to_owned(), script];
    let status = setup::step(what, || vm::run(kernel, opts, &argv))?;
    if status != 0 {
        bail!("{what}: the VM's command exited with {status}");
    }
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    serde_json::from_str(text.trim()).with_context(|| format!("{}: {text:?}", json.display()))
}
