//! Contention scenarios shared by the host and VM tests: real C and Go programs, measured by
//! the agent and, independently, by bpftrace on the same tracepoints.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{Agent, KillOnDrop};

/// Starts the agent with the default configuration, checks `capability` attached in `mode`,
/// runs `scenario` against it, and checks it then stops cleanly.
pub fn with_agent(capability: &str, mode: &str, scenario: impl FnOnce(&Agent)) {
    with_agent_config(None, capability, mode, scenario);
}

/// [`with_agent`] with `config` (TOML; the built-in configuration when `None`).
pub fn with_agent_config(
    config: Option<&str>,
    capability: &str,
    mode: &str,
    scenario: impl FnOnce(&Agent),
) {
    let agent = Agent::start_with(config, &[]);
    assert_eq!(agent.probe_mode(capability), mode, "log:\n{}", agent.log());
    scenario(&agent);
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// The futex probe mode the default configuration gets here: fexit on the kernel's futex wait
/// functions where fentry programs load (the x86-64 guests), the syscall tracepoints where they
/// do not (the development machine's kernel refuses them; arm64 6.1 has no fentry).
pub fn default_futex_mode() -> &'static str {
    if std::env::var_os("NODEWARDEN_IN_VM").is_some()
        && cfg!(target_arch = "x86_64")
        // 5.10's verifier refuses an fexit program's read of a pointer-to-integer argument
        // (`func 'futex_wait' arg0 type INT is not a struct`, seen on bullseye); 6.1's allows it.
        && super::kernel_version() > (5, 10)
    {
        "fexit"
    } else {
        "syscalls"
    }
}

/// A test program (`agent/tests/programs`), built for this architecture by
/// `cargo xtask test-programs` (which `cargo xtask test` runs first); its name is its comm.
pub fn program(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-programs")
        .join(std::env::consts::ARCH)
        .join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo xtask test-programs`",
        path.display()
    );
    path
}

/// bpftrace's log2 histogram of the woken futex waits of processes called `comm`, with the
/// count and the total, measured on the same hooks as the agent's `mode`: the syscall
/// tracepoints and wait operations, or (fexit) the kernel's plain wait function.
fn bpftrace_script(comm: &str, mode: &str) -> String {
    let (enter, exit, ret) = if mode == "fexit" {
        // `__futex_wait` since 6.7, which `futex_wait` calls.
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        let function = if kallsyms.contains(" __futex_wait\n") {
            "__futex_wait"
        } else {
            "futex_wait"
        };
        (
            format!("kfunc:{function} /comm == \"{comm}\"/"),
            format!("kretfunc:{function}"),
            "retval",
        )
    } else {
        (
            format!(
                "tracepoint:syscalls:sys_enter_futex /comm == \"{comm}\" && ((args->op & 127) == 0 || (args->op & 127) == 9 || (args->op & 127) == 6 || (args->op & 127) == 13 || (args->op & 127) == 11)/"
            ),
            "tracepoint:syscalls:sys_exit_futex".to_owned(),
            "args->ret",
        )
    };
    // Without kernel BTF (bpftrace 0.17 finds none on 5.10), the tracepoints' argument structs
    // it generates name types that nothing defines.
    let prelude = if mode != "fexit" && !bpftrace_has_btf() {
        "#define u32 unsigned int\n#define s64 long long\n#define u64 unsigned long long\n"
    } else {
        ""
    };
    format!(
        r#"{prelude}{enter} {{ @start[tid] = nsecs; }}
{exit} /@start[tid]/ {{ if ({ret} >= 0) {{ $d = nsecs - @start[tid]; @h = hist($d); @n = count(); @s = sum($d); }} delete(@start[tid]); }}
BEGIN {{ printf("ready\n"); }}
END {{ clear(@start); }}"#
    )
}

/// Whether bpftrace uses the kernel's BTF (`bpftrace --info`: `btf: yes`).
fn bpftrace_has_btf() -> bool {
    Command::new("bpftrace")
        .arg("--info")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .chain(String::from_utf8_lossy(&o.stderr).lines())
                .any(|l| l.trim() == "btf: yes")
        })
}

/// bpftrace's answer: bucket lower bound (ns) to count, the count and the sum (ns).
#[derive(Debug)]
struct Independent {
    buckets: BTreeMap<u64, u64>,
    count: u64,
    sum_ns: u64,
}

/// Parses bpftrace's printed maps (`@h:` histogram lines `[4K, 8K)  7 |@@ |`, `@n: 7`, `@s: 9`).
fn parse_bpftrace(out: &str) -> Independent {
    let size = |s: &str| -> u64 {
        let s = s.trim();
        let (n, mult) = match s.chars().last() {
            Some('K') => (&s[..s.len() - 1], 1 << 10),
            Some('M') => (&s[..s.len() - 1], 1 << 20),
            Some('G') => (&s[..s.len() - 1], 1 << 30),
            _ => (s, 1),
        };
        n.parse::<u64>().unwrap_or_else(|e| panic!("{s:?}: {e}")) * mult
    };
    let mut buckets = BTreeMap::new();
    for line in out.lines().filter(|l| l.starts_with('[')) {
        let (range, rest) = line.split_once(')').expect("bucket line");
        let lo = range.trim_start_matches('[').split(',').next().expect("lo");
        let count = rest.split_whitespace().next().expect("count");
        buckets.insert(size(lo), count.parse().expect("count"));
    }
    let scalar = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in bpftrace output:\n{out}"))
    };
    Independent {
        buckets,
        count: scalar("@n:"),
        sum_ns: scalar("@s:"),
    }
}

/// The agent's cumulative `le` buckets for `comm`, as per-bucket counts by lower bound (ns).
fn agent_buckets(body: &str, comm: &str) -> BTreeMap<u64, u64> {
    let prefix = format!("nodewarden_futex_wait_seconds_bucket{{comm=\"{comm}\"");
    let mut cumulative: Vec<(u64, u64)> = body
        .lines()
        .filter(|l| l.starts_with(&prefix) && !l.contains("+Inf"))
        .map(|l| {
            let le = l.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let le: f64 = le.expect("le").parse().expect("le number");
            let n = l.rsplit_once(' ').expect("value").1.parse().expect("count");
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "powers of two in ns"
            )]
            ((le * 1e9).round() as u64, n)
        })
        .collect();
    cumulative.sort_unstable();
    let mut out = BTreeMap::new();
    let mut below = 0;
    for (le, n) in cumulative {
        // The bucket [le/2, le); the first also holds everything shorter.
        out.insert(le / 2, n - below);
        below = n;
    }
    out
}

/// Reads bpftrace's output to its `ready` line: "Attaching N probes..." comes before the probes
/// are attached, BEGIN once they all are. Panics with bpftrace's errors if it ends first.
fn wait_until_ready(bpftrace: &mut std::process::Child, out: &mut impl BufRead) {
    let mut line = String::new();
    while line.trim() != "ready" {
        line.clear();
        if out.read_line(&mut line).expect("bpftrace output") == 0 {
            let mut err = String::new();
            if let Some(mut e) = bpftrace.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("bpftrace ended before it was ready: {err}");
        }
    }
}

/// A contended pthread mutex (8 threads, 3 s): the agent's histogram of woken waits agrees
/// within 10% with bpftrace's, measured at the same time on the same hooks.
pub fn futex_waits_agree_with_bpftrace(agent: &Agent) {
    let program = program("nw-mutex");
    let comm = "nw-mutex";
    let mut bpftrace = KillOnDrop(
        Command::new("bpftrace")
            .arg("-e")
            .arg(bpftrace_script(comm, &agent.probe_mode("futex_waits")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bpftrace (Debian package bpftrace)"),
    );
    let mut out = BufReader::new(bpftrace.0.stdout.take().expect("stdout"));
    wait_until_ready(&mut bpftrace.0, &mut out);
    // Both attached: the agent before it started serving, bpftrace now.
    let run = Command::new(&program)
        .args(["-t", "8", "-d", "3"])
        .output()
        .expect("run nw-mutex");
    assert!(run.status.success(), "{run:?}");
    let pid = libc::pid_t::try_from(bpftrace.0.id()).expect("pid");
    // SAFETY: kill(2) on our child: SIGINT makes bpftrace print its maps and exit.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).expect("bpftrace maps");
    let independent = parse_bpftrace(&text);
    assert!(
        independent.count > 100,
        "too few woken waits to compare: {independent:?}"
    );

    // The agent reads the kernel's aggregates every 2 s; wait for the exited program's final
    // count: near bpftrace's, and unchanged for longer than a read period.
    let count_series = format!("nodewarden_futex_wait_seconds_count{{comm=\"{comm}\"");
    let start = Instant::now();
    let mut last: Option<(u64, Instant)> = None;
    let body = loop {
        let body = super::scrape(agent.metrics).unwrap_or_default();
        let count = body
            .lines()
            .find(|l| l.starts_with(&count_series))
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok());
        if let Some(c) = count
            && last.is_none_or(|(n, _)| n != c)
        {
            last = Some((c, Instant::now()));
        }
        if let Some((c, since)) = last
            && c >= independent.count * 9 / 10
            && since.elapsed() > Duration::from_millis(2500)
        {
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "agent count {count:?}, bpftrace {independent:?}\n{body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let value = |prefix: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{body}"))
    };
    let within = |what: &str, agent: f64, other: f64| {
        assert!(
            (agent - other).abs() <= other * 0.10,
            "{what}: agent {agent}, bpftrace {other}"
        );
    };
    #[expect(clippy::cast_precision_loss, reason = "counts and ns far below 2^52")]
    {
        within("count", value(&count_series), independent.count as f64);
        within(
            "sum (s)",
            value(&format!(
                "nodewarden_futex_wait_seconds_sum{{comm=\"{comm}\""
            )),
            independent.sum_ns as f64 / 1e9,
        );
        // Bucket by bucket from 16 µs, where bpftrace has at least 2% of the waits. Below 16 µs
        // the two differ by the order of programs on the same hooks: the agent's ran first at
        // both ends, and its exit program is the longer, so bpftrace's waits are longer by that
        // much (under a µs) and some move up a bucket (seen: [4, 8) µs agent 80, bpftrace 63;
        // [8, 16) µs 131 and 150; same count, sums 0.03% apart).
        let ours = agent_buckets(&body, comm);
        eprintln!(
            "futex waits of {comm}: agent count {} sum {} s buckets {ours:?}; bpftrace {independent:?}",
            value(&count_series),
            value(&format!(
                "nodewarden_futex_wait_seconds_sum{{comm=\"{comm}\""
            ))
        );
        for (&lo, &n) in &independent.buckets {
            if n * 50 < independent.count || lo < 1 << 14 {
                continue;
            }
            let mine = ours.get(&lo).copied().unwrap_or(0);
            assert!(
                mine.abs_diff(n) <= n / 10 + 2,
                "bucket [{lo} ns, {} ns): agent {mine}, bpftrace {n}\nagent: {ours:?}\nbpftrace: {independent:?}",
                lo * 2
            );
        }
    }
}

/// The agent's value of the first sample starting with `prefix`, polled until `ok` holds.
fn wait_value(agent: &Agent, prefix: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        let body = super::scrape(agent.metrics).unwrap_or_default();
        let v = body
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit_once(' ')?.1.parse().ok());
        if let Some(v) = v
            && ok(v)
        {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{prefix}: {v:?}\n{body}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A program that times its own futex waits (200 rounds, each woken after ~1 ms): the agent
/// counts the same woken waits and the same total time, within 10%. Needs no other tool, so it
/// runs on every architecture.
pub fn futex_waits_match_the_programs_own_timing(agent: &Agent) {
    let out = Command::new(program("nw-pingpong"))
        .args(["-n", "200"])
        .output()
        .expect("run nw-pingpong");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
    };
    let (woken, sum_ns) = (field("woken="), field("sum_ns="));
    assert!(woken >= 190, "{text}");
    // Its own 200 waits, plus the few of pthread_join and the C library's start-up.
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let count = wait_value(
        agent,
        "nodewarden_futex_wait_seconds_count{comm=\"nw-pingpong\"",
        |c| c >= woken as f64,
    );
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let extra = count - woken as f64;
    assert!(
        (0.0..=5.0).contains(&extra),
        "agent {count}, program {woken}"
    );
    let sum = wait_value(
        agent,
        "nodewarden_futex_wait_seconds_sum{comm=\"nw-pingpong\"",
        |_| true,
    );
    #[expect(clippy::cast_precision_loss, reason = "ns far below 2^52")]
    let own = sum_ns as f64 / 1e9;
    eprintln!("nw-pingpong: agent {count} waits, {sum} s; program {woken} waits, {own} s");
    assert!(
        (sum - own).abs() <= own * 0.10,
        "sum: agent {sum} s, program {own} s"
    );
}

/// `nodewarden top` lists a contended program while it runs, with the symbolized stack of its
/// longest wait.
pub fn top_shows_the_contended_program(agent: &Agent) {
    let _running = KillOnDrop(
        Command::new(program("nw-mutex"))
            .args(["-t", "8", "-d", "6"])
            .stdout(Stdio::null())
            .spawn()
            .expect("run nw-mutex"),
    );
    let start = Instant::now();
    loop {
        let out = Command::new(super::NODEWARDEN)
            .args(["top", "--once", "--socket"])
            .arg(Agent::events_socket_for(agent.metrics))
            .output()
            .expect("nodewarden top");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A process row, then its word with a frame named by the symbolizer (the C library's
        // lock wait), not an address.
        let listed = text.lines().any(|l| l.contains(" nw-mutex "));
        let named = text
            .lines()
            .any(|l| l.trim_start().starts_with("__lll_lock_wait+"));
        if listed && named {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "top never showed nw-mutex with a named frame:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A contended pthread mutex: each futex word whose longest wait grows past the stack threshold
/// (1 ms by default) becomes a `futex.contention` span, exported over OTLP to a receiver in the
/// test, carrying the process and the symbolized stack of that wait.
pub fn contention_episode_becomes_a_span() {
    let receiver = super::otlp::Receiver::start();
    let endpoint = receiver.endpoint();
    let agent = Agent::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ]);
    assert_eq!(agent.probe_mode("futex_waits"), default_futex_mode());
    let running = KillOnDrop(
        Command::new(program("nw-mutex"))
            .args(["-t", "8", "-d", "8"])
            .stdout(Stdio::null())
            .spawn()
            .expect("run nw-mutex"),
    );
    let pid = running.0.id().to_string();
    let start = Instant::now();
    let span = loop {
        let found = receiver.spans().into_iter().find(|s| {
            s.name == "futex.contention" && s.attributes.get("process.pid") == Some(&pid)
        });
        if let Some(s) = found {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no futex.contention span for nw-mutex (pid {pid}); spans: {:?}; log:\n{}",
            receiver.spans(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(running);
    eprintln!("span: {span:?}");
    let a = &span.attributes;
    assert_eq!(a["process.command"], "nw-mutex");
    let number = |k: &str| {
        a[k].parse::<u64>()
            .unwrap_or_else(|e| panic!("{k}: {e}: {a:?}"))
    };
    assert!(number("futex.max_wait_ns") >= 1_000_000, "{a:?}");
    assert!(number("futex.waits") >= 1, "{a:?}");
    // The wait that set the maximum is among the waits since the last read.
    assert!(
        number("futex.wait_ns") >= number("futex.max_wait_ns"),
        "{a:?}"
    );
    assert!(a["futex.address"].starts_with("0x"), "{a:?}");
    assert!(
        a["code.stacktrace"]
            .lines()
            .next()
            .is_some_and(|f| f.starts_with("__lll_lock_wait")),
        "the wait's innermost frame is the C library's lock wait: {a:?}"
    );
    assert!(receiver.errors().is_empty(), "{:?}", receiver.errors());
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// Runs a test program until the agent has its CPU samples (at least 100) and its off-CPU
/// figures (watched at least 5 s); returns its entry of the contention snapshot's `cpu`.
fn contention_of(agent: &Agent, program_name: &str) -> serde_json::Value {
    let _running = KillOnDrop(
        Command::new(program(program_name))
            .args(["-goroutines", "64", "-duration", "60s"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run {program_name}: {e}")),
    );
    let start = Instant::now();
    loop {
        let body = super::feed_request(&Agent::events_socket_for(agent.metrics), "contention")
            .unwrap_or_default();
        let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let found = snapshot["cpu"].as_array().and_then(|cpu| {
            cpu.iter()
                .find(|p| {
                    p["comm"] == program_name
                        && p["samples"].as_u64() >= Some(100)
                        && p["off_cpu"]["watched_seconds"].as_f64() >= Some(5.0)
                })
                .cloned()
        });
        if let Some(p) = found {
            return p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(50),
            "no samples and off-CPU figures of {program_name}: {body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Three Go designs of a shared map hammered by 64 goroutines (25% writes), each run alone,
/// seen from outside (CPU samples and off-CPU time, no uprobes). The agent ranks them as the
/// designs predict: one `RWMutex` (every goroutine queues on it) above 64 mutex shards (rare
/// collisions) above `sync.Map` (no lock for existing keys). The `RWMutex` program's goroutines
/// park on the lock and its threads sleep: lost CPU, named with the worker's call site.
pub fn go_designs_ranked_by_contention(agent: &Agent) {
    let rwmutex = contention_of(agent, "nw-go-rwmutex");
    let sharded = contention_of(agent, "nw-go-sharded");
    let syncmap = contention_of(agent, "nw-go-syncmap");
    eprintln!("rwmutex: {rwmutex}\nsharded: {sharded}\nsyncmap: {syncmap}");
    let figure = |p: &serde_json::Value, k: &str| p[k].as_f64().unwrap_or(-1.0);
    let off = |p: &serde_json::Value| p["off_cpu"]["lock_share"].as_f64().unwrap_or(-1.0);
    assert!(
        rwmutex["lock_call_site"]
            .as_str()
            .is_some_and(|s| s.starts_with("main.main.func")),
        "the hot call site on CPU is the worker: {rwmutex}"
    );
    assert!(figure(&syncmap, "map_share") > 0.5, "{syncmap}");
    if cfg!(target_arch = "aarch64") {
        // Debian's Go (1.19) on arm64 restarts the frame pointer chain on the scheduler's
        // stack in mcall and systemstack, so neither a sleeping thread's stack nor its waker's
        // reaches the goroutine that parked on the lock: lost CPU cannot be tied to a lock.
        // Without it the on-CPU shares alone do not separate RWMutex from sharded.
        super::skip_notice(
            "off-CPU lock attribution and the RWMutex-over-sharded ranking (aarch64)",
            "Go 1.19's arm64 scheduler restarts the frame pointer chain, so no stack reaches \
             the goroutine parked on the lock",
        );
        assert!(
            figure(&syncmap, "contention") < figure(&rwmutex, "contention")
                && figure(&syncmap, "contention") < figure(&sharded, "contention"),
            "sync.Map is the least contended: {syncmap}"
        );
        return;
    }
    assert!(
        figure(&rwmutex, "contention") > figure(&sharded, "contention")
            && figure(&sharded, "contention") > figure(&syncmap, "contention"),
        "ranking by contention: rwmutex {} > sharded {} > syncmap {}",
        figure(&rwmutex, "contention"),
        figure(&sharded, "contention"),
        figure(&syncmap, "contention")
    );
    // The RWMutex design's difference is lost CPU: its threads sleep blocked on the lock. A
    // window of 5 s can catch the host stalling the vCPU of a thread that holds one shard's
    // lock, and every goroutine piles up behind it (seen once in CI: sharded at 0.27 where it
    // measures about 0.04): then sharded is measured once more and the lower share kept.
    let mut sharded_off = off(&sharded);
    if off(&rwmutex) <= 2.0 * sharded_off {
        let again = contention_of(agent, "nw-go-sharded");
        eprintln!("sharded, measured again: {again}");
        sharded_off = sharded_off.min(off(&again));
    }
    assert!(
        off(&rwmutex) > 0.1 && off(&rwmutex) > 2.0 * sharded_off,
        "off-CPU lock share: rwmutex {} against sharded {sharded_off}",
        off(&rwmutex),
    );
    assert!(
        rwmutex["off_cpu"]["lock_call_site"]
            .as_str()
            .is_some_and(|s| s.starts_with("main.main.func")),
        "the hot call site off CPU is the worker: {rwmutex}"
    );
}

/// `nodewarden diagnose-locks` on the map + `RWMutex` program: for the seconds asked, uprobes
/// on Go's lock slow paths count entries by call site (the worker), and the report shows what
/// they cost, measured; the program outlives them.
pub fn diagnose_locks_names_the_call_site() {
    let mut running = KillOnDrop(
        Command::new(program("nw-go-rwmutex"))
            .args(["-goroutines", "64", "-duration", "30s"])
            .stdout(Stdio::null())
            .spawn()
            .expect("run nw-go-rwmutex"),
    );
    std::thread::sleep(Duration::from_secs(1));
    let pid = running.0.id().to_string();
    let out = Command::new(super::NODEWARDEN)
        .args(["diagnose-locks", "--pid", &pid, "--seconds", "3"])
        .output()
        .expect("nodewarden diagnose-locks");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    let entries: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("lock slow-path entries: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(entries > 0, "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("sync.") && l.trim_end().ends_with("main.main.func1")),
        "a slow path called from the worker: {text}"
    );
    let per_entry: f64 = text
        .split("cost: ")
        .nth(1)
        .and_then(|c| c.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    assert!(per_entry > 0.0, "the cost of an entry is measured: {text}");
    assert!(
        running.0.try_wait().expect("try_wait").is_none(),
        "the program survives the probes"
    );
    // A second run is refused past the time box, and for a process that is not Go.
    let long = Command::new(super::NODEWARDEN)
        .args(["diagnose-locks", "--pid", &pid, "--seconds", "61"])
        .output()
        .expect("nodewarden diagnose-locks");
    assert!(!long.status.success());
    assert!(String::from_utf8_lossy(&long.stderr).contains("between 1 and 60"));
}

/// `select = ["map-heavy"]`: the agent measures the futex waits of the processes its samples
/// show heavy in the Go map runtime (the `sync.Map` program), not of a contended C program
/// running beside it, and watches the selected one off CPU.
pub fn map_heavy_processes_are_selected() {
    let agent = Agent::start_with(
        Some(
            "mode = \"observe\"\nshutdown_drain_ms = 2000\n[metrics]\nlisten = \"127.0.0.1:9717\"\n\
             [contention]\nselect = [\"map-heavy\"]\n",
        ),
        &[],
    );
    let syncmap = KillOnDrop(
        Command::new(program("nw-go-syncmap"))
            .args(["-goroutines", "64", "-duration", "60s"])
            .stdout(Stdio::null())
            .spawn()
            .expect("run nw-go-syncmap"),
    );
    let mutex = KillOnDrop(
        Command::new(program("nw-mutex"))
            .args(["-t", "4", "-d", "60"])
            .stdout(Stdio::null())
            .spawn()
            .expect("run nw-mutex"),
    );
    let (go, c) = (u64::from(syncmap.0.id()), u64::from(mutex.0.id()));
    let start = Instant::now();
    let snapshot = loop {
        let body = super::feed_request(&Agent::events_socket_for(agent.metrics), "contention")
            .unwrap_or_default();
        let snapshot: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let has = |list: &str, pid: u64, extra: &dyn Fn(&serde_json::Value) -> bool| {
            snapshot[list]
                .as_array()
                .is_some_and(|l| l.iter().any(|p| p["pid"] == pid && extra(p)))
        };
        // Both sampled; the Go one selected: its futex waits measured, and watched off CPU.
        if has("processes", go, &|_| true)
            && has("cpu", go, &|p| !p["off_cpu"].is_null())
            && has("cpu", c, &|p| p["samples"].as_u64() >= Some(100))
        {
            break snapshot;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "nw-go-syncmap not selected as map-heavy: {body}\nlog:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let processes = snapshot["processes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !processes.iter().any(|p| p["pid"] == c),
        "the C program is not map-heavy, so its futex waits are not measured: {snapshot}"
    );
    let cpu = snapshot["cpu"].as_array().cloned().unwrap_or_default();
    let c_cpu = cpu
        .iter()
        .find(|p| p["pid"] == c)
        .cloned()
        .unwrap_or_default();
    assert!(c_cpu["map_share"].as_f64() < Some(0.05), "{c_cpu}");
    drop((syncmap, mutex));
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// A Go program with unsynchronized map writes: the agent reports its fatal error, with the
/// reason and the process. The race sometimes corrupts the map before the runtime's check
/// sees two writers (`fatal error: bad map state`, a `throw`): such a run is not the crash
/// under test, and the program runs again (three times at most).
pub fn go_crash_is_reported(agent: &Agent) {
    let mut attempts = 0;
    let pid = loop {
        attempts += 1;
        let (pid, status, stderr) = go_crash_once(agent);
        if stderr.contains("fatal error: concurrent map writes") {
            assert_eq!(status.code(), Some(2), "{stderr}");
            break pid;
        }
        assert!(
            attempts < 3 && status.code() == Some(2) && stderr.contains("fatal error: "),
            "attempt {attempts}: {status}\n{stderr}"
        );
        eprintln!(
            "nw-go-crash died of another map fault, running it again: {}",
            stderr.lines().next().unwrap_or_default()
        );
    };
    let start = Instant::now();
    while !agent.log().lines().any(|l| {
        l.contains("Go fatal error")
            && l.contains(&format!("pid={pid} "))
            && l.contains("comm=nw-go-crash")
            && l.contains("reason=concurrent map writes")
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no fatal error event for pid {pid}; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = super::scrape(agent.metrics).unwrap_or_default();
    let counted = body.lines().any(|l| {
        l.starts_with("nodewarden_go_fatal_errors_total{")
            && l.contains("reason=\"concurrent map writes\"")
            && l.ends_with(" 1")
    });
    assert!(counted, "{body}");
}

/// Runs `nw-go-crash` once its probes are attached: its pid, exit status and stderr.
fn go_crash_once(agent: &Agent) -> (u32, std::process::ExitStatus, String) {
    let mut child = KillOnDrop(
        Command::new(program("nw-go-crash"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nw-go-crash"),
    );
    let mut out = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut ready = String::new();
    out.read_line(&mut ready).expect("ready");
    assert_eq!(ready.trim(), "ready");
    // The agent saw the exec and attached its probes to the program's file.
    let start = Instant::now();
    while !agent
        .log()
        .lines()
        .any(|l| l.contains("Go fatal error probes attached") && l.contains("nw-go-crash"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no probes attached to nw-go-crash; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::io::Write::write_all(child.0.stdin.as_mut().expect("stdin"), b"go\n").expect("go");
    let status = child.0.wait().expect("wait");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    (child.0.id(), status, stderr)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_bpftrace_maps() {
        let out = "@h: \n[2K, 4K)               3 |@@@@     |\n[4K, 8K)              10 |@@@@@@@@@|\n[1M, 2M)               1 |         |\n\n@n: 14\n\n@s: 1234567\n";
        let p = super::parse_bpftrace(out);
        assert_eq!(p.count, 14);
        assert_eq!(p.sum_ns, 1_234_567);
        assert_eq!(p.buckets[&2048], 3);
        assert_eq!(p.buckets[&4096], 10);
        assert_eq!(p.buckets[&(1 << 20)], 1);
    }
}
