//! `nodewarden bench-restore` (hidden): how long a bad limit write stays in effect. For each of
//! `count` cgroups in turn it writes a bad memory.max and polls the file (an independent
//! observer, at well over 1 kHz) until the desired value is back; with the agent's event
//! socket it also collects the agent's own figure for each restore (used by `cargo xtask
//! bench`, against the agent and against a polling script).

use std::{
    collections::HashMap,
    io::BufRead as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::outputs::feed;

/// Longest a restore is waited for.
const GIVE_UP: Duration = Duration::from_secs(10);

/// Writes `bad` to the memory.max of each cgroup below `root` whose directory name starts with
/// `prefix` (in name order, `count` of them) and times the return of `good`; prints JSON.
pub fn run(
    root: &Path,
    prefix: &str,
    count: usize,
    bad: &str,
    good: &str,
    socket: Option<&Path>,
    jitter: Duration,
) -> Result<()> {
    let mut cgroups: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("reading {}", root.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    cgroups.sort();
    cgroups.truncate(count);
    if cgroups.len() < count {
        bail!(
            "{} cgroups named {prefix}* under {}",
            cgroups.len(),
            root.display()
        );
    }
    // The agent's latency of each restore, by cgroup name, from its decisions.
    let agent: Arc<Mutex<HashMap<String, f64>>> = Arc::default();
    if let Some(socket) = socket {
        let stream = feed::connect(socket, feed::Request::Events)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let sink = agent.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let Ok(r) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if r["kind"] == "decision"
                    && let (Some(c), Some(s)) = (
                        r["cgroup"].as_str(),
                        r["outcome"]["latency_seconds"].as_f64(),
                    )
                    && let Some(name) = c.rsplit('/').next()
                    && let Ok(mut m) = sink.lock()
                {
                    m.insert(name.to_owned(), s);
                }
            }
        });
    }
    let mut observed = Vec::new();
    let mut polls = 0u64;
    let mut polling = Duration::ZERO;
    for (i, cg) in cgroups.iter().enumerate() {
        // Bad writes at spread phases of a periodic restorer's cycle (a low-discrepancy
        // sequence: deterministic, and even over [0, jitter)).
        #[expect(clippy::cast_precision_loss, reason = "an index")]
        let phase = (i as f64 * 0.618_033_988_75).fract();
        std::thread::sleep(jitter.mul_f64(phase));
        let file = cg.join("memory.max");
        std::fs::write(&file, bad).with_context(|| format!("writing {}", file.display()))?;
        let written = Instant::now();
        loop {
            let now = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            polls += 1;
            if now.trim() == good {
                observed.push(written.elapsed());
                break;
            }
            if written.elapsed() > GIVE_UP {
                bail!("{} not restored within {GIVE_UP:?}", file.display());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        polling += written.elapsed();
        std::thread::sleep(Duration::from_millis(20));
    }
    // The last decisions have a moment to arrive.
    std::thread::sleep(Duration::from_secs(1));
    let agent: Vec<Duration> = {
        let m = agent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        cgroups
            .iter()
            .filter_map(|c| m.get(c.file_name()?.to_str()?))
            .map(|s| Duration::from_secs_f64(*s))
            .collect()
    };
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let rate = polls as f64 / polling.as_secs_f64().max(1e-9);
    println!(
        "{}",
        serde_json::json!({
            "count": cgroups.len(),
            "observed_p50_us": percentile(&observed, 50),
            "observed_p99_us": percentile(&observed, 99),
            "observed_max_us": percentile(&observed, 100),
            "agent_count": agent.len(),
            "agent_p50_us": percentile(&agent, 50),
            "agent_p99_us": percentile(&agent, 99),
            "polls_per_s": rate.round(),
        })
    );
    Ok(())
}

/// The `p`th percentile of `v` in µs (nearest rank); 0 for none.
fn percentile(v: &[Duration], p: usize) -> u128 {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return 0;
    }
    let rank = (v.len() * p).div_ceil(100).clamp(1, v.len());
    v[rank - 1].as_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=200).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 50), 100);
        assert_eq!(percentile(&v, 99), 198);
        assert_eq!(percentile(&v, 100), 200);
        assert_eq!(percentile(&[], 99), 0);
    }
}
