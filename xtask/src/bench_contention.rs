//! `cargo xtask bench`, contention part: throughput of contended-lock programs (C pthread mutex,
//! Go map + `RWMutex`) with the agent running in its default configuration against without, and
//! the cost the futex probes add to one futex call, all in one run, interleaved.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{programs, setup, vm};

const ROUNDS: usize = 5;

/// (what, program, arguments): each prints `ops=<n>`, or (futexbench) ns per call.
const CASES: [(&str, &str, &[&str]); 3] = [
    (
        "C pthread mutex, 8 threads, 2 s",
        "nw-mutex",
        &["-t", "8", "-d", "2"],
    ),
    (
        "Go map + sync.RWMutex, 64 goroutines, 2 s",
        "nw-go-rwmutex",
        &["-goroutines", "64", "-duration", "2s"],
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
    setup::step(
        &format!(
            "{ROUNDS} rounds of {} programs, without and with the agent",
            CASES.len()
        ),
        || {
            for _ in 0..ROUNDS {
                for (i, case) in CASES.iter().enumerate() {
                    without[i].push(measure(&dir, case)?);
                }
                let running = Running::start(agent)?;
                for (i, case) in CASES.iter().enumerate() {
                    with[i].push(measure(&dir, case)?);
                }
                running.stop();
            }
            Ok(())
        },
    )?;
    let mut md = String::from(
        "\n## Lock contention: what the agent costs contended programs\n\n\
         The agent runs with its default configuration (futex waits of every process, CPU\n\
         sampling at 49 Hz, Go fatal error probes); programs alternate without and with it.\n\
         Medians of 5 rounds.\n\n\
         | program | without | with | ratio |\n|---|---|---|---|\n",
    );
    for (i, (what, _, _)) in CASES.iter().enumerate() {
        let (a, b) = (median(&mut without[i]), median(&mut with[i]));
        if i == CASES.len() - 1 {
            let _ = writeln!(
                md,
                "| {what} | {a:.1} | {b:.1} | **{:.1} ns added per futex call** |",
                b - a
            );
        } else {
            let _ = writeln!(md, "| {what} (ops) | {a:.0} | {b:.0} | **{:.3}** |", b / a);
        }
    }
    md.push_str(
        "\nTarget: at least 0.97 of the throughput without the agent. The per-call figure is the\n\
         cheapest futex wait (the word had changed); it includes what any program on the two\n\
         syscall tracepoints costs on this kernel (see the limit-write table above for that\n\
         floor).\n",
    );
    Ok(md)
}

fn measure(dir: &Path, (_, program, args): &(&str, &str, &[&str])) -> Result<f64> {
    let out = setup::output(Command::new(dir.join(program)).args(*args))?;
    let value = out.trim().strip_prefix("ops=").unwrap_or(out.trim());
    value
        .parse()
        .with_context(|| format!("{program} printed {out:?}"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The agent, running until stopped.
struct Running {
    child: Child,
    socket: PathBuf,
}

impl Running {
    fn start(agent: &Path) -> Result<Self> {
        let port = 19_717;
        let socket = std::env::temp_dir().join("nodewarden-bench.sock");
        let child = Command::new(agent)
            .args(["run", "--metrics-listen", &format!("127.0.0.1:{port}")])
            .arg("--events-socket")
            .arg(&socket)
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
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("nodewarden_probe_info")
}
