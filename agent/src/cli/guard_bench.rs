//! `nodewarden bench-open` (hidden): the cost the guard (the BPF LSM program on `file_open`)
//! adds to an open(2)+close(2) of a regular file, measured in-process so `cargo xtask bench` can
//! compare, in one run, nothing attached, an empty program on the same hook, and the guard.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::Path,
    time::{Duration, Instant},
};

use agent_common::{GuardEntry, GuardTrust, maps, programs};
use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap, MapData},
    programs::Lsm,
};

use crate::{
    config::{ContentionConfig, ProbesConfig},
    kernel::{btf, loader},
};

/// The made-up protected files' inode numbers start here, far above any real cgroup's.
const FAKE_INO: u64 = 1 << 48;
/// Opens per program and kind of open in the pass that takes the programs' own run time.
const STATS_OPENS: u64 = 20_000;
/// How long opens go untimed after each attach and detach: opens were seen slower for about
/// 250 ms after one (in the lab's VM under TCG, by up to 700 ns: more than the programs add).
const SETTLE: Duration = Duration::from_millis(300);

/// The guard's file map and trust, held while the programs may run.
type GuardMaps = (
    HashMap<MapData, u64, GuardEntry>,
    Array<MapData, GuardTrust>,
);

/// What is attached to `file_open` while the loop runs, in the order of each round.
const CONFIGS: [(&str, Option<&str>); 3] = [
    ("none", None),
    ("empty", Some(programs::GUARD_EMPTY)),
    ("guard", Some(programs::GUARD_FILE_OPEN)),
];
/// The open flags timed under each configuration: a write open is the guard's longest path
/// for a file that is not cgroup2's.
const FLAGS: [(&str, libc::c_int); 2] = [("read", libc::O_RDONLY), ("write", libc::O_WRONLY)];

/// Loads both programs once, then for each of `rounds` rounds, each configuration in turn
/// (interleaved, so drift hits them alike), times `iterations` opens+closes of `file` for
/// reading and for writing, after [`SETTLE`] and a tenth as many untimed. Prints one JSON
/// line: per configuration and flags, the median and the minimum over the rounds of ns per
/// open+close, each round's figure in round order (`*_rounds_ns`, for comparisons within a
/// round), and each program's own run time per open (`*_run_ns`, taken before the rounds).
pub fn run(file: &Path, iterations: u64, rounds: usize, protected: u32) -> Result<()> {
    ensure!(iterations > 0, "--iterations must be at least 1");
    ensure!(rounds > 0, "--rounds must be at least 1");
    let meta = std::fs::metadata(file).with_context(|| format!("{}", file.display()))?;
    ensure!(meta.is_file(), "{} is not a regular file", file.display());
    let path = CString::new(file.as_os_str().as_bytes())
        .with_context(|| format!("{} has a NUL byte", file.display()))?;
    // Both flags work before anything is attached, so a failure later is the measurement's.
    for (name, flags) in FLAGS {
        open_close(&path, flags, 1)
            .with_context(|| format!("opening {} ({name})", file.display()))?;
    }
    loader::bpf_lsm_active()
        .map_err(|why| anyhow::anyhow!("{why}: the programs would never run"))?;
    let offsets = btf::resolve(Path::new(btf::VMLINUX_BTF))
        .context("resolving kernel struct offsets")?
        .offsets;
    ensure!(
        offsets.has_guard(),
        "kernel BTF lacks the file fields the guard reads"
    );

    let mut ebpf = loader::load_object(
        &offsets,
        &ProbesConfig::default(),
        &ContentionConfig::default(),
        protected.max(1),
    )
    .context("loading the eBPF object")?;
    // Held until the end, as the agent holds them.
    let _maps = fill_maps(&mut ebpf, protected)?;
    let btf = Btf::from_sys_fs().context("reading the kernel's BTF")?;
    for (_, program) in CONFIGS {
        if let Some(name) = program {
            lsm(&mut ebpf, name)?
                .load(programs::FILE_OPEN_HOOK, &btf)
                .with_context(|| format!("loading {name} on {}", programs::FILE_OPEN_HOOK))?;
        }
    }
    let run_times = run_times(&mut ebpf, &path)?;

    let mut samples: [[Vec<f64>; FLAGS.len()]; CONFIGS.len()] =
        std::array::from_fn(|_| std::array::from_fn(|_| Vec::with_capacity(rounds)));
    for _ in 0..rounds {
        for (c, (_, program)) in CONFIGS.iter().enumerate() {
            let link = match program {
                Some(name) => Some(
                    lsm(&mut ebpf, name)?
                        .attach()
                        .with_context(|| format!("attaching {name}"))?,
                ),
                None => None,
            };
            let start = Instant::now();
            while start.elapsed() < SETTLE {
                for (_, flags) in FLAGS {
                    open_close(&path, flags, 1000)?;
                }
            }
            for (f, (_, flags)) in FLAGS.iter().enumerate() {
                open_close(&path, *flags, iterations / 10)?;
                let elapsed = open_close(&path, *flags, iterations)?;
                #[expect(clippy::cast_precision_loss, reason = "a mean over thousands of opens")]
                samples[c][f].push(elapsed.as_nanos() as f64 / iterations as f64);
            }
            if let (Some(name), Some(link)) = (program, link) {
                lsm(&mut ebpf, name)?
                    .detach(link)
                    .with_context(|| format!("detaching {name}"))?;
            }
        }
    }

    let mut out = serde_json::Map::new();
    out.insert("rounds".into(), rounds.into());
    out.insert("iterations".into(), iterations.into());
    out.insert(
        "settle_ms".into(),
        u64::try_from(SETTLE.as_millis())?.into(),
    );
    for (config, flags, ns) in run_times {
        out.insert(format!("{config}_{flags}_run_ns"), tenths(ns));
    }
    for ((config, _), per_flags) in CONFIGS.iter().zip(&mut samples) {
        for ((flags, _), s) in FLAGS.iter().zip(per_flags) {
            out.insert(
                format!("{config}_{flags}_rounds_ns"),
                s.iter().copied().map(tenths).collect(),
            );
            s.sort_by(f64::total_cmp);
            out.insert(format!("{config}_{flags}_ns"), tenths(s[s.len() / 2]));
            out.insert(format!("{config}_{flags}_min_ns"), tenths(s[0]));
        }
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

/// The guard's maps as the agent fills them: `protected` made-up files (so the lookup is not
/// of an empty map, were one made), and the trust with this process as the agent.
fn fill_maps(ebpf: &mut Ebpf, protected: u32) -> Result<GuardMaps> {
    let mut files: HashMap<MapData, u64, GuardEntry> = loader::take_map(ebpf, maps::GUARD_FILES)?;
    for i in 0..u64::from(protected) {
        let entry = GuardEntry {
            cgroup_id: FAKE_INO + i,
            limit: 0,
            enforce: 0,
        };
        files
            .insert(FAKE_INO + i, entry, 0)
            .with_context(|| format!("filling {}", maps::GUARD_FILES))?;
    }
    let mut trust: Array<MapData, GuardTrust> = loader::take_map(ebpf, maps::GUARD_TRUST)?;
    let value = GuardTrust {
        agent_tgid: std::process::id(),
        ..GuardTrust::default()
    };
    trust
        .set(0, value, 0)
        .with_context(|| format!("setting {}", maps::GUARD_TRUST))?;
    Ok((files, trust))
}

/// Each program's own run time per open (ns), by the kernel's run statistics, for each kind of
/// open, in a pass of its own (the statistics cost every program run while on). Checks on the
/// way that each program runs on every open: BPF LSM could be listed and yet not call it.
fn run_times(ebpf: &mut Ebpf, path: &CString) -> Result<Vec<(&'static str, &'static str, f64)>> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling the kernel's BPF run statistics")?;
    let mut times = Vec::new();
    for (config, program) in CONFIGS {
        let Some(name) = program else { continue };
        let link = lsm(ebpf, name)?
            .attach()
            .with_context(|| format!("attaching {name}"))?;
        let measured = FLAGS
            .iter()
            .map(|&(flags_name, flags)| {
                let before = lsm(ebpf, name)?.info()?;
                open_close(path, flags, STATS_OPENS)?;
                let after = lsm(ebpf, name)?.info()?;
                let runs = after.run_count().saturating_sub(before.run_count());
                ensure!(
                    runs >= STATS_OPENS,
                    "{name} ran {runs} times on {STATS_OPENS} opens: it is not on the open path"
                );
                let ns = after
                    .run_time()
                    .saturating_sub(before.run_time())
                    .as_nanos();
                #[expect(clippy::cast_precision_loss, reason = "a mean over thousands of runs")]
                Ok((config, flags_name, ns as f64 / runs as f64))
            })
            .collect::<Result<Vec<_>>>();
        lsm(ebpf, name)?
            .detach(link)
            .with_context(|| format!("detaching {name}"))?;
        times.extend(measured?);
    }
    Ok(times)
}

/// The LSM program `name`.
fn lsm<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Lsm> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("{name} missing from the eBPF object"))?
        .try_into()?)
}

/// Opens `path` with `flags` and closes it, `n` times; the time it took.
fn open_close(path: &CString, flags: libc::c_int, n: u64) -> Result<Duration> {
    let start = Instant::now();
    for _ in 0..n {
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("open");
        }
        // SAFETY: `fd` was just opened here and is closed once.
        if unsafe { libc::close(fd) } != 0 {
            bail!("close: {}", std::io::Error::last_os_error());
        }
    }
    Ok(start.elapsed())
}

/// `ns` rounded to a tenth, as a JSON number.
fn tenths(ns: f64) -> serde_json::Value {
    serde_json::json!((ns * 10.0).round() / 10.0)
}
