//! `nodewarden diagnose-locks`: the explicit, time-boxed lock diagnostic for one Go process.
//! Uprobes on its lock slow paths count each entry by user stack, which names the call sites
//! that contend, one by one, where the agent's sampling only gives shares. They trap on every
//! slow-path entry, while the lock is contended, so they slow the very contention they
//! measure: the agent never attaches them; this command does, for one process, for at most
//! [`MAX_SECONDS`], and reports what they cost: the cost of one entry measured on this machine
//! just before (a uprobe on a function of this program, called in a loop with and without it),
//! and the process's CPU rate before and during. The probes are this process's file
//! descriptors: if the command dies, the kernel removes them.

use std::{
    collections::HashMap,
    fmt::Write as _,
    hint::black_box,
    num::NonZeroU32,
    path::Path,
    time::{Duration, Instant},
};

use agent_common::{KernelOffsets, SampleKey, maps, programs};
use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, StackTraceMap},
    programs::{UProbe, uprobe::UProbeScope},
};

use crate::{
    config::{ContentionConfig, ProbesConfig},
    contention::{classify::is_runtime, symbols::Symbols},
    enrich::{elf, procfs},
    kernel::loader,
    model::cache::Evictions,
};

/// The longest diagnostic.
pub const MAX_SECONDS: u64 = 60;

/// Go's lock slow paths and semaphore waits, by Go version: a contended `Lock` enters
/// `lockSlow`, and one that must block waits in a `runtime_Semacquire*`. Go 1.24 moved
/// `sync.Mutex` into `internal/sync`.
const SLOW_PATHS: [&str; 6] = [
    "sync.(*Mutex).lockSlow",
    "internal/sync.(*Mutex).lockSlow",
    "sync.runtime_SemacquireMutex",
    "internal/sync.runtime_SemacquireMutex",
    "sync.runtime_SemacquireRWMutexR",
    "sync.runtime_SemacquireRWMutex",
];

/// Calls timed per calibration run.
const CALIBRATION_CALLS: u64 = 20_000;

/// The function the calibration probes: an ordinary call, in this executable.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn nodewarden_lock_diag_calibrate(x: u64) -> u64 {
    black_box(x).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Runs the diagnostic on `pid` for `seconds` and returns the report.
pub fn run(pid: u32, seconds: u64) -> Result<String> {
    ensure!(
        (1..=MAX_SECONDS).contains(&seconds),
        "--seconds {seconds}: between 1 and {MAX_SECONDS} (the probes slow the process)"
    );
    let target = NonZeroU32::new(pid).context("--pid 0 is not a process")?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("process {pid}: its executable"))?;
    let comm = procfs::comm(pid).unwrap_or_default();
    let target_path = Path::new("/proc").join(pid.to_string()).join("exe");
    let go = elf::inspect_file(&target_path, &SLOW_PATHS)
        .with_context(|| format!("reading {}", exe.display()))?
        .with_context(|| format!("{} ({comm}) is not a Go program", exe.display()))?;
    if go.functions.is_empty() {
        bail!(
            "{} has no symbols for Go's lock slow paths (stripped, or no sync.Mutex)",
            exe.display()
        );
    }
    let functions: Vec<&'static str> = go.functions.iter().map(|f| f.0).collect();
    let mut ebpf = loader::load_object(
        &KernelOffsets::UNKNOWN,
        &ProbesConfig::default(),
        &ContentionConfig::default(),
        1,
    )?;
    let program: &mut UProbe = ebpf
        .program_mut(programs::LOCK_DIAG)
        .context("the lock diagnostic program is missing from the eBPF object")?
        .try_into()?;
    program.load()?;
    let per_entry = calibrate(program)?;

    // The process's CPU rate without the probes, then with them.
    let rate = |d: Duration| -> Result<f64> {
        let before = cpu_seconds(pid)?;
        std::thread::sleep(d);
        Ok((cpu_seconds(pid)? - before) / d.as_secs_f64())
    };
    let cpu_before = rate(Duration::from_secs(1))?;
    let mut links = Vec::new();
    for (f, offset) in &go.functions {
        links.push(
            program
                .attach(*offset, &target_path, UProbeScope::OneProcess(target))
                .with_context(|| format!("uprobe on {f}"))?,
        );
    }
    let start = Instant::now();
    let cpu_during = rate(Duration::from_secs(seconds));
    for link in links {
        program.detach(link)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_during = cpu_during?;

    let counts: BpfHashMap<MapData, SampleKey, u64> =
        loader::take_map(&mut ebpf, maps::DIAG_COUNTS)?;
    let stacks: StackTraceMap<MapData> = loader::take_map(&mut ebpf, maps::DIAG_STACKS)?;
    let lost: Array<MapData, u64> = loader::take_map(&mut ebpf, maps::DIAG_LOST)?;
    let mut uncounted = lost.get(&0, 0).unwrap_or(0);
    let mut symbols = Symbols::new(&Evictions::default());
    // (probed function, call site) -> entries.
    let mut sites: HashMap<(String, String), u64> = HashMap::new();
    for (key, n) in counts.iter().filter_map(Result::ok) {
        if key.tgid != pid {
            continue;
        }
        let Ok(trace) = stacks.get(&key.stack_id, 0) else {
            uncounted += n;
            continue;
        };
        let addrs: Vec<u64> = trace.frames().iter().map(|f| f.ip).collect();
        // Addresses where the symbols cannot be read (the process exited meanwhile).
        let names: Vec<String> = symbols
            .symbolize(pid, &addrs)
            .into_iter()
            .zip(&addrs)
            .map(|(s, a)| s.map_or_else(|| format!("{a:#x}"), |(name, _)| name))
            .collect();
        let function = names.first().cloned().unwrap_or_default();
        let site = names
            .iter()
            .skip(1)
            .find(|n| !is_runtime(n))
            .cloned()
            .unwrap_or_else(|| "-".to_owned());
        *sites.entry((function, site)).or_default() += n;
    }
    Ok(report(&Report {
        pid,
        comm,
        version: go.version,
        functions,
        elapsed,
        sites,
        uncounted,
        per_entry_ns: per_entry,
        cpu_before,
        cpu_during,
    }))
}

/// Nanoseconds one probe entry adds to a call, measured here: the same program on this
/// executable's [`nodewarden_lock_diag_calibrate`], the best of three timed loops each way.
fn calibrate(program: &mut UProbe) -> Result<f64> {
    let time = || {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let mut acc = 0u64;
                for i in 0..CALIBRATION_CALLS {
                    acc ^= nodewarden_lock_diag_calibrate(black_box(i));
                }
                black_box(acc);
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    };
    let plain = time();
    let me = NonZeroU32::new(std::process::id()).context("own pid")?;
    let offset = own_file_offset(nodewarden_lock_diag_calibrate as *const () as u64)?;
    let exe = std::env::current_exe()?;
    let link = program
        .attach(offset, &exe, UProbeScope::OneProcess(me))
        .context("calibration uprobe")?;
    let probed = time();
    program.detach(link)?;
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds over a loop")]
    Ok(probed.saturating_sub(plain).as_nanos() as f64 / CALIBRATION_CALLS as f64)
}

/// The file offset of `addr` in this executable, from its mapping in /proc/self/maps.
fn own_file_offset(addr: u64) -> Result<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(_perms), Some(offset)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end, offset) = (
            u64::from_str_radix(start, 16)?,
            u64::from_str_radix(end, 16)?,
            u64::from_str_radix(offset, 16)?,
        );
        if (start..end).contains(&addr) {
            return Ok(addr - start + offset);
        }
    }
    bail!("address {addr:#x} is in no mapping of this process")
}

/// A process's user and system CPU seconds so far.
fn cpu_seconds(pid: u32) -> Result<f64> {
    procfs::cpu_seconds(pid).with_context(|| format!("process {pid} exited"))
}

/// What the diagnostic found and cost.
#[derive(Debug)]
struct Report {
    pid: u32,
    comm: String,
    version: String,
    functions: Vec<&'static str>,
    elapsed: f64,
    sites: HashMap<(String, String), u64>,
    /// Entries whose stack or count had no room (counted in total, not by call site).
    uncounted: u64,
    per_entry_ns: f64,
    cpu_before: f64,
    cpu_during: f64,
}

fn report(r: &Report) -> String {
    let mut v = String::new();
    let total: u64 = r.sites.values().sum::<u64>() + r.uncounted;
    #[expect(clippy::cast_precision_loss, reason = "figures for people")]
    let (total_f, added_s) = (total as f64, total as f64 * r.per_entry_ns / 1e9);
    let _ = writeln!(
        v,
        "nodewarden diagnose-locks: pid {} ({}, {}), {:.1} s, uprobes on {}",
        r.pid,
        r.comm,
        if r.version.is_empty() {
            "Go"
        } else {
            &r.version
        },
        r.elapsed,
        r.functions.join(", ")
    );
    let _ = writeln!(
        v,
        "lock slow-path entries: {total} ({:.0}/s)\n",
        total_f / r.elapsed.max(1e-9)
    );
    let _ = writeln!(v, "{:>10}  {:<36}  CALL SITE", "ENTRIES", "FUNCTION");
    let mut rows: Vec<_> = r.sites.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    for ((function, site), n) in rows.iter().take(20) {
        let _ = writeln!(v, "{n:>10}  {function:<36}  {site}");
    }
    if r.uncounted > 0 {
        let _ = writeln!(
            v,
            "{:>10}  (no room to count these by stack: in the total only)",
            r.uncounted
        );
    }
    let used = r.cpu_during * r.elapsed;
    let _ = writeln!(
        v,
        "\ncost: {:.0} ns per entry (measured on this machine just now); {total} entries added \
         about {added_s:.3} CPU-seconds, {:.1}% of the {used:.2} the process used meanwhile. \
         Its CPU rate was {:.2} CPUs before and {:.2} during. Each entry traps while the lock is \
         contended, lengthening the waits it measures: the probes are gone now.",
        r.per_entry_ns,
        if used > 0.0 {
            100.0 * added_s / used
        } else {
            0.0
        },
        r.cpu_before,
        r.cpu_during,
    );
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_functions_offset_and_refuses_bad_arguments() {
        let offset = own_file_offset(nodewarden_lock_diag_calibrate as *const () as u64);
        assert!(offset.is_ok_and(|o| o > 0));
        assert!(own_file_offset(8).is_err());
        let e = run(std::process::id(), 0).expect_err("0 s");
        assert!(e.to_string().contains("between 1 and 60"), "{e}");
        let e = run(0, 5).expect_err("pid 0");
        assert!(e.to_string().contains("not a process"), "{e}");
        // This test binary is not a Go program.
        let e = run(std::process::id(), 5).expect_err("not Go");
        assert!(e.to_string().contains("is not a Go program"), "{e:#}");
    }

    #[test]
    fn reports_sites_and_cost() {
        let r = Report {
            pid: 7,
            comm: "svc".into(),
            version: "go1.19.8".into(),
            functions: vec!["sync.(*Mutex).lockSlow"],
            elapsed: 2.0,
            uncounted: 0,
            sites: HashMap::from([
                (
                    ("sync.(*Mutex).lockSlow".to_owned(), "main.put".to_owned()),
                    3000,
                ),
                (
                    ("sync.(*Mutex).lockSlow".to_owned(), "main.get".to_owned()),
                    1000,
                ),
            ]),
            per_entry_ns: 2000.0,
            cpu_before: 2.0,
            cpu_during: 1.0,
        };
        let v = report(&r);
        assert!(v.contains("lock slow-path entries: 4000 (2000/s)"), "{v}");
        let put = v.find("main.put").expect("put");
        assert!(put < v.find("main.get").expect("get"), "{v}");
        // 4000 entries x 2 µs = 0.008 s of the 2 CPU-seconds used: 0.4%.
        assert!(
            v.contains("about 0.008 CPU-seconds, 0.4% of the 2.00"),
            "{v}"
        );
        assert!(v.contains("2.00 CPUs before and 1.00 during"), "{v}");
    }
}
