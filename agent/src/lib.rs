//! nodewarden: the node agent. This file is wiring only: the command line, and which module
//! runs each command. The data flows one way through the modules: `kernel` (probes, decode) ->
//! `enrich` -> `pipeline` (with `state`) -> `outputs`; `contention` is a sub-pipeline of its
//! own; `daemon` wires them; `cli` holds the other commands; `model` the plain types they pass.

mod cli;
mod config;
mod contention;
mod daemon;
mod enrich;
mod executor;
pub mod fuzz;
mod kernel;
mod model;
mod outputs;
mod pipeline;
mod rules;
mod state;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

use crate::{
    cli::{
        bench, burst_bench, check, desired, diagnose, events, guard_bench, idle_bench, latency,
        restore_bench, syscall_bench, top,
    },
    config::Config,
    model::{pattern::Pattern, record::RecordKind},
    outputs::{logs, traces::Traces},
};

/// Exit status for a configuration that does not parse or validate (sysexits `EX_CONFIG`).
const EXIT_BAD_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "nodewarden",
    version,
    about = "Node agent: cgroup limit writes, OOM kills, lock contention"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        /// Configuration file (TOML); the embedded default when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override `metrics.listen`.
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Override `events_socket`.
        #[arg(long)]
        events_socket: Option<PathBuf>,
    },
    /// Stream the running agent's events: limit writes, OOM kills, cgroup changes.
    Events {
        /// Print JSON lines instead of one readable line per event.
        #[arg(long)]
        json: bool,
        /// Only cgroups whose path matches this glob (`*`, `?`, `[..]`), e.g. '/kubepods*'.
        #[arg(long, value_parser = parse_glob)]
        cgroup: Option<Pattern>,
        /// Only these kinds (repeatable).
        #[arg(long, value_enum)]
        kind: Vec<RecordKind>,
        /// The agent's event socket.
        #[arg(long, default_value = config::DEFAULT_EVENTS_SOCKET)]
        socket: PathBuf,
    },
    /// Show the most contended processes and their hottest futex words with stacks, refreshed.
    Top {
        /// The agent's event socket (root-only: it serves every process's stacks).
        #[arg(long, default_value = config::DEFAULT_EVENTS_SOCKET)]
        socket: PathBuf,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2)]
        interval: u64,
        /// Print once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Count a Go process's lock slow-path entries by call site with uprobes, for a few
    /// seconds, and show what the probes cost it (they slow contended locks: never left on).
    DiagnoseLocks {
        /// The process.
        #[arg(long)]
        pid: u32,
        /// How long, at most 60.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Report which probes this kernel allows, in which mode, and why not.
    Check {
        /// Configuration file (TOML), for its probe choices; the embedded default when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Time write(2) to /dev/null with nothing, empty programs, or the syscalls-mode probe
    /// attached (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchWrite {
        #[arg(long, value_enum)]
        attached: bench::Attached,
        #[arg(long, default_value_t = 2_000_000)]
        iterations: u64,
        /// Files the writing process holds open besides stdio and /dev/null (over 61 moves
        /// its fds out of the table a process starts with).
        #[arg(long, default_value_t = 0)]
        open_files: u32,
        /// Run the loop in this process (the loader spawns itself with this).
        #[arg(long)]
        loop_only: bool,
    },
    /// Time open(2)+close(2) of a file with nothing, an empty LSM program, or the guard on
    /// `file_open` (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchOpen {
        /// A regular file to open (the caller puts it on a tmpfs).
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 200_000)]
        iterations: u64,
        /// Rounds of the three configurations, interleaved.
        #[arg(long, default_value_t = 9)]
        rounds: usize,
        /// Made-up protected files put in the guard's map, so that it is not empty.
        #[arg(long, default_value_t = 1000)]
        protected: u32,
    },
    /// Time limit writes from their return to their record on a running agent's event feed,
    /// with and without an exec storm (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchLatency {
        /// The agent's event socket.
        #[arg(long)]
        socket: PathBuf,
        /// A cgroup directory to write `memory.high` of.
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long, default_value_t = 500)]
        writes: u32,
        /// Execs of /bin/true per second meanwhile (0: none).
        #[arg(long, default_value_t = 0)]
        exec_rate: u32,
    },
    /// Time bad memory.max writes from their return until the desired value is back, polling
    /// the files (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchRestore {
        /// The directory holding the cgroups.
        #[arg(long)]
        root: PathBuf,
        /// Their names' common start.
        #[arg(long)]
        prefix: String,
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// The bad value written, and the value waited for.
        #[arg(long)]
        bad: String,
        #[arg(long)]
        good: String,
        /// The agent's event socket, for its own figures.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Waits before each bad write, spread over [0, N) ms (for a periodic restorer).
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
    },
    /// Time `getppid()`, write(2) to /dev/null and pwrite(2) to a file with no agent and with
    /// the agent in each of several configurations, in interleaved rounds (used by `cargo
    /// xtask bench`).
    #[command(hide = true)]
    BenchSyscalls {
        #[arg(long, default_value_t = 15)]
        rounds: usize,
        /// Calls of each syscall per measurement.
        #[arg(long, default_value_t = 100_000)]
        calls: u64,
        /// The regular file written (created, then removed).
        #[arg(long)]
        file: PathBuf,
        /// Where the agents' configurations, logs and sockets go.
        #[arg(long)]
        dir: PathBuf,
        /// Pause after each agent start and stop, in ms.
        #[arg(long, default_value_t = 500)]
        settle_ms: u64,
    },
    /// The idle agent's CPU, memory and /metrics by the number of cgroups on the node, in the
    /// kernel lab's VM (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchIdle {
        /// Cgroup counts, in increasing order.
        #[arg(long, value_delimiter = ',', default_values_t = [0, 1000, 10_000])]
        counts: Vec<usize>,
        /// The cgroup the test cgroups are made in (created, removed at the end).
        #[arg(long)]
        parent: PathBuf,
        #[arg(long, default_value_t = 30)]
        idle_seconds: u64,
        #[arg(long, default_value_t = 9)]
        scrapes: usize,
        /// The configuration profile the agent runs with.
        #[arg(long, value_enum, default_value = "default")]
        profile: config::Profile,
        /// Another build's `nodewarden`, measured before this one with each count.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Where the agent's configuration, log and socket go.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Limit writes at a fixed rate against the agent: reported, lost, its CPU, in the kernel
    /// lab's VM (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchBurst {
        #[arg(long, default_value_t = 10_000)]
        rate: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Cgroups written in turn.
        #[arg(long, default_value_t = 4)]
        cgroups: usize,
        /// The cgroup they are made in (created, removed at the end).
        #[arg(long)]
        parent: PathBuf,
        /// Where the agent's configuration, log and socket go.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Every watched limit, its desired value and where that value comes from (the running
    /// agent's state file, `remediation.state_file`).
    Desired {
        /// Configuration file (TOML), for the state file's path; the embedded default when
        /// absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only cgroups whose path matches this glob (`*` matches across `/`).
        #[arg(long, value_parser = parse_glob)]
        cgroup: Option<Pattern>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Rules files: validate one, or print their JSON Schema.
    Rules {
        #[command(subcommand)]
        cmd: RulesCmd,
    },
    /// Validate a configuration file and print it as understood.
    CheckConfig {
        /// Configuration file (TOML); the embedded default when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCmd {
    /// Check a rules file whole: every problem, with its line and column.
    Validate {
        /// The rules file (TOML).
        file: PathBuf,
    },
    /// Print the JSON Schema of rules files.
    Schema,
}

fn parse_glob(s: &str) -> Result<Pattern, String> {
    Pattern::new(s).map_err(|e| e.to_string())
}

/// The `nodewarden` command (`main.rs` only calls this). The agent is a library so that the
/// fuzz targets (`fuzz/`) reach its parsers and decoders through [`fuzz`], every other module
/// staying private.
#[expect(clippy::too_many_lines, reason = "one arm per command")]
#[must_use]
pub fn main() -> ExitCode {
    logs::init();
    let cmd = Cli::parse().cmd;
    if cmd.prints_for_a_reader() {
        end_quietly_when_the_reader_goes();
    }
    match cmd {
        Cmd::Run {
            config,
            metrics_listen,
            events_socket,
        } => {
            let mut config = match load_config(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Some(addr) = metrics_listen {
                config.metrics_listen = addr;
            }
            if let Some(path) = events_socket {
                config.events_socket = Some(path);
            }
            exit(run(&config))
        }
        Cmd::Events {
            json,
            cgroup,
            kind,
            socket,
        } => exit(events::run(
            &socket,
            &events::Filter {
                cgroup,
                kinds: kind,
            },
            json,
        )),
        Cmd::Top {
            socket,
            interval,
            once,
        } => exit(top::run(
            &socket,
            Duration::from_secs(interval.max(1)),
            once,
        )),
        Cmd::DiagnoseLocks { pid, seconds } => exit(
            diagnose::run(pid, seconds).map(|report| print!("{}", cli::printable(&report, true))),
        ),
        Cmd::Desired {
            config,
            cgroup,
            json,
        } => match load_config(config.as_deref()) {
            Ok(c) => exit(desired::run(
                &c.remediation.state_file,
                cgroup.as_ref(),
                json,
            )),
            Err(code) => code,
        },
        Cmd::Check { config } => match load_config(config.as_deref()) {
            Ok(c) => {
                let guard = match c.probes.guard {
                    config::GuardChoice::Auto => kernel::loader::GuardAttach::Yes {
                        max_files: c.remediation.guard_max_files,
                    },
                    config::GuardChoice::Off => {
                        kernel::loader::GuardAttach::No("off in the configuration (probes.guard)")
                    }
                };
                exit(check::check(&c.probes, &c.contention, guard))
            }
            Err(code) => code,
        },
        Cmd::BenchWrite {
            attached,
            iterations,
            open_files,
            loop_only,
        } => exit(if loop_only {
            bench::write_loop(iterations, open_files)
        } else {
            bench::bench_write(attached, iterations, open_files)
        }),
        Cmd::BenchOpen {
            file,
            iterations,
            rounds,
            protected,
        } => exit(guard_bench::run(&file, iterations, rounds, protected)),
        Cmd::BenchLatency {
            socket,
            cgroup,
            writes,
            exec_rate,
        } => exit(latency::run(&socket, &cgroup, writes, exec_rate)),
        Cmd::BenchRestore {
            root,
            prefix,
            count,
            bad,
            good,
            socket,
            jitter_ms,
        } => exit(restore_bench::run(
            &root,
            &prefix,
            count,
            &bad,
            &good,
            socket.as_deref(),
            Duration::from_millis(jitter_ms),
        )),
        Cmd::BenchSyscalls {
            rounds,
            calls,
            file,
            dir,
            settle_ms,
        } => exit(syscall_bench::run(
            rounds,
            calls,
            &file,
            &dir,
            Duration::from_millis(settle_ms),
        )),
        Cmd::BenchIdle {
            counts,
            parent,
            idle_seconds,
            scrapes,
            profile,
            baseline,
            dir,
        } => exit(idle_bench::run(
            &counts,
            &parent,
            Duration::from_secs(idle_seconds),
            scrapes,
            profile,
            baseline.as_deref(),
            &dir,
        )),
        Cmd::BenchBurst {
            rate,
            seconds,
            cgroups,
            parent,
            dir,
        } => exit(burst_bench::run(rate, seconds, cgroups, &parent, &dir)),
        Cmd::Rules {
            cmd: RulesCmd::Validate { file },
        } => exit(cli::rules::validate(&file)),
        Cmd::Rules {
            cmd: RulesCmd::Schema,
        } => {
            cli::rules::schema();
            ExitCode::SUCCESS
        }
        Cmd::CheckConfig { config } => match load_config(config.as_deref()) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}

impl Cmd {
    /// Commands whose output is for a reader that may go early (`head`, a pager). The agent
    /// and the benchmarks keep SIGPIPE ignored, as Rust sets it: a client gone from a socket is
    /// an error they handle, not their end.
    fn prints_for_a_reader(&self) -> bool {
        matches!(
            self,
            Self::Events { .. }
                | Self::Top { .. }
                | Self::DiagnoseLocks { .. }
                | Self::Desired { .. }
                | Self::Check { .. }
                | Self::Rules { .. }
                | Self::CheckConfig { .. }
        )
    }
}

/// A closed stdout ends the process by SIGPIPE, as it ends `cat`, instead of a panic in
/// `println!` (its default under Rust's ignored SIGPIPE).
fn end_quietly_when_the_reader_goes() {
    // SAFETY: restores one signal's default disposition; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    let loaded = match path {
        Some(p) => Config::from_file(p),
        None => Config::default_config(),
    };
    loaded.map_err(|e| {
        eprintln!("nodewarden: {e}");
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// Sets up traces outside the runtime (their HTTP client blocks), runs the agent, then flushes.
fn run(config: &Config) -> anyhow::Result<()> {
    // First, before any thread (the trace exporter's, the runtime's): they inherit what is left.
    match kernel::privileges::restrict() {
        Ok(r) => {
            if let Some(e) = &r.memlock {
                // Kernels from 5.11 do not use it; older ones refuse maps beyond it.
                tracing::info!("privileges: the locked-memory limit stays as it is: {e}");
            }
            tracing::info!(
                "privileges: {} capabilities the agent does not use from here on dropped{}, no_new_privs set",
                r.dropped,
                if r.bounding {
                    " (and from the bounding set)"
                } else {
                    ""
                }
            );
        }
        Err(e) => tracing::warn!(
            "privileges: the capabilities the agent does not use may be held still: {e}"
        ),
    }
    let traces = Traces::init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (result, deadline) = runtime.block_on(daemon::run(config, &traces));
    // The drain is over: whatever the runtime still runs (a blocking scan) is not waited for.
    runtime.shutdown_timeout(Duration::from_millis(100));
    // Spans still queued get what is left of the drain, and a moment at least: the whole stop
    // stays within `shutdown_drain_ms` and a second.
    let left = deadline.saturating_duration_since(Instant::now());
    traces.shutdown(left.max(Duration::from_millis(200)));
    result
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodewarden: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
