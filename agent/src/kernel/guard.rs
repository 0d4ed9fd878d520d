//! The guard's maps in the loaded object, taken out for the executor (which alone changes
//! them).

use agent_common::{ExecKey, GuardEntry, GuardTrust, maps};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError},
};

use super::loader::{LoadError, take_map};
use crate::{executor::guard::GuardTable, model::guard::TrustTables};

/// The guard's maps.
pub struct GuardMaps {
    files: HashMap<MapData, u64, GuardEntry>,
    exes: HashMap<MapData, ExecKey, u64>,
    parents: HashMap<MapData, ExecKey, u64>,
    pids: HashMap<MapData, u32, u64>,
    cgroups: HashMap<MapData, u64, u64>,
    trust: Array<MapData, GuardTrust>,
}

impl std::fmt::Debug for GuardMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardMaps").finish_non_exhaustive()
    }
}

impl GuardMaps {
    /// Takes the maps out of `ebpf`.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            files: take_map(ebpf, maps::GUARD_FILES)?,
            exes: take_map(ebpf, maps::GUARD_EXES)?,
            parents: take_map(ebpf, maps::GUARD_PARENTS)?,
            pids: take_map(ebpf, maps::GUARD_PIDS)?,
            cgroups: take_map(ebpf, maps::GUARD_CGROUPS)?,
            trust: take_map(ebpf, maps::GUARD_TRUST)?,
        })
    }
}

/// A map error on one line, with what was being done.
fn err(what: &str, e: &MapError) -> String {
    format!("{what}: {}", super::loader::explain(e))
}

/// Makes `map` hold exactly `entries`.
fn replace<K: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, K, u64>,
    entries: &[(K, u64)],
    what: &str,
) -> Result<(), String> {
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !entries.iter().any(|(e, _)| e == k))
        .collect();
    for (k, mask) in entries {
        map.insert(k, mask, 0).map_err(|e| err(what, &e))?;
    }
    for k in stale {
        match map.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(err(what, &e)),
        }
    }
    Ok(())
}

impl GuardTable for GuardMaps {
    fn put_file(&mut self, ino: u64, entry: GuardEntry) -> Result<(), String> {
        self.files
            .insert(ino, entry, 0)
            .map_err(|e| err("protecting a limit file", &e))
    }

    fn remove_file(&mut self, ino: u64) -> Result<(), String> {
        match self.files.remove(&ino) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(err("releasing a limit file", &e)),
        }
    }

    fn put_trust(&mut self, t: &TrustTables) -> Result<(), String> {
        // The executables first, the masks of the unconstrained last: for a moment a writer
        // may be refused, never trusted wrongly.
        replace(&mut self.exes, &t.exes, "trusted executables")?;
        replace(&mut self.parents, &t.parents, "trusted parents")?;
        replace(&mut self.pids, &t.pids, "trusted pids")?;
        self.trust
            .set(0, t.trust, 0)
            .map_err(|e| err("the guard's trust", &e))
    }

    fn put_cgroup(&mut self, id: u64, mask: Option<u64>) -> Result<(), String> {
        match mask {
            Some(m) => self
                .cgroups
                .insert(id, m, 0)
                .map_err(|e| err("a trusted writer's cgroup", &e)),
            None => match self.cgroups.remove(&id) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(err("a trusted writer's cgroup", &e)),
            },
        }
    }
}
