//! `cargo xtask fuzz`: the fuzz targets of `fuzz/` (cargo-fuzz and libFuzzer, on the nightly
//! compiler), each for a while. `cargo xtask test` runs each for a few seconds through
//! [`bounded`].
//!
//! The corpus kept in the repository (`fuzz/corpus/<target>`) only seeds a run: what a run
//! finds goes to a working corpus under `target/fuzz/corpus`, and into the kept one only when
//! asked (`--save`), merged so that only inputs that add coverage are kept.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, vm};

/// The targets, as `fuzz/Cargo.toml` names them (one `nodewarden::fuzz` entry each).
const TARGETS: [&str; 6] = [
    "config",
    "limit",
    "cgroup",
    "decode",
    "go_buildinfo",
    "rules",
];

/// Seconds each target runs in `cargo xtask test`: a minute for the six.
const BOUNDED_SECONDS: u64 = 10;

/// libFuzzer's limits: more memory than this, or one allocation this big, is a crash (the code
/// under test must not allocate without bound), and so is one input that takes this long.
const LIBFUZZER_LIMITS: [&str; 3] = ["-rss_limit_mb=1024", "-malloc_limit_mb=256", "-timeout=10"];

/// Lines of a failed run's output shown at most, and characters of each.
const REPORT_LINES: usize = 60;
const LINE_CHARS: usize = 300;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 300)]
    pub seconds: u64,
    /// Only this target (repeatable): `config`, `limit`, `cgroup`, `decode`, `go_buildinfo`,
    /// `rules`.
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Merge the inputs the runs found that add coverage into the kept corpus, fuzz/corpus.
    #[arg(long)]
    pub save: bool,
    /// Build unoptimized, as `cargo xtask test` does: it builds in a third of the time and runs
    /// several times slower.
    #[arg(long)]
    pub dev: bool,
}

/// Runs the chosen targets; 0 when none crashed.
pub fn main(args: &Args) -> Result<i32> {
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    if let Some(t) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "no fuzz target {t:?}: the targets are {}",
            TARGETS.join(", ")
        );
    }
    let profile = if args.dev {
        Profile::Dev
    } else {
        Profile::Release
    };
    setup::ebpf_toolchain()?;
    setup::fuzz_packages()?;
    setup::cargo_fuzz(None)?;
    build(profile, None)?;
    run(&targets, args.seconds, profile, args.save).map(|()| 0)
}

/// The `cargo xtask test` suite: every target for [`BOUNDED_SECONDS`], built unoptimized,
/// finds kept out of the repository. The packages are installed now; the returned run may go
/// on another thread, with cargo's messages in `log` when given (each target's own output goes
/// to a log of its own anyway).
pub fn bounded(log: Option<PathBuf>) -> Result<impl FnOnce() -> Result<()> + Send + 'static> {
    setup::ebpf_toolchain()?;
    setup::fuzz_packages()?;
    Ok(move || {
        let file = log
            .as_ref()
            .map(|p| {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                File::create(p)
            })
            .transpose()
            .with_context(|| format!("creating {log:?}"))?;
        let built =
            setup::cargo_fuzz(file.as_ref()).and_then(|()| build(Profile::Dev, file.as_ref()));
        match (built, &log) {
            (Err(e), Some(path)) => Err(e.context(setup::log_tail(path))),
            (r, _) => r,
        }?;
        run(&TARGETS, BOUNDED_SECONDS, Profile::Dev, false)
    })
}

/// Builds every target; cargo's messages go to `log` when given.
fn build(profile: Profile, log: Option<&File>) -> Result<()> {
    let root = vm::workspace_root();
    setup::step("cargo fuzz build", || {
        setup::run(setup::logged(
            &mut cargo_fuzz(&root, "build", profile),
            log,
        )?)
    })
}

/// The fuzz crate's cargo profile (see the comments in `fuzz/Cargo.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    Dev,
    Release,
}

impl Profile {
    fn cargo_fuzz_args(self) -> &'static [&'static str] {
        match self {
            Self::Dev => &["--dev"],
            Self::Release => &[],
        }
    }
}

/// Runs each built target for `seconds`, and fails naming every target that crashed.
fn run(targets: &[&str], seconds: u64, profile: Profile, save: bool) -> Result<()> {
    let root = vm::workspace_root();
    let mut crashed = Vec::new();
    for target in targets {
        match run_one(&root, target, seconds, profile) {
            Ok(summary) => eprintln!("xtask fuzz: {target}: {summary}"),
            Err(e) => {
                eprintln!("xtask fuzz: {target}: FAILED: {e:#}");
                crashed.push(*target);
            }
        }
        if save {
            setup::step(
                &format!("merging {target}'s finds into fuzz/corpus"),
                || merge(&root, target, profile),
            )?;
        }
    }
    if !crashed.is_empty() {
        bail!("fuzz targets failed: {}", crashed.join(", "));
    }
    Ok(())
}

/// `cargo +nightly fuzz SUBCOMMAND` with the project's target dir and the profile's flags.
fn cargo_fuzz(root: &Path, subcommand: &str, profile: Profile) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", subcommand])
        .args(profile.cargo_fuzz_args())
        .arg("--target-dir")
        .arg(root.join("target/fuzz"))
        .current_dir(root);
    cmd
}

/// The working corpus of `target`: the kept corpus seeds it, runs add to it.
fn working_corpus(root: &Path, target: &str) -> PathBuf {
    root.join("target/fuzz/corpus").join(target)
}

/// Runs one target for `seconds`; its output goes to a log beside the working corpus. Returns
/// a summary line, or an error with the crash's input and the end of the output.
fn run_one(root: &Path, target: &str, seconds: u64, profile: Profile) -> Result<String> {
    let corpus = working_corpus(root, target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let log_path = root.join(format!("target/fuzz/{target}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let status = cargo_fuzz(root, "run", profile)
        .arg(target)
        .arg(&corpus)
        .arg(root.join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(LIBFUZZER_LIMITS)
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("spawning cargo fuzz run")?;
    let output =
        std::fs::read(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
    let output = String::from_utf8_lossy(&output);
    if !status.success() {
        let input = output
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
            .unwrap_or("(none written)");
        bail!(
            "{status}; the input: {input}; the whole output: {}\n{}",
            log_path.display(),
            excerpt(&output)
        );
    }
    let stat = |name: &str| {
        output
            .lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map_or("?", str::trim)
    };
    let inputs = std::fs::read_dir(&corpus).map_or(0, Iterator::count);
    Ok(format!(
        "{} runs, {}/s, {} new inputs, working corpus {inputs} inputs, peak RSS {} MB",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        stat("new_units_added"),
        stat("peak_rss_mb"),
    ))
}

/// What tells a failure: the output from the panic's (or sanitizer's) report to cargo-fuzz's
/// "Reproduce with", without the sanitizer's stack frames and the replayed build warnings (the
/// panic's own backtrace says more), each line cut short (the input is printed whole).
fn excerpt(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.starts_with("warning: "))
        .map(|l| l.get(..LINE_CHARS).unwrap_or(l))
        .collect();
    let end = lines
        .iter()
        .position(|l| l.starts_with("Minimize test case"))
        .unwrap_or(lines.len());
    let start = lines[..end]
        .iter()
        .position(|l| l.contains("panicked at") || l.contains("ERROR: "))
        .unwrap_or(end.saturating_sub(REPORT_LINES));
    let shown = &lines[start..end];
    if shown.len() <= REPORT_LINES {
        return shown.join("\n");
    }
    let (head, tail) = (REPORT_LINES * 2 / 3, REPORT_LINES / 3);
    format!(
        "{}\n...\n{}",
        shown[..head].join("\n"),
        shown[shown.len() - tail..].join("\n")
    )
}

/// Adds to `fuzz/corpus/<target>` the inputs of the working corpus that reach code it does not.
fn merge(root: &Path, target: &str, profile: Profile) -> Result<()> {
    setup::run(
        cargo_fuzz(root, "run", profile)
            .arg(target)
            .arg(root.join("fuzz/corpus").join(target))
            .arg(working_corpus(root, target))
            .args(["--", "-merge=1"])
            .args(LIBFUZZER_LIMITS),
    )
}
