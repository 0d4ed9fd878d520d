//! The cgroup v2 hierarchy on disk: where it is mounted, a cgroup's path from its id (the inode
//! number of its directory, which the kernel opens for us by handle), its limit and memory
//! files, and a scan of the whole tree (the resync, run off the event loop).

use std::{
    ffi::CString,
    io::Read as _,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use agent_common::LimitFile;

use super::Cgroups;
use crate::model::cgroup::path_text;

/// The cgroup2 mount point (`/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
/// hybrid one), from this process's mountinfo.
#[must_use]
pub fn find_mount() -> Option<PathBuf> {
    procfs::process::Process::myself()
        .ok()?
        .mountinfo()
        .ok()?
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

/// The limit files present in the cgroup directory `dir` (those its controllers provide), as
/// (file, content with surrounding whitespace trimmed).
#[must_use]
pub fn read_limits(dir: &Path) -> Vec<(LimitFile, String)> {
    LimitFile::ALL
        .into_iter()
        .filter_map(|limit| {
            let text = std::fs::read_to_string(dir.join(limit.file_name())).ok()?;
            Some((limit, text.trim().to_owned()))
        })
        .collect()
}

/// `name`'s count in a `memory.events` style file (`oom 3` lines).
#[must_use]
pub fn event_count(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// One cgroup as a scan found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedCgroup {
    pub id: u64,
    /// Relative to the mount, with a leading `/`.
    pub path: String,
    /// Its limit files' contents.
    pub limits: Vec<(LimitFile, String)>,
    /// The `oom` count of its `memory.events.local`, where it has one.
    pub oom: Option<u64>,
}

/// The whole hierarchy at one moment (each file read once, in turn).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub cgroups: Vec<ScannedCgroup>,
}

/// The cgroup2 hierarchy mounted at a path.
#[derive(Debug)]
pub struct CgroupFs {
    root: PathBuf,
    /// The mount's root directory, for opening cgroups by id.
    root_fd: Option<OwnedFd>,
    /// Cleared when the kernel refuses to open cgroups by handle (no `CAP_DAC_READ_SEARCH`, or a
    /// kernel without it): ids are then found by scans only.
    by_handle: AtomicBool,
}

/// `FILEID_KERNFS`: the handle type of kernfs files, whose handle is the 64-bit id.
const FILEID_KERNFS: i32 = 0xfe;

/// A `struct file_handle` holding a kernfs id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

impl CgroupFs {
    #[must_use]
    pub fn new(root: PathBuf) -> Self {
        let root_fd = CString::new(root.as_os_str().as_bytes())
            .ok()
            .and_then(|c| {
                // SAFETY: a NUL-terminated path; the fd returned is ours to own.
                let fd = unsafe {
                    libc::open(
                        c.as_ptr(),
                        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                };
                // SAFETY: a fresh fd nobody else owns.
                (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
            });
        Self {
            root,
            by_handle: AtomicBool::new(root_fd.is_some()),
            root_fd,
        }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the cgroup at `path` (relative to the mount).
    #[must_use]
    pub fn dir(&self, path: &str) -> PathBuf {
        let literal = self.root.join(path.trim_start_matches('/'));
        if !path.contains("\\x") || literal.exists() {
            return literal;
        }
        // A name with bytes that are not UTF-8, escaped in its label.
        let bytes = crate::model::cgroup::path_bytes(path.trim_start_matches('/'));
        self.root.join(std::ffi::OsStr::from_bytes(&bytes))
    }

    /// Every cgroup under the mount, with its limit files and OOM count. Slow on a big
    /// hierarchy (thousands of small reads): never on the event loop.
    #[must_use]
    pub fn scan(&self) -> Scan {
        let mut cgroups = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&self.root).unwrap_or(&dir);
            let path = format!("/{}", path_text(rel.as_os_str().as_bytes()));
            cgroups.push(ScannedCgroup {
                id: meta.ino(),
                limits: read_limits(&dir),
                oom: self.oom_count(&path),
                path,
            });
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        Scan { cgroups }
    }

    /// Opens the cgroup `id` by its kernfs handle and reads back its path.
    fn open_by_id(&self, id: u64) -> Option<String> {
        let root_fd = self.root_fd.as_ref()?;
        let fd = match open_by_id(root_fd, id) {
            Ok(fd) => fd,
            Err(e) => {
                // No such cgroup (any more): an answer. Anything else: the kernel cannot do it.
                if !matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) {
                    tracing::info!("cgroup ids are found by scans: opening by handle: {e}");
                    self.by_handle.store(false, Ordering::Relaxed);
                }
                return None;
            }
        };
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        relative(&self.root, &link)
    }
}

/// The directory of cgroup `id`, opened by its kernfs handle beneath the mount `root`
/// (`ESTALE` or `ENOENT`: no such cgroup).
pub fn open_by_id(root: &impl std::os::fd::AsRawFd, id: u64) -> std::io::Result<OwnedFd> {
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id,
    };
    // SAFETY: `handle` is a file_handle with its 8 bytes of payload; the fd returned is ours
    // to own.
    let fd = unsafe {
        libc::open_by_handle_at(
            root.as_raw_fd(),
            (&raw mut handle).cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `name` in the directory `dir`, opened with `flags` (never following a link).
pub fn open_at(
    dir: &impl std::os::fd::AsRawFd,
    name: &str,
    flags: i32,
) -> std::io::Result<std::fs::File> {
    let name = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a directory fd and a NUL-terminated name; the fd returned is ours.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) }.into())
}

/// `link` (a directory's path as the kernel gives it) relative to `root`, with a leading `/`;
/// `None` for a removed directory or one outside `root`.
fn relative(root: &Path, link: &Path) -> Option<String> {
    if link.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return None;
    }
    let rel = link.strip_prefix(root).ok()?;
    Some(format!("/{}", path_text(rel.as_os_str().as_bytes())))
}

impl Cgroups for CgroupFs {
    fn path_of(&self, id: u64) -> Option<String> {
        if id == 0 || !self.by_handle.load(Ordering::Relaxed) {
            return None;
        }
        self.open_by_id(id)
    }

    fn oom_count(&self, path: &str) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir(path).join("memory.events.local")).ok()?;
        event_count(&text, "oom")
    }

    fn usage_and_limit(&self, path: &str) -> (Option<u64>, Option<u64>) {
        let dir = self.dir(path);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let usage = read("memory.current").and_then(|s| s.trim().parse().ok());
        // "max" (no limit) has no byte figure.
        let limit = read("memory.max").and_then(|s| s.trim().parse().ok());
        (usage, limit)
    }

    fn usage(&self, path: &str, file: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir(path).join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// By id where the kernel opens cgroups by handle: a path may have been cut, escaped or
    /// renamed since; by path elsewhere.
    fn limit(&self, id: u64, path: &str, limit: LimitFile) -> Option<String> {
        let by_id = self
            .root_fd
            .as_ref()
            .filter(|_| self.by_handle.load(Ordering::Relaxed))
            .and_then(|root| open_by_id(root, id).ok())
            .and_then(|dir| {
                let mut text = String::new();
                open_at(&dir, limit.file_name(), libc::O_RDONLY)
                    .and_then(|mut f| f.read_to_string(&mut text))
                    .ok()
                    .map(|_| text)
            });
        by_id.or_else(|| std::fs::read_to_string(self.dir(path).join(limit.file_name())).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_counts() {
        let text = "low 0\nhigh 2\nmax 7\noom 3\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(event_count(text, "oom"), Some(3));
        assert_eq!(event_count(text, "oom_kill"), Some(1));
        assert_eq!(event_count(text, "nope"), None);
        assert_eq!(event_count("oom x\n", "oom"), None);
    }

    #[test]
    fn paths_relative_to_the_mount() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            relative(root, Path::new("/sys/fs/cgroup/a/b")).as_deref(),
            Some("/a/b")
        );
        assert_eq!(relative(root, root).as_deref(), Some("/"));
        assert_eq!(
            relative(root, Path::new("/sys/fs/cgroup/a (deleted)")),
            None
        );
        assert_eq!(relative(root, Path::new("/elsewhere")), None);
    }

    /// A directory tree stands in for cgroupfs: a scan reads inode numbers and files, which
    /// any filesystem has (the real hierarchy is scanned in the VM tests).
    #[test]
    fn scans_every_directory_with_its_files() {
        let root = std::env::temp_dir().join(format!("nw-cgroupfs-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::write(root.join("a/memory.max"), "67108864\n").expect("write");
        std::fs::write(root.join("a/cpu.max"), "max 100000\n").expect("write");
        std::fs::write(root.join("a/memory.events.local"), "oom 2\noom_kill 1\n").expect("w");
        let fs = CgroupFs::new(root.clone());
        let scan = fs.scan();
        let ino = |p: &str| std::fs::metadata(root.join(p)).expect("stat").ino();
        let a = scan
            .cgroups
            .iter()
            .find(|c| c.path == "/a")
            .expect("a scanned");
        assert_eq!(a.id, ino("a"));
        assert_eq!(a.oom, Some(2));
        assert_eq!(
            a.limits,
            [
                (LimitFile::MemoryMax, "67108864".to_owned()),
                (LimitFile::CpuMax, "max 100000".to_owned())
            ]
        );
        let paths: Vec<&str> = scan.cgroups.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths.len(), 3, "{paths:?}");
        assert!(paths.contains(&"/") && paths.contains(&"/a/b"), "{paths:?}");
        std::fs::remove_dir_all(&root).expect("rm");
    }
}
