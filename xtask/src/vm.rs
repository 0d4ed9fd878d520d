//! The kernel lab, `cargo xtask vm`: boots a stock Debian kernel under QEMU and runs a command in
//! it, because the development machine's own kernel lacks what nodewarden needs (kprobes, fentry,
//! the cgroup v2 memory controller).
//!
//! The guest sees the host's `/` read-only (`x86_64`) and the project folder read-write at the same
//! path, so host-built test binaries run unchanged. The command's output is streamed to stdout and
//! its exit status is returned; a failure of the VM itself is reported as [`VM_FAILED`].

mod initramfs;
mod kernels;
mod monitor;
mod qemu;

use std::{
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

pub use kernels::{
    Arch, KernelPaths, default_kernel, download_package, ensure_kernel, kernel_ids, workspace_root,
};

/// The exit status of `cargo xtask vm` when the VM failed rather than the command (QEMU failed,
/// the boot never reached the command, timeout, no status reported); like `timeout(1)`'s 125.
pub const VM_FAILED: i32 = 125;

/// Host variables passed to the command besides those starting with `NODEWARDEN_`.
const PASSED_ENV: &[&str] = &["RUST_LOG", "RUST_BACKTRACE"];

/// The command's PATH: the guest (host root on `x86_64`, busybox on arm64 and riscv64) has its
/// tools there.
const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long QEMU may take to power off after the command reported its status.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// Arguments of `cargo xtask vm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the known kernels (architecture, version, whether downloaded) and exit.
    #[arg(long)]
    pub list: bool,
    /// Guest architecture; its default kernel is used unless --kernel is given.
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Kernel to boot (see --list).
    #[arg(long)]
    pub kernel: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Seconds before QEMU is killed.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Use KVM instead of pure emulation (TCG); only where KVM is real, not on the dev VMs.
    #[arg(long)]
    pub kvm: bool,
    /// Treat a command that prints nothing for this many seconds as a stalled guest: report
    /// what its CPUs are doing (QEMU's monitor, and on `x86_64` the kernel's `SysRq` dumps),
    /// then kill it.
    #[arg(long, value_name = "SECONDS")]
    pub silence: Option<u64>,
    /// Boot the host's systemd as the guest's PID 1 and run the command as a service under it
    /// (`x86_64` only: it needs the host's root).
    #[arg(long)]
    pub systemd: bool,
    /// Command to run inside the guest, as argv (no shell: use `sh -c '...'` for one).
    #[arg(last = true, required_unless_present = "list")]
    pub cmd: Vec<String>,
}

/// How to run a VM.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// QEMU is killed (`SIGKILL`) after this long.
    pub timeout: Duration,
    /// Use KVM instead of TCG (only where KVM is real).
    pub kvm: bool,
    /// QEMU is killed when the command prints nothing for this long, or the guest kernel
    /// reports a soft lockup (a stalled guest) or panics, and the run fails with [`Stalled`].
    pub silence: Option<Duration>,
    /// PID 1 is the host's systemd and the command a service under it (`x86_64` only).
    pub systemd: bool,
}

/// What the guest kernel prints (at emergency level, which gets through `loglevel=1`) when a
/// CPU has spun in the kernel for over 20 s.
const SOFT_LOCKUP: &str = "watchdog: BUG: soft lockup";

/// What the guest kernel prints when it panics (the guest then powers off, `panic=-1`).
/// Seen under TCG on trixie 6.12: an int3 Oops in `syscall_trace_enter` while syscall
/// tracepoints were being switched on (the kernel patches its text with int3).
const KERNEL_PANIC: &str = "Kernel panic - not syncing";

/// The guest stalled: it printed nothing for [`RunOptions::silence`], or its kernel reported
/// a soft lockup or panicked (its report is in the output). QEMU was killed.
#[derive(Debug, thiserror::Error)]
#[error(
    "the guest stalled (a soft lockup, a kernel panic, or nothing printed for {0} s), QEMU killed"
)]
pub struct Stalled(pub u64);

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            timeout: Duration::from_secs(600),
            kvm: false,
            silence: None,
            systemd: false,
        }
    }
}

/// `cargo xtask vm`: the command's exit status, or [`VM_FAILED`] with the reason on stderr.
pub fn main(args: &Args) -> Result<i32> {
    if args.list {
        list()?;
        return Ok(0);
    }
    let opts = RunOptions {
        memory_mib: args.memory,
        timeout: Duration::from_secs(args.timeout),
        kvm: args.kvm,
        silence: args.silence.map(Duration::from_secs),
        systemd: args.systemd,
    };
    let status = pick_kernel(args).and_then(|kernel| run(kernel, &opts, &args.cmd));
    Ok(status.unwrap_or_else(|e| {
        eprintln!("xtask vm: no status from the command, the VM failed: {e:#}");
        VM_FAILED
    }))
}

/// The kernel named by --kernel (checked against --arch), else the default of --arch.
fn pick_kernel(args: &Args) -> Result<&'static str> {
    let Some(id) = &args.kernel else {
        return Ok(default_kernel(args.arch.unwrap_or(Arch::X86_64)));
    };
    let kernel = kernels::find(id)?;
    match args.arch {
        Some(arch) if arch != kernel.arch => {
            bail!("kernel {id} is for {}, not {arch}", kernel.arch)
        }
        _ => Ok(kernel.id),
    }
}

/// Prints the catalogue per architecture, default first: id, and the version when downloaded.
fn list() -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:<8} {:<7} VERSION",
        "KERNEL", "ARCH", "CACHED"
    )?;
    for arch in [Arch::X86_64, Arch::Aarch64, Arch::Riscv64] {
        for id in kernel_ids(arch) {
            let kernel = kernels::find(id)?;
            let (cached, version) = match kernels::cached(kernel) {
                Some(p) => (
                    "yes",
                    format!("{} {} ({})", p.package, p.version, p.release),
                ),
                None => ("no", "resolved on first use".to_owned()),
            };
            let default = if default_kernel(arch) == id {
                " [default]"
            } else {
                ""
            };
            writeln!(out, "{id:<20} {arch:<8} {cached:<7} {version}{default}")?;
        }
    }
    Ok(())
}

/// Boots `kernel` (downloading it on first use), runs `argv` in it and returns its exit status.
///
/// The command's output goes to stdout, live. `Err` means the VM or its preparation failed, not
/// the command; `cargo xtask vm` turns that into [`VM_FAILED`].
pub fn run(kernel: &str, opts: &RunOptions, argv: &[String]) -> Result<i32> {
    if argv.is_empty() {
        bail!("no command to run");
    }
    let paths = ensure_kernel(kernel)?;
    // Before the run's files are written: a failure here leaves none behind.
    let emulator = qemu::for_arch(paths.arch)?;
    let project = workspace_root();
    let host_root = paths.arch == Arch::X86_64;
    if opts.systemd && !host_root {
        bail!("--systemd boots the host's systemd, which only an x86_64 guest sees");
    }
    let cwd = guest_cwd(&project, host_root)?;
    let nonce = nonce();
    let start_marker = format!("NODEWARDEN-VM-START-{nonce}");
    let exit_marker = format!("NODEWARDEN-VM-EXIT-{nonce}=");

    let env = guest_env();
    let plan = initramfs::Plan {
        host_root,
        systemd: opts.systemd,
        project: &project,
        cwd: &cwd,
        env: &env,
        argv,
        start_marker: &start_marker,
        exit_marker: &exit_marker,
    };
    let mut initrd = fs::read(&paths.initramfs)
        .with_context(|| format!("reading {}", paths.initramfs.display()))?;
    initrd.extend(initramfs::command_cpio(&plan)?);
    let run_dir = kernels::lab_dir().join("runs");
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    remove_stale(&run_dir);
    let initrd_path = run_dir.join(format!("{nonce}.cpio"));
    fs::write(&initrd_path, initrd)
        .with_context(|| format!("writing {}", initrd_path.display()))?;

    // In the temporary folder: a socket's path has at most 107 bytes, the project's may not fit.
    let monitor_path = std::env::temp_dir().join(format!("nodewarden-vm-{nonce}.monitor"));
    let stall = StallReport {
        monitor: monitor::Monitor::new(monitor_path.clone()),
        sysrq: paths.arch == Arch::X86_64,
    };
    let mut qemu = qemu_command(
        &emulator,
        &paths,
        opts,
        &initrd_path,
        &project,
        &stall.monitor,
    );
    let result = supervise(&mut qemu, opts, &start_marker, &exit_marker, &stall);
    let _ = fs::remove_file(&initrd_path);
    let _ = fs::remove_file(&monitor_path);
    result.with_context(|| {
        format!(
            "kernel {} ({} {}) on {}",
            paths.id, paths.package, paths.version, emulator.version
        )
    })
}

/// Removes initramfs files that interrupted runs left behind (older than an hour: a run that is
/// still going may be using its file).
fn remove_stale(run_dir: &Path) {
    let Ok(entries) = fs::read_dir(run_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_some_and(|a| a > Duration::from_secs(3600)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Where the command starts: the host's current directory when the guest sees the same folder
/// there (the project, or on `x86_64` anything but the guest's own /tmp, /run, /proc, /sys, /dev),
/// otherwise the project root.
fn guest_cwd(project: &Path, host_root: bool) -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let guest_own = ["/tmp", "/run", "/proc", "/sys", "/dev"];
    if cwd.starts_with(project) || (host_root && !guest_own.iter().any(|d| cwd.starts_with(d))) {
        return Ok(cwd);
    }
    eprintln!(
        "xtask vm: {} is not shared with the guest, the command runs in {}",
        cwd.display(),
        project.display()
    );
    Ok(project.to_path_buf())
}

/// A token that makes this run's markers unlike anything the command could print by chance.
fn nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos:09}", std::process::id())
}

/// The command's environment: a fixed PATH and HOME plus the host's logging and nodewarden
/// variables (names that are not shell identifiers, or values that are not UTF-8, are skipped).
fn guest_env() -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_owned(), GUEST_PATH.to_owned()),
        ("HOME".to_owned(), "/root".to_owned()),
    ];
    let mut passed: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| PASSED_ENV.contains(&k.as_str()) || k.starts_with("NODEWARDEN_"))
        .filter(|(k, _)| k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .collect();
    passed.sort();
    env.extend(passed);
    env
}

/// The QEMU command line: serial console on stdio, the monitor on its socket, the 9p shares, no
/// devices beyond those.
fn qemu_command(
    emulator: &qemu::Qemu,
    paths: &KernelPaths,
    opts: &RunOptions,
    initrd: &Path,
    project: &Path,
    monitor: &monitor::Monitor,
) -> Command {
    let console = match paths.arch {
        Arch::X86_64 | Arch::Riscv64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    };
    let mut cmd = emulator.command();
    match paths.arch {
        Arch::X86_64 => {}
        Arch::Aarch64 => {
            cmd.args(["-M", "virt"]);
        }
        // OpenSBI (QEMU's own copy) is the firmware that starts the kernel in supervisor mode.
        Arch::Riscv64 => {
            cmd.args(["-M", "virt", "-bios", "default"]);
        }
    }
    match (opts.kvm, paths.arch) {
        (true, _) => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        (false, Arch::X86_64 | Arch::Riscv64) => cmd.args(["-accel", "tcg"]),
        // pauth-impdef: QEMU's default pointer-authentication algorithm is very slow under TCG.
        (false, Arch::Aarch64) => cmd.args(["-accel", "tcg", "-cpu", "max,pauth-impdef=on"]),
    };
    cmd.args(["-nodefaults", "-no-reboot", "-display", "none"])
        .arg("-monitor")
        .arg(monitor.qemu_arg())
        .args(["-serial", "stdio", "-smp", "2"])
        .arg("-m")
        .arg(opts.memory_mib.to_string())
        .arg("-kernel")
        .arg(&paths.image)
        .arg("-initrd")
        .arg(initrd)
        // quiet + loglevel=1 keep kernel messages off the console (only emergencies, e.g. a
        // panic, get through); dmesg inside the guest still has everything.
        .arg("-append")
        // sysrq_always_enabled: the stall report's SysRq keys (Debian's default mask refuses them).
        .arg(format!(
            "console={console} quiet loglevel=1 panic=-1 sysrq_always_enabled"
        ));
    let mut share = |tag: &str, path: &Path, readonly: bool| {
        let mut fsdev = OsString::from(format!("local,id={tag},security_model=none,path="));
        // QEMU option values escape commas by doubling them.
        fsdev.push(path.as_os_str().to_string_lossy().replace(',', ",,"));
        fsdev.push(if readonly { ",readonly=on" } else { "" });
        // The host tree spans several filesystems: keep inode numbers unique in the guest.
        fsdev.push(",multidevs=remap");
        cmd.arg("-fsdev").arg(fsdev);
        cmd.arg("-device")
            .arg(format!("virtio-9p-pci,fsdev={tag},mount_tag={tag}"));
    };
    if paths.arch == Arch::X86_64 {
        share("hostroot", Path::new("/"), true);
    }
    share("project", project, false);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// The guest's answer to the stall report's `SysRq` keys is streamed until it has been quiet
/// this long (at most [`STALL_ANSWER_MAX`]); then QEMU is killed. Longer than the soft lockup
/// watchdog's period, whose next report comes whole once the log level is raised.
const STALL_ANSWER_QUIET: Duration = Duration::from_secs(25);
const STALL_ANSWER_MAX: Duration = Duration::from_secs(60);

/// What is asked of a guest that went silent, before it is killed.
struct StallReport {
    monitor: monitor::Monitor,
    /// Send `SysRq` keys (`x86_64`: the PC board's keyboard; the virt boards of arm64 and riscv64
    /// have none).
    sysrq: bool,
}

impl StallReport {
    /// Prints the monitor's view of the vCPUs (spinning or idle, and where), then streams the
    /// console, where the guest kernel answers the `SysRq` keys.
    fn report(&self, silent: Option<Duration>, rx: &mpsc::Receiver<Vec<u8>>, out: &mut impl Write) {
        match silent {
            Some(s) => eprintln!(
                "xtask vm: the guest printed nothing for {} s; what QEMU's monitor says of it:",
                s.as_secs()
            ),
            None => eprintln!("xtask vm: a soft lockup; what QEMU's monitor says of the guest:"),
        }
        match self.monitor.diagnose(self.sysrq) {
            Ok(lines) => lines.iter().for_each(|l| eprintln!("xtask vm:   {l}")),
            Err(e) => eprintln!("xtask vm:   no answer: {e:#}"),
        }
        let until = Instant::now() + STALL_ANSWER_MAX;
        let quiet = || STALL_ANSWER_QUIET.min(until.saturating_duration_since(Instant::now()));
        while let Ok(line) = rx.recv_timeout(quiet()) {
            let _ = out.write_all(&line);
        }
        let _ = out.flush();
    }
}

/// Where the run is, as the console output tells.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Kernel and init messages, kept to explain a failed boot.
    Booting,
    /// The command's output, streamed to stdout.
    Running,
    /// The command ended with this status; the rest is power-off noise.
    Done(i32),
}

/// Runs QEMU, streams the command's output and returns the status from the exit marker.
#[expect(
    clippy::too_many_lines,
    reason = "one loop over the console, read top to bottom"
)]
fn supervise(
    qemu: &mut Command,
    opts: &RunOptions,
    start: &str,
    exit: &str,
    stall: &StallReport,
) -> Result<i32> {
    let timeout = opts.timeout;
    let mut child = qemu.spawn().with_context(|| format!("spawning {qemu:?}"))?;
    let stdout = child.stdout.take().context("no stdout pipe from QEMU")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let started = Instant::now();
    // An absurd --timeout would overflow Instant: treat it as a year.
    let mut deadline = started
        .checked_add(timeout)
        .unwrap_or(started + Duration::from_secs(365 * 24 * 3600));
    let mut phase = Phase::Booting;
    let mut boot_log = Vec::new();
    let mut out = std::io::stdout().lock();
    let mut stalled = false;
    let failure = loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let quiet = match (&phase, opts.silence) {
            (Phase::Running, Some(s)) => s.min(wait),
            _ => wait,
        };
        let line = match rx.recv_timeout(quiet) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                stalled = quiet < wait;
                if stalled {
                    stall.report(Some(quiet), &rx, &mut out);
                }
                let _ = child.kill();
                break match phase {
                    Phase::Done(_) => None,
                    _ if stalled => Some(String::new()),
                    _ => Some(format!(
                        "timed out after {} s, QEMU killed",
                        timeout.as_secs()
                    )),
                };
            }
        };
        // The line without its end, which the console turned from \n into \r\n.
        let (body, had_newline) = match line.strip_suffix(b"\n") {
            Some(b) => (b.strip_suffix(b"\r").unwrap_or(b), true),
            None => (&line[..], false),
        };
        let text = String::from_utf8_lossy(body);
        // The guest kernel says a CPU is stuck (seen under TCG: every vCPU spinning for
        // minutes at a program's attach), or it panicked: the run will not finish.
        if opts.silence.is_some()
            && phase == Phase::Running
            && (text.contains(SOFT_LOCKUP) || text.contains(KERNEL_PANIC))
        {
            let _ = out.write_all(body);
            let _ = out.write_all(b"\n");
            // A soft lockup's backtrace is below the console's log level: the report raises
            // it, and the watchdog's next report (every 20 s or so while stuck) comes whole.
            if text.contains(SOFT_LOCKUP) {
                stall.report(None, &rx, &mut out);
            }
            let _ = child.kill();
            stalled = true;
            break Some(String::new());
        }
        match phase {
            Phase::Booting if text.contains(start) => phase = Phase::Running,
            Phase::Booting => boot_log.push(text.into_owned()),
            Phase::Running => {
                if let Some(pos) = text.find(exit) {
                    // The command's last line may lack a newline: keep what precedes the marker.
                    let _ = out.write_all(&text.as_bytes()[..pos]);
                    let status = text[pos + exit.len()..].trim();
                    let Ok(status) = status.parse() else {
                        let _ = child.kill();
                        break Some(format!("the guest reported a bad exit status {status:?}"));
                    };
                    phase = Phase::Done(status);
                    deadline = Instant::now() + POWEROFF_GRACE;
                } else {
                    let _ = out.write_all(body);
                    if had_newline {
                        let _ = out.write_all(b"\n");
                    }
                }
                let _ = out.flush();
            }
            Phase::Done(_) => {}
        }
    };
    let _ = out.flush();
    let qemu_status = child.wait().context("waiting for QEMU")?;
    if let Some(why) = failure {
        if stalled {
            return Err(Stalled(opts.silence.unwrap_or_default().as_secs()).into());
        }
        dump_boot_log(&phase, &boot_log);
        bail!(why);
    }
    match phase {
        Phase::Done(status) => Ok(status),
        Phase::Booting => {
            dump_boot_log(&phase, &boot_log);
            bail!("QEMU exited ({qemu_status}) before the guest reached the command")
        }
        Phase::Running => {
            bail!("QEMU exited ({qemu_status}) without reporting the command's status")
        }
    }
}

/// Shows what the console printed before the command, to explain a boot that failed.
fn dump_boot_log(phase: &Phase, log: &[String]) {
    if *phase != Phase::Booting {
        return;
    }
    if log.iter().all(|l| l.trim().is_empty()) {
        // Seen when the kernel image does not even fit in the guest's memory.
        eprintln!("xtask vm: the guest printed nothing (too little --memory?)");
        return;
    }
    eprintln!("xtask vm: guest console before the failure:");
    for line in log {
        eprintln!("  | {line}");
    }
}
