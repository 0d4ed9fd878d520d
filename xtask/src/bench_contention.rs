//! `cargo xtask bench`, contention part: throughput of contended-lock programs (C pthread mutex,
//! the three Go shared-map designs) with the agent running in its default configuration against
//! without, and the cost the futex probes add to one futex call, all in one run, interleaved.
//! The programs warm up before they count, long enough for the agent to pick them out by their
//! CPU samples and watch them off CPU: what is measured is the cost of being watched.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{bench::median, programs, setup, vm};

const ROUNDS: usize = 7;

/// Seconds a program runs before it counts (the agent's readers look every 2 s and watch a
/// process off CPU once it has a second of samples).
const WARM_UP_S: u64 = 5;

/// (what, program, arguments): each prints `ops=<n>`, or (futexbench) ns per call.
const CASES: [(&str, &str, &[&str]); 5] = [
    (
        "C pthread mutex, 8 threads, 2 s",
        "nw-mutex",
        &["-t", "8", "-w", "5", "-d", "2"],
    ),
    (
        "Go map + sync.RWMutex, 64 goroutines, 2 s",
        "nw-go-rwmutex",
        &["-goroutines", "64", "-warmup", "5s", "-duration", "2s"],
    ),
    (
        "Go sharded map (64 mutexes), 64 goroutines, 2 s",
        "nw-go-sharded",
        &["-goroutines", "64", "-warmup", "5s", "-duration", "2s"],
    ),
    (
        "Go sync.Map, 64 goroutines, 2 s",
        "nw-go-syncmap",
        &["-goroutines", "64", "-warmup", "5s", "-duration", "2s"],
    ),
    (
        "futex(FUTEX_WAIT) returning EAGAIN, ns per call",
        "nw-futexbench",
        &["-n", "2000000"],
    ),
];

/// Measures and returns the markdown section.
pub fn run(agent: &Path) -> Result<String> {
    programs::build()?;
    let dir = vm::workspace_root()
        .join("target/test-programs")
        .join(std::env::consts::ARCH);
    let mut without: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    let mut with: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    // Rounds in which the agent watched the program off CPU once it had warmed up.
    let mut watched = vec![0; CASES.len()];
    // Sleeps per second of each program, without the agent.
    let mut sleeps: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    // CPU seconds, with the agent: the program's, the agent process's, the eBPF programs'.
    let mut cpu: Vec<Vec<Cpu>> = vec![Vec::new(); CASES.len()];
    setup::step(
        &format!(
            "{ROUNDS} rounds of {} programs, without and with the agent",
            CASES.len()
        ),
        || {
            // Each run with the agent right after its run without: this machine's speed drifts
            // by tens of percent over tens of seconds, so only adjacent runs compare.
            for _ in 0..ROUNDS {
                for (i, case) in CASES.iter().enumerate() {
                    let alone = measure(&dir, case, None)?;
                    without[i].push(alone.value);
                    sleeps[i].push(alone.sleeps_per_s);
                    let (beside, cost) = measure_with_agent(agent, &dir, case)?;
                    cpu[i].push(cost);
                    with[i].push(beside.value);
                    watched[i] += usize::from(beside.watched);
                }
            }
            Ok(())
        },
    )?;
    let mut md = String::from(
        "\n## Lock contention: what the agent costs contended programs\n\n\
         The agent runs with its default configuration (futex waits of every process, CPU\n\
         sampling at 49 Hz, off-CPU time with stacks of the processes the samples pick out, Go\n\
         fatal error probes). Each run with the agent follows a run without it, and the ratio\n\
         is taken per such pair: the machine's own speed drifts by tens of percent within a\n\
         minute. Each program warms up for 5 s before it counts, so that the agent watches it\n\
         off CPU while it counts (the last column says in how many rounds it did). Medians of 7\n\
         rounds, with the range of the pairs' ratios.\n\n\
         | program | without | with | ratio (median of pairs) | pairs' range | watched off CPU |\n\
         |---|---|---|---|---|---|\n",
    );
    for (i, (what, _, _)) in CASES.iter().enumerate() {
        let mut ratios: Vec<f64> = without[i]
            .iter()
            .zip(&with[i])
            .map(|(a, b)| b / a)
            .collect();
        let mut added: Vec<f64> = without[i]
            .iter()
            .zip(&with[i])
            .map(|(a, b)| b - a)
            .collect();
        let (a, b) = (median(&mut without[i]), median(&mut with[i]));
        if i == CASES.len() - 1 {
            let _ = writeln!(
                md,
                "| {what} | {a:.1} | {b:.1} | **{:.1} ns added per futex call** | {:.1} to {:.1} | - |",
                median(&mut added),
                added[0],
                added[added.len() - 1]
            );
        } else {
            let _ = writeln!(
                md,
                "| {what} (ops) | {a:.0} | {b:.0} | **{:.3}** | {:.3} to {:.3} | {} of {ROUNDS} |",
                median(&mut ratios),
                ratios[0],
                ratios[ratios.len() - 1],
                watched[i]
            );
        }
    }
    md.push_str(
        "\nTarget: at least 0.97 of the throughput without the agent. The per-call figure is the\n\
         cheapest futex wait (the word had changed); it includes what any program on the two\n\
         syscall tracepoints costs on this kernel (see the limit-write table above for that\n\
         floor).\n",
    );
    cpu_table(&mut cpu, &mut md);
    let per_sleep = switch_costs(agent, &dir, &mut md)?;
    // What watching costs each program: its sleeps per second (measured without the agent)
    // times the cost of a watched sleep, over the machine's CPUs: a bound free of the drift.
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let _ = writeln!(
        md,
        "\nFrom these, what being watched costs each program above: its sleeps per second\n\
         (voluntary context switches, measured in its runs without the agent) times the added\n\
         ns of a watched sleep, as a share of the machine's {cpus} CPUs. This bound does not\n\
         drift with the machine, unlike the throughput ratios.\n\n\
         | program | sleeps per second | CPU share spent watching it |\n|---|---|---|"
    );
    for (i, (what, _, _)) in CASES.iter().enumerate().take(CASES.len() - 1) {
        let rate = median(&mut sleeps[i]);
        #[expect(clippy::cast_precision_loss, reason = "a CPU count")]
        let share = rate * per_sleep / 1e9 / cpus as f64;
        let _ = writeln!(md, "| {what} | {rate:.0} | {:.2}% |", share * 100.0);
    }
    Ok(md)
}

/// The table of CPU seconds of the runs with the agent: the program's, the agent's and its eBPF
/// programs', and their ratio.
fn cpu_table(cpu: &mut [Vec<Cpu>], md: &mut String) {
    md.push_str(
        "\nThe same runs, in CPU time rather than throughput (which drifts with the machine): the\n\
         program's own (user and system, from wait4), the agent process's (its\n\
         `process_cpu_seconds_total`) and the kernel's count of the time every eBPF program of the\n\
         agent ran (`nodewarden_bpf_program_run_seconds_total`; that time is spent in the\n\
         programs' own context, on every process of the machine), over each whole run (warm-up\n\
         included). Medians of the rounds.\n\n\
         | program | program CPU s | agent CPU s | eBPF run time s | (agent + eBPF) / program |\n\
         |---|---|---|---|---|\n",
    );
    for (i, (what, _, _)) in CASES.iter().enumerate() {
        let pick = |f: fn(&Cpu) -> f64| median(&mut cpu[i].iter().map(f).collect::<Vec<_>>());
        let mut shares: Vec<f64> = cpu[i]
            .iter()
            .map(|c| (c.agent + c.ebpf) / c.program)
            .collect();
        let _ = writeln!(
            md,
            "| {what} | {:.2} | {:.3} | {:.3} | **{:.2}%** |",
            pick(|c| c.program),
            pick(|c| c.agent),
            pick(|c| c.ebpf),
            median(&mut shares) * 100.0
        );
    }
}

/// Agent configurations for the context-switch costs: only the off-CPU probe differs.
const SWITCH_CONFIGS: [(&str, &str); 3] = [
    ("the agent without the off-CPU probe", "off_cpu = false\n"),
    ("the off-CPU probe attached, the process not watched", ""),
    (
        "the process watched off CPU",
        "select = [\"comm:nw-switchbench\"]\n",
    ),
];

/// Measures what the off-CPU probe adds to a context switch, unwatched and watched, writes the
/// table, and returns the ns a watched sleep adds.
fn switch_costs(agent: &Path, dir: &Path, md: &mut String) -> Result<f64> {
    let case: (&str, &str, &[&str]) = ("", "nw-switchbench", &["-w", "5", "-d", "3"]);
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); SWITCH_CONFIGS.len()];
    setup::step(
        &format!("{ROUNDS} rounds of nw-switchbench under 3 agent configurations"),
        || {
            for _ in 0..ROUNDS {
                for (i, (_, extra)) in SWITCH_CONFIGS.iter().enumerate() {
                    let config = format!(
                        "mode = \"observe\"\nshutdown_drain_ms = 2000\n[metrics]\n\
                         listen = \"127.0.0.1:{PORT}\"\n[contention]\nfutex_waits = false\n\
                         sample_hz = 0\n{extra}"
                    );
                    let running = Running::start(agent, Some(&config))?;
                    let m = measure(dir, &case, Some(PORT))?;
                    running.stop();
                    if i == 2 && !m.watched {
                        bail!("the agent did not watch nw-switchbench off CPU");
                    }
                    ns[i].push(m.value);
                }
            }
            Ok(())
        },
    )?;
    let _ = writeln!(
        md,
        "\n## Off-CPU time: what a context switch costs\n\n\
         The off-CPU probe runs at every context switch of the node. `nw-switchbench`: two\n\
         threads pinned to one CPU hand a futex word back and forth, each handoff one thread\n\
         going to sleep and one switch. The agent runs with futex waits and sampling off, so\n\
         only the off-CPU probe differs. Medians of {ROUNDS} rounds.\n\n\
         | agent | ns per handoff | added ns |\n|---|---|---|"
    );
    let base = median(&mut ns[0]);
    let mut added = Vec::new();
    for (i, (what, _)) in SWITCH_CONFIGS.iter().enumerate() {
        let v = median(&mut ns[i]);
        added.push(v - base);
        let _ = writeln!(
            md,
            "| {what} | {v:.1} | {} |",
            if i == 0 {
                String::new()
            } else {
                format!("{:.1}", v - base)
            }
        );
    }
    Ok(added[2])
}

/// CPU seconds of one run with the agent.
#[derive(Clone, Copy)]
struct Cpu {
    /// The program's user and system time.
    program: f64,
    /// The agent process's.
    agent: f64,
    /// The time the agent's eBPF programs ran, in whatever context.
    ebpf: f64,
}

/// Runs a program beside the agent (its default configuration, with the kernel's per-program
/// statistics on for the eBPF column: `auto` leaves them off where probes are on syscall
/// tracepoints), and the CPU seconds the run cost.
fn measure_with_agent(
    agent: &Path,
    dir: &Path,
    case: &(&str, &str, &[&str]),
) -> Result<(Measured, Cpu)> {
    let running = Running::start(agent, Some("[metrics]\nbpf_stats = \"on\"\n"))?;
    let before = agent_cost(PORT)?;
    let beside = measure(dir, case, Some(PORT))?;
    let after = agent_cost(PORT)?;
    running.stop();
    let cost = Cpu {
        program: beside.cpu_s,
        agent: after.0 - before.0,
        ebpf: after.1 - before.1,
    };
    Ok((beside, cost))
}

/// The agent's CPU seconds and its eBPF programs' total run time so far, from its metrics.
fn agent_cost(port: u16) -> Result<(f64, f64)> {
    let body = metrics(port).context("scraping the agent")?;
    let value = |l: &str| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok());
    let process = body
        .lines()
        .find(|l| l.starts_with("process_cpu_seconds_total "))
        .and_then(value)
        .context("no process_cpu_seconds_total")?;
    let ebpf = body
        .lines()
        .filter(|l| l.starts_with("nodewarden_bpf_program_run_seconds_total{"))
        .filter_map(value)
        .sum();
    Ok((process, ebpf))
}

/// What one run of a program gave.
struct Measured {
    /// What it printed.
    value: f64,
    /// Whether the agent was watching it off CPU once its warm-up was over.
    watched: bool,
    /// Its voluntary context switches (sleeps) per second.
    sleeps_per_s: f64,
    /// Its user and system CPU seconds.
    cpu_s: f64,
}

/// Runs a program; `agent_port` when the agent runs.
fn measure(
    dir: &Path,
    (_, program, args): &(&str, &str, &[&str]),
    agent_port: Option<u16>,
) -> Result<Measured> {
    let start = Instant::now();
    let mut child = Command::new(dir.join(program))
        .args(*args)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let mut seen = false;
    if agent_port.is_some() && (args.contains(&"-w") || args.contains(&"-warmup")) {
        std::thread::sleep(Duration::from_secs(WARM_UP_S) + Duration::from_millis(500));
        seen = watched_off_cpu(child.id());
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .context("stdout")?
        .read_to_string(&mut out)?;
    // wait4, for the child's context switches.
    let mut status = 0;
    // SAFETY: rusage is plain data the kernel fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: our own child, valid pointers.
    if unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) } != pid {
        return Err(std::io::Error::last_os_error()).context("wait4");
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{program} exited with wait status {status}");
    }
    let value = out.trim().strip_prefix("ops=").unwrap_or(out.trim());
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    Ok(Measured {
        value: value
            .parse()
            .with_context(|| format!("{program} printed {out:?}"))?,
        watched: seen,
        sleeps_per_s: usage.ru_nvcsw as f64 / start.elapsed().as_secs_f64(),
        cpu_s: [usage.ru_utime, usage.ru_stime]
            .iter()
            .map(|t| t.tv_sec as f64 + t.tv_usec as f64 / 1e6)
            .sum(),
    })
}

/// Whether the agent's contention snapshot (asked for on its root-only socket) has off-CPU
/// figures for `pid`.
fn watched_off_cpu(pid: u32) -> bool {
    let Ok(mut s) = UnixStream::connect(socket()) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"contention\n");
    // One JSON line.
    let mut body = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut body);
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["cpu"].as_array().map(|cpu| {
                cpu.iter()
                    .any(|p| p["pid"] == pid && !p["off_cpu"].is_null())
            })
        })
        .unwrap_or(false)
}

/// The agent's socket in the benchmark.
fn socket() -> PathBuf {
    std::env::temp_dir().join("nodewarden-bench.sock")
}

/// The agent's metrics port in the benchmark.
const PORT: u16 = 19_717;

/// The agent, running until stopped.
struct Running {
    child: Child,
    socket: PathBuf,
}

impl Running {
    /// Starts the agent with `config` (TOML text), or its default configuration.
    fn start(agent: &Path, config: Option<&str>) -> Result<Self> {
        let port = PORT;
        let socket = socket();
        let mut cmd = Command::new(agent);
        cmd.args(["run", "--metrics-listen", &format!("127.0.0.1:{port}")])
            .arg("--events-socket")
            .arg(&socket);
        if let Some(text) = config {
            let path = std::env::temp_dir().join("nodewarden-bench.toml");
            std::fs::write(&path, text)?;
            cmd.arg("--config").arg(path);
        }
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the agent")?;
        let start = Instant::now();
        while !serving(port) {
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the agent did not serve metrics within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(Self { child, socket })
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(
                libc::pid_t::try_from(self.child.id()).unwrap_or(0),
                libc::SIGTERM,
            );
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Whether the agent answers on /metrics with its probes attached.
fn serving(port: u16) -> bool {
    metrics(port).is_ok_and(|body| body.contains("nodewarden_probe_info"))
}

/// The agent's /metrics response.
fn metrics(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}
