//! `nodewarden bench-burst` (hidden, the kernel lab's VM only): a burst of limit writes at a
//! fixed rate against the agent in its default configuration: how many it reported
//! (`nodewarden_cgroup_limit_writes_total`), how many it counted as lost
//! (`nodewarden_events_lost_total{kind="limit_write"}`), and the CPU it used. Prints JSON for
//! `cargo xtask bench`.

use std::{
    collections::BTreeMap,
    fs::File,
    net::SocketAddr,
    os::unix::fs::FileExt as _,
    path::Path,
    time::{Duration, Instant},
};

use agent_common::LossKind;
use anyhow::{Context as _, Result};

use super::agent_bench::{self, Running};

/// How long, after the last write, the counts may take to add up.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// The writer's thread name, its comm: the `writer` label of the writes the probes report.
const WRITER: &str = "nw-burst-writer";

/// The counts the agent exposes.
#[derive(Debug, Default, Clone, PartialEq)]
struct Counts {
    /// Writes the probes reported (writer [`WRITER`]).
    reported: f64,
    /// Writes counted without a writer (`writer="unknown"`): none is expected (a change a
    /// resync finds after a loss is not counted as a write: its writes were counted lost).
    unattributed: f64,
    /// By reason.
    lost: BTreeMap<&'static str, f64>,
    /// Kernel records that did not decode (any kind: they may have been limit writes).
    undecoded: f64,
    /// Reads of every limit because events were lost.
    resyncs: f64,
}

impl Counts {
    fn read(metrics: SocketAddr) -> Result<Self> {
        let (body, _) = agent_bench::scrape(metrics)?;
        let kind = format!("kind=\"{}\"", LossKind::LimitWrite.as_str());
        let lost = LossKind::LimitWrite
            .reasons()
            .iter()
            .map(|r| {
                let reason = format!("reason=\"{}\"", r.as_str());
                (
                    r.as_str(),
                    agent_bench::sum(&body, "nodewarden_events_lost_total", &[&kind, &reason]),
                )
            })
            .collect();
        Ok(Self {
            reported: agent_bench::sum(
                &body,
                "nodewarden_cgroup_limit_writes_total",
                &[&format!("writer=\"{WRITER}\"")],
            ),
            unattributed: agent_bench::sum(
                &body,
                "nodewarden_cgroup_limit_writes_total",
                &["writer=\"unknown\""],
            ),
            lost,
            undecoded: agent_bench::sum(
                &body,
                "nodewarden_events_lost_total",
                &["kind=\"record\""],
            ),
            resyncs: agent_bench::sum(
                &body,
                "nodewarden_resyncs_total",
                &["reason=\"events_lost\""],
            ),
        })
    }

    fn total_lost(&self) -> f64 {
        self.lost.values().sum()
    }
}

/// Writes `memory.high` of `cgroups` cgroups under `parent` (created, removed at the end) in
/// turn, `rate` writes a second for `seconds` (paced by absolute deadlines: a write that falls
/// behind is made at once, and those after it catch up), each cgroup's value alternating, while
/// the agent runs its default configuration with its files in `dir`.
pub fn run(rate: u32, seconds: u32, cgroups: usize, parent: &Path, dir: &Path) -> Result<()> {
    agent_bench::require_vm()?;
    std::fs::create_dir_all(dir)?;
    let result = (|| {
        let targets = agent_bench::create_cgroups(parent, cgroups.max(1))?;
        burst(rate, seconds, &targets, dir)
    })();
    agent_bench::remove_cgroups(parent);
    let figures = result?;
    println!("{figures}");
    Ok(())
}

fn burst(rate: u32, seconds: u32, targets: &[std::path::PathBuf], dir: &Path) -> Result<String> {
    let metrics: SocketAddr = "127.0.0.1:19792".parse()?;
    let config = agent_bench::config_text(&[])?;
    let agent = Running::start(dir, "burst", &config, metrics, Duration::from_secs(120))?;
    let modes = agent_bench::modes(&agent_bench::scrape(metrics)?.0);
    // The start's reading of every limit is over before the burst.
    std::thread::sleep(Duration::from_secs(2));
    let before = Counts::read(metrics)?;
    let files = targets
        .iter()
        .map(|cg| {
            let path = cg.join("memory.high");
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let total = u64::from(rate) * u64::from(seconds);
    let every = Duration::from_secs(1) / rate.max(1);
    let cpu0 = agent.cpu_seconds()?;
    let start = Instant::now();
    let (written, failed, late) = std::thread::Builder::new()
        .name(WRITER.to_owned())
        .spawn(move || write_paced(&files, total, every))?
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))?;
    let took = start.elapsed();
    let cpu1 = agent.cpu_seconds()?;
    // Until every write is accounted for, or the counts stop moving for 10 s.
    let issued = written + failed;
    #[expect(clippy::cast_precision_loss, reason = "counts")]
    let issued_f = issued as f64;
    let mut counts = Counts::read(metrics)?;
    let (mut moved, drain_start) = (Instant::now(), Instant::now());
    loop {
        let added = counts.reported - before.reported + counts.total_lost() - before.total_lost();
        if added >= issued_f
            || moved.elapsed() > Duration::from_secs(10)
            || drain_start.elapsed() > DRAIN_LIMIT
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let next = Counts::read(metrics)?;
        if next != counts {
            moved = Instant::now();
        }
        counts = next;
    }
    let drained = drain_start.elapsed();
    let cpu2 = agent.cpu_seconds()?;
    let (rss, rss_anon) = agent.memory()?;
    agent.stop()?;
    let lost: BTreeMap<&str, f64> = counts
        .lost
        .iter()
        .map(|(r, n)| (*r, n - before.lost.get(r).copied().unwrap_or(0.0)))
        .collect();
    Ok(serde_json::json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        "modes": modes,
        "cgroups": targets.len(),
        "rate": rate,
        "issued": issued,
        "failed": failed,
        "late": late,
        "issue_s": took.as_secs_f64(),
        "reported": counts.reported - before.reported,
        "unattributed": counts.unattributed - before.unattributed,
        "lost": lost,
        "undecoded": counts.undecoded - before.undecoded,
        "resyncs_events_lost": counts.resyncs - before.resyncs,
        "drain_s": drained.as_secs_f64(),
        "cpu_burst_s": cpu1 - cpu0,
        "cpu_drain_s": cpu2 - cpu1,
        "rss_bytes": rss,
        "rss_anon_bytes": rss_anon,
    })
    .to_string())
}

/// Writes `total` values to `files` in turn, the i-th at `every` times i from now (a write that
/// falls behind is made at once), each file's value alternating; returns the writes that
/// succeeded, failed, and were made more than `every` late.
fn write_paced(files: &[File], total: u64, every: Duration) -> (u64, u64, u64) {
    let values = ["1073741824", "1074790400"];
    let (mut written, mut failed, mut late) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    for i in 0..total {
        let deadline = start + every * u32::try_from(i).unwrap_or(u32::MAX);
        let now = Instant::now();
        if now < deadline {
            std::thread::sleep(deadline - now);
        } else if now - deadline > every {
            late += 1;
        }
        let n = usize::try_from(i).unwrap_or(0);
        let value = values[(n / files.len()) % 2];
        match files[n % files.len()].write_at(value.as_bytes(), 0) {
            Ok(_) => written += 1,
            Err(_) => failed += 1,
        }
    }
    (written, failed, late)
}
