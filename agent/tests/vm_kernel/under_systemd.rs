//! The systemd unit as shipped (deploy/systemd/nodewarden.service), hardened, runs the agent:
//! under the host's systemd as the guest's PID 1 (`cargo xtask vm --systemd`), in the unit's
//! sandbox, with its capability bounding set and system call filter, the agent attaches what a
//! root agent attaches and names a writer's executable. In mode enforce it refuses to start
//! on the unit's read-only cgroup tree and says why; with enforce.conf it restores a bad write.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use super::{Feed, TestCgroup, common, heal, privileges, require_vm, write_limit_as};
use common::{Agent, START_LIMIT};
use heal::Pod;

/// Where the built-in configuration serves metrics.
const METRICS: &str = "127.0.0.1:9717";
/// Where systemd reads units from that lasts until reboot, beside the guest's read-only /etc.
const UNITS: &str = "/run/systemd/system";
/// The binary and configuration, where the unit's sandbox shows them: the checkout may be
/// under /tmp or /home, which `PrivateTmp=` and `ProtectHome=` hide from the service.
const INSTALL: &str = "/run/nodewarden-test";

fn deployed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd")
        .join(name)
}

fn systemctl(args: &[&str]) -> std::process::Output {
    Command::new("systemctl")
        .args(args)
        .output()
        .expect("systemctl")
}

/// The service's log, from the journal.
fn journal() -> String {
    let out = Command::new("journalctl")
        .args([
            "--unit",
            "nodewarden.service",
            "--no-pager",
            "--output",
            "cat",
        ])
        .output()
        .expect("journalctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The capabilities of the unit's `CapabilityBoundingSet=`, in lower case without `CAP_`.
fn bounding_set() -> Vec<String> {
    let unit = std::fs::read_to_string(deployed("nodewarden.service")).expect("the unit");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet= in the unit");
    line.split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

/// Installs the unit as shipped, with `enforce.conf` when `enforce`, and a test drop-in that
/// only points `ExecStart=` at the binary under test and `config`.
fn install(config: &str, enforce: bool) {
    std::fs::create_dir_all(INSTALL).expect("mkdir");
    let binary = Path::new(INSTALL).join("nodewarden");
    if !binary.exists() {
        std::fs::copy(common::NODEWARDEN, &binary).expect("copy the binary");
    }
    let config_path = Path::new(INSTALL).join("config.toml");
    std::fs::write(&config_path, config).expect("config");
    std::fs::copy(
        deployed("nodewarden.service"),
        Path::new(UNITS).join("nodewarden.service"),
    )
    .expect("install the unit");
    let drop_ins = Path::new(UNITS).join("nodewarden.service.d");
    std::fs::create_dir_all(&drop_ins).expect("mkdir drop-ins");
    std::fs::write(
        drop_ins.join("test.conf"),
        format!(
            "[Service]\nExecStart=\nExecStart={} run --config {}\n",
            binary.display(),
            config_path.display()
        ),
    )
    .expect("the test drop-in");
    let enforce_conf = drop_ins.join("enforce.conf");
    if enforce {
        std::fs::copy(deployed("enforce.conf"), &enforce_conf).expect("enforce.conf");
    } else {
        let _ = std::fs::remove_file(&enforce_conf);
    }
    assert!(
        systemctl(&["daemon-reload"]).status.success(),
        "daemon-reload"
    );
}

/// The running service, stopped on drop.
struct Service {
    pid: i32,
}

impl Service {
    /// Starts the service and waits for its readiness endpoint; its main process.
    fn start() -> Self {
        let out = systemctl(&["start", "nodewarden.service"]);
        assert!(
            out.status.success(),
            "systemctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            journal()
        );
        let metrics: SocketAddr = METRICS.parse().expect("address");
        let start = Instant::now();
        while common::http_get(metrics, "/readyz").is_none() {
            assert!(
                start.elapsed() < START_LIMIT,
                "not ready within {START_LIMIT:?}; {}; journal:\n{}",
                String::from_utf8_lossy(&systemctl(&["status", "nodewarden.service"]).stdout),
                journal()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = systemctl(&[
            "show",
            "--property",
            "MainPID",
            "--value",
            "nodewarden.service",
        ]);
        let pid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("MainPID");
        Self { pid }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = systemctl(&["stop", "nodewarden.service"]);
    }
}

/// Waits for a line of the journal to have every one of `needles`, or panics.
fn wait_in_journal(needles: &[&str]) {
    let start = Instant::now();
    loop {
        let log = journal();
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(
            start.elapsed() < START_LIMIT,
            "no line with {needles:?} in the journal within {START_LIMIT:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
#[ignore = "boots with systemd as PID 1 and writes cgroup v2 limits: runs in `cargo xtask vm --systemd` via `cargo xtask test`"]
fn the_hardened_unit_runs_the_agent() {
    require_vm();
    let init = std::fs::read_to_string("/proc/1/comm").expect("/proc/1/comm");
    assert_eq!(
        init.trim(),
        "systemd",
        "PID 1 must be systemd: run this test in `cargo xtask vm --systemd` (as `cargo xtask test` does)"
    );
    let caps = bounding_set();
    let mut sorted = privileges::daemonset_capabilities();
    sorted.sort();
    let mut unit = caps.clone();
    unit.sort();
    assert_eq!(unit, sorted, "the unit's capabilities are the DaemonSet's");

    // What root attaches with the built-in configuration.
    let root = Agent::start(&[]);
    let as_root = privileges::probes(root.metrics);
    let (status, log) = root.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");

    // Observe (the built-in configuration) under the unit as shipped.
    install("", false);
    let service = Service::start();
    let status = procfs::process::Process::new(service.pid)
        .and_then(|p| p.status())
        .expect("/proc/PID/status");
    assert_eq!(
        status.capeff,
        privileges::after_start(&caps),
        "CapEff of the service: the unit's, but CAP_SYS_RESOURCE once used"
    );
    assert_eq!(status.nonewprivs, Some(1), "NoNewPrivs");
    assert_eq!(status.seccomp, Some(2), "a seccomp filter");
    let metrics: SocketAddr = METRICS.parse().expect("address");
    assert_eq!(
        privileges::probes(metrics),
        as_root,
        "probes under the unit against root's; journal:\n{}",
        journal()
    );
    let feed = Feed::connect_to(Path::new("/run/nodewarden/events.sock"));
    let cg = TestCgroup::new("nw-systemd");
    write_limit_as("nw-lim-writer", &cg.path, "64M").expect("write");
    let w = feed.wait("limit_write", 1, |r| r["cgroup"] == "/nw-systemd");
    let exe = std::env::current_exe().expect("exe").display().to_string();
    assert_eq!(w[0]["writer"]["exe"], exe.as_str(), "{:#}", w[0]);
    drop(service);
    let log = journal();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    eprintln!(
        "under the unit: the {} probe lines of root; warnings and errors:\n{}",
        as_root.len(),
        complaints.join("\n")
    );
    assert!(
        !log.contains("Operation not permitted"),
        "the system call filter or the sandbox refused something:\n{log}"
    );

    // Enforce without enforce.conf: the cgroup tree is read-only, the agent says so and stops.
    let enforce = "mode = \"enforce\"\n";
    install(enforce, false);
    let _ = systemctl(&["reset-failed", "nodewarden.service"]);
    let _ = systemctl(&["start", "nodewarden.service"]);
    wait_in_journal(&["mode enforce", "read-only"]);
    let _ = systemctl(&["stop", "nodewarden.service"]);
    assert!(
        common::http_get(METRICS.parse().expect("address"), "/readyz").is_none(),
        "an agent in mode enforce served on a read-only cgroup tree"
    );

    // With enforce.conf: the self-healing incident's bad write is restored.
    let pod = Pod::new(heal::UID);
    Pod::set(&pod.cgroup, "memory.max", heal::G2);
    install(enforce, true);
    let _ = systemctl(&["reset-failed", "nodewarden.service"]);
    let service = Service::start();
    let feed = Feed::connect_to(Path::new("/run/nodewarden/events.sock"));
    heal::write_as("nw-bad-writer", &pod.cgroup, "memory.max", heal::M512);
    let d = feed.wait("decision", 1, |r| r["cgroup"] == pod.cgroup.as_str());
    assert_eq!(d[0]["rule"], heal::RULE, "{:#}", d[0]);
    assert_eq!(d[0]["outcome"]["result"], "restored", "{:#}", d[0]);
    assert_eq!(Pod::read(&pod.cgroup, "memory.max"), heal::G2);
    drop(service);
    let audit = std::fs::read_to_string("/var/log/nodewarden/audit.jsonl").expect("audit log");
    assert!(
        audit.lines().any(|l| l.contains(&pod.cgroup)),
        "the decision in the audit log the unit's LogsDirectory= holds:\n{audit}"
    );
    eprintln!(
        "under the unit with enforce.conf: restored in {:.1} ms",
        d[0]["outcome"]["latency_seconds"]
            .as_f64()
            .unwrap_or(f64::NAN)
            * 1e3
    );
}
