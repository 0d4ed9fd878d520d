//! `cargo xtask bench`, idle part (issue 14): in the lab's VM, the agent in its default
//! configuration doing nothing, with 0, 1,000 and 10,000 cgroups on the node (`nodewarden
//! bench-idle`): its CPU share, its memory, the size of `/metrics` and the time a scrape takes.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    bench::{Baseline, median, vm_json},
    vm,
};

const KERNEL: &str = "bookworm-6.1";
const COUNTS: &str = "0,1000,10000";
/// Long enough that the CPU clock's 10-ms ticks are a small part of an idle agent's share.
const IDLE_S: u64 = 60;
const SCRAPES: usize = 9;
/// Guest memory: 10,000 memory cgroups take several hundred MiB of the kernel's.
const MEMORY_MIB: u32 = 2048;
/// The targets with 1,000 cgroups: CPU share of one core, and resident memory.
const TARGET_CPU_PCT: f64 = 0.5;
const TARGET_RSS_MB: f64 = 40.0;
const MIB: f64 = 1024.0 * 1024.0;

/// Runs `bench-idle` in the VM, with the `baseline` agent measured beside this one when given;
/// returns the markdown section.
pub fn run(bin: &Path, baseline: Option<&Baseline>) -> Result<String> {
    let out = fresh_dir("target/bench-idle")?;
    report(
        &measure(
            KERNEL,
            bin,
            baseline.map(|b| b.bin.as_path()),
            COUNTS,
            "default",
            &out.join("idle.json"),
        )?,
        baseline.map(|b| b.rev.as_str()),
    )
}

/// A folder of the target dir, emptied.
fn fresh_dir(name: &str) -> Result<std::path::PathBuf> {
    let out = vm::workspace_root().join(name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    Ok(out)
}

/// `bench-idle` with `counts` cgroups and `profile`, in a VM of `kernel` (`bin`, and the
/// `baseline` agent when given, built for its architecture); its JSON, which it leaves in
/// `json`.
fn measure(
    kernel: &str,
    bin: &Path,
    baseline: Option<&Path>,
    counts: &str,
    profile: &str,
    json: &Path,
) -> Result<Value> {
    let baseline = baseline.map_or_else(String::new, |b| format!("--baseline '{}' ", b.display()));
    let script = format!(
        "NODEWARDEN_IN_VM=1 '{bin}' bench-idle --counts {counts} --parent /sys/fs/cgroup/nw-idle \
         --idle-seconds {IDLE_S} --scrapes {SCRAPES} --profile {profile} {baseline}\
         --dir /tmp/nw-bench > '{json}'\n",
        bin = bin.display(),
        json = json.display()
    );
    let opts = vm::RunOptions {
        memory_mib: MEMORY_MIB,
        timeout: Duration::from_secs(3600),
        ..vm::RunOptions::default()
    };
    vm_json(
        &format!("the idle agent in the VM ({kernel}) with {counts} cgroups, profile {profile}"),
        kernel,
        &opts,
        script,
        json,
    )
}

fn report(v: &Value, baseline: Option<&str>) -> Result<String> {
    let counts = v["counts"].as_array().context("no counts")?;
    let mut md = format!(
        "\n## Idle cost by the number of cgroups\n\n\
         In the lab's VM (`{}`, {KERNEL}, x86_64 under TCG emulation, 2 vCPUs, {MEMORY_MIB} MiB): \
         before the agent starts, that many cgroups exist under one parent (memory and pids \
         controllers, a `memory.max` each). The agent runs its default configuration (release \
         build); once it has read every cgroup (its series stop changing in number), it idles \
         for {IDLE_S} s: its CPU time over that window (user and system, all threads, from \
         /proc/PID/stat) as a share of one core, and by thread (the event loop runs on \
         `nodewarden`, the endpoints on `tokio-rt-worker`), its resident memory at the end \
         (VmRSS, and RssAnon, its own heap), then {SCRAPES} scrapes of `/metrics` (median time, and the \
         slowest). Series per cgroup: the series added over the run with no cgroup, per \
         cgroup. Under emulation CPU times are 10 to 50 times a real machine's.{}\n\n\
         | cgroups | agent | CPU idle (% of a core) | by thread | RSS | RssAnon | /metrics | series | series per cgroup | scrape (median, max) | ready, settled after | CPU to settle |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        v["kernel"].as_str().unwrap_or("?"),
        baseline.map_or_else(String::new, |b| format!(
            " With each count, the baseline ({b}) was measured first, then this build, in \
             the same VM."
        )),
    );
    let f = |c: &Value, k: &str| c[k].as_f64().unwrap_or(f64::NAN);
    let base_series = counts.first().map_or(f64::NAN, |c| f(c, "series"));
    let mut verdict = String::new();
    for c in counts {
        let n = f(c, "cgroups");
        let cpu_pct = f(c, "idle_cpu_s") / f(c, "idle_s") * 100.0;
        let rss = f(c, "rss_bytes") / MIB;
        let scrape = scrape_ms(c).map_or_else(
            || "-".to_owned(),
            |(m, max)| format!("{m:.1} ms, {max:.1} ms"),
        );
        let per = if n > 0.0 {
            format!("{:.2}", (f(c, "series") - base_series) / n)
        } else {
            String::new()
        };
        let _ = writeln!(
            md,
            "| {n:.0} | {} | {cpu_pct:.2}% | {} | {rss:.1} MiB | {:.1} MiB | {:.0} KiB | {:.0} | {per} | {scrape} | {:.1} s, {:.1} s | {:.1} s |",
            c["agent"].as_str().unwrap_or("this build"),
            by_thread(c),
            f(c, "rss_anon_bytes") / MIB,
            f(c, "metrics_bytes") / 1024.0,
            f(c, "series"),
            f(c, "ready_s"),
            f(c, "settled_s"),
            f(c, "startup_cpu_s"),
        );
        if (n - 1000.0).abs() < 0.5 && c["agent"].as_str() != Some("baseline") {
            let met = |ok: bool| if ok { "met" } else { "**missed**" };
            verdict = format!(
                "\nTargets with 1,000 cgroups: CPU under {TARGET_CPU_PCT}% of a core: \
                 {cpu_pct:.2}% ({}), under emulation; RSS under {TARGET_RSS_MB:.0} MB: \
                 {:.1} MB, {rss:.1} MiB ({}).\n",
                met(cpu_pct < TARGET_CPU_PCT),
                rss * MIB / 1e6,
                met(rss * MIB < TARGET_RSS_MB * 1e6),
            );
        }
    }
    md.push_str(&verdict);
    Ok(md)
}

/// The idle window's CPU by thread name, as shares of a core, largest first.
fn by_thread(c: &Value) -> String {
    let idle_s = c["idle_s"].as_f64().unwrap_or(f64::NAN);
    let mut threads: Vec<(&String, f64)> = c["idle_cpu_by_thread"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k, v.as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    threads
        .iter()
        .map(|(name, cpu)| format!("{name} {:.2}%", cpu / idle_s * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cgroup counts of the arm64 table: an edge board has fewer than a server.
const ARM64_COUNTS: &str = "0,100,1000";

/// Runs `bench-idle` in the arm64 VM with the default and then the edge profile (`bin` built
/// for aarch64); returns the markdown section.
pub fn run_arm64(bin: &Path) -> Result<String> {
    let kernel = vm::default_kernel(vm::Arch::Aarch64);
    let out = fresh_dir("target/bench-idle-arm64")?;
    let mut runs = Vec::new();
    for profile in ["default", "edge"] {
        let json = out.join(format!("{profile}.json"));
        runs.push(measure(kernel, bin, None, ARM64_COUNTS, profile, &json)?);
    }
    report_arm64(kernel, &runs)
}

fn report_arm64(kernel: &str, runs: &[Value]) -> Result<String> {
    let mut md = format!(
        "\n## Idle cost on arm64, default and edge profiles\n\n\
         In the lab's arm64 VM (`{}`, {kernel}, aarch64 under TCG emulation, 2 vCPUs, \
         {MEMORY_MIB} MiB), measured as in the table above (release build, {IDLE_S} s idle \
         after the agent read every cgroup), with the built-in configuration's default profile \
         and with `profile = \"edge\"`. Maps: the kernel memory of the agent's eBPF maps (the \
         sum of their `memlock` in /proc/PID/fdinfo), allocated at start whatever happens. \
         Arm64 emulation is slower than x86_64's: CPU shares here are not what a board pays; \
         the goal on a Raspberry Pi 4B is under 1% of a core, which this VM cannot measure.\n\n\
         | profile | cgroups | CPU idle (% of a core) | RSS | RssAnon | maps (kernel) | /metrics | scrape (median) | ready after |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        runs.first()
            .and_then(|r| r["kernel"].as_str())
            .unwrap_or("?"),
    );
    let f = |c: &Value, k: &str| c[k].as_f64().unwrap_or(f64::NAN);
    for run in runs {
        let profile = run["profile"].as_str().unwrap_or("?");
        for c in run["counts"].as_array().context("no counts")? {
            let scrape = scrape_ms(c).map_or_else(|| "-".to_owned(), |(m, _)| format!("{m:.1} ms"));
            let _ = writeln!(
                md,
                "| {profile} | {:.0} | {:.2}% | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.0} KiB | {scrape} | {:.1} s |",
                f(c, "cgroups"),
                f(c, "idle_cpu_s") / f(c, "idle_s") * 100.0,
                f(c, "rss_bytes") / MIB,
                f(c, "rss_anon_bytes") / MIB,
                f(c, "maps_bytes") / MIB,
                f(c, "metrics_bytes") / 1024.0,
                f(c, "ready_s"),
            );
        }
    }
    Ok(md)
}

/// The median and the slowest of one count's scrape times, in ms.
fn scrape_ms(c: &Value) -> Option<(f64, f64)> {
    let mut times: Vec<f64> = c["scrape_ms"]
        .as_array()?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    if times.is_empty() {
        return None;
    }
    let m = median(&mut times);
    Some((m, times[times.len() - 1]))
}
