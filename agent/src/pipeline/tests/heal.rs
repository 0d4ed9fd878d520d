//! Self-healing in the pipeline: which changes lead to which decisions, with desired values
//! from each source, the guardrails, lost events and the state kept across restarts.

use agent_common::{ExecKey, LimitFile};

use super::*;
use crate::model::{
    event::Identity,
    heal::{DesiredSource, Kept, Reason, StateFile, Verdict},
    record::{Decision, Trigger},
    trust::TrustedWriter,
};

const POD_ID: u64 = 30;
const G: &str = "2147483648";
const S: u64 = 1_000_000_000;

fn pod_path() -> String {
    format!("/kubepods/burstable/pod{POD_UID}")
}

fn kubelet_exe() -> ExecKey {
    ExecKey {
        dev: 8 << 20 | 1,
        reserved: 0,
        ino: 4242,
    }
}

fn enforcing() -> HealSettings {
    HealSettings {
        mode: Mode::Enforce,
        trust: TrustSet {
            writers: vec![TrustedWriter {
                name: "kubelet".into(),
                exes: vec![kubelet_exe()],
                ..TrustedWriter::default()
            }],
            agent_tgid: 999,
        },
        ..quiet_heal()
    }
}

/// A harness whose pod cgroup had memory.max 2G when the agent started.
fn started(heal: HealSettings) -> Harness {
    let mut h = Harness::healing(heal);
    let path = pod_path();
    h.start(&[(1, "/", "max"), (POD_ID, &path, G)]);
    h
}

/// A write of `value` to the pod's memory.max at `at` by `tgid` running `exe`.
fn write_by(value: &str, at: u64, tgid: u32, exe: Option<ExecKey>) -> Event {
    let Event::LimitWrite(mut w) = write_at(POD_ID, value, Ok(value.len() as u64), at) else {
        unreachable!()
    };
    w.writer.tgid = tgid;
    w.writer.pid = tgid;
    w.identity = Identity {
        exe,
        parent_tgid: 1,
        parent_exe: None,
    };
    Event::LimitWrite(w)
}

fn untrusted(value: &str, at: u64) -> Event {
    write_by(value, at, 42, None)
}

fn decisions(out: &[Update]) -> Vec<&Decision> {
    out.iter()
        .filter_map(|u| match u {
            Update::Decision(d) => Some(d.as_ref()),
            _ => None,
        })
        .collect()
}

fn verdicts(out: &[Update]) -> Vec<(Verdict, Option<Reason>)> {
    decisions(out)
        .iter()
        .map(|d| (d.verdict, d.reason))
        .collect()
}

#[test]
fn the_incident_an_untrusted_write_below_the_desired_value_is_restored() {
    let mut h = started(enforcing());
    h.clock.set(10 * S);
    let out = h.handle(untrusted("536870912", 10 * S));
    let d = decisions(&out);
    assert_eq!(d.len(), 1, "{out:#?}");
    let d = d[0];
    assert_eq!((d.verdict, d.reason), (Verdict::Restore, None));
    assert_eq!(d.desired.as_deref(), Some(G));
    assert_eq!(d.desired_source, Some(DesiredSource::FirstSeen));
    assert_eq!(d.cgroup_id, POD_ID);
    assert_eq!(d.trigger, Trigger::Write);
    assert_eq!(d.changed_ns, 10 * S);
    assert_eq!(d.rule, "kubernetes-limit-lowered");
    assert_eq!(d.writer.as_ref().map(|w| w.pid), Some(42));
    assert_eq!(
        d.write_time_unix_nano,
        Some(11 * S),
        "ties the decision to the write's span"
    );
    // Its own restore comes back as a write by the agent: no decision about it.
    let out = h.handle(write_by(G, 10 * S + 1_000_000, 999, None));
    assert!(decisions(&out).is_empty(), "{out:#?}");
}

#[test]
fn modes_dry_run_and_observe_would_restore() {
    for mode in [Mode::DryRun, Mode::Observe] {
        let mut h = started(HealSettings {
            mode,
            ..enforcing()
        });
        let out = h.handle(untrusted("536870912", 10 * S));
        assert_eq!(verdicts(&out), [(Verdict::WouldRestore, None)], "{mode:?}");
        assert_eq!(decisions(&out)[0].mode, mode);
    }
}

#[test]
fn a_trusted_write_moves_the_desired_value_and_is_never_reverted() {
    let mut h = started(enforcing());
    let out = h.handle(write_by("3221225472", 10 * S, 77, Some(kubelet_exe())));
    assert_eq!(
        verdicts(&out),
        [(Verdict::Accept, Some(Reason::TrustedWriter))]
    );
    assert_eq!(
        decisions(&out)[0].trusted_writer.as_deref(),
        Some("kubelet")
    );
    let d = h
        .pipeline
        .desired(POD_ID, LimitFile::MemoryMax)
        .expect("desired");
    assert_eq!(
        (d.value, d.source),
        (LimitValue::Bytes(3 << 30), DesiredSource::TrustedWriter)
    );
    // A process that calls itself kubelet, from another executable, is not trusted.
    let Event::LimitWrite(mut w) = write_by("1073741824", 20 * S, 78, None) else {
        unreachable!()
    };
    w.writer.comm = "kubelet".into();
    let out = h.handle(Event::LimitWrite(w));
    assert_eq!(verdicts(&out), [(Verdict::Restore, None)]);
    assert_eq!(decisions(&out)[0].desired.as_deref(), Some("3221225472"));
}

#[test]
fn after_lost_events_nothing_is_done_until_a_resync_then_every_bad_value_is_restored() {
    let mut h = started(enforcing());
    h.clock.set(10 * S);
    h.pipeline.events_lost();
    let out = h.handle(untrusted("536870912", 10 * S));
    assert_eq!(
        verdicts(&out),
        [(Verdict::Skip, Some(Reason::AwaitingResync))]
    );
    // The resync's scan started after the loss: it finds the bad value and it is restored.
    let (reason, since) = h.pipeline.take_resync().expect("a resync is wanted");
    assert_eq!(reason, ResyncReason::EventsLost);
    let path = pod_path();
    let mut out = Vec::new();
    h.pipeline.apply_scan(
        &scan(&[(1, "/", "max"), (POD_ID, &path, "536870912")]),
        since,
        reason,
        &mut out,
    );
    assert_eq!(verdicts(&out), [(Verdict::Restore, None)]);
    assert_eq!(decisions(&out)[0].trigger, Trigger::Scan);
}

#[test]
fn a_cooldown_defers_and_the_retry_restores() {
    let mut h = started(enforcing());
    h.clock.set(10 * S);
    assert_eq!(
        verdicts(&h.handle(untrusted("536870912", 10 * S))),
        [(Verdict::Restore, None)]
    );
    // The restore lands...
    h.handle(write_by(G, 10 * S + 1, 999, None));
    // ...and 5 s later another bad write, within... no: outside the fight window, but a
    // third one 100 ms after it is within the cooldown of the second restore.
    h.clock.set(15 * S);
    assert_eq!(
        verdicts(&h.handle(untrusted("536870912", 15 * S))),
        [(Verdict::Restore, None)]
    );
    h.clock.set(15 * S + 100_000_000);
    assert_eq!(
        verdicts(&h.handle(untrusted("268435456", 15 * S + 100_000_000))),
        [(Verdict::Skip, Some(Reason::Cooldown))]
    );
    assert_eq!(
        h.pipeline.tick_due_in(),
        Some(Duration::from_millis(900)),
        "the retry when the cooldown ends"
    );
    assert!(verdicts(&h.tick(15 * S + 500_000_000)).is_empty());
    let out = h.tick(16 * S);
    assert_eq!(verdicts(&out), [(Verdict::Restore, None)]);
    assert_eq!(decisions(&out)[0].trigger, Trigger::Retry);
    assert_eq!(decisions(&out)[0].value, "268435456");
}

#[test]
fn a_fight_is_alerted_once_then_recorded_now_and_then() {
    let mut h = started(enforcing());
    let mut all = Vec::new();
    for i in 0..200 {
        let at = 10 * S + i * 10_000_000;
        h.clock.set(at);
        all.extend(h.handle(untrusted("536870912", at)));
    }
    let v = verdicts(&all);
    assert_eq!(v[0], (Verdict::Restore, None));
    assert_eq!(v[1], (Verdict::Skip, Some(Reason::Cooldown)));
    assert_eq!(v[2], (Verdict::Skip, Some(Reason::Cooldown)));
    assert_eq!(v[3], (Verdict::Alert, Some(Reason::Fight)));
    assert_eq!(v[4], (Verdict::Skip, Some(Reason::Fight)));
    assert_eq!(
        v.len(),
        5,
        "the rest of the fight is counted, not recorded: {v:?}"
    );
    // Ten seconds on, one more record carries the count of those left out.
    h.clock.set(22 * S);
    let out = h.handle(untrusted("536870912", 22 * S));
    let d = decisions(&out);
    assert_eq!(
        (d[0].verdict, d[0].reason),
        (Verdict::Skip, Some(Reason::Fight))
    );
    assert_eq!(d[0].repeated, 195);
}

#[test]
fn the_state_kept_by_the_previous_agent_is_restored_at_start_up() {
    let path = pod_path();
    let kept = StateFile {
        boot_id: "boot".into(),
        values: vec![Kept {
            id: POD_ID,
            path: path.clone(),
            limit: "memory.max".into(),
            value: G.into(),
            source: DesiredSource::TrustedWriter,
        }],
    };
    let mut h = Harness::healing(HealSettings {
        kept: Some(kept.clone()),
        ..enforcing()
    });
    // While it was stopped, memory.max went to 512M.
    let out = h.start(&[(1, "/", "max"), (POD_ID, &path, "536870912")]);
    assert_eq!(verdicts(&out), [(Verdict::Restore, None)]);
    assert_eq!(
        decisions(&out)[0].desired_source,
        Some(DesiredSource::TrustedWriter)
    );
    // Values kept in another boot mean nothing: cgroup ids do not outlive it.
    let mut h = Harness::healing(HealSettings {
        kept: Some(StateFile {
            boot_id: "another".into(),
            ..kept
        }),
        ..enforcing()
    });
    let out = h.start(&[(1, "/", "max"), (POD_ID, &path, "536870912")]);
    assert!(verdicts(&out).is_empty(), "{out:#?}");
}

#[test]
fn a_new_cgroups_first_values_are_its_desired_ones() {
    let mut h = started(enforcing());
    let path = format!("{}/0123456789abcdef", pod_path());
    h.fake.node().paths.insert(31, path.clone());
    h.handle(Event::Cgroup(CgroupChange {
        timestamp_ns: 10 * S,
        id: 31,
        path,
        created: true,
        truncated: false,
    }));
    // Its runtime (not recognised here) sets its limit right away: its first value.
    h.clock.set(10 * S + 1000);
    let Event::LimitWrite(mut w) = untrusted("268435456", 10 * S + 1000) else {
        unreachable!()
    };
    w.target_cgroup_id = 31;
    assert!(verdicts(&h.handle(Event::LimitWrite(w.clone()))).is_empty());
    // Later, lowering it is a change like any other.
    h.clock.set(20 * S);
    w.timestamp_ns = 20 * S;
    w.value = "134217728".into();
    let out = h.handle(Event::LimitWrite(w));
    assert_eq!(verdicts(&out), [(Verdict::Restore, None)]);
    assert_eq!(decisions(&out)[0].desired.as_deref(), Some("268435456"));
}

#[test]
fn a_periodic_reconcile_finds_drift_and_reports_nothing_when_there_is_none() {
    let mut h = started(enforcing());
    h.clock.set(40 * S);
    let (reason, since) = reconcile_reading(&mut h);
    assert_eq!(reason, ResyncReason::Reconcile);
    let path = pod_path();
    let mut out = Vec::new();
    h.pipeline.apply_scan(
        &scan(&[(1, "/", "max"), (POD_ID, &path, G)]),
        since,
        reason,
        &mut out,
    );
    assert!(verdicts(&out).is_empty(), "no drift, no news: {out:#?}");
    let mut out = Vec::new();
    h.pipeline.apply_scan(
        &scan(&[(1, "/", "max"), (POD_ID, &path, "1073741824")]),
        since,
        reason,
        &mut out,
    );
    assert_eq!(verdicts(&out), [(Verdict::Restore, None)]);
}

/// Reconciler passes until one reads the files (a scan wanted, taken).
fn reconcile_reading(h: &mut Harness) -> (ResyncReason, u64) {
    for _ in 0..10 {
        h.pipeline.reconcile(&mut Vec::new());
        if let Some(read) = h.pipeline.take_resync() {
            return read;
        }
    }
    panic!("ten passes without reading the files");
}

/// With every write seen (fexit) and nothing lost, the reconciler compares the values it knows
/// (a pod's spec moved the desired value: no write did) and reads the files only ten passes
/// after they were last read, or after a loss.
#[test]
fn the_reconciler_reads_the_files_only_when_the_values_known_may_be_stale() {
    use crate::model::pods::PodChange;
    let mut h = started(enforcing());
    let path = pod_path();
    let pass = |h: &mut Harness, at: u64| {
        h.clock.set(at);
        let mut out = Vec::new();
        h.pipeline.reconcile(&mut out);
        let read = h.pipeline.take_resync().map(|(reason, since)| {
            assert_eq!(reason, ResyncReason::Reconcile);
            h.pipeline.apply_scan(
                &scan(&[(1, "/", "max"), (POD_ID, &path, G)]),
                since,
                reason,
                &mut out,
            );
        });
        (read.is_some(), verdicts(&out))
    };
    assert_eq!(
        pass(&mut h, 40 * S),
        (false, vec![]),
        "read at the start: no drift, no news"
    );
    // The pod's spec says 3G now, the file holds 1G: no write, the drift is found in memory.
    h.pipeline
        .pods(PodChange::Listed(vec![pod_view(3 << 30, None)]));
    assert_eq!(
        pass(&mut h, 100 * S),
        (false, vec![(Verdict::Restore, None)])
    );
    // Events lost: the next pass reads (the loss's own resync is taken first here).
    h.pipeline.events_lost();
    let _ = h.pipeline.take_resync();
    assert!(pass(&mut h, 130 * S).0, "read after a loss");
    // Ten passes after that read, the files are read all the same.
    let reads: Vec<bool> = (0..10)
        .map(|i| pass(&mut h, (160 + 30 * i) * S).0)
        .collect();
    assert_eq!(
        reads,
        [
            false, false, false, false, false, false, false, false, false, true
        ]
    );
}

/// The pod of [`pod_path`] as the API server describes it: one container limited to
/// `spec` bytes of memory, `applied` while a resize is under way.
fn pod_view(spec: u64, applied: Option<u64>) -> crate::model::pods::PodView {
    use crate::model::pods::{ContainerView, Kind, Limits, PodView};
    PodView {
        uid: POD_UID.into(),
        namespace: "web".into(),
        name: "front-0".into(),
        containers: vec![(
            Kind::Regular,
            ContainerView {
                name: "main".into(),
                id: Some("c1".into()),
                spec: Limits {
                    memory: Some(spec),
                    cpu_milli: None,
                },
                status: Some(Limits {
                    memory: Some(applied.unwrap_or(spec)),
                    cpu_milli: None,
                }),
            },
        )],
        overhead: Limits::default(),
        pod_limits: Limits::default(),
        resizing: applied.is_some(),
    }
}

#[test]
fn the_pod_spec_is_the_desired_value_and_names_the_pod() {
    use crate::model::pods::PodChange;
    let mut h = started(enforcing());
    // Before the API server listed the pods, what was first seen stands.
    h.pipeline.pods(PodChange::Applied(pod_view(3 << 30, None)));
    let out = h.handle(untrusted("536870912", 10 * S));
    assert_eq!(
        decisions(&out)[0].desired_source,
        Some(DesiredSource::FirstSeen)
    );

    h.clock.set(20 * S);
    h.pipeline
        .pods(PodChange::Listed(vec![pod_view(3 << 30, None)]));
    let out = h.handle(untrusted("1073741824", 20 * S));
    let d = decisions(&out);
    assert_eq!((d[0].verdict, d[0].reason), (Verdict::Restore, None));
    assert_eq!(d[0].desired.as_deref(), Some("3221225472"));
    assert_eq!(d[0].desired_source, Some(DesiredSource::Kubernetes));
    let k8s = d[0].k8s.as_ref().expect("a pod");
    assert_eq!(
        (k8s.namespace.as_deref(), k8s.pod.as_deref()),
        (Some("web"), Some("front-0")),
        "named by the API server over kubelet's directories"
    );

    // A resize from 3Gi to 4Gi in progress: the value kubelet applied is legitimate too.
    h.pipeline
        .pods(PodChange::Applied(pod_view(4 << 30, Some(3 << 30))));
    h.clock.set(40 * S);
    let out = h.handle(untrusted("3221225472", 40 * S));
    assert_eq!(
        verdicts(&out),
        [(Verdict::Skip, Some(Reason::NotLowered))],
        "the old value, during the resize"
    );
    h.clock.set(60 * S);
    let out = h.handle(untrusted("2147483648", 60 * S));
    assert_eq!(verdicts(&out), [(Verdict::Restore, None)]);
    assert_eq!(decisions(&out)[0].desired.as_deref(), Some("4294967296"));

    // A trusted writer's value is never reverted, even below the spec's.
    h.clock.set(80 * S);
    let out = h.handle(write_by("1610612736", 80 * S, 77, Some(kubelet_exe())));
    assert_eq!(
        verdicts(&out),
        [(Verdict::Accept, Some(Reason::TrustedWriter))]
    );
    let (reason, since) = reconcile_reading(&mut h);
    let mut out = Vec::new();
    let path = pod_path();
    h.pipeline.apply_scan(
        &scan(&[(1, "/", "max"), (POD_ID, &path, "1610612736")]),
        since,
        reason,
        &mut out,
    );
    assert!(verdicts(&out).is_empty(), "{out:#?}");

    // Gone from the API server: back to the state's values.
    h.pipeline.pods(PodChange::Deleted {
        uid: POD_UID.into(),
    });
    h.clock.set(100 * S);
    let out = h.handle(untrusted("536870912", 100 * S));
    assert_eq!(
        decisions(&out)[0].desired_source,
        Some(DesiredSource::TrustedWriter)
    );
}

fn guards(out: &[Update]) -> Vec<&crate::model::guard::GuardChange> {
    out.iter()
        .filter_map(|u| match u {
            Update::Guard(c) => Some(c),
            _ => None,
        })
        .collect()
}

const GUARD_RULES: &str = r#"
[[rule]]
name = "guard-container-memory"
limits = ["memory.max"]
when = "lowered-by-untrusted"
action = "restore"
protect = true
kubernetes = ["container"]
"#;

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one cgroup's life under the guard, in order"
)]
fn the_guard_follows_cgroups_rules_and_trust_and_names_the_rule_of_a_denial() {
    use crate::model::{
        event::GuardDenial,
        guard::{GuardChange, GuardResult},
    };
    let guarding = || HealSettings {
        rules: crate::rules::file::parse(GUARD_RULES, "test").expect("valid"),
        guard_active: true,
        ..enforcing()
    };
    let container = format!(
        "{}/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        pod_path()
    );
    let mut h = Harness::healing(guarding());
    let out = h.start(&[
        (1, "/", "max"),
        (POD_ID, &pod_path(), G),
        (31, &container, G),
    ]);
    let g = guards(&out);
    assert!(
        matches!(g[0], GuardChange::Trust(t) if t.trust.agent_tgid == 999 && t.exes.len() == 1),
        "the trust tables first: {g:#?}"
    );
    assert_eq!(
        g[1..],
        [&GuardChange::Protect {
            cgroup_id: 31,
            limit: LimitFile::MemoryMax,
            enforce: true
        }],
        "only the container's memory.max"
    );

    // A new container is protected as it is created, and released as it goes.
    let other = format!("{}/{}", pod_path(), "fedcba9876543210".repeat(4));
    let created = h.handle(Event::Cgroup(CgroupChange {
        timestamp_ns: 5,
        id: 32,
        path: other.clone(),
        created: true,
        truncated: false,
    }));
    assert_eq!(
        guards(&created),
        [&GuardChange::Protect {
            cgroup_id: 32,
            limit: LimitFile::MemoryMax,
            enforce: true
        }]
    );

    // A denial names the rule, the target and the opener.
    h.fake.node().paths.insert(31, container.clone());
    let out = h.handle(Event::GuardDenial(GuardDenial {
        timestamp_ns: 6,
        task: task(42, "kubelet", 1),
        identity: Identity::default(),
        target_cgroup_id: 31,
        limit: LimitFile::MemoryMax,
        file_ino: 777,
        enforced: true,
    }));
    let denial = out
        .iter()
        .find_map(|u| match u {
            Update::Denial(d) => Some(d),
            _ => None,
        })
        .expect("a denial");
    assert_eq!(denial.rule, "guard-container-memory");
    assert_eq!(denial.result, GuardResult::Denied);
    assert_eq!(denial.cgroup, container);
    assert_eq!(denial.writer.comm, "kubelet");
    assert!(
        denial
            .k8s
            .as_ref()
            .is_some_and(|k| k.container_id.is_some()),
        "{denial:?}"
    );

    let removed = h.handle(Event::Cgroup(CgroupChange {
        timestamp_ns: 7,
        id: 32,
        path: other,
        created: false,
        truncated: false,
    }));
    assert_eq!(
        guards(&removed),
        [&GuardChange::Release {
            cgroup_id: 32,
            limit: LimitFile::MemoryMax
        }]
    );

    // New rules take effect at the scan they ask for: without protect, everything is released.
    h.pipeline
        .set_rules(crate::rules::file::default_rules().expect("valid"));
    let (reason, since) = h.pipeline.take_resync().expect("a scan is asked for");
    let mut out = Vec::new();
    h.pipeline.apply_scan(
        &scan(&[
            (1, "/", "max"),
            (POD_ID, &pod_path(), G),
            (31, &container, G),
        ]),
        since,
        reason,
        &mut out,
    );
    assert_eq!(
        guards(&out),
        [&GuardChange::Release {
            cgroup_id: 31,
            limit: LimitFile::MemoryMax
        }]
    );
    assert!(h.pipeline.guarded(31, LimitFile::MemoryMax).is_none());

    // Without the guard attached (or in observe), nothing goes to its maps.
    for heal in [
        HealSettings {
            guard_active: false,
            ..guarding()
        },
        HealSettings {
            mode: Mode::Observe,
            ..guarding()
        },
    ] {
        let mut h = Harness::healing(heal);
        let out = h.start(&[(31, &container, G)]);
        assert!(
            guards(&out)
                .iter()
                .all(|c| matches!(c, GuardChange::Trust(_))),
            "{out:#?}"
        );
    }
}

/// A guard change lost on its way to the executor: the maps are emptied and rebuilt by a scan.
#[test]
fn a_lost_guard_change_empties_the_maps_and_the_next_scan_protects_again() {
    use crate::model::guard::GuardChange;
    let mut h = Harness::healing(HealSettings {
        rules: crate::rules::file::parse(GUARD_RULES, "test").expect("valid"),
        guard_active: true,
        ..enforcing()
    });
    let container = format!("{}/{}", pod_path(), "ab".repeat(32));
    let cgroups = [(POD_ID, pod_path(), G), (31, container.clone(), G)];
    let cgroups: Vec<(u64, &str, &str)> = cgroups
        .iter()
        .map(|(i, p, v)| (*i, p.as_str(), *v))
        .collect();
    h.start(&cgroups);
    let mut out = Vec::new();
    h.pipeline.guard_lost(&mut out);
    let g = guards(&out);
    assert_eq!(g[0], &GuardChange::Reset, "{g:#?}");
    assert!(matches!(g[1], GuardChange::Trust(_)), "{g:#?}");
    assert!(h.pipeline.guarded(31, LimitFile::MemoryMax).is_none());
    let (reason, since) = h.pipeline.take_resync().expect("a scan is asked for");
    let mut out = Vec::new();
    h.pipeline
        .apply_scan(&scan(&cgroups), since, reason, &mut out);
    assert_eq!(
        guards(&out),
        [&GuardChange::Protect {
            cgroup_id: 31,
            limit: LimitFile::MemoryMax,
            enforce: true
        }]
    );
}
