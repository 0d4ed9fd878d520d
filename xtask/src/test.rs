//! `cargo xtask test`: lints, unit tests, host kernel tests, VM kernel tests (x86_64 kernels
//! and arm64) and a bounded run of each fuzz target (beside the VM suites, with the aarch64
//! build, on a thread of its own). Every suite runs even when an earlier one failed; the summary
//! line at the end counts them.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{build, fuzz, image, lint, programs, setup, vm};

/// The x86_64 kernels `cargo xtask test` boots by default. bullseye-5.10 is left out for CI's
/// time budget (its suite takes 9 to 12 minutes under TCG); it froze under QEMU 7.2 and passes
/// under the lab's 10.0. Run it with `--kernel bullseye-5.10` (docs/kernel-support.md).
const DEFAULT_X86_KERNELS: [&str; 2] = ["bookworm-6.1", "trixie-6.12"];

/// VM tests whose subject is the agent's own handling of what it has seen, not what a kernel or
/// an architecture does: label bounds, the order of resync and action after a loss, rule
/// reloads, the modes, the event CLI, reading a huge executable, naming cgroups by their path,
/// ranking three Go map designs from their samples and sleeps (every suite still samples a Go
/// program and watches it off CPU, in `map_heavy_processes_are_selected`). They run in the
/// first VM suite of a `cargo xtask test` only; each later suite (the other kernels, arm64)
/// lists them as left out. Together they took about 190 s a suite under TCG, which kept CI
/// within its budget.
const FIRST_SUITE_ONLY: [&str; 9] = [
    "events_cli_streams_filtered_events",
    "go_map_designs_ranked_by_contention",
    "heal::after_a_ring_overflow_nothing_acts_before_the_resync_then_everything_is_restored",
    "heal::rules_reload_on_change_and_sighup_and_an_invalid_file_is_refused_whole",
    "heal::the_incident_in_dry_run_and_observe_is_recorded_and_nothing_written",
    "hostile::names_chosen_by_processes_leave_the_metrics_bounded",
    "kubernetes_cgroups_are_named",
    "lossless::a_huge_executable_costs_the_agent_its_headers_only",
    "pod_selector_picks_the_pods_processes",
];

/// The VM tests that run under systemd as the guest's PID 1 (`cargo xtask vm --systemd`), in a
/// VM of their own after the first x86_64 suite; the other suites leave them out.
const UNDER_SYSTEMD: &str = "under_systemd::";

/// The fuzz suite's name.
const FUZZ: &str = "fuzz (bounded)";

/// Which suites to run (all by default).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kernels for the VM tests (default: bookworm-6.1 and trixie-6.12; see `cargo xtask vm --list`).
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Skip rustfmt and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Skip the VM suites (x86_64 and aarch64).
    #[arg(long)]
    pub no_vm: bool,
    /// Skip the aarch64 cross-build and its VM smoke test.
    #[arg(long)]
    pub no_arm64: bool,
}

/// Runs the suites and returns 0 when all passed.
pub fn main(args: &Args) -> Result<i32> {
    setup::ebpf_toolchain()?;
    let mut results: Vec<(String, Result<()>)> = Vec::new();
    let mut suite = |name: String, f: &mut dyn FnMut() -> Result<()>| {
        eprintln!("\nxtask test: === {name} ===");
        let start = Instant::now();
        let r = f();
        let secs = start.elapsed().as_secs_f64();
        match &r {
            Ok(()) => eprintln!("xtask test: {name}: PASSED in {secs:.0}s"),
            Err(e) => eprintln!("xtask test: {name}: FAILED in {secs:.0}s: {e:#}"),
        }
        results.push((name, r));
    };

    if !args.no_lint {
        suite(
            "lint (rustfmt, clippy, eBPF clippy)".into(),
            &mut lint::main,
        );
    }
    // The default members: every crate but the eBPF one, which only builds for bpfel.
    suite("unit tests".into(), &mut || cargo_test(&[], &[]));
    suite(
        "test programs (C and Go, x86_64 and aarch64)".into(),
        &mut programs::build,
    );
    suite("host kernel tests".into(), &mut host_tests);
    if args.no_vm {
        // Needs neither root nor a VM; finds stay in target/fuzz, out of the kept corpus.
        suite(FUZZ.into(), &mut || fuzz::bounded(None)?());
    } else {
        let kernels = if args.kernels.is_empty() {
            DEFAULT_X86_KERNELS
                .iter()
                .map(|k| (*k).to_owned())
                .collect()
        } else {
            args.kernels.clone()
        };
        let mut exe = None;
        suite("build VM test binary".into(), &mut || {
            exe = Some(test_executable("vm_kernel")?);
            Ok(())
        });
        if let Some(kernel) = kernels.first() {
            let name =
                format!("the x86_64 image (of the debug build): `nodewarden check` on {kernel}");
            suite(name, &mut || x86_image_check(kernel));
        }
        let background = Background::start(!args.no_arm64);
        if let Some(exe) = exe {
            for (i, kernel) in kernels.iter().enumerate() {
                let skip: &[&str] = if i == 0 { &[] } else { &FIRST_SUITE_ONLY };
                suite(format!("VM kernel tests on {kernel}"), &mut || {
                    vm_tests(kernel, &exe, skip)
                });
                if i == 0 {
                    suite(
                        format!("the systemd unit, under systemd in the VM on {kernel}"),
                        &mut || systemd_tests(kernel, &exe),
                    );
                }
            }
        }
        let mut arm64 = background.arm64;
        if let Some(arm64) = arm64.take() {
            suite(
                "aarch64: cross-build, `nodewarden check` and VM kernel tests on arm64".into(),
                &mut || {
                    let built = arm64
                        .recv()
                        .context("the background build thread ended without a word")??;
                    arm64_tests(&built, &[&FIRST_SUITE_ONLY[..], &NOT_ON_ARM64[..]].concat())
                },
            );
        }
        let mut fuzz = Some(background.fuzz);
        suite(format!("{FUZZ}, beside the VM suites"), &mut || {
            fuzz.take()
                .context("joined twice")?
                .join()
                .map_err(|_| anyhow::anyhow!("the background thread panicked"))?
        });
    }

    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(n, _)| n.as_str())
        .collect();
    let passed = results.len() - failed.len();
    eprintln!();
    // The reasons are repeated here, at the end, where a log cut to its tail still shows them.
    for (name, r) in &results {
        match r {
            Ok(()) => eprintln!("  ok     {name}"),
            Err(e) => eprintln!("  FAILED {name}: {e:#}"),
        }
    }
    println!("summary: {passed} passed, {} failed", failed.len());
    Ok(i32::from(!failed.is_empty()))
}

/// The host kernel tests, with what they need installed.
fn host_tests() -> Result<()> {
    require_root()?;
    // A real Prometheus server scrapes the agent in one of them, promtool tests the alert
    // rules in another; bpftrace measures futex waits independently in a third.
    // systemd-analyze scores the systemd unit in another (the systemd suite boots the same
    // systemd to run the agent under that unit).
    setup::apt_install(&["prometheus", "bpftrace", "systemd"])?;
    // kubectl renders the Kubernetes overlays (its kustomize) in another: Debian's, unless
    // the machine has one.
    if Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_err()
    {
        setup::apt_install(&["kubernetes-client"])?;
    }
    cargo_test(&["-p", "agent", "--test", "host_kernel"], &["--ignored"])
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("kernel tests load eBPF programs and need root: run `sudo -E cargo xtask test`");
    }
    Ok(())
}

/// `cargo test CARGO_ARGS -- TEST_ARGS` in the workspace.
fn cargo_test(cargo_args: &[&str], test_args: &[&str]) -> Result<()> {
    setup::run(
        Command::new(build::cargo())
            .arg("test")
            .args(cargo_args)
            .arg("--")
            .args(test_args)
            .current_dir(vm::workspace_root()),
    )
}

/// Builds the agent and the integration test `name`, returning the test executable's path.
fn test_executable(name: &str) -> Result<PathBuf> {
    let out = setup::output(
        Command::new(build::cargo())
            .args([
                "test",
                "-p",
                "agent",
                "--test",
                name,
                "--no-run",
                "--message-format=json",
            ])
            .current_dir(vm::workspace_root()),
    )?;
    build::test_executable_from(&out, name)
}

/// Longest a single VM test may run before it is killed (they take 5 to 60 s under TCG).
const VM_TEST_TIMEOUT_S: u32 = 240;

/// Longest a whole VM suite may run (7 to 12 minutes under TCG).
const VM_SUITE_TIMEOUT_S: u64 = 1800;

/// While a VM test runs, the guest says so this often: a guest that runs at all is never silent
/// for longer.
const VM_HEARTBEAT_S: u32 = 60;

/// A guest that prints nothing for this long has stalled (the heartbeat above has not come).
const VM_SILENCE_S: u64 = 150;

/// New VMs a suite may start after stalled guests, each running the tests not yet finished.
/// Each costs the silence, a boot and the report (about 3 minutes under TCG).
const VM_STALL_RERUNS: u32 = 2;

/// Runs the ignored (kernel) tests of `exe` inside a VM booted on `kernel`, each in its own
/// process under a timeout: one test that hangs fails alone, by name, in bounded time. A test
/// killed by the timeout is run once more and said so (a hang seen once under emulation, that
/// did not come back in isolation); a test that fails is not. A guest that stalls whole (seen
/// twice in six suite runs under TCG: every vCPU in a kernel soft lockup, the agent on one,
/// as a test's agent started; and guests silent with no kernel report at all), or whose kernel
/// panics (seen once, on trixie 6.12: an int3 Oops in `syscall_trace_enter` as syscall
/// tracepoints were switched on), is killed at the kernel's report or after `VM_SILENCE_S` of
/// silence (after `cargo xtask vm`'s stall report, which a soft lockup gets too), and a new VM
/// runs the tests that had not finished, up to `VM_STALL_RERUNS` times. The kernel's report
/// stays in the output. The tests named in `skip` are listed as left out, not run.
fn vm_tests(kernel: &str, exe: &Path, skip: &[&str]) -> Result<()> {
    // The guest gets NODEWARDEN_* variables; this one lets the VM tests write cgroups there.
    // SAFETY: xtask is single-threaded here.
    unsafe { std::env::set_var("NODEWARDEN_IN_VM", "1") };
    // Each finished test is a line in a file the guest writes beside the sources: `ok NAME`
    // or `FAILED NAME`.
    let progress = vm::workspace_root().join(format!("target/vm-progress-{kernel}.txt"));
    let _ = std::fs::remove_file(&progress);
    if !skip.is_empty() {
        eprintln!(
            "xtask: on {kernel}, left out (run by the first VM suite; see FIRST_SUITE_ONLY and NOT_ON_ARM64 in xtask/src/test.rs): {}",
            skip.join(", ")
        );
    }
    let (exe, done) = (exe.display(), progress.display());
    let skip = skip.join(" ");
    let (t, beat) = (VM_TEST_TIMEOUT_S, VM_HEARTBEAT_S);
    let script = format!(
        r#"run() {{
    '{exe}' --ignored --exact "$1" & p=$!
    i=0
    while kill -0 $p 2>/dev/null && [ $i -lt {t} ]; do
        sleep 1; i=$((i+1))
        [ $((i % {beat})) -eq 0 ] && echo "... $1: running for $i s"
    done
    if kill -0 $p 2>/dev/null; then
        echo "HUNG: $1 still running after {t} s; its tasks, then every task:"
        for s in /proc/$p/task/*/stack; do echo "$s:"; cat "$s"; done
        ps -eo pid,ppid,stat,wchan:32,args 2>/dev/null || ps
        kill -9 $p; wait $p; return 137
    fi
    wait $p
}}
touch '{done}'
for t in $('{exe}' --ignored --list --format terse | sed -n 's/: test$//p'); do
    grep -q " $t\$" '{done}' && continue
    case " {skip} " in *" $t "*) continue;; esac
    case $t in {UNDER_SYSTEMD}*) continue;; esac
    run "$t"; s=$?
    if [ $s -eq 137 ]; then
        echo "HUNG: $t was killed; running it once more"
        run "$t"; s=$?
    fi
    if [ $s -eq 0 ]; then echo "ok $t" >> '{done}'; else echo "FAILED: $t (status $s)"; echo "FAILED $t" >> '{done}'; fi
    sync
done
! grep -q '^FAILED ' '{done}'"#
    );
    let argv = ["sh".to_owned(), "-c".to_owned(), script];
    // 2 GiB: the self-healing tests run a workload of 700 MiB beside the agent.
    let opts = vm::RunOptions {
        memory_mib: 2048,
        timeout: std::time::Duration::from_secs(VM_SUITE_TIMEOUT_S),
        silence: Some(std::time::Duration::from_secs(VM_SILENCE_S)),
        ..vm::RunOptions::default()
    };
    let status = run_again_if_stalled(kernel, &opts, &argv, VM_STALL_RERUNS, || {
        let finished = std::fs::read_to_string(&progress).map_or(0, |t| t.lines().count());
        format!(" after {finished} tests; a new VM runs the tests that had not finished")
    })?;
    if status != 0 {
        let failed: Vec<String> = std::fs::read_to_string(&progress)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("FAILED "))
            .map(str::to_owned)
            .collect();
        bail!(
            "tests in the VM exited with status {status}; failed: {}",
            if failed.is_empty() {
                "none recorded".to_owned()
            } else {
                failed.join(", ")
            }
        );
    }
    Ok(())
}

/// Runs `argv` in a VM of `kernel`; a stalled guest (see [`vm_tests`]) gets a new VM, up to
/// `reruns` times, after a line with the stall and `next()` (what happens now).
fn run_again_if_stalled(
    kernel: &str,
    opts: &vm::RunOptions,
    argv: &[String],
    reruns: u32,
    next: impl Fn() -> String,
) -> Result<i32> {
    let mut stalls = 0;
    loop {
        match vm::run(kernel, opts, argv) {
            Err(e) if stalls < reruns && e.downcast_ref::<vm::Stalled>().is_some() => {
                stalls += 1;
                eprintln!(
                    "xtask: {e:#} (new VM {stalls} of at most {reruns}){}",
                    next()
                );
            }
            other => return other,
        }
    }
}

/// The [`UNDER_SYSTEMD`] tests, in a VM whose PID 1 is the host's systemd.
fn systemd_tests(kernel: &str, exe: &Path) -> Result<()> {
    // The guest boots the host's own systemd (the host suite installs it too).
    setup::apt_install(&["systemd"])?;
    // SAFETY: xtask is single-threaded here.
    unsafe { std::env::set_var("NODEWARDEN_IN_VM", "1") };
    let argv = [
        exe.display().to_string(),
        "--ignored".to_owned(),
        UNDER_SYSTEMD.to_owned(),
    ];
    let opts = vm::RunOptions {
        memory_mib: 2048,
        // A test's bound, and as long again for systemd's start (about 15 s under TCG).
        timeout: std::time::Duration::from_secs(2 * u64::from(VM_TEST_TIMEOUT_S)),
        // One test, without the heartbeat: silent for as long as it runs.
        silence: Some(std::time::Duration::from_secs(
            u64::from(VM_TEST_TIMEOUT_S) + 60,
        )),
        systemd: true,
        ..vm::RunOptions::default()
    };
    let status =
        run_again_if_stalled(kernel, &opts, &argv, 1, || "; once more in a new VM".into())?;
    if status != 0 {
        bail!("tests under systemd in the VM exited with status {status}");
    }
    Ok(())
}

/// The amd64 image, made of the debug build (a release build would cost CI minutes; the arm64
/// image is of the release build): `nodewarden check` from it, as root, in the VM on `kernel`.
fn x86_image_check(kernel: &str) -> Result<()> {
    image::install_packages(vm::Arch::X86_64)?;
    let debug = vm::workspace_root().join("target/debug/nodewarden");
    let text = image_check(vm::Arch::X86_64, &debug, kernel)?;
    for expected in [
        "x86_64",
        "every struct field found",
        "capabilities: every one the agent uses",
        "limit_writes   fexit",
    ] {
        if !text.contains(expected) {
            bail!("`nodewarden check` in the image lacks {expected:?}");
        }
    }
    Ok(())
}

/// The image of `binary`, in a layout of the tests' own: `nodewarden check` from it in a VM of
/// `kernel` (see [`image::check_in_vm`]), and the layout's multi-architecture tag, which names
/// it and the other architecture's when that suite built it, read back by skopeo; what `check`
/// printed.
fn image_check(arch: vm::Arch, binary: &Path, kernel: &str) -> Result<String> {
    let layout = vm::workspace_root().join("target/image-test/nodewarden");
    let built = image::build(arch, binary, &layout)?;
    image::check_index(&layout)?;
    image::check_in_vm(&built, kernel)
}

/// Left out of the arm64 suite besides [`FIRST_SUITE_ONLY`]: what the kernel makes of the text
/// written to a limit file is its version's, not its architecture's, and the arm64 kernel is
/// the same 6.1 as bookworm-6.1 on x86_64, which runs it (40 s under arm64 emulation).
const NOT_ON_ARM64: [&str; 1] = ["hostile::limit_gauges_equal_the_files_whatever_the_written_text"];

/// Work that needs neither root nor a VM, run on a thread of its own at the lowest CPU priority
/// while the VM suites run, which leave part of the two cores idle (an arm64 suite about one;
/// the x86 suites, two vCPUs each, less). Measured in a local run: the cross-build took 19
/// minutes beside the two x86 suites (7 alone) and was ready when the arm64 suite began; the
/// fuzz build went on beside that suite; the whole run took 39 minutes, against 47 to 59
/// before.
struct Background {
    /// The aarch64 agent and VM tests, when asked for (sent as soon as they are built, before
    /// the fuzz run starts).
    arm64: Option<mpsc::Receiver<Result<build::Dist>>>,
    /// The bounded fuzz run.
    fuzz: std::thread::JoinHandle<Result<()>>,
}

impl Background {
    /// Installs what both need now (apt stays on this thread) and starts the thread.
    fn start(arm64: bool) -> Self {
        if arm64 && let Err(e) = image::install_packages(vm::Arch::Aarch64) {
            eprintln!("xtask: the arm64 image's packages: {e:#}");
        }
        let root = vm::workspace_root();
        let arm64_log = root.join("target/arm64-build.log");
        let fuzz_log = root.join("target/fuzz/build.log");
        let arm64_build =
            arm64.then(|| build::dist_later(build::AARCH64, "vm_kernel", arm64_log.clone()));
        let fuzz = fuzz::bounded(Some(fuzz_log.clone()));
        let (tx, rx) = mpsc::channel();
        let fuzz = std::thread::spawn(move || {
            lowest_priority();
            if let Some(b) = arm64_build {
                eprintln!(
                    "xtask: building for aarch64 in the background; cargo's messages in {}",
                    arm64_log.display()
                );
                let _ = tx.send(b.and_then(|f| f()));
            }
            eprintln!(
                "xtask: fuzzing in the background; cargo's messages in {}",
                fuzz_log.display()
            );
            fuzz.and_then(|f| f())
        });
        Self {
            arm64: arm64.then_some(rx),
            fuzz,
        }
    }
}

/// Gives the calling thread, and the processes it starts from now on, the lowest CPU priority
/// (on Linux a nice value is a thread's own, and a child inherits its parent thread's).
fn lowest_priority() {
    // SAFETY: setpriority takes plain integers; who 0 is the calling thread.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0 {
        eprintln!(
            "xtask: background work at normal priority: setpriority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `nodewarden check` in the arm64 VM (it must start, read the kernel's BTF and report each
/// capability: arm64 6.1 refuses fexit, so limit writes use kprobes, and the guard), then the
/// VM kernel tests built for aarch64.
fn arm64_tests(built: &build::Dist, skip: &[&str]) -> Result<()> {
    let kernel = vm::default_kernel(vm::Arch::Aarch64);
    // The release agent as shipped: in its image.
    let text = image_check(vm::Arch::Aarch64, &built.agent, kernel)?;
    for expected in [
        "aarch64",
        "every struct field found",
        "limit_writes   kprobe      attached: memory_max_write",
        "oom_kills      tracepoint  attached: oom/mark_victim",
        "oom_victims    raw_tp      attached: signal_generate",
        "oom_limits     kprobe      attached: out_of_memory",
        "cgroup_changes raw_tp      attached",
        "off_cpu        raw_tp      attached: sched_switch (with prev_state)",
        // BPF LSM needs a BPF trampoline, which arm64 6.1 lacks (as for fexit).
        "guard          UNAVAILABLE",
        "rules with `protect` fall back to restoring",
    ] {
        if !text.contains(expected) {
            bail!("arm64 `nodewarden check` output lacks {expected:?}");
        }
    }
    vm_tests(kernel, &built.test, skip)
}
