//! `nodewarden bench-idle` (hidden, the kernel lab's VM only): what the agent costs when
//! nothing happens, by the number of cgroups on the node. For each count, that many cgroups
//! (memory and pids controllers, a `memory.max` each) exist before the agent starts in its
//! built-in configuration with a profile; once it has read them all, it idles, and its CPU
//! time, memory, its maps' kernel memory and `/metrics` are measured. Prints JSON for
//! `cargo xtask bench`.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::agent_bench::{self, AnonMappings, Running};
use crate::config::Profile;

/// How long the agent may take to start and read every cgroup.
const START_LIMIT: Duration = Duration::from_secs(600);

/// One cgroup count's figures.
#[derive(Debug, serde::Serialize)]
struct Figures {
    cgroups: usize,
    /// `baseline` (another build's agent) or `this build`.
    agent: &'static str,
    /// Spawn to probes attached, and to the series settled (every cgroup read).
    ready_s: f64,
    settled_s: f64,
    /// CPU seconds the agent used until settled.
    startup_cpu_s: f64,
    /// The idle window: its length and the CPU seconds used in it.
    idle_s: f64,
    idle_cpu_s: f64,
    /// The idle window's CPU seconds by thread name (the threads that used any).
    idle_cpu_by_thread: BTreeMap<String, f64>,
    rss_bytes: u64,
    rss_anon_bytes: u64,
    anon: AnonMappings,
    /// The kernel memory of the agent's eBPF maps (their `memlock` in /proc/PID/fdinfo).
    maps_bytes: u64,
    metrics_bytes: usize,
    series: usize,
    /// Each scrape's time, after the idle window.
    scrape_ms: Vec<f64>,
}

/// Measures each of `counts` (cgroups under `parent`, created cumulatively and removed at the
/// end): `idle` of idling after the agent settled, then `scrapes` scrapes; with each count,
/// the `baseline` agent's first when one is given, then this build's. `dir` holds the agents'
/// files.
pub fn run(
    counts: &[usize],
    parent: &Path,
    idle: Duration,
    scrapes: usize,
    profile: Profile,
    baseline: Option<&Path>,
    dir: &Path,
) -> Result<()> {
    let this = std::env::current_exe()?;
    let agents: Vec<(&'static str, &Path)> = baseline
        .map(|b| ("baseline", b))
        .into_iter()
        .chain([("this build", this.as_path())])
        .collect();
    agent_bench::require_vm()?;
    std::fs::create_dir_all(dir)?;
    let metrics: SocketAddr = "127.0.0.1:19791".parse()?;
    // The profile alone: a file that named the other keys would keep the default's values.
    let config = format!("profile = \"{}\"\n", profile.as_str());
    let mut all = Vec::new();
    let result = (|| -> Result<()> {
        for &count in counts {
            let start = Instant::now();
            agent_bench::create_cgroups(parent, count)?;
            eprintln!(
                "bench-idle: {count} cgroups in {:.1} s",
                start.elapsed().as_secs_f64()
            );
            for (i, &(name, exe)) in agents.iter().enumerate() {
                let agent = Running::start_exe(
                    exe,
                    dir,
                    &format!("idle-{count}-{i}"),
                    &config,
                    metrics,
                    START_LIMIT,
                )?;
                let figures = measure(&agent, name, count, idle, scrapes)?;
                eprintln!("bench-idle: {figures:?}");
                all.push(figures);
                agent.stop()?;
            }
        }
        Ok(())
    })();
    agent_bench::remove_cgroups(parent);
    result?;
    println!(
        "{}",
        serde_json::json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
            "profile": profile.as_str(),
            "counts": all,
        })
    );
    Ok(())
}

fn measure(
    agent: &Running,
    name: &'static str,
    count: usize,
    idle: Duration,
    scrapes: usize,
) -> Result<Figures> {
    let settled = settle(agent)?;
    let startup_cpu_s = agent.cpu_seconds()?;
    let (cpu0, threads0, t0) = (
        agent.cpu_seconds()?,
        agent.threads_cpu_seconds()?,
        Instant::now(),
    );
    std::thread::sleep(idle);
    let (cpu1, idle_s) = (agent.cpu_seconds()?, t0.elapsed().as_secs_f64());
    let mut idle_cpu_by_thread = agent.threads_cpu_seconds()?;
    for (name, cpu) in &mut idle_cpu_by_thread {
        *cpu -= threads0.get(name).copied().unwrap_or(0.0);
    }
    idle_cpu_by_thread.retain(|_, cpu| *cpu > 0.0);
    let (rss_bytes, rss_anon_bytes) = agent.memory()?;
    let anon = agent.anon_mappings()?;
    let maps_bytes = agent.maps_memory()?;
    let mut scrape_ms = Vec::new();
    let mut body = String::new();
    for _ in 0..scrapes.max(1) {
        let (b, took) = agent_bench::scrape(agent.metrics)?;
        scrape_ms.push(took.as_secs_f64() * 1e3);
        body = b;
    }
    let figures = Figures {
        cgroups: count,
        agent: name,
        ready_s: agent.ready_after.as_secs_f64(),
        settled_s: settled.as_secs_f64() + agent.ready_after.as_secs_f64(),
        startup_cpu_s,
        idle_s,
        idle_cpu_s: cpu1 - cpu0,
        idle_cpu_by_thread,
        rss_bytes,
        rss_anon_bytes,
        anon,
        maps_bytes,
        metrics_bytes: body.len(),
        series: agent_bench::series(&body),
        scrape_ms,
    };
    Ok(figures)
}

/// Waits until the agent has read the hierarchy at start (`nodewarden_resyncs_total{reason=
/// "start"}`) and its series stop changing in number over 2 s, then 5 s more; returns how long
/// after ready that was.
fn settle(agent: &Running) -> Result<Duration> {
    let start = Instant::now();
    let mut last = None;
    loop {
        let (body, _) = agent_bench::scrape(agent.metrics)?;
        let read = agent_bench::sum(&body, "nodewarden_resyncs_total", &["reason=\"start\""]);
        let now = agent_bench::series(&body);
        if read >= 1.0 && last == Some(now) {
            break;
        }
        last = Some(now);
        if start.elapsed() > START_LIMIT {
            bail!("the agent's series did not settle within {START_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let settled = start.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    Ok(settled)
}
