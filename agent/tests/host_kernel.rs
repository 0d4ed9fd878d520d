//! Kernel tests for the machine's own kernel: load and attach what it allows, serve metrics, stop
//! cleanly. Nothing here writes a cgroup or causes an OOM kill (those run in VM tests).
//! Run by `cargo xtask test` as root.

mod common;

use std::process::Command;

use common::{Agent, NODEWARDEN, is_root};

const NEEDS_ROOT: &str = "needs root and a BPF-capable kernel: run by `cargo xtask test`";

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn agent_starts_reports_probes_and_stops_on_sigterm() {
    assert!(is_root(), "{NEEDS_ROOT}");
    let agent = Agent::start(&[]);

    // Every probe has a status; those this kernel refuses are reported, not fatal.
    let body = common::scrape(agent.metrics).expect("scrape");
    for (capability, hook) in [
        ("limit_writes", "fexit:memory_max_write"),
        ("oom_kills", "tracepoint:oom/mark_victim"),
        ("oom_victims", "raw_tp:signal_generate"),
    ] {
        let series =
            format!("nodewarden_probe_attached{{capability=\"{capability}\",hook=\"{hook}\"}}");
        let v = common::sample(&body, &series)
            .unwrap_or_else(|| panic!("{series} missing from:\n{body}"));
        if v == 0.0 {
            let log = agent.log();
            assert!(
                log.lines()
                    .any(|l| l.contains("probe unavailable on this kernel")
                        && l.contains(capability)),
                "{capability} not attached but not reported in the log:\n{log}"
            );
        }
    }
    // Tracepoints and raw tracepoints load on every kernel we support, this one included.
    assert_eq!(
        common::sample(
            &body,
            "nodewarden_probe_attached{capability=\"oom_kills\",hook=\"tracepoint:oom/mark_victim\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        common::sample(
            &body,
            "nodewarden_probe_attached{capability=\"oom_victims\",hook=\"raw_tp:signal_generate\"}"
        ),
        Some(1.0),
        "{body}"
    );

    let log_before_stop = agent.log();
    let status = agent.stop();
    assert!(
        status.success(),
        "agent exit status {status}; log:\n{log_before_stop}"
    );
}

#[test]
#[ignore = "needs root and a BPF-capable kernel: run by `cargo xtask test`"]
fn check_lists_every_probe_with_its_status() {
    assert!(is_root(), "{NEEDS_ROOT}");
    let out = Command::new(NODEWARDEN)
        .arg("check")
        .output()
        .expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "check failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for hook in [
        "fexit:memory_max_write",
        "tracepoint:oom/mark_victim",
        "raw_tp:signal_generate",
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(hook))
            .unwrap_or_else(|| panic!("{hook} missing from check output:\n{text}"));
        assert!(
            line.ends_with("attached") || line.contains("UNAVAILABLE: "),
            "no status for {hook}: {line}"
        );
    }
    assert!(text.contains("kernel BTF: "), "{text}");
}
