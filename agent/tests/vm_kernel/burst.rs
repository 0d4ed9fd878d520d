//! A burst of limit writes, in the VM: every write the kernel took is either reported by the
//! agent or counted as lost, exactly; how many of each depends on how fast the (emulated)
//! machine lets the agent read, so only their sum is asserted.

use std::{
    os::unix::fs::FileExt as _,
    time::{Duration, Instant},
};

use super::{TestCgroup, common, require_vm};
use common::Agent;

/// Writes in the burst, and the pace aimed at (a count, not a duration: under emulation the
/// writer may not reach the pace, and the test does not care).
const WRITES: u64 = 20_000;
const PER_SECOND: u32 = 10_000;
/// The cgroups written in turn.
const CGROUPS: usize = 4;
/// The counts must stop short of the writes for this long before the test gives up.
const STILL: Duration = Duration::from_secs(15);

/// The writer's thread name: its comm, the `writer` label of the writes the probes report.
const WRITER: &str = "nw-burst-writer";

/// The agent's limit writes by [`WRITER`] reported, and limit writes counted as lost (every
/// reason), summed over series. Changes a read of every limit finds after a loss are counted
/// as writes too, of an unknown writer: a lost write's change may be among them, so they are
/// left out.
fn accounted(agent: &Agent) -> (u64, u64) {
    let body = common::scrape(agent.metrics).expect("scrape");
    let mut reported = 0.0;
    let mut lost = 0.0;
    for line in body.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        if series.starts_with("nodewarden_cgroup_limit_writes_total{")
            && series.contains(&format!("writer=\"{WRITER}\""))
        {
            reported += value;
        } else if series.starts_with("nodewarden_events_lost_total{")
            && series.contains("kind=\"limit_write\"")
        {
            lost += value;
        }
    }
    (whole(reported), whole(lost))
}

/// A counter's value, a whole number in the exposition's float.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counters of whole writes"
)]
fn whole(v: f64) -> u64 {
    v as u64
}

/// 20,000 writes of `memory.high` (4 cgroups in turn, values alternating), paced at 10,000 a
/// second: the agent's reported writes plus its counted losses equal the writes made.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn every_write_of_a_burst_is_reported_or_counted_as_lost() {
    require_vm();
    let cgroups: Vec<TestCgroup> = (0..CGROUPS)
        .map(|i| TestCgroup::new(&format!("nw-burst-{i}")))
        .collect();
    let agent = Agent::start(&[]);
    for i in 0..CGROUPS {
        agent.wait_for_sample(
            &format!(
                "nodewarden_cgroup_limit_bytes{{cgroup=\"/nw-burst-{i}\",limit=\"memory.high\"}}"
            ),
            f64::INFINITY,
            STILL,
        );
    }
    let (reported_before, lost_before) = accounted(&agent);
    let files: Vec<std::fs::File> = cgroups
        .iter()
        .map(|cg| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(cg.path.join("memory.high"))
                .expect("open memory.high")
        })
        .collect();
    let every = Duration::from_secs(1) / PER_SECOND;
    let start = Instant::now();
    super::on_thread(WRITER, move || {
        let values = ["1073741824", "1074790400"];
        let mut due = Instant::now();
        for i in 0..usize::try_from(WRITES).expect("fits") {
            // Each cgroup's value changes at each of its writes.
            let value = values[(i / CGROUPS) % 2];
            files[i % CGROUPS]
                .write_at(value.as_bytes(), 0)
                .unwrap_or_else(|e| panic!("write {i}: {e}"));
            due += every;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    });
    let took = start.elapsed();

    // Until the counts add up, or stop moving short of it.
    let (mut counts, mut moved) = (accounted(&agent), Instant::now());
    while counts.0 - reported_before + counts.1 - lost_before < WRITES && moved.elapsed() < STILL {
        std::thread::sleep(Duration::from_millis(250));
        let now = accounted(&agent);
        if now != counts {
            (counts, moved) = (now, Instant::now());
        }
    }
    let (reported, lost) = (counts.0 - reported_before, counts.1 - lost_before);
    let (status, log) = agent.stop();
    eprintln!(
        "burst: {WRITES} writes in {took:?}: {reported} reported, {lost} counted as lost \
         (sum {})",
        reported + lost
    );
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    assert_eq!(
        reported + lost,
        WRITES,
        "{reported} reported + {lost} counted as lost != {WRITES} writes"
    );
}
