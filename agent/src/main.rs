//! nodewarden: the node agent. This file is wiring only.

mod bench;
mod cgroups;
mod check;
mod config;
mod contention;
mod diagnose;
mod events;
mod events_cli;
mod feed;
mod golang;
mod http;
mod inotify;
mod k8s;
mod kubelet;
mod limits;
mod metrics;
mod offcpu;
mod offsets;
mod oom;
mod outputs;
mod pipeline;
mod probes;
mod record;
mod run;
mod sampling;
mod selection;
mod state;
mod telemetry;
mod top;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::config::Config;

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
        /// Only cgroups whose path matches this glob (`*`, `?`), e.g. '/kubepods*'.
        #[arg(long)]
        cgroup: Option<String>,
        /// Only these kinds (repeatable): `limit_write`, `oom_kill`, `oom_incident`, `go_fatal`,
        /// `cgroup_created`, `cgroup_removed`.
        #[arg(long)]
        kind: Vec<String>,
        /// The agent's event socket.
        #[arg(long, default_value = config::DEFAULT_EVENTS_SOCKET)]
        socket: PathBuf,
    },
    /// Show the most contended processes and their hottest futex words with stacks, refreshed.
    Top {
        /// The running agent's metrics address.
        #[arg(long, default_value = "127.0.0.1:9717")]
        agent: std::net::SocketAddr,
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
    /// Validate a configuration file and print it as understood.
    CheckConfig {
        /// Configuration file (TOML); the embedded default when absent.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    telemetry::init_logs();
    match Cli::parse().cmd {
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
        } => exit(events_cli::run(
            &socket,
            &events_cli::Filter {
                cgroup,
                kinds: kind,
            },
            json,
        )),
        Cmd::Top {
            agent,
            interval,
            once,
        } => exit(top::run(
            agent,
            std::time::Duration::from_secs(interval.max(1)),
            once,
        )),
        Cmd::DiagnoseLocks { pid, seconds } => {
            exit(diagnose::run(pid, seconds).map(|report| print!("{report}")))
        }
        Cmd::Check { config } => match load_config(config.as_deref()) {
            Ok(c) => exit(check::check(&c.probes, &c.contention)),
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
        Cmd::CheckConfig { config } => match load_config(config.as_deref()) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
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
    let traces = telemetry::Traces::init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run::run(config, &traces));
    runtime.shutdown_timeout(config.shutdown_drain);
    traces.shutdown(config.shutdown_drain);
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
