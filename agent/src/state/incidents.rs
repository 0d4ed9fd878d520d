//! OOM kills grouped into incidents: one limit hit and every process killed for it.

use std::fmt::Write as _;

use crate::model::cache::{Cache, Evictions};

/// How long an incident stays open after its last victim. The kernel kills every victim of one
/// limit hit (several with `memory.oom.group`) within one `out_of_memory` call, microseconds
/// apart; a second is far beyond that and short enough for `nodewarden events` to feel live.
pub const QUIET_NS: u64 = 1_000_000_000;

/// Incidents open at once at most: an OOM storm beyond it closes the oldest early (counted).
const MAX_OPEN: usize = 1024;

/// What groups a victim with others of the same limit hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The `out_of_memory` call was seen: the thread that ran it and when it began.
    Kernel { trigger_tid: u32, entered_ns: u64 },
    /// Derived: the triggering thread, within [`QUIET_NS`] of the last victim (the limit is
    /// derived once, for the first victim: the counts rise once per limit hit).
    Derived { trigger_tid: u32 },
}

/// One limit hit and its victims so far.
#[derive(Debug)]
pub struct Open<T> {
    pub id: String,
    pub key: Key,
    /// Kernel time of the last victim.
    pub last_ns: u64,
    /// What the caller keeps for the incident (its record).
    pub data: T,
}

/// The incidents still taking victims.
#[derive(Debug)]
pub struct Incidents<T> {
    open: Vec<Open<T>>,
    evictions: Evictions,
}

impl<T> Incidents<T> {
    #[must_use]
    pub fn new(evictions: &Evictions) -> Self {
        Self {
            open: Vec::new(),
            evictions: evictions.clone(),
        }
    }

    /// The open incident a victim seen at `at_ns` with `key` belongs to.
    pub fn find(&mut self, key: &Key, at_ns: u64) -> Option<&mut Open<T>> {
        self.open
            .iter_mut()
            .find(|o| o.key == *key && at_ns.saturating_sub(o.last_ns) < QUIET_NS)
    }

    /// Opens an incident with a new id. When [`MAX_OPEN`] are open, the oldest is closed first
    /// and returned, to be reported.
    pub fn open(&mut self, key: Key, at_ns: u64, data: T) -> (&mut Open<T>, Option<Open<T>>) {
        let pushed_out = (self.open.len() >= MAX_OPEN).then(|| {
            self.evictions.add(Cache::OomIncidents, 1);
            self.open.remove(0)
        });
        self.open.push(Open {
            id: new_id(),
            key,
            last_ns: at_ns,
            data,
        });
        let last = self.open.len() - 1;
        (&mut self.open[last], pushed_out)
    }

    /// The incidents open.
    pub fn iter(&self) -> impl Iterator<Item = &Open<T>> {
        self.open.iter()
    }

    /// Removes and returns the incidents whose last victim is [`QUIET_NS`] before `now_ns`.
    pub fn close_quiet(&mut self, now_ns: u64) -> Vec<Open<T>> {
        let (done, open) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|o| now_ns.saturating_sub(o.last_ns) >= QUIET_NS);
        self.open = open;
        done
    }

    /// When the first open incident goes quiet (monotonic ns), if one is open.
    #[must_use]
    pub fn next_quiet_ns(&self) -> Option<u64> {
        self.open
            .iter()
            .map(|o| o.last_ns.saturating_add(QUIET_NS))
            .min()
    }

    /// Every incident, open or not (at shutdown).
    pub fn close_all(&mut self) -> Vec<Open<T>> {
        std::mem::take(&mut self.open)
    }
}

/// 16 random bytes as 32 hex digits: an incident id that is also its trace id.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `len` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if usize::try_from(n).ok() != Some(bytes.len()) {
        // No entropy source: time and pid still make ids unique on one node.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (now ^ (u128::from(std::process::id()) << 96)).to_be_bytes();
    }
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incidents_group_by_key_and_close_when_quiet() {
        let mut i: Incidents<u32> = Incidents::new(&Evictions::default());
        let key = Key::Kernel {
            trigger_tid: 7,
            entered_ns: 100,
        };
        let id = i.open(key.clone(), 1_000, 1).0.id.clone();
        assert_eq!(id.len(), 32);
        let same = i.find(&key, 1_500).expect("same incident");
        same.last_ns = 1_500;
        assert_eq!(same.id, id);
        let other = Key::Kernel {
            trigger_tid: 7,
            entered_ns: 200,
        };
        assert!(i.find(&other, 1_600).is_none());
        assert!(i.close_quiet(1_500 + QUIET_NS - 1).is_empty());
        let closed = i.close_quiet(1_500 + QUIET_NS);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].id, id);
        assert!(i.find(&key, 1_600).is_none());
    }

    #[test]
    fn an_oom_storm_closes_the_oldest_early() {
        let e = Evictions::default();
        let mut i: Incidents<u32> = Incidents::new(&e);
        for n in 0..u32::try_from(MAX_OPEN).expect("fits") {
            let key = Key::Derived { trigger_tid: n };
            assert!(i.open(key, 0, n).1.is_none());
        }
        let (_, out) = i.open(Key::Derived { trigger_tid: 9999 }, 0, 9999);
        assert_eq!(out.map(|o| o.data), Some(0));
        assert_eq!(e.get(Cache::OomIncidents), 1);
        assert_eq!(i.close_all().len(), MAX_OPEN);
    }
}
