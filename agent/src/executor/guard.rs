//! The guard's kernel maps as the executor changes them: which files are protected (by inode
//! number, found by opening the cgroup by id) and who is trusted. Behind a trait, so the
//! executor is tested without BPF.

use std::collections::{HashMap, HashSet};

use agent_common::{GuardEntry, LimitFile};

use super::files::LimitFiles;
use crate::model::guard::{GuardChange, TrustTables};

/// The kernel's guard maps.
pub trait GuardTable {
    /// Protects the file with inode number `ino` as `entry` says.
    fn put_file(&mut self, ino: u64, entry: GuardEntry) -> Result<(), String>;
    /// Stops protecting it.
    fn remove_file(&mut self, ino: u64) -> Result<(), String>;
    /// Replaces the trusted writers' tables.
    fn put_trust(&mut self, tables: &TrustTables) -> Result<(), String>;
    /// Trusted writers with cgroup globs may write from cgroup `id` (`mask`), or no longer.
    fn put_cgroup(&mut self, id: u64, mask: Option<u64>) -> Result<(), String>;
}

/// The guard's maps and which inode each protected (cgroup, limit) has there.
pub struct Guard {
    table: Box<dyn GuardTable + Send>,
    inodes: HashMap<(u64, LimitFile), u64>,
    /// Cgroups trusted writers with cgroup globs may write from, as the kernel has them.
    cgroups: HashSet<u64>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("files", &self.inodes.len())
            .finish_non_exhaustive()
    }
}

impl Guard {
    #[must_use]
    pub fn new(table: Box<dyn GuardTable + Send>) -> Self {
        Self {
            table,
            inodes: HashMap::new(),
            cgroups: HashSet::new(),
        }
    }

    /// Files protected now.
    #[must_use]
    pub fn files(&self) -> usize {
        self.inodes.len()
    }

    /// Carries out `change`, finding files through `files`.
    pub fn apply(&mut self, change: &GuardChange, files: &dyn LimitFiles) -> Result<(), String> {
        match change {
            GuardChange::Protect {
                cgroup_id,
                limit,
                enforce,
            } => {
                let ino = files.inode(*cgroup_id, *limit)?;
                let index = LimitFile::ALL
                    .iter()
                    .position(|l| l == limit)
                    .and_then(|i| u32::try_from(i).ok())
                    .unwrap_or(u32::MAX);
                self.table.put_file(
                    ino,
                    GuardEntry {
                        cgroup_id: *cgroup_id,
                        limit: index,
                        enforce: u32::from(*enforce),
                    },
                )?;
                if let Some(old) = self.inodes.insert((*cgroup_id, *limit), ino)
                    && old != ino
                {
                    self.table.remove_file(old)?;
                }
                Ok(())
            }
            GuardChange::Release { cgroup_id, limit } => {
                match self.inodes.remove(&(*cgroup_id, *limit)) {
                    Some(ino) => self.table.remove_file(ino),
                    None => Ok(()),
                }
            }
            GuardChange::Trust(tables) => self.table.put_trust(tables),
            GuardChange::TrustCgroup { id, mask } => {
                if mask.is_some() {
                    self.cgroups.insert(*id);
                } else {
                    self.cgroups.remove(id);
                }
                self.table.put_cgroup(*id, *mask)
            }
            GuardChange::Reset => {
                let mut first = Ok(());
                for (_, ino) in self.inodes.drain() {
                    first = first.and(self.table.remove_file(ino));
                }
                for id in self.cgroups.drain() {
                    first = first.and(self.table.put_cgroup(id, None));
                }
                first
            }
        }
    }
}
