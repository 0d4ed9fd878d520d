//! `cargo xtask bench`, burst part (issue 14): in the lab's VM, 10,000 limit writes a second
//! for 10 s against the agent in its default configuration (`nodewarden bench-burst`): every
//! write reported or counted as lost, and the CPU the agent used.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;
use serde_json::Value;

use crate::{bench, vm};

const KERNEL: &str = "bookworm-6.1";
const RATE: u32 = 10_000;
const SECONDS: u32 = 10;
const CGROUPS: usize = 4;

/// Runs `bench-burst` in the VM; returns the markdown section.
pub fn run(bin: &Path) -> Result<String> {
    let out = vm::workspace_root().join("target/bench-burst");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    // The binary is copied to the guest's tmpfs first: the agent stats and reads the link of
    // each writer's executable, and over the project's 9p share that costs it more than all
    // else (measured: 3,000 to 9,900 writes reported instead of 40,000 to 46,000).
    let script = format!(
        "cp '{bin}' /tmp/nodewarden\n\
         NODEWARDEN_IN_VM=1 /tmp/nodewarden bench-burst --rate {RATE} --seconds {SECONDS} \
         --cgroups {CGROUPS} --parent /sys/fs/cgroup/nw-burst --dir /tmp/nw-bench \
         > '{out}/burst.json'\n",
        bin = bin.display(),
        out = out.display()
    );
    let opts = vm::RunOptions {
        timeout: Duration::from_secs(1200),
        ..vm::RunOptions::default()
    };
    let v = bench::vm_json(
        &format!("a burst of {RATE} limit writes/s for {SECONDS} s in the VM ({KERNEL})"),
        KERNEL,
        &opts,
        script,
        &out.join("burst.json"),
    )?;
    Ok(report(&v))
}

fn report(v: &Value) -> String {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let lost: Vec<(String, f64)> = v["lost"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(r, n)| (r.clone(), n.as_f64().unwrap_or(f64::NAN)))
                .collect()
        })
        .unwrap_or_default();
    let total_lost: f64 = lost.iter().map(|(_, n)| n).sum();
    let by_reason = lost
        .iter()
        .filter(|(_, n)| *n > 0.0)
        .map(|(r, n)| format!("{n:.0} {r}"))
        .collect::<Vec<_>>()
        .join(", ");
    let issued = f("issued");
    let unaccounted = issued - f("reported") - total_lost;
    let mut md = format!(
        "\n## A burst of limit writes\n\n\
         In the lab's VM (`{}`, {KERNEL}, x86_64 under TCG emulation, 2 vCPUs; limit writes \
         by {}): one process writes `memory.high` of {CGROUPS} cgroups in turn, each cgroup's \
         value alternating between two, paced at {RATE} writes a second for {SECONDS} s by \
         absolute deadlines (a write that falls behind is made at once, not skipped), against \
         the agent in its default configuration (release build, its log at the default level, \
         a line per limit write, on the guest's tmpfs; the writer and the agent run from a \
         copy of `nodewarden` on the tmpfs, not from the 9p share, as on a node whose \
         executables are on a local disk). Reported: \
         `nodewarden_cgroup_limit_writes_total` of the writer (its thread's comm), summed; \
         lost: `nodewarden_events_lost_total{{kind=\"limit_write\"}}`, by reason; without a \
         writer: the same counter's `writer=\"unknown\"` series (none expected: a change the \
         agent finds when it reads every limit again after a loss is not counted as a write, \
         its writes having been counted lost); read once the counts add up to the writes, or \
         stop moving for 10 s. The agent's CPU is its \
         user and system time, all threads.\n\n\
         | writes issued | rate reached | reported | counted lost | unaccounted | counted without a writer | drained after the last write | agent CPU during the burst | and while draining | RSS after |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        v["kernel"].as_str().unwrap_or("?"),
        v["modes"]["limit_writes"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        md,
        "| {issued:.0} | {:.0}/s | {:.0} | **{total_lost:.0}**{} | {unaccounted:.0} | {:.0} | {:.1} s | {:.2} s ({:.0}% of a core) | {:.2} s | {:.1} MiB |",
        issued / f("issue_s"),
        f("reported"),
        if by_reason.is_empty() {
            String::new()
        } else {
            format!(" ({by_reason})")
        },
        f("unattributed"),
        f("drain_s"),
        f("cpu_burst_s"),
        f("cpu_burst_s") / f("issue_s") * 100.0,
        f("cpu_drain_s"),
        f("rss_bytes") / 1024.0 / 1024.0,
    );
    let _ = writeln!(
        md,
        "\nGoal: none lost, every write reported or counted as lost (unaccounted 0). Writes \
         that failed: {:.0}; records that did not decode: {:.0}; reads of every limit after \
         a loss: {:.0}.",
        f("failed"),
        f("undecoded"),
        f("resyncs_events_lost"),
    );
    md
}
