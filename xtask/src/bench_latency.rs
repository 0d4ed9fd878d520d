//! `cargo xtask bench`, event latency part: in the lab's VM (Debian bookworm 6.1, fexit), how
//! long a limit write takes from its return to its record on the agent's event feed, p50 and
//! p99 over 500 writes, without and with an exec storm of 1,000 execs a second. With
//! `--baseline REV` the agent built from that revision is measured in the same VM run, by the
//! same client (the current build's `bench-latency`), in interleaved rounds: the emulated VM's
//! tail latencies drift, and interleaving makes the drift hit both agents alike.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{build, setup, vm};

/// The kernel the latency is measured on.
const KERNEL: &str = "bookworm-6.1";
const WRITES: u32 = 500;
const EXEC_RATE: u32 = 1000;
/// Rounds per agent, each a fresh start: quiet, then the storm.
const ROUNDS: usize = 5;

/// One agent's figures: (p50 µs, p99 µs, missing, execs/s) without and with the storm.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    p50: f64,
    p99: f64,
    missing: f64,
    execs_per_s: f64,
}

/// Builds `rev` of this repository in a worktree under `target/`; returns its agent binary.
pub fn build_revision(rev: &str) -> Result<PathBuf> {
    let root = vm::workspace_root();
    let dir = root.join("target/bench-baseline");
    let src = dir.join("src");
    setup::step(&format!("checking out {rev} in {}", src.display()), || {
        if src.exists() {
            setup::run(
                Command::new("git")
                    .args(["checkout", "--detach", rev])
                    .current_dir(&src),
            )
        } else {
            setup::run(
                Command::new("git")
                    .args(["worktree", "add", "--detach"])
                    .arg(&src)
                    .arg(rev)
                    .current_dir(&root),
            )
        }
    })?;
    setup::step(&format!("cargo build --release -p agent ({rev})"), || {
        setup::run(
            Command::new(build::cargo())
                .args(["build", "--release", "-p", "agent"])
                .env("CARGO_TARGET_DIR", dir.join("target"))
                .current_dir(&src),
        )
    })?;
    Ok(dir.join("target/release/nodewarden"))
}

/// Measures each of `agents` (name, binary) in one VM run, with `client` as the measuring
/// client; returns the markdown section.
pub fn run(client: &Path, agents: &[(String, PathBuf)]) -> Result<String> {
    let out = vm::workspace_root().join("target/bench-latency");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let mut script = String::from(
        "set -e\n\
         echo +memory > /sys/fs/cgroup/cgroup.subtree_control\n\
         mkdir -p /sys/fs/cgroup/nw-bench\n",
    );
    for (round, (i, (_, bin))) in
        (0..ROUNDS).flat_map(|r| agents.iter().enumerate().map(move |a| (r, a)))
    {
        let _ = write!(
            script,
            "rm -f /tmp/nw-bench.sock\n\
             '{bin}' run --metrics-listen 127.0.0.1:19800 --events-socket /tmp/nw-bench.sock \
             > '{out}/agent-{i}-{round}.log' 2>&1 &\n\
             pid=$!\n\
             n=0; while [ ! -S /tmp/nw-bench.sock ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done\n\
             sleep 2\n\
             '{client}' bench-latency --socket /tmp/nw-bench.sock --cgroup /sys/fs/cgroup/nw-bench \
             --writes {WRITES} > '{out}/{i}-{round}-quiet.json'\n\
             '{client}' bench-latency --socket /tmp/nw-bench.sock --cgroup /sys/fs/cgroup/nw-bench \
             --writes {WRITES} --exec-rate {EXEC_RATE} > '{out}/{i}-{round}-storm.json'\n\
             kill $pid; wait $pid || true\n",
            bin = bin.display(),
            out = out.display(),
            client = client.display(),
        );
    }
    let argv = ["sh".to_owned(), "-c".to_owned(), script];
    let status = setup::step(
        &format!(
            "event latency in the VM ({KERNEL}), {} agents x {ROUNDS} rounds",
            agents.len()
        ),
        || vm::run(KERNEL, &vm::RunOptions::default(), &argv),
    )?;
    if status != 0 {
        bail!(
            "the latency run in the VM exited with {status}; see {}",
            out.display()
        );
    }
    report(agents, &out)
}

/// The markdown section from the rounds' figures in `out`.
fn report(agents: &[(String, PathBuf)], out: &Path) -> Result<String> {
    let read = |i: usize, round: usize, case: &str| -> Result<Figures> {
        let path = out.join(format!("{i}-{round}-{case}.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("{}: {text:?}", path.display()))?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Ok(Figures {
            p50: f("p50_us"),
            p99: f("p99_us"),
            missing: f("missing"),
            execs_per_s: f("execs_per_s"),
        })
    };
    let mut md = format!(
        "\n## Event latency: from a limit write's return to its record on the feed\n\n\
         In the lab's VM ({KERNEL}, x86_64 under TCG emulation, 2 vCPUs, fexit mode): {WRITES} \
         writes to a cgroup's memory.high 10 ms apart, timed by one client from the write's \
         return to the record's arrival on the agent's event socket (`nodewarden \
         bench-latency`), without and then with an exec storm of `/bin/true` (target \
         {EXEC_RATE} execs/s; the rate the emulated VM reached is given). Each agent ran \
         {ROUNDS} times, the agents interleaved; medians of the rounds, and the range of the \
         rounds' own ratios.\n\n\
         | agent | storm (execs/s) | p50 | p99 | missed | p99 with / without storm | rounds' range |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for (i, (name, _)) in agents.iter().enumerate() {
        let mut quiet = Vec::new();
        let mut storm = Vec::new();
        for round in 0..ROUNDS {
            quiet.push(read(i, round, "quiet")?);
            storm.push(read(i, round, "storm")?);
        }
        let mut ratios: Vec<f64> = quiet
            .iter()
            .zip(&storm)
            .map(|(q, s)| s.p99 / q.p99)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let m = |v: &[Figures], f: fn(&Figures) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            crate::bench::median(&mut x)
        };
        let missed = |v: &[Figures]| v.iter().map(|f| f.missing).sum::<f64>();
        let (quiet_p99, storm_p99) = (m(&quiet, |f| f.p99), m(&storm, |f| f.p99));
        let _ = writeln!(
            md,
            "| {name} | none | {:.2} ms | {:.2} ms | {} | | |\n\
             | {name} | {:.0} | {:.2} ms | {:.2} ms | {} | **{:.2}** | {:.2} to {:.2} |",
            m(&quiet, |f| f.p50) / 1000.0,
            quiet_p99 / 1000.0,
            missed(&quiet),
            m(&storm, |f| f.execs_per_s),
            m(&storm, |f| f.p50) / 1000.0,
            storm_p99 / 1000.0,
            missed(&storm),
            storm_p99 / quiet_p99,
            ratios.first().copied().unwrap_or(f64::NAN),
            ratios.last().copied().unwrap_or(f64::NAN),
        );
    }
    md.push_str(
        "\nTarget: p99 under the exec storm within 2x of p99 without it. Execs are reported by \
         the kernel once per executable file, in a ring of their own; the event loop never \
         reads an executable. Missed: writes whose record had not arrived 2 s after the last \
         write, over all rounds.\n",
    );
    Ok(md)
}
