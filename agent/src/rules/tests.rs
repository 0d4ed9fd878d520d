//! The decision function as a table: each row a change, the facts, and what must be decided.

use agent_common::LimitFile;

use super::{Change, Facts, GuardView, Ruleset, Target, decide, file};
use crate::model::{
    cgroup::Qos,
    heal::{Desired, DesiredSource, Mode, Reason, Verdict, Writer},
    limit::LimitValue,
    record::K8s,
};

const POD: &str = "/kubepods/burstable/pod1b2a9f0e-0a1b-4c3d-8e9f-001122334455";

fn pod() -> K8s {
    K8s {
        pod_uid: "1b2a9f0e-0a1b-4c3d-8e9f-001122334455".into(),
        qos: Qos::Burstable,
        container_id: None,
        namespace: Some("prod".into()),
        pod: Some("web-0".into()),
        container: None,
    }
}

const G: u64 = 1 << 30;
const M: u64 = 1 << 20;

/// A row: its name, the global mode, the change, and what must be decided.
type Row<'a> = (&'a str, Mode, &'a Change, Option<(Verdict, Option<Reason>)>);

fn bytes(n: u64) -> LimitValue {
    LimitValue::Bytes(n)
}

#[expect(
    clippy::unnecessary_wraps,
    reason = "reads as the facts' field it fills"
)]
fn desired(n: u64, source: DesiredSource) -> Option<Desired> {
    Some(Desired::new(bytes(n), source))
}

fn untrusted(value: u64) -> Change {
    Change {
        limit: LimitFile::MemoryMax,
        value: bytes(value),
        writer: Writer::Untrusted,
    }
}

fn facts(d: Option<Desired>) -> Facts {
    Facts {
        desired: d,
        ..Facts::default()
    }
}

/// (verdict, reason) of a decision, or `None` for no decision.
fn run(
    rules: &Ruleset,
    mode: Mode,
    path: &str,
    k8s: Option<&K8s>,
    change: &Change,
    facts: &Facts,
) -> Option<(Verdict, Option<Reason>)> {
    decide(rules, mode, Target { path, k8s }, change, facts).map(|d| (d.verdict, d.reason))
}

fn defaults() -> Ruleset {
    file::default_rules().expect("valid")
}

#[test]
fn writers_and_modes() {
    let rules = defaults();
    let k = pod();
    let want = desired(2 * G, DesiredSource::FirstSeen);
    let trusted = Change {
        writer: Writer::Trusted("kubelet".into()),
        ..untrusted(512 * M)
    };
    let own = Change {
        writer: Writer::Agent,
        ..untrusted(512 * M)
    };
    let unseen = Change {
        writer: Writer::Unseen,
        ..untrusted(512 * M)
    };
    let table: [Row<'_>; 8] = [
        (
            "untrusted, enforce",
            Mode::Enforce,
            &untrusted(512 * M),
            Some((Verdict::Restore, None)),
        ),
        (
            "untrusted, dry-run",
            Mode::DryRun,
            &untrusted(512 * M),
            Some((Verdict::WouldRestore, None)),
        ),
        (
            "untrusted, observe",
            Mode::Observe,
            &untrusted(512 * M),
            Some((Verdict::WouldRestore, None)),
        ),
        (
            "trusted by executable",
            Mode::Enforce,
            &trusted,
            Some((Verdict::Accept, Some(Reason::TrustedWriter))),
        ),
        ("the agent's own write", Mode::Enforce, &own, None),
        (
            "found by a scan",
            Mode::Enforce,
            &unseen,
            Some((Verdict::Restore, None)),
        ),
        (
            "raised",
            Mode::Enforce,
            &untrusted(3 * G),
            Some((Verdict::Skip, Some(Reason::NotLowered))),
        ),
        (
            "set to the desired value",
            Mode::Enforce,
            &untrusted(2 * G),
            Some((Verdict::Skip, Some(Reason::NotLowered))),
        ),
    ];
    for (name, mode, change, expected) in table {
        assert_eq!(
            run(&rules, mode, POD, Some(&k), change, &facts(want)),
            expected,
            "{name}"
        );
    }
}

#[test]
fn desired_value_sources() {
    let k = pod();
    let pinned = file::parse(
        "[[rule]]\nname = \"p\"\nlimits = [\"memory.max\"]\nwhen = \"lowered-by-untrusted\"\naction = \"restore\"\npin = \"4G\"\n",
        "t",
    )
    .expect("valid");
    // The pin beats the state's value: 3G is below the pinned 4G.
    let d = decide(
        &pinned,
        Mode::Enforce,
        Target {
            path: "/anything",
            k8s: None,
        },
        &untrusted(3 * G),
        &facts(desired(2 * G, DesiredSource::Kubernetes)),
    )
    .expect("decided");
    assert_eq!(d.verdict, Verdict::Restore);
    assert_eq!(d.desired, desired(4 * G, DesiredSource::Pinned));
    // Each source of the state decides the same way; none known: nothing to restore to.
    for source in [
        DesiredSource::Kubernetes,
        DesiredSource::TrustedWriter,
        DesiredSource::FirstSeen,
    ] {
        let d = decide(
            &defaults(),
            Mode::Enforce,
            Target {
                path: POD,
                k8s: Some(&k),
            },
            &untrusted(512 * M),
            &facts(desired(2 * G, source)),
        )
        .expect("decided");
        assert_eq!(
            (d.verdict, d.desired.map(|d| d.source)),
            (Verdict::Restore, Some(source))
        );
    }
    assert_eq!(
        run(
            &defaults(),
            Mode::Enforce,
            POD,
            Some(&k),
            &untrusted(512 * M),
            &facts(None)
        ),
        Some((Verdict::Skip, Some(Reason::NoDesiredValue)))
    );
}

#[test]
fn a_resize_in_progress_makes_both_values_legitimate() {
    let k = pod();
    let resizing = Some(Desired {
        value: bytes(4 * G),
        source: DesiredSource::Kubernetes,
        also: Some(bytes(2 * G)),
    });
    let at = |v| {
        run(
            &defaults(),
            Mode::Enforce,
            POD,
            Some(&k),
            &untrusted(v),
            &facts(resizing),
        )
    };
    assert_eq!(at(2 * G), Some((Verdict::Skip, Some(Reason::NotLowered))));
    assert_eq!(at(3 * G), Some((Verdict::Skip, Some(Reason::NotLowered))));
    assert_eq!(at(G), Some((Verdict::Restore, None)));
}

#[test]
fn guardrails() {
    let k = pod();
    let want = desired(2 * G, DesiredSource::FirstSeen);
    let with = |guard: GuardView, stale: bool| Facts {
        desired: want,
        stale,
        guard,
        ..Facts::default()
    };
    let table = [
        (
            "events lost, no resync yet",
            with(GuardView::default(), true),
            (Verdict::Skip, Some(Reason::AwaitingResync)),
        ),
        (
            "cooldown",
            with(
                GuardView {
                    cooling: true,
                    ..GuardView::default()
                },
                false,
            ),
            (Verdict::Skip, Some(Reason::Cooldown)),
        ),
        (
            "cap reached",
            with(
                GuardView {
                    capped: true,
                    cooling: true,
                    ..GuardView::default()
                },
                false,
            ),
            (Verdict::Skip, Some(Reason::CapReached)),
        ),
        (
            "a fight starts",
            with(
                GuardView {
                    fight_starts: true,
                    cooling: true,
                    ..GuardView::default()
                },
                false,
            ),
            (Verdict::Alert, Some(Reason::Fight)),
        ),
        (
            "a fight goes on",
            with(
                GuardView {
                    fighting: true,
                    ..GuardView::default()
                },
                false,
            ),
            (Verdict::Skip, Some(Reason::Fight)),
        ),
    ];
    for (name, facts, expected) in table {
        assert_eq!(
            run(
                &defaults(),
                Mode::Enforce,
                POD,
                Some(&k),
                &untrusted(512 * M),
                &facts
            ),
            Some(expected),
            "{name}"
        );
    }
}

#[test]
fn paths_never_touched_and_systemd_units() {
    let everything = file::parse(
        "[[rule]]\nname = \"all\"\nlimits = [\"memory.max\"]\nwhen = \"lowered-by-untrusted\"\naction = \"restore\"\n",
        "t",
    )
    .expect("valid");
    let want = facts(desired(2 * G, DesiredSource::FirstSeen));
    for path in [
        "/",
        "/init.scope",
        "/kubepods",
        "/kubepods/burstable",
        "/kubepods.slice/kubepods-besteffort.slice",
    ] {
        assert_eq!(
            run(
                &everything,
                Mode::Enforce,
                path,
                None,
                &untrusted(512 * M),
                &want
            ),
            Some((Verdict::Skip, Some(Reason::Protected))),
            "{path}"
        );
    }
    let unit = "/system.slice/postgres.service";
    assert_eq!(
        run(
            &everything,
            Mode::Enforce,
            unit,
            None,
            &untrusted(512 * M),
            &want
        ),
        Some((Verdict::Alert, Some(Reason::SystemdUnit)))
    );
    let naming_units = file::parse(
        "[[rule]]\nname = \"pg\"\nlimits = [\"memory.max\"]\nwhen = \"lowered-by-untrusted\"\naction = \"restore\"\nsystemd_units = true\ncgroups = [\"/system.slice/postgres.service\"]\n",
        "t",
    )
    .expect("valid");
    assert_eq!(
        run(
            &naming_units,
            Mode::Enforce,
            unit,
            None,
            &untrusted(512 * M),
            &want
        ),
        Some((Verdict::Restore, None))
    );
    // The default rules are about pods and containers only.
    assert_eq!(
        run(
            &defaults(),
            Mode::Enforce,
            "/workloads/app",
            None,
            &untrusted(512 * M),
            &want
        ),
        None
    );
}

#[test]
fn a_rule_is_never_more_active_than_the_global_mode() {
    let k = pod();
    let rules = file::parse(
        "[[rule]]\nname = \"dry\"\nlimits = [\"memory.max\"]\nwhen = \"lowered-by-untrusted\"\naction = \"restore\"\nmode = \"dry-run\"\n\n[[rule]]\nname = \"hot\"\nlimits = [\"pids.max\"]\nwhen = \"lowered-by-untrusted\"\naction = \"restore\"\nmode = \"enforce\"\n",
        "t",
    )
    .expect("valid");
    let want = facts(desired(2 * G, DesiredSource::FirstSeen));
    let d = |mode, change: &Change, facts: &Facts| {
        decide(
            &rules,
            mode,
            Target {
                path: POD,
                k8s: Some(&k),
            },
            change,
            facts,
        )
        .map(|d| (d.verdict, d.mode))
    };
    assert_eq!(
        d(Mode::Enforce, &untrusted(512 * M), &want),
        Some((Verdict::WouldRestore, Mode::DryRun))
    );
    let pids = Change {
        limit: LimitFile::PidsMax,
        value: LimitValue::Count(10),
        writer: Writer::Untrusted,
    };
    let want_pids = facts(Some(Desired::new(
        LimitValue::Max,
        DesiredSource::FirstSeen,
    )));
    assert_eq!(
        d(Mode::Observe, &pids, &want_pids),
        Some((Verdict::WouldRestore, Mode::Observe))
    );
    assert_eq!(
        d(Mode::Enforce, &pids, &want_pids),
        Some((Verdict::Restore, Mode::Enforce))
    );
}

#[test]
fn below_usage_needs_the_value_under_usage_plus_margin() {
    let rules = file::parse(
        "[[rule]]\nname = \"u\"\nlimits = [\"memory.max\"]\nwhen = \"below-usage\"\nmargin = \"64M\"\naction = \"restore\"\n",
        "t",
    )
    .expect("valid");
    let with_usage = |usage| Facts {
        desired: desired(2 * G, DesiredSource::FirstSeen),
        usage,
        ..Facts::default()
    };
    let at = |value, usage| {
        run(
            &rules,
            Mode::Enforce,
            "/app",
            None,
            &untrusted(value),
            &with_usage(usage),
        )
    };
    // 1G leaves room above 300M of usage: lowered, but not below usage.
    assert_eq!(
        at(G, Some(300 * M)),
        Some((Verdict::Skip, Some(Reason::NotLowered)))
    );
    assert_eq!(at(320 * M, Some(300 * M)), Some((Verdict::Restore, None)));
    assert_eq!(
        at(320 * M, None),
        Some((Verdict::Skip, Some(Reason::NotLowered))),
        "usage unknown: not acted on"
    );
}

#[test]
fn lower_means_more_restrictive() {
    use super::below;
    let cpu = |q: Option<u64>, p| LimitValue::Cpu {
        quota_us: q,
        period_us: p,
    };
    assert!(below(bytes(1), bytes(2)));
    assert!(below(bytes(1), LimitValue::Max));
    assert!(!below(LimitValue::Max, bytes(1)));
    assert!(!below(LimitValue::Max, LimitValue::Max));
    assert!(below(
        cpu(Some(50_000), 100_000),
        cpu(Some(100_000), 100_000)
    ));
    assert!(!below(
        cpu(Some(100_000), 200_000),
        cpu(Some(50_000), 100_000)
    ));
    assert!(below(cpu(Some(100_000), 100_000), cpu(None, 100_000)));
    assert!(!below(bytes(1), LimitValue::Count(2)), "different kinds");
}

/// The rules examples shipped: TOML code blocks with `[[rule]]` in docs/*.md, and rules files
/// (TOML with `[[rule]]`) anywhere under deploy/.
fn shipped_examples() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut found = Vec::new();
    let mut dirs = vec![root.join("docs"), root.join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("a shipped folder") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let name = path.display().to_string();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            match path.extension().and_then(|e| e.to_str()) {
                Some("md") => {
                    for (i, block) in text.split("```toml\n").skip(1).enumerate() {
                        let block = block.split("```").next().unwrap_or_default();
                        if block.contains("[[rule]]") {
                            found.push((format!("{name}, example {}", i + 1), block.to_owned()));
                        }
                    }
                }
                Some("toml") if text.contains("[[rule]]") => found.push((name, text)),
                _ => {}
            }
        }
    }
    found
}

#[test]
fn every_rules_example_in_docs_and_deploy_is_valid() {
    let examples = shipped_examples();
    assert!(
        examples
            .iter()
            .filter(|(n, _)| n.contains("rules.md"))
            .count()
            >= 4,
        "docs/rules.md's examples are found: {:?}",
        examples.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for (name, text) in &examples {
        if let Err(e) = file::parse(text, name) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn the_guard_protects_what_a_protect_rule_matches_in_its_mode() {
    let rules = file::parse(
        r#"
[[rule]]
name = "guard-containers"
limits = ["memory.max", "memory.high"]
when = "lowered-by-untrusted"
action = "restore"
protect = true
kubernetes = ["pod", "container"]

[[rule]]
name = "dry-only"
limits = ["pids.max"]
when = "lowered-by-untrusted"
action = "restore"
mode = "dry-run"
protect = true

[[rule]]
name = "restore-only"
limits = ["cpu.max"]
when = "lowered-by-untrusted"
action = "restore"

[[rule]]
name = "units"
limits = ["memory.swap.max"]
when = "lowered-by-untrusted"
action = "alert"
protect = true
"#,
        "test",
    )
    .expect("valid");
    let k = pod();
    let at = |path| Target {
        path,
        k8s: Some(&k),
    };
    let g = |mode, target, limit| {
        super::guard(&rules, mode, target, limit).map(|g| (g.rule, g.enforce))
    };
    let name = |s: &str| s.to_owned();
    assert_eq!(
        g(Mode::Enforce, at(POD), LimitFile::MemoryMax),
        Some((name("guard-containers"), true))
    );
    assert_eq!(
        g(Mode::DryRun, at(POD), LimitFile::MemoryHigh),
        Some((name("guard-containers"), false)),
        "the global mode caps the rule's"
    );
    assert_eq!(g(Mode::Observe, at(POD), LimitFile::MemoryMax), None);
    assert_eq!(
        g(Mode::Enforce, at(POD), LimitFile::PidsMax),
        Some((name("dry-only"), false)),
        "the rule's mode caps the global one"
    );
    assert_eq!(
        g(Mode::Enforce, at(POD), LimitFile::CpuMax),
        None,
        "no protect"
    );
    assert_eq!(
        g(Mode::Enforce, at(POD), LimitFile::MemoryLow),
        None,
        "no rule"
    );
    let plain = |path| Target { path, k8s: None };
    assert_eq!(
        g(Mode::Enforce, plain("/batch/job"), LimitFile::MemoryMax),
        None,
        "not a Kubernetes cgroup"
    );
    assert_eq!(
        g(Mode::Enforce, plain("/batch/job"), LimitFile::MemorySwapMax),
        Some((name("units"), true)),
        "an alert rule protects too"
    );
    for never in [
        "/",
        "/init.scope",
        "/kubepods/burstable",
        "/system.slice/x.service",
    ] {
        assert_eq!(
            g(Mode::Enforce, plain(never), LimitFile::MemorySwapMax),
            None,
            "{never}"
        );
    }
}

/// The shipped guard example protects the memory limits of containers under both cgroup
/// drivers, and nothing of pods or of other cgroups.
#[test]
fn the_guard_example_protects_container_memory_under_both_drivers() {
    let (name, text) = shipped_examples()
        .into_iter()
        .find(|(n, _)| n.ends_with("overlays/enforce/rules.toml"))
        .expect("the guard example is shipped");
    let rules = file::parse(&text, &name).expect("valid");
    let identity = |path: &str| K8s::unnamed(path).expect("a Kubernetes path");
    let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let uid = "6d3f1a2b-4c5d-4e6f-8a9b-0c1d2e3f4a5b";
    let containers = [
        format!("/kubepods/burstable/pod{uid}/{id}"),
        format!("/kubepods/pod{uid}/{id}"),
        format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{id}.scope",
            uid.replace('-', "_")
        ),
    ];
    for path in &containers {
        let k = identity(path);
        for limit in [LimitFile::MemoryMax, LimitFile::MemoryHigh] {
            let g = super::guard(
                &rules,
                Mode::Enforce,
                Target {
                    path,
                    k8s: Some(&k),
                },
                limit,
            )
            .unwrap_or_else(|| panic!("{path} {} not protected", limit.file_name()));
            assert_eq!(g.rule, "guard-container-memory");
            assert!(g.enforce);
        }
        let other = super::guard(
            &rules,
            Mode::Enforce,
            Target {
                path,
                k8s: Some(&k),
            },
            LimitFile::PidsMax,
        );
        assert!(other.is_none(), "{path}: pids.max is restored, not guarded");
    }
    let pod = format!("/kubepods/burstable/pod{uid}");
    let k = identity(&pod);
    assert!(
        super::guard(
            &rules,
            Mode::Enforce,
            Target {
                path: &pod,
                k8s: Some(&k)
            },
            LimitFile::MemoryMax
        )
        .is_none(),
        "a pod's cgroup is restored, not guarded"
    );
}
