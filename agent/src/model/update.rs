//! What the pipeline hands the outputs: records (events for everyone), and changes to the
//! state the gauges show.

use agent_common::LimitFile;

use super::{
    cgroup::Who,
    limit::LimitValue,
    record::{Decision, Record},
};

/// Why the limit state was read again from cgroupfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// At start-up.
    Start,
    /// Events that change limits or cgroups were lost: the state may be stale.
    EventsLost,
    /// An event named a cgroup id the agent could not resolve.
    UnknownCgroup,
    /// The periodic poll of the limit files (limit writes seen without BPF).
    Poll,
    /// The reconciler's periodic pass: every watched limit compared with its desired value.
    Reconcile,
    /// A successful limit write whose value could be neither read back nor parsed.
    UnreadWrite,
}

impl ResyncReason {
    pub const ALL: [Self; 6] = [
        Self::Start,
        Self::EventsLost,
        Self::UnknownCgroup,
        Self::Poll,
        Self::Reconcile,
        Self::UnreadWrite,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::EventsLost => "events_lost",
            Self::UnknownCgroup => "unknown_cgroup",
            Self::Poll => "poll",
            Self::Reconcile => "reconcile",
            Self::UnreadWrite => "unread_write",
        }
    }
}

/// One output of the pipeline.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// An event: fed, counted, logged, traced.
    Record(Record),
    /// A cgroup's limit is now `value` (a write, a scan, a new cgroup's default).
    Limit {
        who: Who,
        limit: LimitFile,
        value: LimitValue,
    },
    /// A cgroup removed `metrics.deleted_cgroup_ttl_s` ago: its series go.
    Expired(String),
    /// The limit state was read again from cgroupfs.
    Resynced(ResyncReason),
    /// A decision about a watched limit, for the executor (which records it).
    Decision(Box<Decision>),
    /// The desired values changed: all of them, for the state file.
    Desired(super::heal::StateFile),
    /// A change to the guard's kernel maps, for the executor.
    Guard(super::guard::GuardChange),
    /// A guard denial, for the executor (which records it).
    Denial(Box<super::record::GuardDenial>),
}
