//! Writing one limit of one cgroup, guarded: the cgroup is opened by its id (a kernfs file
//! handle beneath the cgroup2 mount, never a path built from event data), checked to be the
//! one decided about and not delegated, read, written only if that raises the limit, and read
//! back.

use std::{
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
};

use agent_common::LimitFile;

use crate::{
    enrich::cgroupfs::open_at,
    model::{
        heal::Reason,
        limit::{self, LimitValue},
    },
    rules::below,
};

/// What came of an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Written; the file then read this.
    Written { read_back: String },
    /// Every check passed; nothing written (dry-run).
    Checked,
    /// Not written, and why.
    NotWritten(Reason),
    /// The write or a read failed (an errno's name, or what did not match).
    Failed(String),
}

/// The limit files of the hierarchy, as the executor reaches them.
pub trait LimitFiles {
    /// Puts `to` into `limit` of cgroup `id` if that raises it (`write`), or checks that it
    /// could (not `write`).
    fn restore(&self, id: u64, limit: LimitFile, to: LimitValue, write: bool) -> Attempt;
    /// The inode number of `limit`'s file in cgroup `id` (what the guard keys it by).
    fn inode(&self, id: u64, limit: LimitFile) -> Result<u64, String>;
}

/// The real hierarchy, through a directory fd on its mount.
#[derive(Debug)]
pub struct Cgroup2 {
    root: OwnedFd,
    page_size: u64,
}

fn errno_name(e: &std::io::Error) -> String {
    e.raw_os_error()
        .map_or_else(|| e.to_string(), crate::pipeline::errno_name)
}

impl Cgroup2 {
    /// The hierarchy mounted at `root`.
    pub fn open(root: &Path, page_size: u64) -> std::io::Result<Self> {
        let dir = std::fs::File::open(root)?;
        Ok(Self {
            root: dir.into(),
            page_size: page_size.max(1),
        })
    }

    /// The directory of cgroup `id`.
    fn dir(&self, id: u64) -> std::io::Result<std::fs::File> {
        crate::enrich::cgroupfs::open_by_id(&self.root, id).map(std::fs::File::from)
    }

    fn read(dir: &std::fs::File, limit: LimitFile) -> Result<(String, LimitValue), String> {
        let mut text = String::new();
        open_at(dir, limit.file_name(), libc::O_RDONLY)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| errno_name(&e))?;
        let text = text.trim().to_owned();
        let value = limit::parse(limit, &text).map_err(|e| format!("read {text:?}: {e}"))?;
        Ok((text, value))
    }

    /// What the kernel keeps of `v` (memory values in whole pages).
    fn stored(&self, limit: LimitFile, v: LimitValue) -> LimitValue {
        match (limit, v) {
            (LimitFile::PidsMax | LimitFile::CpuMax, v) => v,
            (_, LimitValue::Bytes(n)) => LimitValue::Bytes(n / self.page_size * self.page_size),
            (_, v) => v,
        }
    }
}

impl LimitFiles for Cgroup2 {
    fn inode(&self, id: u64, limit: LimitFile) -> Result<u64, String> {
        let dir = self
            .dir(id)
            .map_err(|e| format!("opening the cgroup: {}", errno_name(&e)))?;
        let meta = dir
            .metadata()
            .map_err(|e| format!("stat: {}", errno_name(&e)))?;
        if meta.ino() != id {
            return Err("the cgroup is gone".to_owned());
        }
        let name = std::ffi::CString::new(limit.file_name()).map_err(|e| e.to_string())?;
        // SAFETY: a directory fd, a NUL-terminated name and a struct to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                &raw mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(format!(
                "stat {}: {}",
                limit.file_name(),
                errno_name(&std::io::Error::last_os_error())
            ));
        }
        Ok(st.st_ino)
    }

    fn restore(&self, id: u64, limit: LimitFile, to: LimitValue, write: bool) -> Attempt {
        let dir = match self.dir(id) {
            Ok(d) => d,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => {
                return Attempt::NotWritten(Reason::Stale);
            }
            Err(e) => return Attempt::Failed(format!("opening the cgroup: {}", errno_name(&e))),
        };
        let meta = match dir.metadata() {
            Ok(m) => m,
            Err(e) => return Attempt::Failed(format!("stat: {}", errno_name(&e))),
        };
        if meta.ino() != id {
            return Attempt::NotWritten(Reason::Stale);
        }
        if meta.uid() != 0 {
            return Attempt::NotWritten(Reason::Delegated);
        }
        let current = match Self::read(&dir, limit) {
            Ok((_, v)) => v,
            Err(e) => return Attempt::Failed(e),
        };
        // Never lower a limit: only a value below the one to restore is raised.
        if !below(current, self.stored(limit, to)) {
            return Attempt::NotWritten(Reason::AlreadyRestored);
        }
        if !write {
            return Attempt::Checked;
        }
        let written = open_at(&dir, limit.file_name(), libc::O_WRONLY)
            .and_then(|mut f| f.write_all(to.to_string().as_bytes()));
        if let Err(e) = written {
            return Attempt::Failed(errno_name(&e));
        }
        match Self::read(&dir, limit) {
            Ok((text, v)) if v == self.stored(limit, to) => Attempt::Written { read_back: text },
            Ok((text, _)) => Attempt::Failed(format!("read back {text:?} after writing {to}")),
            Err(e) => Attempt::Failed(e),
        }
    }
}
