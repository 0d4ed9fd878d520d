//! `nodewarden bench-syscalls` (hidden): what the agent costs a process doing something the
//! agent does not watch. A loop in this process times `getppid()`, a one-byte `write()` to
//! /dev/null and a one-byte `pwrite()` to a regular file, with no agent, then with a real
//! `nodewarden run` in one configuration, for each configuration in turn, in many short
//! rounds; prints every figure as JSON for `cargo xtask bench` to reduce.

use std::{
    collections::BTreeMap,
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use super::agent_bench::{self, Running};

/// The built-in configuration less what costs other processes anything: no futex waits, no
/// CPU samples, no off-CPU time, limit writes by inotify, no guard.
const MINIMAL: &str = "[contention]\nfutex_waits = false\nsample_hz = 0\noff_cpu = false\n\
                       [probes]\nlimit_writes = \"inotify\"\nguard = \"off\"\n";

/// (name, what it is, overrides of the built-in configuration, merged in turn).
const CONFIGS: [(&str, &str, &[&str]); 8] = [
    (
        "minimal",
        "minimal: futex waits, CPU samples and off-CPU off, limit writes by inotify, no guard",
        &[MINIMAL],
    ),
    (
        "futex_waits",
        "minimal + futex waits",
        &[MINIMAL, "[contention]\nfutex_waits = true\n"],
    ),
    (
        "cpu_samples",
        "minimal + CPU samples (49 Hz)",
        &[MINIMAL, "[contention]\nsample_hz = 49\n"],
    ),
    (
        "off_cpu",
        "minimal + off-CPU (nobody watched)",
        &[MINIMAL, "[contention]\noff_cpu = true\n"],
    ),
    (
        "limit_writes",
        "minimal + limit writes (probes.limit_writes = \"auto\")",
        &[MINIMAL, "[probes]\nlimit_writes = \"auto\"\n"],
    ),
    ("default", "the default configuration", &[]),
    (
        "default_futex_syscalls",
        "the default, probes.futex_waits = \"syscalls\"",
        &["[probes]\nfutex_waits = \"syscalls\"\n"],
    ),
    (
        "default_no_bpf_stats",
        "the default, metrics.bpf_stats = \"off\"",
        &["[metrics]\nbpf_stats = \"off\"\n"],
    ),
];

/// The syscalls timed, in the order of each measurement's figures.
const SYSCALLS: [&str; 3] = ["getppid", "write_null", "pwrite_file"];

/// One configuration's figures: ns per call of each syscall, per round.
#[derive(Debug, Default, serde::Serialize)]
struct Figures {
    name: &'static str,
    what: &'static str,
    /// Each capability's mode, from `nodewarden_probe_info` (the first round's).
    modes: BTreeMap<String, String>,
    /// Whether a later round's agent reported other modes.
    modes_varied: bool,
    /// Right before the agent started, with no agent.
    without: Vec<[f64; 3]>,
    /// With the agent running.
    with: Vec<[f64; 3]>,
    /// Seconds from the agent's spawn to its probes attached.
    ready_s: Vec<f64>,
}

/// Runs `rounds` rounds of every configuration (the order rotated each round), each a pair of
/// measurements of `calls` calls of each syscall: without the agent, then with it, `settle`
/// after every start and stop. `file` is the regular file written; `dir` holds the agents'
/// configurations, logs and sockets. Prints one JSON object.
pub fn run(rounds: usize, calls: u64, file: &Path, dir: &Path, settle: Duration) -> Result<()> {
    ensure!(
        rounds > 0 && calls > 0,
        "--rounds and --calls must be at least 1"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let target = File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let metrics: SocketAddr = "127.0.0.1:19790".parse()?;
    let mut figures: Vec<Figures> = CONFIGS
        .iter()
        .map(|(name, what, _)| Figures {
            name,
            what,
            ..Figures::default()
        })
        .collect();
    for round in 0..rounds {
        for i in (0..CONFIGS.len()).map(|k| (k + round) % CONFIGS.len()) {
            let (name, _, overrides) = CONFIGS[i];
            std::thread::sleep(settle);
            let without = measure(calls, &null, &target)?;
            let config = agent_bench::config_text(overrides)?;
            let agent = Running::start(dir, name, &config, metrics, Duration::from_secs(120))?;
            let modes = agent_bench::modes(&agent_bench::scrape(metrics)?.0);
            std::thread::sleep(settle);
            let with = measure(calls, &null, &target)?;
            let ready = agent.ready_after.as_secs_f64();
            agent.stop()?;
            let f = &mut figures[i];
            if f.with.is_empty() {
                f.modes = modes;
            } else if f.modes != modes {
                f.modes_varied = true;
            }
            f.without.push(without);
            f.with.push(with);
            f.ready_s.push(ready);
        }
        eprintln!("bench-syscalls: round {} of {rounds} done", round + 1);
    }
    let _ = std::fs::remove_file(file);
    println!(
        "{}",
        serde_json::json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
            "calls": calls,
            "rounds": rounds,
            "syscalls": SYSCALLS,
            "configs": figures,
        })
    );
    Ok(())
}

/// ns per call of each of [`SYSCALLS`], `calls` of each after a tenth as many untimed.
fn measure(calls: u64, null: &File, file: &File) -> Result<[f64; 3]> {
    let (null, file) = (null.as_raw_fd(), file.as_raw_fd());
    let byte = [b'x'];
    Ok([
        // SAFETY: getppid has no preconditions.
        time(calls, || i64::from(unsafe { libc::getppid() }))?,
        // SAFETY: an open descriptor and a one-byte buffer that outlives the call.
        time(
            calls,
            || unsafe { libc::write(null, byte.as_ptr().cast(), 1) } as i64,
        )?,
        // SAFETY: as above.
        time(
            calls,
            || unsafe { libc::pwrite(file, byte.as_ptr().cast(), 1, 0) } as i64,
        )?,
    ])
}

/// ns per call of `f` (a syscall returning -1 on failure), over `calls` calls.
fn time(calls: u64, f: impl Fn() -> i64) -> Result<f64> {
    for _ in 0..calls / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..calls {
        if f() < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "a mean over many calls")]
    Ok(start.elapsed().as_nanos() as f64 / calls as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LimitWriteMode};

    #[test]
    fn every_configuration_is_valid_and_the_minimal_one_is_minimal() {
        for (name, _, overrides) in CONFIGS {
            let text = agent_bench::config_text(overrides).expect("text");
            let c = Config::parse(&text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            if name == "minimal" {
                assert!(!c.contention.futex_waits && !c.contention.off_cpu);
                assert_eq!(c.contention.sample_hz, 0);
                assert_eq!(c.probes.limit_writes, LimitWriteMode::Inotify);
            }
        }
    }
}
