//! Self-healing, in the VM: real limit writes into a Kubernetes-shaped cgroup tree (cgroupfs
//! driver), real workloads and real OOM kills; the agent decides, restores, and records. Each
//! test checks the cgroup files and the kernel's `memory.events`, not only the agent's word.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{CGROUP_ROOT, Feed, TestCgroup, common, on_thread, require_vm};
use common::{Agent, KillOnDrop, otlp};

pub(super) const UID: &str = "6d3f1a2b-4c5d-4e6f-8a9b-0c1d2e3f4a5b";
pub(super) const CONTAINER: &str =
    "c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123456789";
pub(super) const G2: &str = "2147483648";
pub(super) const M512: &str = "536870912";
const WAIT: Duration = Duration::from_secs(30);
pub(super) const RULE: &str = "kubernetes-limit-lowered";

/// `/kubepods/burstable/pod<uid>/<container>` (the cgroupfs driver's tree), memory and pids on
/// every level; removed on drop.
pub(super) struct Pod {
    dirs: Vec<PathBuf>,
    /// Paths relative to the mount: the pod's cgroup, and its container's.
    pub(super) cgroup: String,
    pub(super) container: String,
}

impl Pod {
    pub(super) fn new(uid: &str) -> Self {
        let pod = format!("/kubepods/burstable/pod{uid}");
        let container = format!("{pod}/{CONTAINER}");
        let mut dirs = Vec::new();
        let mut dir = PathBuf::from(CGROUP_ROOT);
        for part in container.trim_start_matches('/').split('/') {
            std::fs::write(dir.join("cgroup.subtree_control"), "+memory +pids")
                .unwrap_or_else(|e| panic!("controllers in {}: {e}", dir.display()));
            dir = dir.join(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                dirs.push(dir.clone());
            }
        }
        Self {
            dirs,
            cgroup: pod,
            container,
        }
    }

    pub(super) fn file(cgroup: &str, name: &str) -> PathBuf {
        Path::new(CGROUP_ROOT)
            .join(cgroup.trim_start_matches('/'))
            .join(name)
    }

    pub(super) fn read(cgroup: &str, name: &str) -> String {
        let p = Self::file(cgroup, name);
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_owned()
    }

    pub(super) fn set(cgroup: &str, name: &str, value: &str) {
        let p = Self::file(cgroup, name);
        std::fs::write(&p, value).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }

    pub(super) fn oom_kills(cgroup: &str) -> u64 {
        Self::read(cgroup, "memory.events")
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.parse().ok())
            .expect("oom_kill in memory.events")
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            // A killed workload's cgroup empties a moment later.
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The agent in `mode` with an audit log and a state file in `dir`; `top` goes at the top of
/// its configuration, `remediation` in its `[remediation]` table, `tables` after.
pub(super) fn healing_agent(
    mode: &str,
    dir: &Path,
    config: &Extra<'_>,
    env: &[(&str, &str)],
) -> Agent {
    std::fs::create_dir_all(dir).expect("mkdir");
    let text = format!(
        "mode = \"{mode}\"\nshutdown_drain_ms = 2000\n{}\n[metrics]\nlisten = \"127.0.0.1:9717\"\n\n[remediation]\naudit_log = \"{}\"\nstate_file = \"{}\"\n{}\n{}\n",
        config.top,
        dir.join("audit.jsonl").display(),
        dir.join("desired.json").display(),
        config.remediation,
        config.tables,
    );
    Agent::start_with(Some(&text), env)
}

/// Configuration beyond the tests' common one.
#[derive(Default)]
pub(super) struct Extra<'a> {
    pub(super) top: &'a str,
    pub(super) remediation: &'a str,
    pub(super) tables: &'a str,
}

pub(super) fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A workload in `cgroup` (`nw-hold`): it holds what it is told to, and says when it does.
pub(super) struct Workload {
    child: KillOnDrop,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
}

impl Workload {
    pub(super) fn start(cgroup: &str) -> Self {
        let procs = Pod::file(cgroup, "cgroup.procs");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo 0 > {} && exec {}",
                procs.display(),
                common::contention::program("nw-hold").display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn nw-hold");
        let input = child.stdin.take().expect("stdin");
        let output = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child: KillOnDrop(child),
            input,
            output,
        }
    }

    /// Asks for `mib` MiB more, without waiting.
    pub(super) fn grow(&mut self, mib: u64) {
        use std::io::Write as _;
        writeln!(self.input, "{mib}").expect("ask nw-hold");
    }

    /// Waits until it holds what it was asked for; `false` when it died first (killed).
    pub(super) fn held(&mut self) -> bool {
        use std::io::BufRead as _;
        let mut line = String::new();
        matches!(self.output.read_line(&mut line), Ok(n) if n > 0 && line.starts_with("ok"))
    }

    /// Whether it was killed by SIGKILL (waits for its end).
    pub(super) fn killed(&mut self) -> bool {
        let status = self.child.0.wait().expect("wait");
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL)
    }
}

/// Writes `value` to `cgroup`'s `file` from a thread named `comm` of this (untrusted) process.
pub(super) fn write_as(comm: &str, cgroup: &str, file: &str, value: &str) {
    let (path, value) = (Pod::file(cgroup, file), value.to_owned());
    on_thread(comm, move || std::fs::write(path, value)).expect("write");
}

/// The decisions the feed has about `cgroup`.
fn decisions(feed: &Feed, cgroup: &str) -> Vec<Value> {
    feed.records()
        .into_iter()
        .filter(|r| r["kind"] == "decision" && r["cgroup"] == cgroup)
        .collect()
}

/// The incident: a pod's memory.max set to 512M by an unknown writer while its workload holds
/// 300M and grows to 700M. In enforce the limit is back to 2G before the workload reaches 512M
/// (no OOM kill); in dry-run and observe the kill happens and a would-restore is recorded.
pub(super) fn incident(mode: &str) {
    require_vm();
    let pod = Pod::new(UID);
    Pod::set(&pod.cgroup, "memory.max", G2);
    let dir = scratch(&format!("nw-heal-incident-{mode}"));
    let agent = healing_agent(mode, &dir, &Extra::default(), &[]);
    let feed = Feed::connect(&agent);
    let mut work = Workload::start(&pod.container);
    work.grow(300);
    assert!(work.held(), "the workload died at 300M");
    let before = Pod::oom_kills(&pod.cgroup);

    write_as("nw-bad-writer", &pod.cgroup, "memory.max", M512);
    work.grow(400);
    let grew = work.held();
    let kills = Pod::oom_kills(&pod.cgroup) - before;
    let d = feed.wait("decision", 1, |r| r["cgroup"] == pod.cgroup.as_str());
    let d = &d[0];
    assert_eq!(d["rule"], RULE, "{d:#}");
    assert_eq!(d["desired"], G2, "{d:#}");
    assert_eq!(d["desired_source"], "first_seen", "{d:#}");
    assert_eq!(d["writer"]["comm"], "nw-bad-writer", "{d:#}");
    if mode == "enforce" {
        assert!(grew, "the workload was killed; log:\n{}", agent.log());
        assert_eq!(kills, 0, "memory.events of the pod shows an OOM kill");
        assert_eq!(Pod::read(&pod.cgroup, "memory.max"), G2);
        assert_eq!(d["verdict"], "restore", "{d:#}");
        assert_eq!(d["outcome"]["result"], "restored", "{d:#}");
        assert_eq!(d["outcome"]["read_back"], G2, "{d:#}");
        let latency = d["outcome"]["latency_seconds"].as_f64().expect("latency");
        eprintln!(
            "restored {M512} -> {G2} {:.1} ms after the bad write",
            latency * 1e3
        );
        assert_eq!(
            agent.sample("nodewarden_remediation_latency_seconds_count"),
            Some(1.0)
        );
    } else {
        assert!(!grew, "the workload grew past 512M: was the limit written?");
        assert_eq!(kills, 1, "the kill the restore would have prevented");
        assert_eq!(
            Pod::read(&pod.cgroup, "memory.max"),
            M512,
            "nothing written in {mode}"
        );
        assert_eq!(d["verdict"], "would_restore", "{d:#}");
        let expected = if mode == "dry-run" {
            "checked"
        } else {
            "recorded"
        };
        assert_eq!(d["outcome"]["result"], expected, "{d:#}");
    }
    if !grew {
        assert!(work.killed(), "the workload ended without being killed");
    }
    drop(work);
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    // The audit log has the decision too, as a JSON line.
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit log");
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"kind\":\"decision\"") && l.contains(&pod.cgroup)),
        "{audit}"
    );
}

#[test]
#[ignore = "writes cgroup v2 limits and causes an OOM kill: runs in the VM via `cargo xtask test`"]
fn the_incident_in_enforce_is_restored_before_the_workload_reaches_the_bad_limit() {
    incident("enforce");
}

#[test]
#[ignore = "writes cgroup v2 limits and causes an OOM kill: runs in the VM via `cargo xtask test`"]
fn the_incident_in_dry_run_and_observe_is_recorded_and_nothing_written() {
    incident("dry-run");
    incident("observe");
}

/// A value below usage: the kernel kills inside the write itself; the restore follows, and the
/// write, the kill and the restore are one trace.
#[test]
#[ignore = "writes cgroup v2 limits and causes an OOM kill: runs in the VM via `cargo xtask test`"]
fn a_value_below_usage_kills_inside_the_write_then_is_restored_in_one_trace() {
    require_vm();
    let pod = Pod::new(UID);
    Pod::set(&pod.container, "memory.max", "1073741824");
    let dir = scratch("nw-heal-below-usage");
    let receiver = otlp::Receiver::start();
    let endpoint = receiver.endpoint();
    let agent = healing_agent(
        "enforce",
        &dir,
        &Extra::default(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let feed = Feed::connect(&agent);
    let mut work = Workload::start(&pod.container);
    work.grow(300);
    assert!(work.held(), "the workload died at 300M");
    write_as("nw-bad-writer", &pod.container, "memory.max", "104857600");
    assert!(work.killed(), "the workload was not killed by the write");
    assert_eq!(Pod::oom_kills(&pod.container), 1);
    let d = feed.wait("decision", 1, |r| r["cgroup"] == pod.container.as_str());
    let d = &d[0];
    assert_eq!(d["outcome"]["result"], "restored", "{d:#}");
    assert_eq!(Pod::read(&pod.container, "memory.max"), "1073741824");
    let incident = d["incident"]
        .as_str()
        .unwrap_or_else(|| panic!("the decision names no incident: {d:#}"))
        .to_owned();
    let w = feed.wait("limit_write", 1, |r| {
        r["cgroup"] == pod.container.as_str() && r["value"] == "104857600"
    });
    assert_eq!(w[0]["incident"], incident.as_str());
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    let spans = receiver.spans();
    let in_trace: Vec<&otlp::ReceivedSpan> =
        spans.iter().filter(|s| s.trace_id == incident).collect();
    let named = |n: &str| {
        in_trace
            .iter()
            .find(|s| s.name == n)
            .unwrap_or_else(|| panic!("no {n} span in the incident's trace: {in_trace:#?}"))
    };
    let root = named("oom.incident");
    let kill = named("oom.kill");
    let write = named("cgroup.limit_write");
    let restore = named("cgroup.limit_remediation");
    assert_eq!(kill.parent_span_id, root.span_id);
    assert_eq!(write.parent_span_id, root.span_id);
    assert_eq!(restore.parent_span_id, write.span_id, "{restore:#?}");
    assert_eq!(restore.attributes["remediation.result"], "restored");
}

/// A trusted writer (by executable: `/bin/sh` here) sets 3G: the new desired value, never
/// reverted. A process named `kubelet` running another executable is not trusted.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn a_trusted_writer_moves_the_desired_value_a_namesake_does_not() {
    require_vm();
    let pod = Pod::new(UID);
    Pod::set(&pod.cgroup, "memory.max", G2);
    let dir = scratch("nw-heal-trusted");
    let agent = healing_agent(
        "enforce",
        &dir,
        &Extra {
            top: "builtin_trusted_writers = false",
            remediation: "reconcile_interval_s = 1",
            tables: "[[trusted_writers]]\nname = \"test-kubelet\"\nexe = [\"/bin/sh\"]",
        },
        &[],
    );
    let feed = Feed::connect(&agent);
    let g3 = "3221225472";
    let status = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "echo {g3} > {}",
            Pod::file(&pod.cgroup, "memory.max").display()
        ))
        .status()
        .expect("sh");
    assert!(status.success());
    let d = feed.wait("decision", 1, |r| r["cgroup"] == pod.cgroup.as_str());
    assert_eq!(d[0]["verdict"], "accept", "{:#}", d[0]);
    assert_eq!(d[0]["trusted_writer"], "test-kubelet", "{:#}", d[0]);
    // Reconcile passes (every second here) leave it alone.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(Pod::read(&pod.cgroup, "memory.max"), g3);
    write_as("kubelet", &pod.cgroup, "memory.max", "1073741824");
    let d = feed.wait("decision", 2, |r| r["cgroup"] == pod.cgroup.as_str());
    assert_eq!(d[1]["verdict"], "restore", "{:#}", d[1]);
    assert_eq!(d[1]["writer"]["comm"], "kubelet", "{:#}", d[1]);
    assert_eq!(d[1]["desired"], g3, "{:#}", d[1]);
    assert_eq!(d[1]["desired_source"], "trusted_writer", "{:#}", d[1]);
    assert_eq!(Pod::read(&pod.cgroup, "memory.max"), g3);
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// A loop rewriting 512M every 10 ms: one restore, then a fight is detected; the agent stops
/// acting on the cgroup and says so.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn a_writer_that_fights_back_is_left_alone_and_reported() {
    require_vm();
    let pod = Pod::new(UID);
    Pod::set(&pod.cgroup, "memory.max", G2);
    let dir = scratch("nw-heal-fight");
    let agent = healing_agent("enforce", &dir, &Extra::default(), &[]);
    let feed = Feed::connect(&agent);
    let path = Pod::file(&pod.cgroup, "memory.max");
    on_thread("nw-fighter", move || {
        for _ in 0..300 {
            std::fs::write(&path, M512).expect("write");
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let fights = feed.wait("decision", 1, |r| {
        r["cgroup"] == pod.cgroup.as_str() && r["reason"] == "fight" && r["verdict"] == "alert"
    });
    assert_eq!(fights.len(), 1);
    // Well past the cooldown: nothing more was written.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(Pod::read(&pod.cgroup, "memory.max"), M512);
    let restores = decisions(&feed, &pod.cgroup)
        .into_iter()
        .filter(|d| d["verdict"] == "restore")
        .count();
    assert_eq!(restores, 1, "{:#?}", decisions(&feed, &pod.cgroup));
    assert_eq!(
        agent.sample(&format!(
            "nodewarden_remediation_fights_total{{rule=\"{RULE}\"}}"
        )),
        Some(1.0)
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// The agent stopped, the limit changed, the agent started: the reconciler restores it, from
/// the desired value the previous agent kept.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn a_change_while_the_agent_was_stopped_is_restored_at_start_up() {
    require_vm();
    let pod = Pod::new(UID);
    Pod::set(&pod.cgroup, "memory.max", G2);
    let dir = scratch("nw-heal-restart");
    let agent = healing_agent("enforce", &dir, &Extra::default(), &[]);
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    let kept = std::fs::read_to_string(dir.join("desired.json")).expect("the state file");
    assert!(kept.contains(&pod.cgroup), "{kept}");
    Pod::set(&pod.cgroup, "memory.max", M512);
    let agent = healing_agent("enforce", &dir, &Extra::default(), &[]);
    let start = Instant::now();
    while Pod::read(&pod.cgroup, "memory.max") != G2 {
        assert!(
            start.elapsed() < WAIT,
            "not restored; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit log");
    let restore: Value = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|d| d["cgroup"] == pod.cgroup.as_str() && d["verdict"] == "restore")
        .unwrap_or_else(|| panic!("no restore in the audit log:\n{audit}"));
    assert_eq!(restore["trigger"], "scan", "{restore:#}");
    assert_eq!(restore["outcome"]["result"], "restored", "{restore:#}");
}

/// Bad writes while the ring overflows (the agent stopped): nothing is done before the resync,
/// and every bad value is restored after it.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn after_a_ring_overflow_nothing_acts_before_the_resync_then_everything_is_restored() {
    require_vm();
    let uids: Vec<String> = (0..5)
        .map(|i| format!("6d3f1a2b-4c5d-4e6f-8a9b-0c1d2e3f4a{i:02}"))
        .collect();
    let pods: Vec<Pod> = uids.iter().map(|u| Pod::new(u)).collect();
    for p in &pods {
        Pod::set(&p.cgroup, "memory.max", G2);
    }
    let flood = Pod::new("6d3f1a2b-4c5d-4e6f-8a9b-0c1d2e3f4aff");
    let dir = scratch("nw-heal-overflow");
    let agent = healing_agent("enforce", &dir, &Extra::default(), &[]);
    let feed = Feed::connect(&agent);
    let pid = libc::pid_t::try_from(agent.child.id()).expect("pid");
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    for (i, p) in pods.iter().enumerate() {
        write_as("nw-bad-writer", &p.cgroup, "memory.max", M512);
        if i == 2 {
            for n in 0..crate::OVERFLOWING_WRITES {
                Pod::set(
                    &flood.container,
                    "memory.high",
                    &(1_000_000_000 + n * 4096).to_string(),
                );
            }
        }
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let start = Instant::now();
    while pods
        .iter()
        .any(|p| Pod::read(&p.cgroup, "memory.max") != G2)
    {
        assert!(
            start.elapsed() < WAIT,
            "not all restored; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lost = agent
        .sample("nodewarden_events_lost_total{kind=\"limit_write\",reason=\"ring_full\"}")
        .unwrap_or(0.0);
    assert!(lost > 0.0, "the ring did not overflow");
    assert!(
        agent
            .sample("nodewarden_resyncs_total{reason=\"events_lost\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    let about_pods: Vec<Value> = feed
        .records()
        .into_iter()
        .filter(|r| {
            r["kind"] == "decision" && pods.iter().any(|p| r["cgroup"] == p.cgroup.as_str())
        })
        .collect();
    assert_eq!(
        about_pods.first().map(|d| d["reason"].clone()),
        Some(Value::from("awaiting_resync")),
        "a decision before the resync: {about_pods:#?}"
    );
    eprintln!(
        "{lost} limit writes lost; {} decisions about the pods",
        about_pods.len()
    );
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}

/// Mode enforce on a read-only cgroup2 mount: the agent refuses to start, and says why.
#[test]
#[ignore = "mounts cgroup2: runs in the VM via `cargo xtask test`"]
fn enforce_on_a_read_only_hierarchy_refuses_to_start() {
    require_vm();
    let mnt = scratch("nw-ro-cgroup");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let ok = Command::new("mount")
        .args(["-t", "cgroup2", "-o", "ro", "none"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(ok.success(), "mount -o ro cgroup2");
    let config = mnt.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"enforce\"\nshutdown_drain_ms = 1000\ncgroup_root = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            mnt.display()
        ),
    )
    .expect("config");
    let out = Command::new(common::NODEWARDEN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    let _ = Command::new("umount").arg(&mnt).status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("mode enforce") && stderr.contains("read-only"),
        "{stderr}"
    );
}

/// The rules file is reloaded when it changes and on SIGHUP; an invalid one is refused whole
/// and the previous rules stay.
#[test]
#[ignore = "writes cgroup v2 limits: runs in the VM via `cargo xtask test`"]
fn rules_reload_on_change_and_sighup_and_an_invalid_file_is_refused_whole() {
    require_vm();
    let dir = scratch("nw-heal-rules");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let rules = dir.join("rules.toml");
    let pin = |v: &str| {
        format!(
            "[[rule]]\nname = \"pinned\"\nlimits = [\"memory.max\"]\nwhen = \"lowered-by-untrusted\"\naction = \"restore\"\npin = \"{v}\"\ncgroups = [\"/nw-rules\"]\n"
        )
    };
    std::fs::write(&rules, pin("1G")).expect("rules");
    let _cg = TestCgroup::new("nw-rules");
    let top = format!("rules = \"{}\"", rules.display());
    let agent = healing_agent(
        "enforce",
        &dir,
        &Extra {
            top: &top,
            ..Extra::default()
        },
        &[],
    );
    let feed = Feed::connect(&agent);
    let reloads = |result: &str| {
        agent
            .sample(&format!(
                "nodewarden_rules_reloads_total{{result=\"{result}\"}}"
            ))
            .unwrap_or(0.0)
    };
    // An invalid file: refused, with its place; `nodewarden rules validate` says the same.
    std::fs::write(&rules, "[[rule]]\nname = \"broken\"\nlimits = [\"memory.max\"]\nwhen = \"sometimes\"\naction = \"restore\"\n").expect("rules");
    let start = Instant::now();
    while reloads("invalid") < 1.0 {
        assert!(
            start.elapsed() < WAIT,
            "not reloaded; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        agent.log().contains("4:8: unknown variant `sometimes`"),
        "{}",
        agent.log()
    );
    let out = Command::new(common::NODEWARDEN)
        .args(["rules", "validate"])
        .arg(&rules)
        .output()
        .expect("validate");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("4:8:"));
    // The previous rules still apply: 512M is below the pinned 1G.
    write_as("nw-bad-writer", "/nw-rules", "memory.max", M512);
    let d = feed.wait("decision", 1, |r| r["cgroup"] == "/nw-rules");
    assert_eq!(d[0]["desired"], "1073741824", "{:#}", d[0]);
    // A valid file takes effect; so does SIGHUP (even with the file unchanged).
    std::fs::write(&rules, pin("768M")).expect("rules");
    let start = Instant::now();
    while reloads("ok") < 1.0 {
        assert!(
            start.elapsed() < WAIT,
            "not reloaded; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = libc::pid_t::try_from(agent.child.id()).expect("pid");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let start = Instant::now();
    while reloads("ok") < 2.0 {
        assert!(
            start.elapsed() < WAIT,
            "SIGHUP did not reload; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(1500));
    write_as("nw-bad-writer", "/nw-rules", "memory.max", "268435456");
    let d = feed.wait("decision", 2, |r| r["cgroup"] == "/nw-rules");
    assert_eq!(d[1]["desired"], "805306368", "{:#}", d[1]);
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
}
