//! The executor against a fake hierarchy: what each verdict and mode makes of a decision, and
//! what is recorded.

use std::sync::{Arc, Mutex};

use agent_common::LimitFile;

use super::{
    Executor, Sinks,
    audit::AuditLog,
    files::{Attempt, LimitFiles},
};
use crate::{
    model::{
        heal::{DesiredSource, Mode, Outcome, Reason, Verdict},
        limit::LimitValue,
        record::{Decision, Trigger},
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
