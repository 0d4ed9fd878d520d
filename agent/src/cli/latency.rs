//! `nodewarden bench-latency` (hidden): how long a limit write takes to reach a running agent's
//! event feed, measured from the write's return to the record's arrival, optionally under an
//! exec storm (used by `cargo xtask bench`). It works against any agent that serves the feed,
//! an older build included (which ignores the request line), so both are measured by the same
//! client.

use std::{
    collections::HashMap,
    io::BufRead as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::outputs::feed;

/// Threads that run the storm's execs.
const STORM_THREADS: u32 = 4;

/// Writes `writes` values to `cgroup`'s `memory.high` 10 ms apart, with `exec_rate` execs of
/// `/bin/true` per second meanwhile, and prints the latencies' percentiles as JSON.
pub fn run(socket: &Path, cgroup: &Path, writes: u32, exec_rate: u32) -> Result<()> {
    let stream = feed::connect(socket, feed::Request::Events)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let target = format!(
        "/{}",
        cgroup
            .components()
            .next_back()
            .context("the cgroup's name")?
            .as_os_str()
            .to_string_lossy()
    );
    // Values to arrival times.
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let sink = arrivals.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let at = Instant::now();
            let Ok(r) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if r["kind"] == "limit_write"
                && r["cgroup"] == target.as_str()
                && let Some(v) = r["value"].as_str()
                && let Ok(mut m) = sink.lock()
            {
                m.insert(v.to_owned(), at);
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let execs = Arc::new(AtomicU64::new(0));
    let storm: Vec<_> = (0..if exec_rate > 0 { STORM_THREADS } else { 0 })
        .map(|_| {
            let (stop, execs) = (stop.clone(), execs.clone());
            let every = Duration::from_secs(u64::from(STORM_THREADS)) / exec_rate;
            std::thread::spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if std::process::Command::new("/bin/true").status().is_ok() {
                        execs.fetch_add(1, Ordering::Relaxed);
                    }
                    next += every;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })
        })
        .collect();
    // Let the storm get going.
    std::thread::sleep(Duration::from_millis(500));
    let storm_start = (Instant::now(), execs.load(Ordering::Relaxed));
    let file = cgroup.join("memory.high");
    let mut written = Vec::new();
    for i in 0..u64::from(writes) {
        let value = ((1u64 << 30) + i * 4096).to_string();
        std::fs::write(&file, &value).with_context(|| format!("writing {}", file.display()))?;
        written.push((value, Instant::now()));
        std::thread::sleep(Duration::from_millis(10));
    }
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let rate = (execs.load(Ordering::Relaxed) - storm_start.1) as f64
        / storm_start.0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in storm {
        let _ = t.join();
    }
    // The last records have a moment to arrive.
    std::thread::sleep(Duration::from_secs(2));
    let arrivals = arrivals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut latencies: Vec<Duration> = written
        .iter()
        .filter_map(|(v, at)| Some(arrivals.get(v)?.saturating_duration_since(*at)))
        .collect();
    latencies.sort();
    let missing = written.len() - latencies.len();
    let pct = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .map_or(0, Duration::as_micros)
    };
    println!(
        "{}",
        serde_json::json!({
            "writes": writes,
            "missing": missing,
            "p50_us": pct(50),
            "p99_us": pct(99),
            "max_us": latencies.last().map_or(0, Duration::as_micros),
            "execs_per_s": rate.round(),
        })
    );
    Ok(())
}
