//! User stacks: read from the programs' stack maps and symbolized with blazesym from the
//! executables' symbol tables. The symbolizer keeps every file it opened for as long as it
//! lives, so it is replaced regularly: what it holds open stays bounded.

use std::{
    collections::HashSet,
    hash::{Hash as _, Hasher as _},
};

use aya::maps::{MapData, StackTraceMap};

use crate::model::cache::{Cache, Evictions};

/// A symbolizer serves at most this many processes...
const MAX_PROCESSES: usize = 64;
/// ...or this many read windows, before it is replaced (and its open files closed).
const MAX_WINDOWS: u32 = 150;

/// The addresses of a stack, innermost first, and a hash of them: the stack's identity, where
/// its id in the map is only a bucket that another stack may take once it is freed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub addrs: Vec<u64>,
    pub hash: u64,
}

/// Stack `id` of `map`, or `None` when it is not there.
#[must_use]
pub fn read(map: &StackTraceMap<MapData>, id: u32) -> Option<Stack> {
    let trace = map.get(&id, 0).ok()?;
    let addrs: Vec<u64> = trace.frames().iter().map(|f| f.ip).collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    addrs.hash(&mut h);
    Some(Stack {
        hash: h.finish(),
        addrs,
    })
}

/// Symbolizes user addresses, replacing its blazesym symbolizer as it goes.
pub struct Symbols {
    symbolizer: blazesym::symbolize::Symbolizer,
    /// Processes served by the current symbolizer.
    pids: HashSet<u32>,
    windows: u32,
    evictions: Evictions,
}

impl std::fmt::Debug for Symbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbols")
            .field("pids", &self.pids.len())
            .finish_non_exhaustive()
    }
}

impl Symbols {
    #[must_use]
    pub fn new(evictions: &Evictions) -> Self {
        Self {
            symbolizer: blazesym::symbolize::Symbolizer::new(),
            pids: HashSet::new(),
            windows: 0,
            evictions: evictions.clone(),
        }
    }

    /// The function (and offset in it) of each user address of process `pid`, from the
    /// executables' symbol tables; `None` where unknown (or for all, when the process is gone).
    pub fn symbolize(&mut self, pid: u32, addrs: &[u64]) -> Vec<Option<(String, usize)>> {
        if !self.pids.contains(&pid) && self.pids.len() >= MAX_PROCESSES {
            self.replace();
        }
        self.pids.insert(pid);
        let mut process = blazesym::symbolize::source::Process::new(blazesym::Pid::from(pid));
        // Symbol tables name every function needed here; DWARF would cost seconds and memory
        // for a large binary. Perf maps are files any process writes in /tmp (a FIFO there
        // would hang the read): not read.
        process.debug_syms = false;
        process.perf_map = false;
        let src = blazesym::symbolize::source::Source::Process(process);
        match self
            .symbolizer
            .symbolize(&src, blazesym::symbolize::Input::AbsAddr(addrs))
        {
            Ok(syms) => syms
                .into_iter()
                .map(|s| match s {
                    blazesym::symbolize::Symbolized::Sym(sym) => {
                        Some((sym.name.into_owned(), sym.offset))
                    }
                    blazesym::symbolize::Symbolized::Unknown(_) => None,
                })
                .collect(),
            Err(e) => {
                tracing::debug!(pid, "symbolizing a stack: {e}");
                vec![None; addrs.len()]
            }
        }
    }

    /// The end of a read window: an old symbolizer is replaced.
    pub fn window_done(&mut self) {
        self.windows += 1;
        if self.windows >= MAX_WINDOWS {
            self.replace();
        }
    }

    /// A fresh symbolizer; what the old one held (per process) is counted as evicted.
    fn replace(&mut self) {
        self.evictions
            .add(Cache::Symbolizer, self.pids.len() as u64);
        self.symbolizer = blazesym::symbolize::Symbolizer::new();
        self.pids.clear();
        self.windows = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolizes_this_process_and_is_replaced_when_it_served_many() {
        let e = Evictions::default();
        let mut s = Symbols::new(&e);
        let addr = symbolizes_this_process_and_is_replaced_when_it_served_many as *const () as u64;
        let me = std::process::id();
        let found = s.symbolize(me, &[addr]);
        assert!(
            found[0]
                .as_ref()
                .is_some_and(|(name, _)| name.contains("symbolizes_this_process")),
            "{found:?}"
        );
        for pid in 1..=u32::try_from(MAX_PROCESSES).expect("fits") {
            s.symbolize(u32::MAX - pid, &[1]);
        }
        assert_eq!(e.get(Cache::Symbolizer), MAX_PROCESSES as u64);
        assert_eq!(s.pids.len(), 1);
    }
}
