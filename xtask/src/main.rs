//! `cargo xtask`: everything that needs root, the special eBPF toolchain or a VM.

mod bench;
mod bench_burst;
mod bench_contention;
mod bench_guard;
mod bench_idle;
mod bench_latency;
mod bench_restore;
mod bench_syscalls;
mod build;
mod fuzz;
mod image;
mod lint;
mod programs;
mod run;
mod setup;
mod test;
mod vm;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "nodewarden's developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what this machine lacks (Debian packages, bpf-linker, QEMU).
    Setup,
    /// Build the agent (and its eBPF programs).
    Build {
        #[arg(long, value_enum, default_value = "debug")]
        profile: build::Profile,
    },
    /// Install what is missing, build, and run `nodewarden run` as root. Ctrl-C stops it.
    Run {
        #[arg(long, value_enum, default_value = "release")]
        profile: build::Profile,
        /// Arguments for `nodewarden run` (e.g. `-- --config my.toml`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Lints, unit tests, host kernel tests and VM kernel tests.
    Test(test::Args),
    /// rustfmt and clippy on every crate, the eBPF one included.
    Lint,
    /// Run the fuzz targets (fuzz/, cargo-fuzz on the nightly compiler), each for a while.
    Fuzz(fuzz::Args),
    /// Measure probe overhead and event latency against baselines in the same run; writes
    /// docs/benchmarks.md.
    Bench {
        /// Also measure the event latency of the agent built from this git revision (before a
        /// change), in the same VM run.
        #[arg(long)]
        baseline: Option<String>,
        /// Run one part only and print it, leaving docs/benchmarks.md as it is.
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
    },
    /// Build the C and Go programs the tests run, for x86_64 and aarch64 (`cargo xtask test`
    /// does this first).
    TestPrograms,
    /// Boot a stock kernel under QEMU and run a command in it.
    Vm(vm::Args),
    /// Build the agent's OCI image (an OCI layout, a tag per architecture) with umoci.
    Image(image::Args),
    /// Build a release binary for a target (host, aarch64-unknown-linux-gnu or
    /// riscv64gc-unknown-linux-gnu).
    Dist {
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<i32> {
    match Cli::parse().cmd {
        Cmd::Setup => {
            setup::ebpf_toolchain()?;
            for arch in [vm::Arch::X86_64, vm::Arch::Aarch64] {
                setup::apt_install(arch.host_packages())?;
            }
            Ok(0)
        }
        Cmd::Build { profile } => build::agent(profile).map(|_| 0),
        Cmd::Run { profile, args } => run::main(profile, &args),
        Cmd::Test(args) => test::main(&args),
        Cmd::Lint => lint::main().map(|()| 0),
        Cmd::Fuzz(args) => fuzz::main(&args),
        Cmd::Bench { baseline, only } => bench::main(baseline.as_deref(), only),
        Cmd::TestPrograms => programs::build().map(|()| 0),
        Cmd::Vm(args) => vm::main(&args),
        Cmd::Image(args) => image::main(&args),
        Cmd::Dist { target } => {
            let target = match target {
                Some(t) => t,
                None => build::host_triple()?,
            };
            build::dist(&target).map(|_| 0)
        }
    }
}
