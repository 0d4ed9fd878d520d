//! The guard's plain types: which limit files are protected and how, the trusted writers as
//! the kernel program checks them, and the changes the pipeline asks of the kernel's maps.

use agent_common::{ExecKey, GUARD_MAX_WRITERS, GuardTrust, LimitFile};
use serde::{Deserialize, Serialize};

use super::trust::TrustSet;

/// What the guard does about an untrusted open of a protected file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardResult {
    /// The open failed with `EPERM` (enforce): the value was never written.
    Denied,
    /// The open went through (dry-run): it would have been refused.
    WouldDeny,
}

impl GuardResult {
    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::WouldDeny => "would_deny",
        }
    }
}

/// How one limit file of one cgroup is protected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Guarded {
    /// The rule that protects it.
    pub rule: String,
    /// Refuse (enforce), or let through and record (dry-run).
    pub enforce: bool,
}

/// The trusted writers as the kernel program checks them: a bit per writer (its index in the
/// trust set), in maps keyed by what the kernel sees at the open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustTables {
    pub exes: Vec<(ExecKey, u64)>,
    pub parents: Vec<(ExecKey, u64)>,
    pub pids: Vec<(u32, u64)>,
    pub trust: GuardTrust,
}

/// Adds `bit` to `key`'s mask in `table`.
fn add<K: PartialEq + Copy>(table: &mut Vec<(K, u64)>, key: K, bit: u64) {
    match table.iter_mut().find(|(k, _)| *k == key) {
        Some((_, mask)) => *mask |= bit,
        None => table.push((key, bit)),
    }
}

impl TrustTables {
    /// The tables for `set`. Writers past [`GUARD_MAX_WRITERS`] get no bit (the configuration
    /// refuses more).
    #[must_use]
    pub fn of(set: &TrustSet) -> Self {
        let mut t = Self {
            trust: GuardTrust {
                agent_tgid: set.agent_tgid,
                ..GuardTrust::default()
            },
            ..Self::default()
        };
        for (i, w) in set.writers.iter().enumerate().take(GUARD_MAX_WRITERS) {
            let bit = 1u64 << i;
            for e in &w.exes {
                add(&mut t.exes, *e, bit);
            }
            match &w.parents {
                Some(parents) => parents.iter().for_each(|p| add(&mut t.parents, *p, bit)),
                None => t.trust.any_parent |= bit,
            }
            match w.pid {
                Some(pid) => add(&mut t.pids, pid, bit),
                None => t.trust.any_pid |= bit,
            }
            if w.cgroups.is_none() {
                t.trust.any_cgroup |= bit;
            }
        }
        t
    }
}

/// The bits of the writers of `set` that may run in the cgroup at `path` because of their
/// `cgroup` globs (writers without globs are in [`GuardTrust::any_cgroup`]).
#[must_use]
pub fn cgroup_mask(set: &TrustSet, path: &str) -> u64 {
    set.writers
        .iter()
        .take(GUARD_MAX_WRITERS)
        .enumerate()
        .filter(|(_, w)| {
            w.cgroups
                .as_ref()
                .is_some_and(|globs| globs.iter().any(|g| g.matches(path)))
        })
        .fold(0, |mask, (i, _)| mask | 1 << i)
}

/// What the pipeline asks of the kernel's guard maps (the executor carries it out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuardChange {
    /// Protect `limit` of cgroup `cgroup_id`: refuse untrusted opens (`enforce`) or report them.
    Protect {
        cgroup_id: u64,
        limit: LimitFile,
        enforce: bool,
    },
    /// No longer protect it.
    Release { cgroup_id: u64, limit: LimitFile },
    /// The trusted writers changed (or start).
    Trust(Box<TrustTables>),
    /// Trusted writers with cgroup globs may write from cgroup `id` (`mask`), or no longer
    /// (`None`: the cgroup is gone, or matches no glob now).
    TrustCgroup { id: u64, mask: Option<u64> },
    /// A change was lost on its way: everything protected is released, to be protected again
    /// by the scan that follows.
    Reset,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        event::Identity,
        heal::Writer,
        pattern::Pattern,
        trust::{TrustSet, TrustedWriter},
    };

    fn key(ino: u64) -> ExecKey {
        ExecKey {
            dev: 8 << 20 | 1,
            reserved: 0,
            ino,
        }
    }

    /// The kernel's check on these tables (`GuardTrust::trusts` over map lookups) says what
    /// the agent's own classification says, for every kind of constraint.
    #[test]
    fn the_kernel_tables_trust_whom_the_agent_trusts() {
        let set = TrustSet {
            writers: vec![
                TrustedWriter {
                    name: "kubelet".into(),
                    exes: vec![key(10), key(11)],
                    ..TrustedWriter::default()
                },
                TrustedWriter {
                    name: "runc".into(),
                    exes: vec![key(20)],
                    parents: Some(vec![key(21)]),
                    ..TrustedWriter::default()
                },
                TrustedWriter {
                    name: "systemd".into(),
                    exes: vec![key(30)],
                    pid: Some(1),
                    ..TrustedWriter::default()
                },
                TrustedWriter {
                    name: "ops".into(),
                    exes: vec![key(40), key(20)],
                    cgroups: Some(vec![Pattern::new("/ops/**").expect("glob")]),
                    ..TrustedWriter::default()
                },
            ],
            agent_tgid: 500,
        };
        let t = TrustTables::of(&set);
        assert_eq!(t.trust.agent_tgid, 500);
        let lookup = |table: &[(ExecKey, u64)], k: Option<ExecKey>| {
            k.and_then(|k| table.iter().find(|(e, _)| *e == k).map(|(_, m)| *m))
                .unwrap_or(0)
        };
        let kernel = |tgid: u32, who: &Identity, cgroup: &str| {
            let pid = t
                .pids
                .iter()
                .find(|(p, _)| *p == tgid)
                .map_or(0, |(_, m)| *m);
            t.trust.trusts(
                lookup(&t.exes, who.exe),
                lookup(&t.parents, who.parent_exe),
                pid,
                cgroup_mask(&set, cgroup),
            )
        };
        let cases = [
            (77, (10, 30), "/kubepods/pod1"),
            (77, (11, 30), "/"),
            (78, (20, 21), "/x"),
            (78, (20, 99), "/x"),
            (78, (20, 99), "/ops/shell"),
            (1, (30, 0), "/init.scope"),
            (2, (30, 30), "/init.scope"),
            (9, (40, 1), "/ops/shell"),
            (9, (40, 1), "/other"),
            (66, (12, 30), "/"),
        ];
        for (tgid, (exe, parent), cgroup) in cases {
            let who = Identity {
                exe: Some(key(exe)),
                parent_tgid: 1,
                parent_exe: (parent != 0).then(|| key(parent)),
            };
            let agent = !matches!(set.classify(tgid, &who, Some(cgroup)), Writer::Untrusted);
            assert_eq!(
                kernel(tgid, &who, cgroup),
                agent,
                "tgid {tgid} exe {exe} parent {parent} in {cgroup}"
            );
        }
        let nobody = Identity::default();
        assert!(!kernel(3, &nobody, "/"), "an unreadable identity");
    }
}
