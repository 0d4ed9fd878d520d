//! The capabilities the Kubernetes `DaemonSet` grants (deploy/kubernetes/base/daemonset.yaml) are
//! all the agent needs: limited to them, with `no_new_privs`, it attaches what a root agent
//! attaches on this kernel, names writers' executables, and restores a bad limit write.

use std::{net::SocketAddr, time::Duration};

use super::{Feed, TestCgroup, common, heal, require_vm, write_limit_as};
use common::Agent;

/// Linux's capability numbers, for the names the `DaemonSet` may use.
const NUMBERS: [(&str, u32); 9] = [
    ("dac_override", 1),
    ("dac_read_search", 2),
    ("sys_ptrace", 19),
    ("sys_admin", 21),
    ("sys_resource", 24),
    ("syslog", 34),
    ("perfmon", 38),
    ("bpf", 39),
    ("ipc_lock", 14),
];

/// The capabilities the `DaemonSet` adds (after dropping all), in lower case without `CAP_`.
pub(super) fn daemonset_capabilities() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/kubernetes/base/daemonset.yaml"
    );
    let text = std::fs::read_to_string(path).expect("daemonset.yaml");
    let ds: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    let security = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(
        security["capabilities"]["drop"][0].as_str(),
        Some("ALL"),
        "the DaemonSet drops every capability first: {security:?}"
    );
    security["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a name").to_ascii_lowercase())
        .collect()
}

/// The `nodewarden_probe_info` lines the agent serving metrics on `metrics` has: how each
/// capability attached.
pub(super) fn probes(metrics: SocketAddr) -> Vec<String> {
    let body = common::scrape(metrics).expect("scrape");
    let mut lines: Vec<String> = body
        .lines()
        .filter(|l| l.starts_with("nodewarden_probe_info{"))
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// `kernel.perf_event_paranoid`, set for the life of this value and put back on drop.
struct Paranoid(String);

const PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";

impl Paranoid {
    fn set(value: &str) -> Self {
        let old = std::fs::read_to_string(PARANOID).expect("perf_event_paranoid");
        std::fs::write(PARANOID, value).expect("set perf_event_paranoid");
        Self(old.trim().to_owned())
    }
}

impl Drop for Paranoid {
    fn drop(&mut self) {
        let _ = std::fs::write(PARANOID, &self.0);
    }
}

/// What an agent started with `caps` holds once running: all but `sys_resource`, whose one use
/// (raising the locked-memory limit) comes before it drops it.
pub(super) fn after_start(caps: &[String]) -> u64 {
    mask(caps) & !mask(&["sys_resource".to_owned()])
}

/// The capability mask of `caps`.
pub(super) fn mask(caps: &[String]) -> u64 {
    caps.iter()
        .map(|c| {
            let (_, n) = NUMBERS
                .iter()
                .find(|(name, _)| name == c)
                .unwrap_or_else(|| panic!("capability {c:?} is not in NUMBERS"));
            1u64 << n
        })
        .sum()
}

/// An agent limited to `caps` attaches what `as_root` lists, holds exactly [`after_start`] of
/// `caps` with an unlimited locked-memory limit and `no_new_privs`, and names a writer's
/// executable (read from /proc/PID/exe of a process with every capability).
fn limited_agent_matches(caps: &[String], as_root: &[String], start: &dyn Fn() -> Agent) {
    common::restrict_capabilities(mask(caps));
    let agent = start();
    let pid = i32::try_from(agent.child.id()).expect("pid");
    let status = procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .expect("/proc/PID/status");
    assert_eq!(
        status.capeff,
        after_start(caps),
        "the agent's capabilities, for {caps:?}"
    );
    assert_eq!(status.nonewprivs, Some(1), "no_new_privs");
    // CAP_SYS_RESOURCE's one use, made before the agent dropped it.
    let memlock = procfs::process::Process::new(pid)
        .and_then(|p| p.limits())
        .expect("/proc/PID/limits")
        .max_locked_memory;
    assert!(
        matches!(
            (memlock.soft_limit, memlock.hard_limit),
            (
                procfs::process::LimitValue::Unlimited,
                procfs::process::LimitValue::Unlimited
            )
        ),
        "the agent's locked-memory limit, for {caps:?}: {memlock:?}"
    );
    let limited = probes(agent.metrics);
    assert_eq!(
        limited,
        as_root,
        "probes with {caps:?} against root; log:\n{}",
        agent.log()
    );
    let feed = Feed::connect(&agent);
    let cg = TestCgroup::new("nw-privileges");
    write_limit_as("nw-lim-writer", &cg.path, "64M").expect("write");
    let w = feed.wait("limit_write", 1, |r| r["cgroup"] == "/nw-privileges");
    let exe = std::env::current_exe().expect("exe").display().to_string();
    assert_eq!(w[0]["writer"]["exe"], exe.as_str(), "{:#}", w[0]);
    std::thread::sleep(Duration::from_millis(200));
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    for line in log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
    {
        eprintln!("agent with {caps:?}: {line}");
    }
    eprintln!(
        "with {caps:?} only: the {} probe lines of root",
        limited.len()
    );
    check_reports(caps);
}

/// An agent started by root with every capability drops those it does not use before its first
/// thread: each thread holds `five` (the `DaemonSet`'s but `CAP_SYS_RESOURCE`) in its effective,
/// permitted and bounding sets, nothing to pass on, and `no_new_privs`.
fn root_keeps_only_what_it_uses(agent: &Agent, five: u64) {
    let pid = i32::try_from(agent.child.id()).expect("pid");
    let tasks: Vec<_> = procfs::process::Process::new(pid)
        .and_then(|p| p.tasks())
        .expect("/proc/PID/task")
        .flatten()
        .collect();
    for task in &tasks {
        let Ok(s) = task.status() else {
            continue; // a thread that ended meanwhile
        };
        assert_eq!(
            (
                s.capeff,
                s.capprm,
                s.capbnd,
                s.capinh,
                s.capamb,
                s.nonewprivs
            ),
            (five, five, Some(five), 0, Some(0), Some(1)),
            "thread {} ({}): effective, permitted, bounding, inheritable, ambient, no_new_privs",
            task.tid,
            s.name
        );
    }
    assert!(tasks.len() > 2, "the agent's threads: {}", tasks.len());
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("privileges: "))
        .unwrap_or_else(|| panic!("no privileges line in the log:\n{log}"));
    eprintln!("root agent, {} threads: {line}", tasks.len());
}

/// `nodewarden check`, limited to `caps`, says it holds them and lacks the others it uses.
fn check_reports(caps: &[String]) {
    let mut cmd = std::process::Command::new(common::NODEWARDEN);
    cmd.arg("check");
    common::limit(&mut cmd);
    let out = cmd.output().expect("nodewarden check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check with {caps:?}: {text}");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("capabilities:") || l.starts_with("  missing "))
        .collect();
    // The six the agent uses (docs/operations.md, "Privileges").
    for name in [
        "bpf",
        "perfmon",
        "sys_ptrace",
        "dac_read_search",
        "sys_resource",
        "sys_admin",
    ] {
        let missing = format!("  missing CAP_{}:", name.to_ascii_uppercase());
        assert_eq!(
            lines.iter().any(|l| l.starts_with(&missing)),
            !caps.iter().any(|c| c == name),
            "check with {caps:?} on CAP_{}: {text}",
            name.to_ascii_uppercase()
        );
    }
    assert!(!text.contains("also held"), "{text}");
    assert!(text.contains("no_new_privs: set"), "{text}");
    eprintln!("check with {caps:?}: {}", lines.join(" | "));
}

/// The `DaemonSet`'s capabilities give the agent what root gives it, at the kernel's own
/// `perf_event_paranoid` (Debian's 3: its kernels allow `perf_event_open` only to
/// `CAP_SYS_ADMIN` then); without `CAP_SYS_ADMIN` it needs the sysctl at 2, which this checks
/// too. Then the self-healing incident is restored by an agent with the `DaemonSet`'s
/// capabilities.
#[test]
#[ignore = "writes cgroup v2 limits and causes an OOM kill: runs in the VM via `cargo xtask test`"]
fn the_daemonsets_capabilities_are_enough() {
    require_vm();
    let caps = daemonset_capabilities();
    // Enforce, where the guard attaches if the kernel allows: every program the agent has.
    let dir = heal::scratch("nw-privileges");
    let start = || heal::healing_agent("enforce", &dir, &heal::Extra::default(), &[]);
    let root = start();
    root_keeps_only_what_it_uses(&root, after_start(&caps));
    let as_root = probes(root.metrics);
    let (status, log) = root.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");

    let paranoid = std::fs::read_to_string(PARANOID).expect("perf_event_paranoid");
    eprintln!("kernel.perf_event_paranoid is {}", paranoid.trim());
    limited_agent_matches(&caps, &as_root, &start);
    let without_admin: Vec<String> = caps.iter().filter(|c| *c != "sys_admin").cloned().collect();
    assert_ne!(
        without_admin, caps,
        "the DaemonSet adds sys_admin, for perf_event_open"
    );
    {
        let _paranoid = Paranoid::set("2");
        limited_agent_matches(&without_admin, &as_root, &start);
    }

    // Enforce: the bad write of the self-healing incident restored before the workload
    // reaches it.
    common::restrict_capabilities(mask(&caps));
    heal::incident("enforce");
}
