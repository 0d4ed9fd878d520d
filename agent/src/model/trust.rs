//! Trusted writers: who may change a limit and have the change taken as the new desired value.
//! Told apart by what the kernel saw at the write (the executable's device and inode, the
//! parent's, the writer's cgroup and pid), never by comm.

use agent_common::ExecKey;

use super::{event::Identity, heal::Writer, pattern::Pattern};

/// One trusted writer, its executables resolved to the kernel's keys.
#[derive(Debug, Clone, Default)]
pub struct TrustedWriter {
    pub name: String,
    /// The executables it may run (every key a configured path has had).
    pub exes: Vec<ExecKey>,
    /// The executables its parent may run; `None`: any parent.
    pub parents: Option<Vec<ExecKey>>,
    /// The cgroups it may run in; `None`: any.
    pub cgroups: Option<Vec<Pattern>>,
    /// The tgid it must have (`1` for systemd); `None`: any.
    pub pid: Option<u32>,
}

impl TrustedWriter {
    fn matches(&self, tgid: u32, who: &Identity, cgroup: Option<&str>) -> bool {
        who.exe.is_some_and(|e| self.exes.contains(&e))
            && self.pid.is_none_or(|p| p == tgid)
            && self
                .parents
                .as_ref()
                .is_none_or(|p| who.parent_exe.is_some_and(|e| p.contains(&e)))
            && self
                .cgroups
                .as_ref()
                .is_none_or(|globs| cgroup.is_some_and(|c| globs.iter().any(|g| g.matches(c))))
    }
}

/// Every trusted writer, and the agent itself.
#[derive(Debug, Clone, Default)]
pub struct TrustSet {
    pub writers: Vec<TrustedWriter>,
    /// The agent's own tgid: its writes are its restores.
    pub agent_tgid: u32,
}

impl TrustSet {
    /// Who `tgid`, seen by the kernel as `who` in the cgroup at `cgroup`, is.
    #[must_use]
    pub fn classify(&self, tgid: u32, who: &Identity, cgroup: Option<&str>) -> Writer {
        if tgid == self.agent_tgid && tgid != 0 {
            return Writer::Agent;
        }
        self.writers
            .iter()
            .find(|w| w.matches(tgid, who, cgroup))
            .map_or(Writer::Untrusted, |w| Writer::Trusted(w.name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64) -> ExecKey {
        ExecKey {
            dev: 8 << 20 | 1,
            reserved: 0,
            ino,
        }
    }

    fn who(exe: u64, parent: u32, parent_exe: u64) -> Identity {
        Identity {
            exe: Some(key(exe)),
            parent_tgid: parent,
            parent_exe: Some(key(parent_exe)),
        }
    }

    #[test]
    fn trust_follows_executables_parentage_cgroups_and_pids() {
        let set = TrustSet {
            writers: vec![
                TrustedWriter {
                    name: "kubelet".into(),
                    exes: vec![key(10)],
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
                    exes: vec![key(40)],
                    cgroups: Some(vec![Pattern::new("/ops/**").expect("glob")]),
                    ..TrustedWriter::default()
                },
            ],
            agent_tgid: 500,
        };
        let t = |name: &str| Writer::Trusted(name.into());
        assert_eq!(set.classify(77, &who(10, 1, 30), None), t("kubelet"));
        assert_eq!(set.classify(78, &who(20, 60, 21), None), t("runc"));
        assert_eq!(
            set.classify(78, &who(20, 60, 99), None),
            Writer::Untrusted,
            "runc started by something else"
        );
        assert_eq!(set.classify(1, &who(30, 0, 0), None), t("systemd"));
        assert_eq!(
            set.classify(2, &who(30, 1, 30), None),
            Writer::Untrusted,
            "systemd's executable, not PID 1"
        );
        assert_eq!(
            set.classify(9, &who(40, 1, 1), Some("/ops/shell")),
            t("ops")
        );
        assert_eq!(
            set.classify(9, &who(40, 1, 1), Some("/other")),
            Writer::Untrusted
        );
        assert_eq!(set.classify(500, &who(99, 1, 1), None), Writer::Agent);
        // A process that calls itself kubelet runs another executable: comm plays no part.
        assert_eq!(set.classify(66, &who(11, 1, 30), None), Writer::Untrusted);
        assert_eq!(
            set.classify(66, &Identity::default(), None),
            Writer::Untrusted,
            "unreadable identity"
        );
    }
}
