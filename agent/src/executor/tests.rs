//! The executor against a fake hierarchy: what each verdict and mode makes of a decision, and
//! what is recorded.

use std::sync::{Arc, Mutex};

use agent_common::LimitFile;

use agent_common::GuardEntry;

use super::{
    Executor, Job, Sinks,
    audit::AuditLog,
    files::{Attempt, LimitFiles},
    guard::{Guard, GuardTable},
};
use crate::{
    model::{
        guard::{GuardChange, GuardResult, TrustTables},
        heal::{DesiredSource, Mode, Outcome, Reason, Verdict},
        limit::LimitValue,
        record::{Decision, Trigger},
        record::{GuardDenial, Process},
    },
    outputs::{
        feed::Feed,
        metrics::{Metrics, Shared},
        traces::Traces,
    },
};

/// The restores asked for: cgroup id, limit, value, and whether to write (or only check).
type Asked = Arc<Mutex<Vec<(u64, LimitFile, LimitValue, bool)>>>;

/// Records what it is asked, answers as told.
#[derive(Debug, Clone, Default)]
struct Fake {
    asked: Asked,
    answer: Option<Attempt>,
}

impl LimitFiles for Fake {
    fn restore(&self, id: u64, limit: LimitFile, to: LimitValue, write: bool) -> Attempt {
        self.asked
            .lock()
            .expect("lock")
            .push((id, limit, to, write));
        self.answer.clone().unwrap_or(if write {
            Attempt::Written {
                read_back: to.to_string(),
            }
        } else {
            Attempt::Checked
        })
    }

    /// Cgroup 0 has no files; any other's file is `10 * id + the limit's index`.
    fn inode(&self, id: u64, limit: LimitFile) -> Result<u64, String> {
        if id == 0 {
            return Err("the cgroup is gone".into());
        }
        let i = LimitFile::ALL.iter().position(|l| *l == limit).unwrap_or(9);
        Ok(10 * id + i as u64)
    }
}

/// What the guard's maps were asked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Table {
    Put(u64, GuardEntry),
    Remove(u64),
    Trust(u32),
    Cgroup(u64, Option<u64>),
}

#[derive(Debug, Clone, Default)]
struct FakeTable(Arc<Mutex<Vec<Table>>>);

impl GuardTable for FakeTable {
    fn put_file(&mut self, ino: u64, entry: GuardEntry) -> Result<(), String> {
        self.0.lock().expect("lock").push(Table::Put(ino, entry));
        Ok(())
    }
    fn remove_file(&mut self, ino: u64) -> Result<(), String> {
        self.0.lock().expect("lock").push(Table::Remove(ino));
        Ok(())
    }
    fn put_trust(&mut self, tables: &TrustTables) -> Result<(), String> {
        self.0
            .lock()
            .expect("lock")
            .push(Table::Trust(tables.trust.agent_tgid));
        Ok(())
    }
    fn put_cgroup(&mut self, id: u64, mask: Option<u64>) -> Result<(), String> {
        self.0.lock().expect("lock").push(Table::Cgroup(id, mask));
        Ok(())
    }
}

fn decision(verdict: Verdict, mode: Mode) -> Decision {
    Decision {
        time_unix_nano: 1,
        cgroup: "/kubepods/burstable/pod1".into(),
        cgroup_id: 77,
        k8s: None,
        limit: LimitFile::MemoryMax,
        rule: "r".into(),
        mode,
        verdict,
        reason: None,
        value: "536870912".into(),
        desired: Some("2147483648".into()),
        desired_source: Some(DesiredSource::FirstSeen),
        writer: None,
        trusted_writer: None,
        trigger: Trigger::Write,
        changed_ns: 0,
        incident: None,
        write_time_unix_nano: Some(1),
        outcome: None,
        repeated: 0,
    }
}

fn executor(fake: &Fake, audit: Option<AuditLog>) -> (Executor, Metrics) {
    let metrics = Metrics::new(Shared::default());
    let sinks = Sinks {
        metrics: metrics.clone(),
        feed: Feed::new(),
        traces: Traces::disabled(),
        audit,
        state_file: None,
    };
    (Executor::new(Box::new(fake.clone()), sinks), metrics)
}

#[test]
fn each_verdict_and_mode_does_what_it_says_and_is_recorded() {
    let dir = std::env::temp_dir().join(format!("nw-executor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let audit = dir.join("audit.jsonl");
    let fake = Fake::default();
    let (mut ex, metrics) = executor(&fake, Some(AuditLog::new(audit.clone(), 1 << 20, 2)));
    ex.decide(decision(Verdict::Restore, Mode::Enforce));
    ex.decide(decision(Verdict::WouldRestore, Mode::DryRun));
    ex.decide(decision(Verdict::WouldRestore, Mode::Observe));
    let mut alert = decision(Verdict::Alert, Mode::Enforce);
    alert.reason = Some(Reason::Fight);
    ex.decide(alert);
    let asked = fake.asked.lock().expect("lock").clone();
    assert_eq!(
        asked,
        [
            (77, LimitFile::MemoryMax, LimitValue::Bytes(2 << 30), true),
            (77, LimitFile::MemoryMax, LimitValue::Bytes(2 << 30), false),
        ],
        "enforce writes, dry-run checks, observe and alerts touch nothing"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let results: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["verdict"].as_str().unwrap_or_default(),
                l["outcome"]["result"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("restore", "restored"),
            ("would_restore", "checked"),
            ("would_restore", "recorded"),
            ("alert", "recorded"),
        ]
    );
    assert_eq!(lines[0]["kind"], "decision");
    assert_eq!(
        metrics
            .remediations
            .with_label_values(&["r", "restore", "restored"])
            .get(),
        1
    );
    assert_eq!(
        metrics.remediation_fights.with_label_values(&["r"]).get(),
        1
    );
    assert_eq!(metrics.remediation_latency.get_sample_count(), 1);
    std::fs::remove_dir_all(&dir).expect("rm");
}

#[test]
fn a_target_gone_or_already_restored_is_not_written_and_said_why() {
    for (answer, expected) in [
        (
            Attempt::NotWritten(Reason::Stale),
            Outcome::NotWritten {
                reason: Reason::Stale,
            },
        ),
        (
            Attempt::NotWritten(Reason::AlreadyRestored),
            Outcome::NotWritten {
                reason: Reason::AlreadyRestored,
            },
        ),
        (
            Attempt::Failed("EINVAL".into()),
            Outcome::Failed {
                error: "EINVAL".into(),
            },
        ),
    ] {
        let fake = Fake {
            answer: Some(answer),
            ..Fake::default()
        };
        let (mut ex, metrics) = executor(&fake, None);
        let mut d = decision(Verdict::Restore, Mode::Enforce);
        d.outcome = None;
        ex.decide(d);
        let label = expected.label();
        assert_eq!(
            metrics
                .remediations
                .with_label_values(&["r", "restore", label])
                .get(),
            1,
            "{expected:?}"
        );
        assert_eq!(metrics.remediation_latency.get_sample_count(), 0);
    }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one sequence of changes, checked in order"
)]
fn guard_changes_reach_the_kernel_maps_by_inode_and_denials_are_recorded() {
    let dir = std::env::temp_dir().join(format!("nw-executor-guard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let audit = dir.join("audit.jsonl");
    let fake = Fake::default();
    let table = FakeTable::default();
    let (ex, metrics) = executor(&fake, Some(AuditLog::new(audit.clone(), 1 << 20, 2)));
    let mut ex = ex.with_guard(Guard::new(Box::new(table.clone())));
    let m = LimitFile::MemoryMax;
    let tables = TrustTables {
        trust: agent_common::GuardTrust {
            agent_tgid: 7,
            ..Default::default()
        },
        ..TrustTables::default()
    };
    for c in [
        GuardChange::Trust(Box::new(tables)),
        GuardChange::Protect {
            cgroup_id: 3,
            limit: m,
            enforce: true,
        },
        GuardChange::Protect {
            cgroup_id: 3,
            limit: LimitFile::CpuMax,
            enforce: false,
        },
        GuardChange::Protect {
            cgroup_id: 0,
            limit: m,
            enforce: true,
        },
        GuardChange::TrustCgroup {
            id: 3,
            mask: Some(2),
        },
        GuardChange::Release {
            cgroup_id: 3,
            limit: m,
        },
        GuardChange::Release {
            cgroup_id: 9,
            limit: m,
        },
    ] {
        ex.take(Job::Guard(c));
    }
    let entry = |limit: u32, enforce: u32| GuardEntry {
        cgroup_id: 3,
        limit,
        enforce,
    };
    assert_eq!(
        *table.0.lock().expect("lock"),
        [
            Table::Trust(7),
            Table::Put(30, entry(0, 1)),
            Table::Put(36, entry(6, 0)),
            Table::Cgroup(3, Some(2)),
            Table::Remove(30),
        ],
        "a cgroup without files is not protected, a file never protected is not released"
    );
    assert_eq!(metrics.guard_errors.get(), 1);
    assert_eq!(metrics.guard_files.get(), 1);
    ex.take(Job::Guard(GuardChange::Reset));
    assert_eq!(
        table.0.lock().expect("lock")[5..],
        [Table::Remove(36), Table::Cgroup(3, None)],
        "a reset empties what the kernel holds"
    );
    assert_eq!(metrics.guard_files.get(), 0);

    ex.take(Job::Denial(Box::new(GuardDenial {
        time_unix_nano: 1,
        cgroup: "/kubepods/pod1/c1".into(),
        cgroup_id: 3,
        k8s: None,
        limit: m,
        rule: "g".into(),
        result: GuardResult::Denied,
        writer: Process {
            pid: 5,
            tid: 5,
            comm: "sh".into(),
            exe: Some("/bin/dash".into()),
            cgroup: "/".into(),
        },
    })));
    assert_eq!(
        metrics
            .guard_denials
            .with_label_values(&["g", "memory.max", "denied"])
            .get(),
        1
    );
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&audit)
            .expect("audit log")
            .lines()
            .next()
            .expect("a line"),
    )
    .expect("JSON");
    assert_eq!(line["kind"], "guard_denial");
    assert_eq!(line["result"], "denied");
    assert_eq!(line["writer"]["exe"], "/bin/dash");
    assert!(
        fake.asked.lock().expect("lock").is_empty(),
        "no cgroup written"
    );
    std::fs::remove_dir_all(&dir).expect("rm");
}
