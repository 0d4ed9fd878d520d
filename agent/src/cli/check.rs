//! `nodewarden check`: what this kernel allows, probe by probe, and why not.

use std::path::Path;

use anyhow::Result;

use crate::{
    config::{ContentionConfig, ProbesConfig},
    enrich::cgroupfs,
    kernel::{btf, loader, privileges},
    model::probe::{Capability, ProbeStatus},
};

/// Prints the report; fails only when the eBPF object cannot be loaded at all.
pub fn check(
    choices: &ProbesConfig,
    contention: &ContentionConfig,
    guard: loader::GuardAttach,
) -> Result<()> {
    let uname = uname();
    println!("kernel: {uname}");

    let btf = Path::new(btf::VMLINUX_BTF);
    let (kernel_offsets, functions) = match btf::resolve(btf) {
        Ok(r) if r.missing.is_empty() => {
            println!("kernel BTF: {} (every struct field found)", btf.display());
            (r.offsets, r.functions)
        }
        Ok(r) => {
            println!(
                "kernel BTF: {} (missing: {})",
                btf.display(),
                r.missing.join(", ")
            );
            (r.offsets, r.functions)
        }
        Err(e) => {
            println!("kernel BTF: unavailable: {e}");
            (
                agent_common::KernelOffsets::UNKNOWN,
                btf::Functions::default(),
            )
        }
    };

    match cgroupfs::find_mount() {
        Some(root) => {
            let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            println!("cgroup v2: {} (controllers: {controllers})", root.display());
        }
        None => println!("cgroup v2: not mounted"),
    }

    match privileges::held() {
        Ok(held) => {
            for line in privileges::report(held, privileges::perf_event_paranoid()) {
                println!("{line}");
            }
        }
        Err(e) => println!("capabilities: unknown ({e})"),
    }

    let probes = loader::load(&kernel_offsets, &functions, choices, contention, guard)?;
    println!("probes:");
    for s in &probes.status {
        println!("  {s}");
    }
    if let Some(s) = probes
        .status
        .iter()
        .find(|s| s.capability == Capability::LimitWrites)
    {
        println!("{}", crate::model::probe::limit_write_coverage(s.mode));
    }
    if let Some(cost) = crate::model::probe::syscall_tracepoint_cost(&probes.status) {
        println!("{cost}");
    }
    let attached = probes.status.iter().filter(|s| s.attached()).count();
    println!(
        "{attached} of {} capabilities can attach",
        probes.status.len()
    );
    let guard = probes
        .status
        .iter()
        .find(|s| s.capability == Capability::Guard);
    println!("{}", guard_summary(guard));
    Ok(())
}

/// What the guard's status means for rules with `protect`.
fn guard_summary(status: Option<&ProbeStatus>) -> String {
    match status {
        Some(s) if s.attached() => "guard: available: rules with `protect` refuse untrusted opens of their limit files for writing (dry-run: recorded as would-deny). It fails open: protection ends when the agent stops or crashes (nothing is pinned).".to_owned(),
        Some(s) => format!(
            "guard: unavailable ({}): rules with `protect` fall back to restoring",
            s.errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
        None => "guard: unavailable: rules with `protect` fall back to restoring".to_owned(),
    }
}

/// `uname -r` and machine, e.g. `6.1.0-31-amd64 x86_64`.
fn uname() -> String {
    // SAFETY: utsname is plain data; uname fills it or fails.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&raw mut u) } != 0 {
        return "unknown".to_owned();
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c.to_ne_bytes()[0])
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!("{} {}", field(&u.release), field(&u.machine))
}
