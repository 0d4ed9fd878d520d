//! Limit writes the syscalls mode cannot see. Its tracepoints are on write(2), pwrite64(2)
//! and writev(2); pwritev(2), `io_uring`, sendfile(2), splice(2) and `copy_file_range(2)`
//! reach a limit file by other paths. The VFS notifies inotify after every successful write,
//! whatever its path, so in syscalls mode inotify backs the probes up: each notification is
//! looked at once the ring has had time to deliver the write it may stand for, with the file
//! read again then. A value the probes reported is the state's already and nothing more
//! happens; any other was written unseen, and is reported without its writer (`seen_by`
//! inotify).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use agent_common::LimitFile;

use crate::model::event::Observed;

/// How long a notification waits for the ring's record of the same write. inotify is notified
/// inside the write, the ring at the syscall's return: a writer descheduled in between for
/// longer than this has its write reported twice, once without its writer. 250 ms was seen
/// exceeded in the lab's VM under emulation on a loaded machine; the writes only inotify sees
/// (`io_uring`, splice...) are reported this much later.
pub const WAIT: Duration = Duration::from_secs(1);

/// Limit files waiting at once, at most: one entry per file however often it changes, so this
/// is reached only by more files than a node has; beyond it the state is resynced instead.
pub const MAX_WAITING: usize = 65_536;

/// Notified limit files, each with the time its first notification came.
#[derive(Debug, Default)]
pub struct Unseen {
    waiting: HashMap<(u64, LimitFile), (String, Instant)>,
}

impl Unseen {
    /// Files notified at `now`; `false` when one did not fit (a resync is then due).
    pub fn notified(&mut self, observed: &[Observed], now: Instant) -> bool {
        let mut fits = true;
        for o in observed {
            let key = (o.id, o.limit);
            if self.waiting.contains_key(&key) {
                continue;
            }
            if self.waiting.len() >= MAX_WAITING {
                fits = false;
                continue;
            }
            self.waiting.insert(key, (o.path.clone(), now));
        }
        fits
    }

    /// Whether a file is waiting.
    #[must_use]
    pub fn waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The files whose wait is over at `now` (id, path, limit), taken out.
    pub fn due(&mut self, now: Instant) -> Vec<(u64, String, LimitFile)> {
        let mut due = Vec::new();
        self.waiting.retain(|(id, limit), (path, at)| {
            let over = now.saturating_duration_since(*at) >= WAIT;
            if over {
                due.push((*id, std::mem::take(path), *limit));
            }
            !over
        });
        due.sort_unstable_by_key(|(id, _, limit)| (*id, *limit as usize));
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(id: u64, limit: LimitFile) -> Observed {
        Observed {
            id,
            path: format!("/c{id}"),
            limit,
            value: "max".into(),
        }
    }

    #[test]
    fn a_notification_waits_for_the_ring_once_per_file() {
        let mut u = Unseen::default();
        let t0 = Instant::now();
        assert!(u.notified(
            &[
                observed(1, LimitFile::MemoryMax),
                observed(1, LimitFile::MemoryMax),
                observed(2, LimitFile::PidsMax),
            ],
            t0
        ));
        // A later notification of a waiting file does not move its time.
        assert!(u.notified(&[observed(1, LimitFile::MemoryMax)], t0 + WAIT / 2));
        assert!(u.due(t0 + WAIT / 2).is_empty());
        assert_eq!(
            u.due(t0 + WAIT),
            [
                (1, "/c1".to_owned(), LimitFile::MemoryMax),
                (2, "/c2".to_owned(), LimitFile::PidsMax)
            ]
        );
        assert!(u.due(t0 + WAIT * 4).is_empty(), "each once");
    }
}
