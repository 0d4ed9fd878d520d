//! Kernel tests for the machine's own kernel: load and attach what it allows, serve metrics, stop
//! cleanly. Nothing here writes a cgroup or causes an OOM kill (those run in VM tests).
//! Run by `cargo xtask test` as root.

mod common;

use std::{process::Command, time::Duration};

use common::{Agent, NODEWARDEN, is_root};

#[path = "host_kernel/prometheus_operator.rs"]
mod prometheus_operator;

const NEEDS_ROOT: &str = "needs root and a BPF-capable kernel: run by `cargo xtask test`";

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn agent_starts_reports_probes_and_stops_on_sigterm() {
    assert!(is_root(), "{NEEDS_ROOT}");
    let agent = Agent::start(&[]);

    // Every capability reports its mode; those this kernel refuses are reported, not fatal.
    let mode = |capability: &str| agent.probe_mode(capability);
    // Tracepoints and raw tracepoints load on every kernel we support, this one included.
    assert_eq!(mode("oom_kills"), "tracepoint");
    assert_eq!(mode("oom_victims"), "raw_tp");
    assert_eq!(mode("cgroup_changes"), "raw_tp");
    // This kernel allows neither fentry nor kprobes: the limit an OOM kill hit is derived.
    let oom_limits = mode("oom_limits");
    assert!(
        ["fentry", "kprobe", "memory.events"].contains(&oom_limits.as_str()),
        "{oom_limits}"
    );
    let limit_writes = mode("limit_writes");
    assert!(
        ["fexit", "kprobe", "syscalls", "unavailable"].contains(&limit_writes.as_str()),
        "{limit_writes}"
    );
    if limit_writes == "unavailable" {
        let log = agent.log();
        assert!(
            log.lines()
                .any(|l| l.contains("probe unavailable on this kernel")
                    && l.contains("limit_writes")),
            "limit_writes not attached but not reported in the log:\n{log}"
        );
    }

    // The kubelet's probes: live (the event loop turns) and ready (start-up is over).
    for (path, body) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let answer = common::http_request(agent.metrics, path, Duration::from_secs(10));
        assert_eq!(answer, Ok((200, body.to_owned())), "{path}");
    }

    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit status {status}; log:\n{log}");
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
}

/// `nodewarden check`'s report (it must succeed).
fn check() -> String {
    assert!(is_root(), "{NEEDS_ROOT}");
    let out = Command::new(NODEWARDEN)
        .arg("check")
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "check failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn check_lists_every_probe_with_its_status() {
    let text = check();
    for capability in [
        "limit_writes",
        "oom_limits",
        "oom_kills",
        "oom_victims",
        "cgroup_changes",
    ] {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(capability))
            .unwrap_or_else(|| panic!("{capability} missing from check output:\n{text}"));
        assert!(
            line.contains(" attached: ") || line.ends_with("UNAVAILABLE"),
            "no status for {capability}: {line}"
        );
    }
    assert!(text.contains("kernel BTF: "), "{text}");
}

/// `nodewarden check` says whether the guard can attach on this kernel, and if not why, and
/// what rules with `protect` get then.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn check_says_whether_the_guard_can_attach_and_why_not() {
    let text = check();
    let status = text
        .lines()
        .find(|l| l.trim_start().starts_with("guard "))
        .unwrap_or_else(|| panic!("no guard status in:\n{text}"));
    let summary = text
        .lines()
        .find(|l| l.starts_with("guard: "))
        .unwrap_or_else(|| panic!("no guard summary in:\n{text}"));
    if status.contains(" attached: file_open") {
        assert!(summary.starts_with("guard: available"), "{summary}");
        assert!(summary.contains("fails open"), "{summary}");
    } else {
        assert!(status.ends_with("UNAVAILABLE"), "{status}");
        let why = summary
            .strip_prefix("guard: unavailable (")
            .and_then(|r| r.split_once("): "))
            .unwrap_or_else(|| panic!("no reason: {summary}"));
        assert!(why.0.len() > 10, "the reason says nothing: {summary}");
        assert_eq!(
            why.1, "rules with `protect` fall back to restoring",
            "{summary}"
        );
    }
    eprintln!("{status}\n{summary}");
}

/// The alert rules pass `promtool check rules`, and their unit tests (each alert fires on the
/// agent's series when what it watches for happens, and only then) pass `promtool test rules`.
/// The unit test `the_alert_rules_name_only_what_the_agent_exports` ties the series in them to
/// the agent's registry.
#[test]
#[ignore = "needs Debian's prometheus package (promtool): run by `cargo xtask test`"]
fn alert_rules_pass_promtool() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        ["check", "rules", "nodewarden-alerts.yaml"],
        ["test", "rules", "nodewarden-alerts.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool (Debian package `prometheus`; `cargo xtask test` installs it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {}:\n{text}", args.join(" "));
        assert!(
            text.contains("SUCCESS"),
            "promtool {}:\n{text}",
            args.join(" ")
        );
        eprintln!("promtool {}: {}", args.join(" "), text.trim());
    }
}

/// The systemd unit (deploy/systemd), alone and with its enforce.conf drop-in, scores 4.0 or
/// lower in `systemd-analyze security` (0 is the most locked down, 10 the least). The VM test
/// `under_systemd::the_hardened_unit_runs_the_agent` runs the agent under both.
#[test]
#[ignore = "needs systemd-analyze (Debian package systemd): run by `cargo xtask test`"]
fn systemd_unit_scores_4_or_lower() {
    let deployed = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let dir = std::env::temp_dir().join(format!("nw-systemd-score-{}", std::process::id()));
    let drop_ins = dir.join("nodewarden.service.d");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(
        deployed.join("nodewarden.service"),
        dir.join("nodewarden.service"),
    )
    .expect("copy the unit");
    for enforce in [false, true] {
        if enforce {
            // Offline, systemd-analyze reads the drop-ins beside the unit file.
            std::fs::create_dir_all(&drop_ins).expect("mkdir");
            std::fs::copy(deployed.join("enforce.conf"), drop_ins.join("enforce.conf"))
                .expect("copy enforce.conf");
        }
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(dir.join("nodewarden.service"))
            .output()
            .expect(
                "run systemd-analyze (Debian package `systemd`; `cargo xtask test` installs it)",
            );
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("nodewarden.service: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no overall exposure level in:\n{text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        let what = if enforce {
            "with enforce.conf"
        } else {
            "as shipped"
        };
        eprintln!("systemd-analyze security, the unit {what}: {score:.1}");
        assert!(score <= 4.0, "the unit {what} scores {score:.1}:\n{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each Kubernetes overlay (deploy/kubernetes/overlays), rendered by `kubectl kustomize`, parses
/// strictly into the Kubernetes API types: every object is of a known kind and goes through its
/// type and back unchanged (a misspelt or misplaced field would be dropped by the type, and
/// ignored by the API server). Then each overlay does what it is for.
#[test]
#[ignore = "needs kubectl (Debian package kubernetes-client): run by `cargo xtask test`"]
fn kubernetes_overlays_parse_strictly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    for (overlay, mode, cgroup_read_only) in
        [("observe", "observe", true), ("enforce", "enforce", false)]
    {
        let text = kustomize(&root.join("overlays").join(overlay));
        let Rendered {
            mut kinds,
            daemonset,
            config,
        } = parse_strictly(overlay, &text);
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "DaemonSet",
                "Namespace",
                "Service",
                "ServiceAccount"
            ],
            "{overlay}: the objects rendered"
        );
        // What the overlay is for: the mode, and whether the agent may write the cgroup tree.
        let config = config.expect("ConfigMap").data.expect("data");
        let toml = config.get("config.toml").expect("config.toml");
        assert!(
            toml.contains(&format!("mode = \"{mode}\"")),
            "{overlay}: {toml}"
        );
        assert_eq!(
            config.contains_key("rules.toml"),
            mode == "enforce",
            "{overlay}: {config:?}"
        );
        let pod = daemonset
            .expect("DaemonSet")
            .spec
            .expect("spec")
            .template
            .spec
            .expect("pod spec");
        let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
        let cgroup = mounts
            .iter()
            .find(|m| m.mount_path == "/sys/fs/cgroup")
            .expect("cgroup mount");
        assert_eq!(
            cgroup.read_only,
            Some(cgroup_read_only),
            "{overlay}: {cgroup:?}"
        );
        let mut writable: Vec<&str> = mounts
            .iter()
            .filter(|m| m.read_only != Some(true))
            .map(|m| m.mount_path.as_str())
            .collect();
        writable.sort_unstable();
        let expected: &[&str] = if cgroup_read_only {
            &["/run/nodewarden", "/var/lib/nodewarden"]
        } else {
            &["/run/nodewarden", "/sys/fs/cgroup", "/var/lib/nodewarden"]
        };
        assert_eq!(writable, expected, "{overlay}: mounts writable");
        assert_ne!(
            pod.host_network,
            Some(true),
            "{overlay}: metrics are served on the pod's address"
        );
        eprintln!(
            "{overlay}: {} objects parsed strictly, mode {mode}, writable {writable:?}",
            kinds.len()
        );
    }
}

/// `kubectl kustomize DIR`: the rendered objects, as multi-document YAML.
fn kustomize(dir: &std::path::Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("run kubectl (Debian package kubernetes-client; `cargo xtask test` installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The objects of a rendered overlay, each parsed strictly into its API type.
struct Rendered {
    kinds: Vec<String>,
    daemonset: Option<k8s_openapi::api::apps::v1::DaemonSet>,
    config: Option<k8s_openapi::api::core::v1::ConfigMap>,
}

/// Parses every object of `text` (multi-document YAML) into its API type, requiring the round
/// trip through the type to change nothing and namespaced objects to be in `nodewarden`.
fn parse_strictly(overlay: &str, text: &str) -> Rendered {
    use k8s_openapi::api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    };
    use serde::Deserialize as _;
    let mut kinds = Vec::new();
    let mut daemonset = None;
    let mut config = None;
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let object = serde_json::Value::deserialize(doc).expect("YAML");
        let kind = object["kind"].as_str().expect("kind").to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let back = match kind.as_str() {
            "Namespace" => round_trip::<Namespace>(&object).1,
            "ServiceAccount" => round_trip::<ServiceAccount>(&object).1,
            "ClusterRole" => round_trip::<ClusterRole>(&object).1,
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(&object).1,
            "ConfigMap" => {
                let (typed, back) = round_trip::<ConfigMap>(&object);
                config = Some(typed);
                back
            }
            "Service" => round_trip::<Service>(&object).1,
            "DaemonSet" => {
                let (typed, back) = round_trip::<DaemonSet>(&object);
                daemonset = Some(typed);
                back
            }
            other => panic!("{overlay}: {other} {name} is of a kind this test does not check"),
        };
        assert_eq!(
            back, object,
            "{overlay}: {kind} {name} changed going through its API type: a field it does not know"
        );
        let cluster_scoped =
            ["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&kind.as_str());
        assert_eq!(
            object["metadata"]["namespace"].as_str(),
            (!cluster_scoped).then_some("nodewarden"),
            "{overlay}: {kind} {name} in the wrong namespace"
        );
        kinds.push(kind);
    }
    Rendered {
        kinds,
        daemonset,
        config,
    }
}

/// `object` turned into a `T`, and that turned back.
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    object: &serde_json::Value,
) -> (T, serde_json::Value) {
    let typed: T =
        serde_json::from_value(object.clone()).unwrap_or_else(|e| panic!("{e}: {object}"));
    let back = serde_json::to_value(&typed).expect("serialize");
    (typed, back)
}

/// A real Prometheus server scrapes the agent: the target is up and the probe gauges arrive.
#[test]
#[ignore = "needs root, a BPF-capable kernel and Debian's prometheus: run by `cargo xtask test`"]
fn prometheus_scrapes_the_agent() {
    assert!(is_root(), "{NEEDS_ROOT}");
    let agent = Agent::start(&[]);
    let dir = std::env::temp_dir().join(format!("nodewarden-prom-{}", agent.metrics.port()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: nodewarden\n    static_configs:\n      - targets: ['{}']\n",
            agent.metrics
        ),
    )
    .expect("write prometheus.yml");
    let web = common::free_port();
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start prometheus (Debian package `prometheus`; `cargo xtask test` installs it)");
    let prometheus = common::KillOnDrop(prometheus);

    let query = |q: &str| -> Option<serde_json::Value> {
        let body = common::http_get(web, &format!("/api/v1/query?query={q}"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"]
            .as_array()?
            .first()
            .map(|r| r["value"][1].clone())
    };
    let start = std::time::Instant::now();
    let mut last = (None, None);
    while start.elapsed() < Duration::from_secs(60) {
        last = (
            query("up%7Bjob%3D%22nodewarden%22%7D"),
            query(
                "nodewarden_probe_info%7Bcapability%3D%22oom_kills%22%2Cmode%3D%22tracepoint%22%7D",
            ),
        );
        if last.0.as_ref().and_then(|v| v.as_str()) == Some("1")
            && last.1.as_ref().and_then(|v| v.as_str()) == Some("1")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(prometheus);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        (
            last.0.as_ref().and_then(|v| v.as_str()),
            last.1.as_ref().and_then(|v| v.as_str())
        ),
        (Some("1"), Some("1")),
        "prometheus never saw the agent up with its probe gauge; agent log:\n{}",
        agent.log()
    );
}

/// The agent reports its own cost: build info, the process metrics (resident memory checked
/// against /proc), and each attached eBPF program's runs and run time from the kernel's
/// statistics, which the agent turns on when asked: they grow with the activity its probes
/// see, and the programs with series are those its BPF links hold. By default (`auto`) they
/// stay off on this kernel, whose probes are on syscall tracepoints.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn agent_reports_its_own_cost() {
    assert!(is_root(), "{NEEDS_ROOT}");
    let default = Agent::start(&[]);
    let body = common::scrape(default.metrics).expect("scrape");
    assert_eq!(
        common::sample(&body, "nodewarden_bpf_stats_enabled"),
        Some(0.0),
        "auto leaves the statistics off with probes on syscall tracepoints; log:\n{}",
        default.log()
    );
    let (status, log) = default.stop();
    assert!(status.success(), "agent exit {status}; log:\n{log}");
    let agent = Agent::start_with(Some("[metrics]\nbpf_stats = \"on\"\n"), &[]);
    let pid = agent.child.id();
    let body = common::scrape(agent.metrics).expect("scrape");
    check_build_info(&body);

    let rss = common::sample(&body, "process_resident_memory_bytes").unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmRSS")
        * 1024.0;
    eprintln!("process_resident_memory_bytes {rss}, VmRSS {vm_rss} bytes");
    assert!(
        rss > 0.0 && (0.5..=2.0).contains(&(rss / vm_rss)),
        "process_resident_memory_bytes {rss}, /proc VmRSS {vm_rss} bytes"
    );
    for series in ["process_cpu_seconds_total", "process_open_fds"] {
        assert!(
            common::sample(&body, series).is_some(),
            "no {series} in:\n{body}"
        );
    }
    check_cpu_seconds(&agent);
    assert_eq!(
        common::sample(&body, "nodewarden_bpf_stats_enabled"),
        Some(1.0),
        "kernel 6.18 counts runs for root; log:\n{}",
        agent.log()
    );

    let before = program_runs(&common::scrape(agent.metrics).expect("scrape"));
    // Context switches and futex waits: two threads hand a token back and forth.
    let (to_b, from_a) = std::sync::mpsc::channel::<u32>();
    let (to_a, from_b) = std::sync::mpsc::channel::<u32>();
    let b = std::thread::spawn(move || {
        while let Ok(n) = from_a.recv() {
            let _ = to_a.send(n);
        }
    });
    for n in 0..5000 {
        to_b.send(n).expect("send");
        from_b.recv().expect("recv");
    }
    drop(to_b);
    b.join().expect("join");
    let after = program_runs(&common::scrape(agent.metrics).expect("scrape"));
    for (name, (runs, seconds)) in &after {
        eprintln!(
            "{name}: {runs} runs, {seconds} s (before: {:?})",
            before.get(name)
        );
    }
    let (switch, (runs, seconds)) = [
        agent_common::programs::SCHED_SWITCH,
        agent_common::programs::SCHED_SWITCH_COMPAT,
    ]
    .iter()
    .find_map(|n| after.get(*n).map(|v| (*n, *v)))
    .unwrap_or_else(|| panic!("no sched_switch program among {after:?}"));
    assert!(
        runs > 0.0 && seconds > 0.0,
        "{switch}: {runs} runs, {seconds} s"
    );
    assert!(
        runs > before.get(switch).map_or(0.0, |v| v.0),
        "{switch}'s runs did not grow: {before:?} then {after:?}"
    );

    // As many programs have series as the agent's BPF links hold (the Go watcher may attach a
    // uprobe between the two reads: read again).
    let mut last = (0, 0);
    for _ in 0..20 {
        let exported = program_runs(&common::scrape(agent.metrics).expect("scrape")).len();
        last = (exported, linked_programs(pid));
        if last.0 == last.1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        last.0, last.1,
        "programs with series, programs the agent's links hold"
    );

    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit status {status}; log:\n{log}");
    assert!(log.contains("eBPF program run statistics on"), "{log}");
}

/// `process_cpu_seconds_total` is to the tick, not whole seconds: the agent's figure lies between
/// two reads of its `/proc/<pid>/stat` taken around a scrape.
fn check_cpu_seconds(agent: &Agent) {
    let pid = agent.child.id();
    let cpu_ticks = || {
        let stat = procfs::process::Process::new(i32::try_from(pid).expect("pid"))
            .and_then(|p| p.stat())
            .expect("stat");
        #[expect(clippy::cast_precision_loss, reason = "ticks")]
        let ticks = (stat.utime + stat.stime) as f64;
        ticks
    };
    #[expect(clippy::cast_precision_loss, reason = "a hundred or so")]
    let tps = procfs::ticks_per_second() as f64;
    let before = cpu_ticks();
    let body = common::scrape(agent.metrics).expect("scrape");
    let after = cpu_ticks();
    for l in body.lines().filter(|l| l.starts_with("process_")) {
        eprintln!("{l}");
    }
    let cpu = common::sample(&body, "process_cpu_seconds_total").expect("cpu seconds");
    assert!(
        cpu * tps >= before - 0.5 && cpu * tps <= after + 0.5,
        "process_cpu_seconds_total {cpu}; /proc/{pid}/stat: {before} then {after} ticks at {tps} a second"
    );
}

/// `nodewarden_build_info` has this crate's version and, when built in a git checkout, a
/// 12-digit commit.
fn check_build_info(body: &str) {
    let info = body
        .lines()
        .find(|l| l.starts_with("nodewarden_build_info{"))
        .unwrap_or_else(|| panic!("no nodewarden_build_info in:\n{body}"));
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert!(info.contains(&version) && info.ends_with("} 1"), "{info}");
    let commit = info
        .split("commit=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_default();
    let built_in_git = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
        .output()
        .is_ok_and(|o| o.status.success());
    if built_in_git {
        assert!(
            commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit()),
            "built in a git checkout, but the commit is {commit:?}: {info}"
        );
    } else {
        assert!(!commit.is_empty(), "{info}");
    }
}

/// Each program's (runs, seconds) in a scrape.
fn program_runs(body: &str) -> std::collections::BTreeMap<String, (f64, f64)> {
    let mut out = std::collections::BTreeMap::<String, (f64, f64)>::new();
    for (prefix, seconds) in [
        ("nodewarden_bpf_program_runs_total{program=\"", false),
        ("nodewarden_bpf_program_run_seconds_total{program=\"", true),
    ] {
        for l in body.lines() {
            let Some((name, value)) = l.strip_prefix(prefix).and_then(|r| r.split_once("\"} "))
            else {
                continue;
            };
            let v: f64 = value.parse().expect("a number");
            let e = out.entry(name.to_owned()).or_default();
            if seconds {
                e.1 = v;
            } else {
                e.0 = v;
            }
        }
    }
    out
}

/// How many distinct programs the BPF links process `pid` holds name (its fds' fdinfo).
fn linked_programs(pid: u32) -> usize {
    let mut ids = std::collections::BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        if std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf_link") {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            ids.extend(
                info.lines()
                    .find_map(|l| l.strip_prefix("prog_id:"))
                    .map(|v| v.trim().to_owned()),
            );
        }
    }
    ids.len()
}

/// The syscall-tracepoint mode (the one this machine's kernel gets: no fexit, no kprobes)
/// attaches, and ordinary writes of every style are not reported as limit writes.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn syscalls_mode_ignores_ordinary_writes() {
    use std::{io::Write as _, os::unix::fs::FileExt as _};

    assert!(is_root(), "{NEEDS_ROOT}");
    let config = "mode = \"observe\"\nshutdown_drain_ms = 2000\n[metrics]\nlisten = \"127.0.0.1:9717\"\n[probes]\nlimit_writes = \"syscalls\"\n";
    let agent = Agent::start_with(Some(config), &[]);
    assert_eq!(
        agent.probe_mode("limit_writes"),
        "syscalls",
        "{}",
        agent.log()
    );

    let path = std::env::temp_dir().join(format!("nodewarden-plain-{}", agent.metrics.port()));
    let mut file = std::fs::File::create(&path).expect("create");
    for _ in 0..1000 {
        file.write_all(b"x").expect("write");
    }
    assert_eq!(file.write_at(b"memory.max", 0).expect("pwrite"), 10);
    let iov = [std::io::IoSlice::new(b"64M")];
    assert_eq!(file.write_vectored(&iov).expect("writev"), 3);
    let mut null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("open");
    for _ in 0..1000 {
        null.write_all(b"max").expect("write");
    }
    let sh = Command::new("sh")
        .arg("-c")
        .arg(format!("echo 512M > {}", path.display()))
        .status()
        .expect("sh");
    assert!(sh.success());
    drop(file);
    let _ = std::fs::remove_file(&path);

    std::thread::sleep(Duration::from_millis(500));
    let body = common::scrape(agent.metrics).expect("scrape");
    assert!(
        !body.contains("nodewarden_cgroup_limit_writes_total{"),
        "{body}"
    );
    for lost in [
        "nodewarden_events_lost_total{kind=\"record\",reason=\"decode\"}",
        "nodewarden_events_lost_total{kind=\"limit_write\",reason=\"read_failed\"}",
    ] {
        assert_eq!(common::sample(&body, lost), Some(0.0), "{lost}");
    }
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit status {status}; log:\n{log}");
}

/// A contended pthread mutex: the agent's futex wait histogram agrees with bpftrace's.
#[test]
#[ignore = "needs root, bpftrace and the test programs: run by `cargo xtask test`"]
fn futex_waits_agree_with_bpftrace() {
    assert!(is_root(), "{NEEDS_ROOT}");
    common::contention::with_agent("futex_waits", "syscalls", |agent| {
        common::contention::futex_waits_agree_with_bpftrace(agent);
        common::contention::futex_waits_match_the_programs_own_timing(agent);
        common::contention::top_shows_the_contended_program(agent);
    });
}

/// A futex word with a long wait becomes a `futex.contention` span with its stack.
#[test]
#[ignore = "needs root and the test programs: run by `cargo xtask test`"]
fn futex_contention_becomes_a_span() {
    assert!(is_root(), "{NEEDS_ROOT}");
    common::contention::contention_episode_becomes_a_span();
}

/// The explicit lock diagnostic: uprobes for a few seconds, call sites and their cost.
#[test]
#[ignore = "needs root and the Go test programs: run by `cargo xtask test`"]
fn diagnose_locks_names_the_call_site() {
    assert!(is_root(), "{NEEDS_ROOT}");
    common::contention::diagnose_locks_names_the_call_site();
}

/// `select = ["map-heavy"]` picks the process heavy in the Go map runtime, by its samples.
#[test]
#[ignore = "needs root and the test programs: run by `cargo xtask test`"]
fn map_heavy_processes_are_selected() {
    assert!(is_root(), "{NEEDS_ROOT}");
    common::contention::map_heavy_processes_are_selected();
}

/// A Go program's "concurrent map writes" crash is reported with its reason and process.
#[test]
#[ignore = "needs root and the Go test program: run by `cargo xtask test`"]
fn go_map_crash_is_reported() {
    assert!(is_root(), "{NEEDS_ROOT}");
    common::contention::with_agent("go_fatal_errors", "uprobe", |agent| {
        common::contention::go_crash_is_reported(agent);
    });
}

/// Three Go shared-map designs ranked by contention from CPU samples and off-CPU time, with
/// the lock's call site.
#[test]
#[ignore = "needs root and the Go test programs: run by `cargo xtask test`"]
fn go_map_designs_ranked_by_contention() {
    assert!(is_root(), "{NEEDS_ROOT}");
    common::contention::with_agent("off_cpu", "raw_tp", |agent| {
        assert_eq!(agent.probe_mode("cpu_samples"), "perf_event");
        common::contention::go_designs_ranked_by_contention(agent);
    });
}

/// The metrics endpoint under a connection flood from one local process, with the agent's open
/// files limited to 256: 2,000 idle connections and 200 that send a request head a byte at a
/// time. A scrape is still answered within a second, the agent stays nearly idle (under 5% of a
/// CPU: a loop on failed accepts would take a whole one), and its log is not flooded with
/// failed accepts.
#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn metrics_endpoint_survives_a_connection_flood() {
    use std::{
        io::Write as _,
        net::TcpStream,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::Duration,
    };

    assert!(is_root(), "{NEEDS_ROOT}");
    common::raise_own_nofile(4096);
    // Contention off: sampling the other tests' busy programs, which run beside this one, cost
    // the agent 6% of a CPU in one run (0.4 to 0.6% alone); the flood's cost is what is measured.
    let quiet = "[contention]\nfutex_waits = false\nsample_hz = 0\noff_cpu = false\n";
    let agent = Agent::start_with_nofile(Some(quiet), 256);
    let addr = agent.metrics;

    // Slow headers: each started a request head and adds a byte every 300 ms, forever.
    let mut slow = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHo");
            let _ = s.set_nonblocking(true);
            slow.push(s);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let dribbler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in &mut slow {
                    // Closed by the agent: the write fails, and that is what it should do.
                    let _ = s.write(b"x");
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    // Idle connections, not waited for: those beyond the listen backlog retry their SYN.
    let idle: Vec<_> = (0..2000)
        .filter_map(|_| connect_nonblocking(addr))
        .collect();
    assert_eq!(
        idle.len(),
        2000,
        "connects refused by this process's limits"
    );
    std::thread::sleep(Duration::from_secs(2));

    let scrape = common::http_request(addr, "/metrics", Duration::from_secs(1));
    let window = Duration::from_secs(5);
    let cpu = cpu_share(agent.child.id(), window);
    let accept_lines = agent.log_lines_containing("accept");
    stop.store(true, Ordering::Relaxed);
    let _ = dribbler.join();
    let scraped = match &scrape {
        Ok((status, body)) => format!("HTTP {status}, {} bytes", body.len()),
        Err(e) => format!("failed: {e}"),
    };
    eprintln!(
        "flood of 2000 idle and 200 slow-header connections, agent nofile 256: scrape {scraped}; \
         agent CPU {:.1}% of one CPU over {window:?}; {accept_lines} log lines about accept",
        cpu * 100.0
    );
    assert!(
        scrape
            .as_ref()
            .is_ok_and(|(status, body)| *status == 200 && body.contains("nodewarden_probe_info")),
        "scrape during the flood: {scraped}"
    );
    assert!(cpu < 0.05, "agent CPU {:.1}% during the flood", cpu * 100.0);
    assert!(
        accept_lines < 100,
        "{accept_lines} log lines about accept: the log is flooded"
    );
    drop(idle);
    let (status, log) = agent.stop();
    assert!(status.success(), "agent exit status {status}; log:\n{log}");
}

/// A TCP connection to `addr` started without waiting for it to complete, or `None` when the
/// socket could not be made.
fn connect_nonblocking(addr: std::net::SocketAddr) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    let std::net::SocketAddr::V4(v4) = addr else {
        return None;
    };
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).ok()?,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).ok()?;
    // SAFETY: `sin` is a valid sockaddr_in of `len` bytes.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&raw const sin).cast(), len) };
    let started =
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS);
    started.then_some(fd)
}

/// The share of one CPU process `pid` used over `window` (user and system time).
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
        // After the name (which may hold spaces and parentheses): state is field 3, utime 14,
        // stime 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("stat")
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let before = ticks();
    let start = std::time::Instant::now();
    std::thread::sleep(window);
    let used = ticks() - before;
    #[expect(clippy::cast_precision_loss, reason = "a share")]
    let share = used as f64 / hz as f64 / start.elapsed().as_secs_f64();
    share
}

/// `nodewarden check-config | head -1`: the closed pipe ends the command by SIGPIPE, as it ends
/// `cat`, not by a panic (needs neither root nor a kernel: runs with the unit tests).
#[test]
fn a_closed_stdout_ends_a_printing_command_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(NODEWARDEN)
        .arg("check-config")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "status {}; stderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
