//! Limit writes without BPF: inotify on every cgroup directory reports each modified limit
//! file (the VFS notifies after any successful write), so the new value is read at once. The
//! writer is unknown, and a write the kernel rejected is not seen at all. A periodic scan of the
//! files catches what inotify misses (its queue overflowing, which is counted and rescans at
//! once).

use std::{
    collections::HashMap,
    ffi::CString,
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
};

use agent_common::LimitFile;

use crate::{enrich::cgroupfs::read_limits, model::event::Observed};

/// What one read of the queue found.
#[derive(Debug, Default)]
pub struct Batch {
    pub observed: Vec<Observed>,
    /// The kernel's queue overflowed: notifications were lost.
    pub overflowed: bool,
}

/// An inotify instance watching every cgroup directory under a root.
#[derive(Debug)]
pub struct Watcher {
    fd: OwnedFd,
    root: PathBuf,
    /// Watch descriptor to (cgroup id, path relative to the root).
    dirs: HashMap<i32, (u64, String)>,
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

const DIR_MASK: u32 = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_ONLYDIR | libc::IN_DONT_FOLLOW;

impl Watcher {
    /// Watches `root` and every cgroup below it.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        // SAFETY: inotify_init1 takes flags only; the fd it returns is ours to own.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut w = Self {
            fd,
            root: root.to_owned(),
            dirs: HashMap::new(),
        };
        w.add_tree(root)?;
        Ok(w)
    }

    /// Directories watched.
    #[must_use]
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    fn add_tree(&mut self, top: &Path) -> std::io::Result<()> {
        let mut stack = vec![top.to_owned()];
        while let Some(dir) = stack.pop() {
            self.add_dir(&dir)?;
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        Ok(())
    }

    fn add_dir(&mut self, dir: &Path) -> std::io::Result<()> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), DIR_MASK) };
        if wd < 0 {
            let e = std::io::Error::last_os_error();
            // A cgroup removed while we walk is no error.
            return if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            };
        }
        let id = std::fs::metadata(dir).map_or(0, |m| m.ino());
        let rel = dir.strip_prefix(&self.root).unwrap_or(dir);
        self.dirs.insert(wd, (id, format!("/{}", rel.display())));
        Ok(())
    }

    /// The limit files of the cgroup directory `dir` as they are now.
    fn read_all(&self, dir: &Path, out: &mut Vec<Observed>) {
        let Ok(meta) = std::fs::metadata(dir) else {
            return;
        };
        let rel = dir.strip_prefix(&self.root).unwrap_or(dir);
        for (limit, value) in read_limits(dir) {
            out.push(Observed {
                id: meta.ino(),
                path: format!("/{}", rel.display()),
                limit,
                value,
            });
        }
    }

    /// Reads the pending notifications (non-blocking) and returns the limit files modified.
    pub fn read(&mut self) -> std::io::Result<Batch> {
        let mut out = Batch::default();
        let mut buf = [0u8; 16 * 1024];
        loop {
            // SAFETY: reads into a buffer we own, of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(out);
                }
                return Err(e);
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                return Ok(out);
            }
            self.parse(&buf[..n], &mut out);
        }
    }

    /// Walks the `inotify_event` records of one read.
    fn parse(&mut self, mut bytes: &[u8], out: &mut Batch) {
        const HEADER: usize = size_of::<libc::inotify_event>();
        while bytes.len() >= HEADER {
            // SAFETY: at least HEADER bytes remain; read_unaligned copes with the buffer's alignment.
            let ev: libc::inotify_event = unsafe {
                bytes
                    .as_ptr()
                    .cast::<libc::inotify_event>()
                    .read_unaligned()
            };
            let len = usize::try_from(ev.len).unwrap_or(0);
            let end = (HEADER + len).min(bytes.len());
            let name_bytes = &bytes[HEADER..end];
            let name_end = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..name_end]).into_owned();
            bytes = &bytes[end..];
            if ev.mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&ev.wd);
                continue;
            }
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                tracing::warn!("inotify queue overflowed: limit writes missed until a rescan");
                out.overflowed = true;
                continue;
            }
            let Some((id, path)) = self.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let dir = self.root.join(path.trim_start_matches('/'));
            if ev.mask & libc::IN_CREATE != 0 && ev.mask & libc::IN_ISDIR != 0 {
                let new = dir.join(&name);
                if let Err(e) = self.add_tree(&new) {
                    tracing::warn!("inotify: watching {}: {e}", new.display());
                }
                // Writes between the mkdir and the new watch would be missed: read the files
                // now (the pipeline reports those that differ from a new cgroup's defaults).
                self.read_all(&new, &mut out.observed);
            } else if ev.mask & libc::IN_MODIFY != 0
                && let Some(limit) = LimitFile::from_file_name(&name)
                && let Ok(value) = std::fs::read_to_string(dir.join(&name))
            {
                out.observed.push(Observed {
                    id,
                    path,
                    limit,
                    value: value.trim().to_owned(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// inotify works on any filesystem: a directory tree stands in for cgroupfs here (the VM
    /// tests watch the real one).
    #[test]
    fn reports_modified_limit_files_in_new_and_old_directories() {
        let root = std::env::temp_dir().join(format!("nw-watch-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a")).expect("mkdir");
        std::fs::write(root.join("a/memory.max"), "max\n").expect("write");
        let mut w = Watcher::new(&root).expect("inotify");
        assert_eq!(w.watched(), 2);
        std::fs::write(root.join("a/memory.max"), "67108864\n").expect("write");
        std::fs::write(root.join("a/cgroup.procs"), "1\n").expect("write");
        std::fs::create_dir(root.join("a/b")).expect("mkdir");
        let seen = w.read().expect("read").observed;
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            (seen[0].path.as_str(), seen[0].limit, seen[0].value.as_str()),
            ("/a", LimitFile::MemoryMax, "67108864")
        );
        std::fs::write(root.join("a/b/pids.max"), "10").expect("write");
        let seen = w.read().expect("read").observed;
        assert_eq!(seen.len(), 1, "new directories are watched too: {seen:?}");
        assert_eq!(seen[0].limit, LimitFile::PidsMax);
        std::fs::remove_dir_all(&root).expect("rm");
    }
}
