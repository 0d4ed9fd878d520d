//! `cargo xtask bench`, restore latency part: in the lab's VM (Debian bookworm 6.1), 200 bad
//! memory.max writes, one to each of 200 pod cgroups, each timed from the write's return until
//! the desired value is back: by the agent in mode enforce (its own figure, and a poller
//! reading the file), and, in the same run, by a polling script like the incident's (writing
//! 2G to every pod's memory.max each second).

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::{setup, vm};

const KERNEL: &str = "bookworm-6.1";
const COUNT: usize = 200;
const GOOD: &str = "2147483648";
const BAD: &str = "536870912";

/// One run's figures (µs, and polls per second).
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    observed_p50: f64,
    observed_p99: f64,
    observed_max: f64,
    agent_count: f64,
    agent_p50: f64,
    agent_p99: f64,
    polls: f64,
}

/// Runs both in one VM run with `bin` (agent and client); returns the markdown section.
pub fn run(bin: &Path) -> Result<String> {
    let out = vm::workspace_root().join("target/bench-restore");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let (bin, out_dir) = (bin.display(), out.display());
    let pods = "/sys/fs/cgroup/kubepods/burstable";
    let script = format!(
        r#"set -e
echo "+memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
mkdir -p {pods}
echo "+memory +pids" > /sys/fs/cgroup/kubepods/cgroup.subtree_control
echo "+memory +pids" > {pods}/cgroup.subtree_control
for i in $(seq 1 {COUNT}); do
    d={pods}/pod6d3f1a2b-4c5d-4e6f-8a9b-$(printf %012d $i)
    mkdir -p $d
    echo {GOOD} > $d/memory.max
done
cat > /tmp/nw-bench.toml <<EOF
mode = "enforce"
shutdown_drain_ms = 2000
[metrics]
listen = "127.0.0.1:19800"
[remediation]
audit_log = ""
state_file = ""
EOF
rm -f /tmp/nw-bench.sock
'{bin}' run --config /tmp/nw-bench.toml --events-socket /tmp/nw-bench.sock > '{out_dir}/agent.log' 2>&1 &
pid=$!
n=0; while [ ! -S /tmp/nw-bench.sock ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
sleep 2
'{bin}' bench-restore --root {pods} --prefix pod --count {COUNT} --bad {BAD} --good {GOOD} --socket /tmp/nw-bench.sock > '{out_dir}/agent.json'
kill $pid; wait $pid || true
(while :; do for d in {pods}/pod*/; do echo {GOOD} > $d/memory.max; done; sleep 1; done) &
script=$!
'{bin}' bench-restore --root {pods} --prefix pod --count {COUNT} --bad {BAD} --good {GOOD} --jitter-ms 1000 > '{out_dir}/script.json'
kill $script
"#
    );
    let argv = ["sh".to_owned(), "-c".to_owned(), script];
    let status = setup::step(
        &format!("restore latency in the VM ({KERNEL}), {COUNT} bad writes x 2"),
        || vm::run(KERNEL, &vm::RunOptions::default(), &argv),
    )?;
    if status != 0 {
        bail!("the restore run in the VM exited with {status}; see {out_dir}");
    }
    let read = |name: &str| -> Result<Figures> {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("{}: {text:?}", path.display()))?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Ok(Figures {
            observed_p50: f("observed_p50_us"),
            observed_p99: f("observed_p99_us"),
            observed_max: f("observed_max_us"),
            agent_count: f("agent_count"),
            agent_p50: f("agent_p50_us"),
            agent_p99: f("agent_p99_us"),
            polls: f("polls_per_s"),
        })
    };
    let (agent, script) = (read("agent.json")?, read("script.json")?);
    let ms = |us: f64| us / 1000.0;
    let mut md = format!(
        "\n## Restore latency: from a bad memory.max write's return to the desired value back\n\n\
         In the lab's VM ({KERNEL}, x86_64 under TCG emulation, fexit mode): {COUNT} pod \
         cgroups (`/kubepods/burstable/pod<uid>`, memory.max 2G); one bad write of 512M to \
         each in turn, 20 ms apart. A poller in the writing process reads memory.max until \
         it says 2G again ({:.0} and {:.0} reads per second in the two runs). The agent runs \
         its default rules in mode enforce; the agent's own figure is the one its \
         `nodewarden_remediation_latency_seconds` histogram takes (from the kernel's timestamp \
         of the write to the value read back). The script is the incident's: every second, \
         2G written to every pod's memory.max; against it, each bad write waits a spread \
         fraction of a second first, so that the writes fall at every phase of its cycle.\n\n\
         | restorer | measured by | restores | p50 | p99 | max |\n\
         |---|---|---|---|---|---|\n",
        agent.polls, script.polls
    );
    let _ = writeln!(
        md,
        "| nodewarden (enforce) | the poller | {COUNT} | {:.2} ms | **{:.2} ms** | {:.2} ms |\n\
         | nodewarden (enforce) | the agent | {:.0} | {:.2} ms | {:.2} ms | |\n\
         | a 1 s polling script | the poller | {COUNT} | {:.0} ms | {:.0} ms | {:.0} ms |",
        ms(agent.observed_p50),
        ms(agent.observed_p99),
        ms(agent.observed_max),
        agent.agent_count,
        ms(agent.agent_p50),
        ms(agent.agent_p99),
        ms(script.observed_p50),
        ms(script.observed_p99),
        ms(script.observed_max),
    );
    md.push_str("\nTarget: p99 under 20 ms under emulation.\n");
    Ok(md)
}
