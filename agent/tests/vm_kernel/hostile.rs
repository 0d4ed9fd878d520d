//! Hostile input in the VM: values written the way the kernel reads them but the agent used
//! not to (`0x`, octal, wrapping suffixes, a cpu.max quota alone), and names chosen by
//! processes in their thousands; the agent reports what the kernel holds and stays bounded.

use std::time::Duration;

use super::{TestCgroup, common, require_vm, write_file_as};
use common::Agent;

const WAIT: Duration = Duration::from_secs(20);

/// Each write's gauge ends equal to what `cat` shows, whichever way the kernel read the text.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn limit_gauges_equal_the_files_whatever_the_written_text() {
    require_vm();
    for probes in ["", "limit_writes = \"syscalls\""] {
        let config = format!("[probes]\n{probes}\n");
        let agent = Agent::start_with(Some(&config), &[]);
        let name = format!(
            "nw-values-{}",
            if probes.is_empty() {
                "auto"
            } else {
                "syscalls"
            }
        );
        let cg = TestCgroup::new(&name);
        let file = |f: &str| cg.path.join(f);
        let cat = |f: &str| {
            std::fs::read_to_string(file(f))
                .expect("read back")
                .trim()
                .to_owned()
        };
        let writer = "nw-val-writer";
        write_file_as(writer, &file("cpu.max"), "max 200000").expect("cpu.max period");
        for (limit, text) in [
            ("memory.max", "0x4000000"),
            ("memory.low", "0100M"),
            ("memory.high", "16E"),
            ("cpu.max", "50000"),
        ] {
            write_file_as(writer, &file(limit), text)
                .unwrap_or_else(|e| panic!("{limit} <- {text}: {e}"));
        }
        // What the kernel made of them: hexadecimal, octal, a shift that wrapped to 0, and the
        // period kept.
        assert_eq!(cat("memory.max"), "67108864");
        assert_eq!(cat("memory.low"), "67108864");
        assert_eq!(cat("memory.high"), "0");
        assert_eq!(cat("cpu.max"), "50000 200000");
        let cgroup = format!("/{name}");
        let bytes = |limit: &str| {
            format!("nodewarden_cgroup_limit_bytes{{cgroup=\"{cgroup}\",limit=\"{limit}\"}}")
        };
        for limit in ["memory.max", "memory.low", "memory.high"] {
            let held: f64 = cat(limit).parse().expect("a byte count");
            agent.wait_for_sample(&bytes(limit), held, WAIT);
        }
        agent.wait_for_sample(
            &format!("nodewarden_cgroup_cpu_limit_cores{{cgroup=\"{cgroup}\"}}"),
            0.25,
            WAIT,
        );
        drop(cg);
        let (status, log) = agent.stop();
        assert!(status.success(), "agent exit {status}; log:\n{log}");
    }
}

/// 100,000 limit writes, each by a thread with a name of its own, and thousands of short-lived
/// processes with names of their own waiting on futexes, in two rounds: the writer and comm
/// labels keep their bound (the rest counted under `other`), `/metrics` stays under 8 MiB,
/// the agent's resident memory under 64 MiB, and the second round leaves it about where the
/// first one took it (what grows with input would show there).
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn names_chosen_by_processes_leave_the_metrics_bounded() {
    require_vm();
    let agent = Agent::start(&[]);
    std::thread::sleep(Duration::from_secs(5));
    let idle = rss_kib(&agent);
    let cg = TestCgroup::new("nw-names");
    let first = flood(&agent, &cg, 0);
    let after_first = rss_kib(&agent);
    let body = flood(&agent, &cg, 1);
    let after_second = rss_kib(&agent);

    let series = |prefix: &str| body.lines().filter(|l| l.starts_with(prefix)).count();
    let writers = series("nodewarden_cgroup_limit_writes_total{cgroup=\"/nw-names\"");
    let comms: std::collections::HashSet<&str> = body
        .lines()
        .filter(|l| l.starts_with("nodewarden_futex_waits_total{"))
        .filter_map(|l| l.split("comm=\"").nth(1)?.split('"').next())
        .collect();
    eprintln!(
        "2 x {WRITES} writers, 2 x {PROCESSES} processes: {writers} writer series, {} futex \
         comms, /metrics {} bytes ({} after the first round); agent RSS idle {idle} KiB, \
         {after_first} KiB after the first round, {after_second} KiB after the second; \
         folded: writer {}, comm {}",
        comms.len(),
        body.len(),
        first.len(),
        folded(&body, "writer"),
        folded(&body, "comm"),
    );
    assert!(writers <= 129, "{writers} writer series");
    assert!(
        folded(&body, "writer") > 0.0 && folded(&body, "comm") > 0.0,
        "nothing folded under other:\n{body}"
    );
    assert!(comms.len() <= 257, "{} futex comms", comms.len());
    assert!(body.len() < 8 << 20, "/metrics is {} bytes", body.len());
    assert!(after_second < 64 << 10, "agent RSS {after_second} KiB");
    assert!(
        after_second < after_first + (8 << 10),
        "the agent grew by {} KiB in the second round",
        after_second.saturating_sub(after_first)
    );
    drop(cg);
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// Limit writes of one round, each thread named afresh.
const WRITES: usize = 50_000;
/// Short-lived processes of one round.
const PROCESSES: usize = 2_500;

/// One round of writes and processes, every name new (`round` apart); returns the scrape once
/// every write of the cgroup is counted under its writer or as lost.
fn flood(agent: &Agent, cg: &TestCgroup, round: usize) -> String {
    let high = cg.path.join("memory.high");
    let writer = std::thread::spawn(move || {
        for i in 0..WRITES {
            set_comm(&format!("w{round}-{i:x}"));
            std::fs::write(&high, "max").expect("memory.high");
        }
    });
    assert_eq!(processes_with_names(round, PROCESSES), PROCESSES, "forks");
    writer.join().expect("writer");
    let lost = |body: &str| {
        common::sample(
            body,
            "nodewarden_events_lost_total{kind=\"limit_write\",reason=\"ring_full\"}",
        )
        .unwrap_or(0.0)
    };
    #[expect(clippy::cast_precision_loss, reason = "a count")]
    let expected = ((round + 1) * WRITES) as f64;
    let start = std::time::Instant::now();
    loop {
        let body = common::scrape(agent.metrics).expect("scrape");
        let counted: f64 = body
            .lines()
            .filter(|l| l.starts_with("nodewarden_cgroup_limit_writes_total{cgroup=\"/nw-names\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if counted + lost(&body) >= expected {
            // Two more reads of the contention maps (every 2 s) for the futex series.
            std::thread::sleep(Duration::from_secs(5));
            return common::scrape(agent.metrics).unwrap_or(body);
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{counted} writes counted, {} lost, of {expected}",
            lost(&body)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn folded(body: &str, label: &str) -> f64 {
    common::sample(
        body,
        &format!("nodewarden_label_values_folded_total{{label=\"{label}\"}}"),
    )
    .unwrap_or(0.0)
}

/// This thread's comm.
fn set_comm(name: &str) {
    let name = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes (longer is cut).
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// The agent's resident memory.
fn rss_kib(agent: &Agent) -> u64 {
    std::fs::read_to_string(format!("/proc/{}/status", agent.child.id()))
        .expect("agent status")
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .expect("VmRSS")
}

/// Forks `n` processes, one after another, each naming itself `p<i>` and waiting once on a
/// futex (a 1 µs timeout) before it exits; returns how many ran.
fn processes_with_names(round: usize, n: usize) -> usize {
    let mut ran = 0;
    for i in 0..n {
        let name = std::ffi::CString::new(format!("p{round}-{i:x}")).expect("no NUL");
        // SAFETY: the child calls only async-signal-safe functions (prctl, syscall, _exit).
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::prctl(libc::PR_SET_NAME, name.as_ptr());
                let word: u32 = 0;
                let timeout = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1000,
                };
                libc::syscall(
                    libc::SYS_futex,
                    &raw const word,
                    libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                    0u32,
                    &raw const timeout,
                );
                libc::_exit(0);
            },
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waits for the child just forked.
                unsafe { libc::waitpid(pid, &raw mut status, 0) };
                ran += 1;
            }
            _ => break,
        }
    }
    ran
}
