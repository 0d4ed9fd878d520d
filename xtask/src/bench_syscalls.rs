//! `cargo xtask bench`, unrelated-syscall part (issue 14, the node's bill): what the agent
//! costs a process that does something the agent does not watch, per configuration: ns per
//! `getppid()`, one-byte `write()` to /dev/null and one-byte `pwrite()` to a file on a tmpfs,
//! on this machine's kernel and in the lab's VM (`nodewarden bench-syscalls` in both).

use std::{fmt::Write as _, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{bench, setup, vm};

const KERNEL: &str = "bookworm-6.1";
/// Rounds of every configuration, and calls of each syscall per measurement.
const HOST_ROUNDS: usize = 15;
const VM_ROUNDS: usize = 12;
const CALLS: u64 = 100_000;
/// The target on a kernel with fentry or kprobes: the default configuration adds at most this
/// share to a syscall it does not watch.
const TARGET_PCT: f64 = 2.0;
const SYSCALLS: [&str; 3] = [
    "`getppid()`",
    "`write()` of 1 byte to /dev/null",
    "`pwrite()` of 1 byte to a tmpfs file",
];

/// Measures on the host, then in the VM; returns the markdown section.
pub fn run(bin: &Path) -> Result<String> {
    let out = vm::workspace_root().join("target/bench-syscalls");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let host = setup::step(
        &format!("unrelated syscalls on this kernel, {HOST_ROUNDS} rounds of every configuration"),
        || {
            setup::output(
                Command::new(bin)
                    .args(["bench-syscalls", "--rounds", &HOST_ROUNDS.to_string()])
                    .args(["--calls", &CALLS.to_string()])
                    .args(["--file", "/dev/shm/nw-bench-pwrite"])
                    .arg("--dir")
                    .arg(std::env::temp_dir().join("nw-bench-syscalls")),
            )
        },
    )?;
    std::fs::write(out.join("host.json"), &host)?;
    let script = format!(
        "'{bin}' bench-syscalls --rounds {VM_ROUNDS} --calls {CALLS} --file /tmp/nw-pwrite \
         --dir /tmp/nw-bench --settle-ms 1000 > '{out}/vm.json'\n",
        bin = bin.display(),
        out = out.display()
    );
    let opts = vm::RunOptions {
        timeout: Duration::from_secs(3600),
        ..vm::RunOptions::default()
    };
    let vm_figures = bench::vm_json(
        &format!(
            "unrelated syscalls in the VM ({KERNEL}), {VM_ROUNDS} rounds of every configuration"
        ),
        KERNEL,
        &opts,
        script,
        &out.join("vm.json"),
    )?;
    report(&parse(&host)?, &vm_figures)
}

/// The markdown section from both runs' figures (`bench-syscalls` JSON).
fn report(host: &Value, vm_figures: &Value) -> Result<String> {
    let kernel = setup::output(Command::new("uname").arg("-srm"))?;
    let mut md = format!(
        "\n## The node's bill: what the agent costs a syscall it does not watch\n\n\
         A process that never touches a limit file or a lock still pays for the agent when a \
         program sits on a syscall tracepoint: while any is attached, the kernel sends every \
         syscall of every task through its slower entry path. `nodewarden bench-syscalls` \
         times {CALLS} calls each of `getppid()`, a one-byte `write()` to /dev/null and a \
         one-byte `pwrite()` at offset 0 of a file on a tmpfs, with no agent and then with a \
         real `nodewarden run` (release build, started and waited for until its probes are \
         attached) in each configuration below, the configurations in turn within each round \
         (their order rotated each round). Each figure with the agent is paired with one \
         without it taken just before the agent started: ns per call is the median over the \
         rounds (the minimum in brackets), added is the median of the pairs' differences, and \
         % the median of the pairs' ratios. Minimal: the default configuration with futex \
         waits, CPU samples and off-CPU time off, limit writes by inotify, no guard (OOM, \
         cgroup and exec probes stay: none is on a syscall). The modes are those the agent \
         reported (`nodewarden_probe_info`).\n"
    );
    let host_machine = format!("`{}`, {}", kernel.trim(), bench::cpu_model());
    section(
        &mut md,
        &format!("This machine ({host_machine}), {HOST_ROUNDS} rounds"),
        host,
        false,
    )?;
    section(
        &mut md,
        &format!(
            "The lab's VM ({KERNEL}, x86_64 under TCG emulation, 2 vCPUs), {VM_ROUNDS} rounds"
        ),
        vm_figures,
        true,
    )?;
    Ok(md)
}

fn parse(text: &str) -> Result<Value> {
    serde_json::from_str(text.trim()).with_context(|| format!("bench-syscalls printed {text:?}"))
}

/// The rounds' figures of one syscall (index `s`) of `rows` (`without` or `with`).
fn column(rows: &Value, s: usize) -> Vec<f64> {
    rows.as_array()
        .map(|a| a.iter().filter_map(|r| r[s].as_f64()).collect())
        .unwrap_or_default()
}

/// One table: a row for no agent (every measurement without), one per configuration.
fn section(md: &mut String, title: &str, v: &Value, verdict: bool) -> Result<()> {
    let configs = v["configs"].as_array().context("no configs")?;
    let _ = write!(
        md,
        "\n### {title}\n\nKernel `{}`.\n\n\
         | agent | futex waits | limit writes | {} | added | % | {} | added | % | {} | added | % |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n| no agent | | |",
        v["kernel"].as_str().unwrap_or("?"),
        SYSCALLS[0],
        SYSCALLS[1],
        SYSCALLS[2],
    );
    for s in 0..SYSCALLS.len() {
        let mut all: Vec<f64> = configs
            .iter()
            .flat_map(|c| column(&c["without"], s))
            .collect();
        let _ = write!(md, " {} | | |", median_min(&mut all));
    }
    md.push('\n');
    let mut default_pct = [f64::NAN; 3];
    // getppid's % for the agents with nothing on a syscall tracepoint: what the machine's own
    // noise makes of agents that cannot cost it anything.
    let mut floor: Vec<f64> = Vec::new();
    for c in configs {
        let mode = |cap: &str| c["modes"][cap].as_str().unwrap_or("?").to_owned();
        let varied = if c["modes_varied"].as_bool() == Some(true) {
            " (modes varied between rounds)"
        } else {
            ""
        };
        let _ = write!(
            md,
            "| {}{varied} | {} | {} |",
            c["what"].as_str().unwrap_or("?"),
            mode("futex_waits"),
            mode("limit_writes"),
        );
        for (s, pct_out) in default_pct.iter_mut().enumerate() {
            let (without, mut with) = (column(&c["without"], s), column(&c["with"], s));
            let mut added: Vec<f64> = without.iter().zip(&with).map(|(a, b)| b - a).collect();
            let mut pct: Vec<f64> = without
                .iter()
                .zip(&with)
                .map(|(a, b)| (b / a - 1.0) * 100.0)
                .collect();
            if added.is_empty() {
                bail!("{}: no rounds", c["name"]);
            }
            let (added, pct) = (bench::median(&mut added), bench::median(&mut pct));
            if c["name"] == "default" {
                *pct_out = pct;
            }
            let default = c["name"].as_str().is_some_and(|n| n.starts_with("default"));
            if s == 0
                && !default
                && mode("futex_waits") != "syscalls"
                && mode("limit_writes") != "syscalls"
            {
                floor.push(pct);
            }
            let _ = write!(
                md,
                " {} | {added:+.0} | {pct:+.0}% |",
                median_min(&mut with)
            );
        }
        md.push('\n');
    }
    floor.sort_by(f64::total_cmp);
    let _ = write!(
        md,
        "\nThe minimal agent and each capability alone with nothing on a syscall tracepoint \
         (neither column says syscalls) cannot slow `getppid()` down by more than a timer's or \
         a sampler's share: their figures, from {:+.1}% to {:+.1}%, are what this machine's \
         drift leaves in a median of pairs.",
        floor.first().copied().unwrap_or(f64::NAN),
        floor.last().copied().unwrap_or(f64::NAN),
    );
    if verdict {
        let noise = floor.last().copied().unwrap_or(f64::NAN);
        let met = |p: f64| {
            if p <= TARGET_PCT {
                "met"
            } else if p <= noise {
                "not settled: within the spread of the agents above that cost nothing"
            } else {
                "**missed**"
            }
        };
        let _ = write!(
            md,
            " Target on a kernel with fentry or kprobes: the default configuration adds at \
             most {TARGET_PCT:.0}% to `getppid()` and to a `write()` of a regular file: \
             {:+.1}% ({}) and {:+.1}% ({}) here.",
            default_pct[0],
            met(default_pct[0]),
            default_pct[2],
            met(default_pct[2]),
        );
    }
    md.push('\n');
    Ok(())
}

/// "median (min)" of `v`, ns.
fn median_min(v: &mut [f64]) -> String {
    if v.is_empty() {
        return "-".to_owned();
    }
    let m = bench::median(v);
    format!("{m:.0} ({:.0})", v[0])
}
