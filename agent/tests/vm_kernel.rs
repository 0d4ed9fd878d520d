//! Kernel tests that write cgroup v2 limits and cause OOM kills: they run only inside the kernel
//! lab's VM (`cargo xtask vm`), never on the development machine, and refuse to run elsewhere.

mod common;

use std::{
    io::{BufRead as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use common::{Agent, otlp};

#[path = "vm_kernel/burst.rs"]
mod burst;
#[path = "vm_kernel/edge.rs"]
mod edge;
#[path = "vm_kernel/guard.rs"]
mod guard;
#[path = "vm_kernel/heal.rs"]
mod heal;
#[path = "vm_kernel/hostile.rs"]
mod hostile;
#[path = "vm_kernel/lossless.rs"]
mod lossless;
#[path = "vm_kernel/oom.rs"]
mod oom;
#[path = "vm_kernel/privileges.rs"]
mod privileges;
#[path = "vm_kernel/under_systemd.rs"]
mod under_systemd;

/// Limit writes that overflow the event ring while the agent is stopped: the ring (1 MiB)
/// holds about 5,040 (208 bytes each with the ring's header); each write costs the test a few
/// ms under emulation, so not many more.
pub(crate) const OVERFLOWING_WRITES: u64 = 6_500;

/// The agent's live event feed, collected in the background.
pub(crate) struct Feed {
    records: Arc<Mutex<Vec<Value>>>,
}

impl Feed {
    pub(crate) fn connect(agent: &Agent) -> Self {
        Self::connect_to(&Agent::events_socket_for(agent.metrics))
    }

    /// The feed of the agent serving `socket`.
    pub(crate) fn connect_to(socket: &Path) -> Self {
        let mut stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        stream.write_all(b"events\n").expect("ask for the events");
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&records);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                let v: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
                sink.lock().expect("lock").push(v);
            }
        });
        Self { records }
    }

    /// Every record so far.
    pub(crate) fn records(&self) -> Vec<Value> {
        self.records.lock().expect("lock").clone()
    }

    /// Waits for `n` records of `kind` with `pred`, and returns them.
    pub(crate) fn wait(&self, kind: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let found: Vec<Value> = self
                .records
                .lock()
                .expect("lock")
                .iter()
                .filter(|r| r["kind"] == kind && pred(r))
                .cloned()
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                start.elapsed() < FEED_WAIT,
                "{} of {n} {kind} records within {FEED_WAIT:?}; all records: {:#?}",
                found.len(),
                self.records.lock().expect("lock")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// How long the feed is waited on for records.
const FEED_WAIT: Duration = Duration::from_secs(20);

/// Set by `cargo xtask test` in the guest's environment.
const IN_VM: &str = "NODEWARDEN_IN_VM";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Fails (never skips silently) when not inside the lab VM with cgroup v2 memory.
fn require_vm() {
    assert!(
        std::env::var_os(IN_VM).is_some(),
        "refusing to write cgroups outside the nodewarden VM: run by `cargo xtask test`"
    );
    let controllers = std::fs::read_to_string(Path::new(CGROUP_ROOT).join("cgroup.controllers"))
        .expect("cgroup2 mounted at /sys/fs/cgroup in the VM");
    assert!(
        controllers.split_whitespace().any(|c| c == "memory"),
        "no memory controller: {controllers}"
    );
}

/// A fresh child cgroup with the memory controller, removed at the end.
struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    fn new(name: &str) -> Self {
        for controller in ["+memory", "+pids", "+cpu"] {
            std::fs::write(
                Path::new(CGROUP_ROOT).join("cgroup.subtree_control"),
                controller,
            )
            .unwrap_or_else(|e| panic!("enable {controller}: {e}"));
        }
        let path = Path::new(CGROUP_ROOT).join(name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).expect("mkdir cgroup");
        Self { path }
    }

    fn memory_event(&self, key: &str) -> u64 {
        let events =
            std::fs::read_to_string(self.path.join("memory.events")).expect("memory.events");
        events
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} missing from memory.events:\n{events}"))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Writes `value` to the cgroup's memory.max from a thread whose comm is `comm`, returning the
/// write's result.
fn write_limit_as(comm: &str, cgroup: &Path, value: &str) -> std::io::Result<()> {
    write_file_as(comm, &cgroup.join("memory.max"), value)
}

/// Writes `value` at offset 0 of `file` with pwrite(2) from a thread whose comm is `comm`.
fn pwrite_as(comm: &str, file: &Path, value: &str) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let (file, value) = (file.to_owned(), value.to_owned());
    on_thread(comm, move || {
        let f = std::fs::OpenOptions::new().write(true).open(file)?;
        f.write_at(value.as_bytes(), 0).map(drop)
    })
}

/// Writes `value` to `file` with writev(2) from a thread whose comm is `comm`.
fn writev_as(comm: &str, file: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let (file, value) = (file.to_owned(), value.to_owned());
    on_thread(comm, move || {
        let mut f = std::fs::OpenOptions::new().write(true).open(file)?;
        f.write_vectored(&[std::io::IoSlice::new(value.as_bytes())])
            .map(drop)
    })
}

/// Writes `value` to `file` the way Python does (`open(...).write(...)`), returning the writer's
/// comm. The arm64 guest has no Python: there the test's own thread writes, and says so.
fn python_write(file: &Path, value: &str) -> String {
    let script = format!(
        "open({:?}, 'w').write({value:?})",
        file.display().to_string()
    );
    // Debian's path: the comm is the name exec'd ("python3"), not a version manager's shim.
    match Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(&script)
        .status()
    {
        Ok(status) => {
            assert!(status.success(), "python3 -c {script}: {status}");
            "python3".to_owned()
        }
        Err(e) => {
            common::skip_notice(
                "the Python writer",
                &format!("no python3 in this guest ({e})"),
            );
            write_file_as("nw-lim-writer", file, value).expect("write");
            "nw-lim-writer".to_owned()
        }
    }
}

/// Writes `value` to `file` (one write(2)) from a thread whose comm is `comm`.
fn write_file_as(comm: &str, file: &Path, value: &str) -> std::io::Result<()> {
    let (file, value) = (file.to_owned(), value.to_owned());
    on_thread(comm, move || std::fs::write(file, value))
}

/// Runs `f` on a thread named `comm`: the kernel reports that name as the writer's comm.
fn on_thread<T: Send + 'static>(comm: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .name(comm.to_owned())
        .spawn(f)
        .expect("spawn writer thread")
        .join()
        .expect("writer thread")
}

#[test]
#[ignore = "writes cgroup v2 limits and causes an OOM kill: runs in the VM via `cargo xtask test`"]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn limit_write_and_oom_kill_are_counted_and_traced() {
    require_vm();
    let receiver = otlp::Receiver::start();
    let endpoint = receiver.endpoint();
    let agent = Agent::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ]);
    assert!(
        common::scrape(agent.metrics)
            .is_some_and(|b| !b.contains("capability=\"limit_writes\",mode=\"unavailable\"")),
        "limit writes must be probed on the lab's x86_64 kernels; log:\n{}",
        agent.log()
    );

    let cg = TestCgroup::new("nw-oom-test");
    let writer = "nw-limit-writer";
    write_limit_as(writer, &cg.path, "64M").expect("memory.max = 64M");
    let rejected = write_limit_as(writer, &cg.path, "abc").expect_err("the kernel rejects abc");
    assert_eq!(rejected.raw_os_error(), Some(libc::EINVAL));
    assert_eq!(
        std::fs::read_to_string(cg.path.join("memory.max"))
            .expect("read memory.max")
            .trim(),
        "67108864"
    );

    // 200 MB held by `tail` (no newline in the input, so it keeps it all) in a 64M cgroup.
    let procs = cg.path.join("cgroup.procs");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo 0 > {} && head -c 209715200 /dev/zero | tail > /dev/null",
            procs.display()
        ))
        .status()
        .expect("run the allocation");
    assert!(
        !status.success(),
        "the allocation should have been killed: {status}"
    );
    let kernel_kills = cg.memory_event("oom_kill");
    assert_eq!(kernel_kills, 1, "memory.events oom_kill");

    let cgroup = "/nw-oom-test";
    agent.wait_for_sample(
        &format!(
            "nodewarden_cgroup_limit_writes_total{{cgroup=\"{cgroup}\",limit=\"memory.max\",result=\"ok\",writer=\"{writer}\"}}"
        ),
        1.0,
        Duration::from_secs(10),
    );
    agent.wait_for_sample(
        &format!(
            "nodewarden_cgroup_limit_writes_total{{cgroup=\"{cgroup}\",limit=\"memory.max\",result=\"EINVAL\",writer=\"{writer}\"}}"
        ),
        1.0,
        Duration::from_secs(10),
    );
    #[expect(clippy::cast_precision_loss, reason = "a count of one")]
    agent.wait_for_sample(
        &format!("nodewarden_oom_kills_total{{cgroup=\"{cgroup}\",scope=\"container\"}}"),
        kernel_kills as f64,
        Duration::from_secs(10),
    );

    // The agent flushes its spans on SIGTERM.
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    assert!(
        receiver.errors().is_empty(),
        "receiver errors: {:?}",
        receiver.errors()
    );
    let spans = receiver.spans();
    let write = spans
        .iter()
        .find(|s| {
            s.name == "cgroup.limit_write"
                && s.attributes.get("cgroup.path").map(String::as_str) == Some(cgroup)
                && s.attributes.get("cgroup.limit.result").map(String::as_str) == Some("ok")
        })
        .unwrap_or_else(|| panic!("no limit write span in {spans:#?}"));
    assert_eq!(write.service, "nodewarden");
    assert_eq!(write.attributes["cgroup.path"], cgroup);
    assert_eq!(write.attributes["cgroup.limit"], "memory.max");
    assert_eq!(write.attributes["cgroup.limit.value"], "64M");
    assert_eq!(write.attributes["process.command"], writer);

    let kills: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "oom.kill" && s.attributes["cgroup.path"] == cgroup)
        .collect();
    assert_eq!(kills.len(), 1, "{spans:#?}");
    let kill = kills[0];
    assert_eq!(kill.attributes["cgroup.path"], cgroup);
    assert_eq!(kill.attributes["oom.victim.command"], "tail");
    assert_eq!(kill.attributes["oom.victim.cgroup_source"], "kernel");

    // The kernel's own record names the same victim.
    let dmesg = Command::new("dmesg").output().expect("dmesg");
    let dmesg = String::from_utf8_lossy(&dmesg.stdout);
    let victim_pid = &kill.attributes["oom.victim.pid"];
    assert!(
        dmesg.contains(&format!("Killed process {victim_pid} (tail)")),
        "dmesg does not name victim {victim_pid}:\n{dmesg}"
    );
    assert!(dmesg.contains(&format!("oom_memcg={cgroup}")), "{dmesg}");
    // The OOM program's own aya-log line reached the agent's log.
    assert!(
        log.contains(&format!("oom: victim pid {victim_pid}")),
        "no aya-log line from the eBPF program in the agent log:\n{log}"
    );
}

/// Each way of probing limit writes, forced in turn: every limit file, several writing styles,
/// a rejected value, and a write to a file that is not a limit, checked against the kernel's own
/// view (the files read back) and the previous values.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn limit_writes_in_each_probe_mode() {
    require_vm();
    for mode in ["fexit", "kprobe", "syscalls"] {
        limit_writes_in_mode(mode);
    }
}

/// An agent exporting spans to a fresh OTLP receiver, with `metrics` and `probes` lines added
/// to an observe-mode configuration.
fn traced_agent(metrics: &str, probes: &str) -> (Agent, otlp::Receiver) {
    let receiver = otlp::Receiver::start();
    let endpoint = receiver.endpoint();
    let config = format!(
        "mode = \"observe\"\nshutdown_drain_ms = 2000\n[metrics]\nlisten = \"127.0.0.1:9717\"\n{metrics}\n[probes]\n{probes}\n"
    );
    let agent = Agent::start_with(
        Some(&config),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    (agent, receiver)
}

#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn limit_writes_in_mode(mode: &str) {
    let (agent, receiver) = traced_agent("", &format!("limit_writes = \"{mode}\""));
    let attached = agent.probe_mode("limit_writes");
    // The lab's arm64 6.1 kernel has no BPF trampolines: fexit must be reported unavailable there.
    if cfg!(target_arch = "aarch64") && mode == "fexit" && attached == "unavailable" {
        let (_, log) = agent.stop();
        let reason = log
            .lines()
            .find(|l| l.contains("limit_writes") && l.contains("fexit: failed on"))
            .unwrap_or_else(|| panic!("fexit unavailable without a reason in the log:\n{log}"));
        common::skip_notice("limit writes in fexit mode", reason.trim());
        return;
    }
    assert_eq!(
        attached,
        mode,
        "forced mode not in use; log:\n{}",
        agent.log()
    );

    if mode == "syscalls" {
        // The BTF-typed entries need bpf_get_current_task_btf (5.11); before that, the entries
        // that read through helpers must have taken over.
        let version = common::kernel_version();
        assert_eq!(
            agent.log().contains("reads the task through helpers"),
            version < (5, 11),
            "wrong syscalls entries for {version:?}; log:\n{}",
            agent.log()
        );
        // The writers below run in this process and its children: its fd table must be the one
        // a process starts with, or the test would not reach the probe's direct-load path.
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        assert!(
            status.lines().any(|l| l == "FDSize:\t64"),
            "this process has outgrown its first fd table:\n{status}"
        );
    }

    // Created after the agent started: known from the mkdir probe, with the kernel's defaults.
    let name = format!("nw-limits-{mode}");
    let cg = TestCgroup::new(&name);
    let cgroup = format!("/{name}");
    let writer = "nw-lim-writer";
    let file = |f: &str| cg.path.join(f);
    write_file_as(writer, &file("memory.max"), "64M").expect("memory.max");
    pwrite_as(writer, &file("memory.low"), "16M\n").expect("memory.low");
    writev_as(writer, &file("memory.min"), "8M").expect("memory.min");
    let swap_writer = python_write(&file("memory.swap.max"), "0");
    write_file_as(writer, &file("pids.max"), "100").expect("pids.max");
    write_file_as(writer, &file("cpu.max"), "50000 100000").expect("cpu.max");
    let err = write_file_as(writer, &file("memory.max"), "abc").expect_err("abc is rejected");
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    // Not a limit: must not be reported.
    write_file_as(writer, &file("memory.oom.group"), "1").expect("memory.oom.group");
    // A shell redirect (comm "sh").
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!("echo 512M > {}", file("memory.high").display()))
        .status()
        .expect("sh");
    assert!(sh.success());

    // A writer whose process has outgrown its first fd table (an fd above 63 open): the
    // syscalls mode reaches its file through helper reads. The table stays big after the
    // close, so this comes last of the writers in this process, and syscalls is the last mode.
    let wide = "nw-lim-wide";
    if mode == "syscalls" {
        // SAFETY: dup2 onto an fd number nothing in this process uses, closed again below.
        assert_eq!(unsafe { libc::dup2(2, 100) }, 100);
        write_file_as(wide, &file("memory.swap.max"), "max").expect("memory.swap.max");
        // SAFETY: the fd opened just above.
        unsafe { libc::close(100) };
    }

    let kernel = |f: &str| {
        std::fs::read_to_string(file(f))
            .expect("read back")
            .trim()
            .to_owned()
    };
    assert_eq!(kernel("memory.max"), "67108864");
    assert_eq!(kernel("memory.high"), "536870912");
    assert_eq!(kernel("cpu.max"), "50000 100000");

    let counter = |limit: &str, who: &str, result: &str| {
        format!(
            "nodewarden_cgroup_limit_writes_total{{cgroup=\"{cgroup}\",limit=\"{limit}\",result=\"{result}\",writer=\"{who}\"}}"
        )
    };
    let wait = Duration::from_secs(10);
    for limit in [
        "memory.max",
        "memory.low",
        "memory.min",
        "pids.max",
        "cpu.max",
    ] {
        agent.wait_for_sample(&counter(limit, writer, "ok"), 1.0, wait);
    }
    agent.wait_for_sample(&counter("memory.swap.max", &swap_writer, "ok"), 1.0, wait);
    agent.wait_for_sample(&counter("memory.max", writer, "EINVAL"), 1.0, wait);
    agent.wait_for_sample(&counter("memory.high", "sh", "ok"), 1.0, wait);
    if mode == "syscalls" {
        agent.wait_for_sample(&counter("memory.swap.max", wide, "ok"), 1.0, wait);
    }
    // Gauges follow the kernel's values (memory in bytes, cpu.max as cores).
    let gauge = |limit: &str| {
        format!("nodewarden_cgroup_limit_bytes{{cgroup=\"{cgroup}\",limit=\"{limit}\"}}")
    };
    agent.wait_for_sample(&gauge("memory.max"), 67_108_864.0, wait);
    agent.wait_for_sample(&gauge("memory.high"), 536_870_912.0, wait);
    agent.wait_for_sample(
        &format!("nodewarden_cgroup_cpu_limit_cores{{cgroup=\"{cgroup}\"}}"),
        0.5,
        wait,
    );
    agent.wait_for_sample(
        &format!("nodewarden_cgroup_pids_limit{{cgroup=\"{cgroup}\"}}"),
        100.0,
        wait,
    );
    let body = common::scrape(agent.metrics).expect("scrape");
    assert!(!body.contains("limit=\"memory.oom.group\""), "{body}");

    drop(cg);
    // Removal drops the cgroup's gauges; its counters stay.
    let start = Instant::now();
    while common::scrape(agent.metrics).is_some_and(|b| b.contains(&gauge("memory.max"))) {
        assert!(
            start.elapsed() < wait,
            "gauges of the removed cgroup stayed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        agent.sample(&counter("memory.max", writer, "ok")),
        Some(1.0)
    );

    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    let spans = receiver.spans();
    let span = |limit: &str, result: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == "cgroup.limit_write"
                    && s.attributes["cgroup.path"] == cgroup
                    && s.attributes["cgroup.limit"] == limit
                    && s.attributes["cgroup.limit.result"] == result
            })
            .unwrap_or_else(|| panic!("no {limit} {result} span ({mode}) in {spans:#?}"))
    };
    let max = span("memory.max", "ok");
    assert_eq!(max.attributes["cgroup.limit.old"], "max");
    assert_eq!(max.attributes["cgroup.limit.new"], "67108864");
    assert_eq!(max.attributes["process.command"], writer);
    let rejected = span("memory.max", "EINVAL");
    assert_eq!(rejected.attributes["cgroup.limit.value"], "abc");
    assert_eq!(rejected.attributes["cgroup.limit.old"], "67108864");
    assert_eq!(rejected.attributes["cgroup.limit.new"], "unknown");
    let low = span("memory.low", "ok");
    assert_eq!(low.attributes["cgroup.limit.old"], "0");
    assert_eq!(low.attributes["cgroup.limit.value"], "16M");
    let cpu = span("cpu.max", "ok");
    assert_eq!(cpu.attributes["cgroup.limit.old"], "max 100000");
    assert_eq!(cpu.attributes["cgroup.limit.new"], "50000 100000");
    let high = span("memory.high", "ok");
    let highs: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.attributes
                .get("cgroup.limit")
                .is_some_and(|l| l == "memory.high")
        })
        .collect();
    assert_eq!(
        high.attributes.get("process.command").map(String::as_str),
        Some("sh"),
        "the memory.high span ({mode}) has no writer; every memory.high span: {highs:#?}"
    );
    assert_eq!(high.attributes["cgroup.limit.new"], "536870912");
}

/// `nodewarden events` streams the running agent's events, filtered by cgroup glob and kind, as
/// JSON lines and as readable lines.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn events_cli_streams_filtered_events() {
    require_vm();
    let agent = Agent::start(&[]);
    let socket = Agent::events_socket_for(agent.metrics);
    let cli = |json: bool| {
        let mut cmd = Command::new(common::NODEWARDEN);
        cmd.arg("events")
            .arg("--socket")
            .arg(&socket)
            .args(["--cgroup", "/nw-events-*", "--kind", "limit_write"])
            .stdout(std::process::Stdio::piped());
        if json {
            cmd.arg("--json");
        }
        common::KillOnDrop(cmd.spawn().expect("spawn nodewarden events"))
    };
    let (mut json, mut human) = (cli(true), cli(false));
    // Both clients connect within this pause; events before it are not theirs to see.
    std::thread::sleep(Duration::from_secs(1));

    let shown = TestCgroup::new("nw-events-a");
    let hidden = TestCgroup::new("nw-other");
    write_limit_as("nw-lim-writer", &shown.path, "64M").expect("write");
    write_limit_as("nw-lim-writer", &hidden.path, "32M").expect("write");
    agent.wait_for_sample(
        "nodewarden_cgroup_limit_writes_total{cgroup=\"/nw-other\",limit=\"memory.max\",result=\"ok\",writer=\"nw-lim-writer\"}",
        1.0,
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    let output = |c: &mut common::KillOnDrop| {
        let _ = c.0.kill();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut c.0.stdout.take().expect("stdout"), &mut out)
            .expect("read");
        out
    };
    let (json, human) = (output(&mut json), output(&mut human));

    let lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(lines.len(), 1, "only the filtered cgroup's write: {json}");
    let e = &lines[0];
    assert_eq!(e["kind"], "limit_write");
    assert_eq!(e["cgroup"], "/nw-events-a");
    assert_eq!(e["limit"], "memory.max");
    assert_eq!(e["value"], "64M");
    assert_eq!(e["old"], "max");
    assert_eq!(e["new"], "67108864");
    assert_eq!(e["result"], "ok");
    assert_eq!(e["writer"]["comm"], "nw-lim-writer");
    assert_eq!(e["writer"]["pid"], std::process::id());
    // The writer (this test) was alive to name its executable.
    let exe = std::env::current_exe().expect("exe").display().to_string();
    assert_eq!(e["writer"]["exe"], exe.as_str());

    assert_eq!(human.lines().count(), 1, "{human}");
    assert!(
        human.contains(&format!(
            "limit_write    /nw-events-a memory.max = \"64M\" (max -> 67108864) ok by nw-lim-writer[{}] {exe} in ",
            std::process::id()
        )),
        "{human}"
    );
}

/// A pod's container cgroup shaped as kubelet (systemd driver) and containerd make them, and a
/// directory with kubelet's log layout standing in for /var/log (no kubelet runs here): pod
/// `shop/cart-7d9f`, container `app`. Removed on drop, leaf first.
struct FakePod {
    logs: PathBuf,
    /// The container's cgroup directory.
    dir: PathBuf,
    /// Its path under the cgroup root, without the leading `/`.
    container: String,
}

impl FakePod {
    const UID: &str = "3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a6b";
    const ID: &str = "4c01db0b339c2c4e3a1f0d9e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b";

    fn create() -> Self {
        let logs = std::env::temp_dir().join("nw-kubelet-logs");
        std::fs::create_dir_all(logs.join("containers")).expect("mkdir");
        std::fs::create_dir_all(logs.join(format!("pods/shop_cart-7d9f_{}/app", Self::UID)))
            .expect("mkdir");
        std::fs::write(
            logs.join(format!("containers/cart-7d9f_shop_app-{}.log", Self::ID)),
            "",
        )
        .expect("log");
        let pod = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            Self::UID.replace('-', "_")
        );
        let container = format!("{pod}/cri-containerd-{}.scope", Self::ID);
        let mut dir = PathBuf::from(CGROUP_ROOT);
        for part in container.split('/') {
            std::fs::write(dir.join("cgroup.subtree_control"), "+memory").expect("+memory");
            dir.push(part);
            std::fs::create_dir_all(&dir).expect("mkdir");
        }
        Self {
            logs,
            dir,
            container,
        }
    }

    /// An observe-mode configuration naming the kubelet log directory, with `extra` appended.
    fn config(&self, extra: &str) -> String {
        format!(
            "mode = \"observe\"\nshutdown_drain_ms = 2000\nkubelet_log_dir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:9717\"\n{extra}",
            self.logs.display()
        )
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        let mut dir = self.dir.clone();
        while dir != Path::new(CGROUP_ROOT) {
            let _ = std::fs::remove_dir(&dir);
            dir.pop();
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// A write to a container's cgroup shaped as kubelet and containerd make them is labelled with
/// the pod's and container's names.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn kubernetes_cgroups_are_named() {
    require_vm();
    let pod = FakePod::create();
    let agent = Agent::start_with(Some(&pod.config("")), &[]);
    write_limit_as("containerd-shim", &pod.dir, "256M").expect("write");
    let container = &pod.container;
    let series = format!(
        "nodewarden_cgroup_limit_writes_total{{cgroup=\"/{container}\",container=\"app\",limit=\"memory.max\",namespace=\"shop\",pod=\"cart-7d9f\",result=\"ok\",writer=\"containerd-shim\"}}"
    );
    agent.wait_for_sample(&series, 1.0, Duration::from_secs(10));
    agent.wait_for_sample(
        &format!(
            "nodewarden_cgroup_limit_bytes{{cgroup=\"/{container}\",container=\"app\",limit=\"memory.max\",namespace=\"shop\",pod=\"cart-7d9f\"}}"
        ),
        268_435_456.0,
        Duration::from_secs(10),
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// `select = ["pod:shop/cart-*"]`: of two contended C programs, the agent measures the futex
/// waits of the one in the pod's container cgroup, labelled with the pod, and not the other.
#[test]
#[ignore = "moves a process into a cgroup: runs in the VM via `cargo xtask test`"]
fn pod_selector_picks_the_pods_processes() {
    require_vm();
    let pod = FakePod::create();
    let agent = Agent::start_with(
        Some(&pod.config("[contention]\nselect = [\"pod:shop/cart-*\"]\n")),
        &[],
    );
    let spawn = || {
        common::KillOnDrop(
            Command::new(common::contention::program("nw-mutex"))
                .args(["-t", "4", "-d", "60"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("run nw-mutex"),
        )
    };
    let (inside, outside) = (spawn(), spawn());
    std::fs::write(pod.dir.join("cgroup.procs"), inside.0.id().to_string())
        .expect("move into the pod");
    let series = format!(
        "nodewarden_futex_waits_total{{comm=\"nw-mutex\",cgroup=\"/{}\",namespace=\"shop\",pod=\"cart-7d9f\",container=\"app\",outcome=\"woken\"}}",
        pod.container
    );
    let start = Instant::now();
    loop {
        let body = common::scrape(agent.metrics).unwrap_or_default();
        if common::sample(&body, &series).is_some_and(|v| v > 0.0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no futex waits of the pod's process: {series}\n{body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let snapshot = common::feed_request(&Agent::events_socket_for(agent.metrics), "contention")
        .unwrap_or_default();
    let snapshot: Value = serde_json::from_str(&snapshot).expect("json");
    let pids: Vec<u64> = snapshot["processes"]
        .as_array()
        .map(|l| l.iter().filter_map(|p| p["pid"].as_u64()).collect())
        .unwrap_or_default();
    assert!(pids.contains(&u64::from(inside.0.id())), "{snapshot}");
    assert!(
        !pids.contains(&u64::from(outside.0.id())),
        "the process outside the pod is not measured: {snapshot}"
    );
    drop((inside, outside));
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// Without BPF (forced here; the agent falls back to it when no probe loads), limit writes are
/// seen by inotify: the new and previous values are right, the writer is unknown and says so,
/// and a write the kernel rejected is not seen (nothing changed).
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn limit_writes_without_bpf() {
    require_vm();
    let receiver = otlp::Receiver::start();
    let endpoint = receiver.endpoint();
    let config = "mode = \"observe\"\nshutdown_drain_ms = 2000\n[metrics]\nlisten = \"127.0.0.1:9717\"\n[probes]\nlimit_writes = \"inotify\"\n";
    let agent = Agent::start_with(
        Some(config),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    assert_eq!(agent.probe_mode("limit_writes"), "inotify");
    let cg = TestCgroup::new("nw-inotify");
    let cgroup = "/nw-inotify";
    write_limit_as("nw-lim-writer", &cg.path, "64M").expect("write");
    let _ = write_limit_as("nw-lim-writer", &cg.path, "abc").expect_err("rejected");
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!("echo 100 > {}", cg.path.join("pids.max").display()))
        .status()
        .expect("sh");
    assert!(sh.success());

    let wait = Duration::from_secs(10);
    let counter = |limit: &str| {
        format!(
            "nodewarden_cgroup_limit_writes_total{{cgroup=\"{cgroup}\",limit=\"{limit}\",result=\"ok\",writer=\"unknown\"}}"
        )
    };
    agent.wait_for_sample(&counter("memory.max"), 1.0, wait);
    agent.wait_for_sample(&counter("pids.max"), 1.0, wait);
    agent.wait_for_sample(
        &format!("nodewarden_cgroup_limit_bytes{{cgroup=\"{cgroup}\",limit=\"memory.max\"}}"),
        67_108_864.0,
        wait,
    );
    let body = common::scrape(agent.metrics).expect("scrape");
    assert!(
        !body.contains("result=\"EINVAL\""),
        "a rejected write changes nothing: {body}"
    );

    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    let spans = receiver.spans();
    let max = spans
        .iter()
        .find(|s| {
            s.name == "cgroup.limit_write"
                && s.attributes["cgroup.path"] == cgroup
                && s.attributes["cgroup.limit"] == "memory.max"
        })
        .unwrap_or_else(|| panic!("no span in {spans:#?}"));
    assert_eq!(max.attributes["cgroup.limit.seen_by"], "inotify");
    assert_eq!(max.attributes["cgroup.limit.old"], "max");
    assert_eq!(max.attributes["cgroup.limit.new"], "67108864");
    assert!(!max.attributes.contains_key("process.command"), "{max:?}");
}

/// Futex waits, in the mode the default configuration gets (fexit where the kernel allows it):
/// against a program's own timing (every architecture), and a contended pthread mutex against
/// bpftrace on the same hooks (where the guest has it); then, where that mode was not already
/// the syscall tracepoints, with them forced, against the program's own timing.
#[test]
#[ignore = "runs in the VM via `cargo xtask test`"]
fn futex_waits_are_measured() {
    require_vm();
    let mode = common::contention::default_futex_mode();
    eprintln!("futex waits in mode {mode}");
    common::contention::with_agent("futex_waits", mode, |agent| {
        common::contention::futex_waits_match_the_programs_own_timing(agent);
        if !common::skip_without("bpftrace") {
            common::contention::futex_waits_agree_with_bpftrace(agent);
        }
    });
    if mode != "syscalls" {
        eprintln!("futex waits in mode syscalls (forced)");
        common::contention::with_agent_config(
            Some("[probes]\nfutex_waits = \"syscalls\"\n"),
            "futex_waits",
            "syscalls",
            common::contention::futex_waits_match_the_programs_own_timing,
        );
    }
}

/// A futex word with a long wait becomes a `futex.contention` span with its stack.
#[test]
#[ignore = "runs in the VM via `cargo xtask test`"]
fn futex_contention_becomes_a_span() {
    require_vm();
    common::contention::contention_episode_becomes_a_span();
}

/// The explicit lock diagnostic: uprobes for a few seconds, call sites and their cost.
#[test]
#[ignore = "runs in the VM via `cargo xtask test`"]
fn diagnose_locks_names_the_call_site() {
    require_vm();
    common::contention::diagnose_locks_names_the_call_site();
}

/// `select = ["map-heavy"]` picks the process heavy in the Go map runtime, by its samples.
#[test]
#[ignore = "runs in the VM via `cargo xtask test`"]
fn map_heavy_processes_are_selected() {
    require_vm();
    common::contention::map_heavy_processes_are_selected();
}

/// A Go program's "concurrent map writes" crash is reported with its reason and process.
#[test]
#[ignore = "runs in the VM via `cargo xtask test`"]
fn go_map_crash_is_reported() {
    require_vm();
    common::contention::with_agent("go_fatal_errors", "uprobe", |agent| {
        common::contention::go_crash_is_reported(agent);
    });
}

/// Three Go shared-map designs ranked by contention from CPU samples and off-CPU time, with
/// the lock's call site.
#[test]
#[ignore = "runs in the VM via `cargo xtask test`"]
fn go_map_designs_ranked_by_contention() {
    require_vm();
    common::contention::with_agent("off_cpu", "raw_tp", |agent| {
        assert_eq!(agent.probe_mode("cpu_samples"), "perf_event");
        common::contention::go_designs_ranked_by_contention(agent);
    });
}
