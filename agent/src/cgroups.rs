//! Cgroup v2 identity: the cgroup id the kernel reports is the inode number of the cgroup's
//! directory, which this module maps to a path relative to the cgroup2 mount.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::PathBuf};

/// Finds the cgroup2 mount point in `/proc/self/mountinfo` (`/sys/fs/cgroup` on a unified host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
#[must_use]
pub fn find_cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&mountinfo)
}

/// The mount point of the first cgroup2 line of a mountinfo text.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 25 0:31 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw,..."
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(c) = code {
            out.push(char::from(c));
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// How many removed cgroups keep their path, so late events about them still resolve.
const REMOVED_KEPT: usize = 4096;

/// Maps cgroup ids to paths. Kept current by the kernel's mkdir/rmdir events; rescans the
/// hierarchy only when it meets an id it does not know (events lost, or the probe unavailable).
#[derive(Debug)]
pub struct CgroupResolver {
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    /// Ids of removed cgroups, oldest first; their paths are dropped past [`REMOVED_KEPT`].
    removed: std::collections::VecDeque<u64>,
}

impl CgroupResolver {
    /// A resolver for the hierarchy mounted at `root` (`None`: no cgroup2 mount, nothing resolves).
    #[must_use]
    pub fn new(root: Option<PathBuf>) -> Self {
        let mut r = Self {
            root,
            paths: HashMap::new(),
            removed: std::collections::VecDeque::new(),
        };
        r.rescan();
        r
    }

    /// The path of cgroup `id` relative to the mount ("/" for the root cgroup), if it exists or
    /// existed while this resolver knew it.
    pub fn path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if !self.paths.contains_key(&id) {
            self.rescan();
        }
        self.paths.get(&id).cloned()
    }

    /// The cgroup2 mount this resolver reads.
    #[must_use]
    pub fn root(&self) -> Option<&std::path::Path> {
        self.root.as_deref()
    }

    /// Every cgroup known, as (id, path).
    pub fn entries(&self) -> impl Iterator<Item = (u64, &str)> {
        self.paths.iter().map(|(id, p)| (*id, p.as_str()))
    }

    /// A cgroup was created.
    pub fn created(&mut self, id: u64, path: String) {
        self.paths.insert(id, path);
    }

    /// A cgroup was removed: its path is kept a while for events still in flight.
    pub fn removed(&mut self, id: u64) {
        self.removed.push_back(id);
        while self.removed.len() > REMOVED_KEPT {
            if let Some(old) = self.removed.pop_front() {
                self.paths.remove(&old);
            }
        }
    }

    /// Walks the whole hierarchy, adding every directory (known paths of removed cgroups are kept,
    /// so an event for a cgroup removed right after it still resolves).
    fn rescan(&mut self) {
        let Some(root) = self.root.clone() else {
            return;
        };
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&root).unwrap_or(&dir);
            self.paths.insert(meta.ino(), format!("/{}", rel.display()));
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
}

/// The cgroup v2 path of a live process, from `/proc/<pid>/cgroup` (`0::/path`).
#[must_use]
pub fn path_of_pid(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_and_hybrid_mounts() {
        let unified =
            "25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory\n\
                      31 25 0:27 / /sys/fs/cgroup/unified rw shared:12 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("30 25 0:26 / /x rw - ext4 /dev/vda rw\n"),
            None
        );
        assert_eq!(unescape_octal(r"/a\040b"), "/a b");
    }

    /// A directory tree stands in for cgroupfs: the resolver only reads inode numbers, which any
    /// filesystem has (the real hierarchy is exercised by the VM tests).
    #[test]
    fn resolves_ids_to_paths_and_keeps_removed_ones() {
        let root = std::env::temp_dir().join(format!("nw-cgroups-test-{}", std::process::id()));
        let child = root.join("kubepods/pod1");
        std::fs::create_dir_all(&child).expect("mkdir");
        let root_ino = std::fs::metadata(&root).expect("stat").ino();
        let mut r = CgroupResolver::new(Some(root.clone()));
        assert_eq!(r.path(root_ino).as_deref(), Some("/"));
        let late = root.join("late");
        std::fs::create_dir(&late).expect("mkdir");
        let late_ino = std::fs::metadata(&late).expect("stat").ino();
        assert_eq!(r.path(late_ino).as_deref(), Some("/late"), "rescan on miss");
        let child_ino = std::fs::metadata(&child).expect("stat").ino();
        std::fs::remove_dir_all(&root).expect("rm");
        assert_eq!(r.path(child_ino).as_deref(), Some("/kubepods/pod1"));
        assert_eq!(r.path(0), None);
    }
}
