//! `cargo xtask`: everything that needs root, the special eBPF toolchain or a VM.

mod setup;
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
    /// Boot a stock kernel under QEMU and run a command in it.
    Vm(vm::Args),
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
        Cmd::Vm(args) => vm::main(&args),
    }
}
