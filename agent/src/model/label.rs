//! Bounds on label values others choose: a writer's comm, a Go program's fatal message, a
//! process's comm in the futex series. Anyone who can start a process chooses these, so each
//! label keeps the first values it sees up to a cap and folds the rest into `other`, counted
//! (`nodewarden_label_values_folded_total{label}`): the series stay bounded whatever runs on
//! the node. A value once kept stays kept, so a series never moves into `other` and back.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

/// The value folded values become.
pub const OTHER: &str = "other";

/// The labels whose values are bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// `writer` of `nodewarden_cgroup_limit_writes_total`.
    Writer,
    /// `reason` of `nodewarden_go_fatal_errors_total`.
    GoReason,
    /// `comm` of the futex series.
    FutexComm,
}

impl Label {
    pub const ALL: [Self; 3] = [Self::Writer, Self::GoReason, Self::FutexComm];

    /// The label's name, as the metrics carry it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Writer => "writer",
            Self::GoReason => "reason",
            Self::FutexComm => "comm",
        }
    }

    /// How many distinct values the label keeps. Writers of limit files are few on a node
    /// (kubelet, the runtime, systemd); Go's fatal errors are a handful of messages.
    #[must_use]
    pub const fn cap(self) -> usize {
        match self {
            Self::Writer => 128,
            Self::GoReason => 32,
            Self::FutexComm => 256,
        }
    }
}

/// Folded values of every label, shared by the bounds (which count) and the metrics (which read).
#[derive(Clone, Debug, Default)]
pub struct Folded(Arc<[AtomicU64; Label::ALL.len()]>);

impl Folded {
    #[must_use]
    pub fn get(&self, label: Label) -> u64 {
        self.0[label as usize].load(Ordering::Relaxed)
    }

    fn add(&self, label: Label) {
        self.0[label as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The values one label keeps.
#[derive(Debug)]
pub struct Bound {
    label: Label,
    kept: HashSet<String>,
    folded: Folded,
}

impl Bound {
    #[must_use]
    pub fn new(label: Label, folded: Folded) -> Self {
        Self {
            label,
            kept: HashSet::new(),
            folded,
        }
    }

    /// `value` if the label keeps it (or has room for it), else [`OTHER`], counted.
    pub fn value<'a>(&mut self, value: &'a str) -> &'a str {
        if self.kept.contains(value) {
            return value;
        }
        if self.kept.len() < self.label.cap() {
            self.kept.insert(value.to_owned());
            return value;
        }
        self.folded.add(self.label);
        OTHER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_values_up_to_the_cap_and_folds_the_rest_counted() {
        let folded = Folded::default();
        let mut b = Bound::new(Label::GoReason, folded.clone());
        let values: Vec<String> = (0..Label::GoReason.cap() + 10)
            .map(|i| format!("r{i}"))
            .collect();
        let out: Vec<&str> = values.iter().map(|v| b.value(v)).collect();
        assert_eq!(
            &out[..Label::GoReason.cap()],
            &values[..Label::GoReason.cap()]
        );
        assert!(out[Label::GoReason.cap()..].iter().all(|v| *v == OTHER));
        assert_eq!(folded.get(Label::GoReason), 10);
        // A kept value stays kept; other labels count apart.
        assert_eq!(b.value("r0"), "r0");
        assert_eq!(folded.get(Label::GoReason), 10);
        assert_eq!(folded.get(Label::Writer), 0);
    }
}
