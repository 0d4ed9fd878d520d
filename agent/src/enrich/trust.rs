//! The trusted writers' executables as the kernel keys them: each configured path `stat`ed to
//! its device and inode. An executable replaced by an upgrade gets a new inode while processes
//! still run the old one, so every key a path has had is kept (a few per path).

use std::os::unix::fs::MetadataExt as _;

use agent_common::ExecKey;

use crate::{
    config::TrustedWriterConfig,
    model::{
        pattern::Pattern,
        trust::{TrustSet, TrustedWriter},
    },
};

/// Keys kept per trusted writer, at most.
const MAX_KEYS: usize = 64;

/// The key of the file at `path` as the kernel's `super_block.s_dev` and `i_ino` give it
/// (`MKDEV`: major << 20 | minor); `None` when there is no such file.
#[must_use]
pub fn key_of(path: &std::path::Path) -> Option<ExecKey> {
    std::fs::metadata(path).ok().map(|m| key_of_metadata(&m))
}

/// The key of a file whose metadata this is, as the kernel gives it (see [`key_of`]).
#[must_use]
pub fn key_of_metadata(meta: &std::fs::Metadata) -> ExecKey {
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    ExecKey {
        dev: (major << 20) | (minor & 0xf_ffff),
        reserved: 0,
        ino: meta.ino(),
    }
}

/// Resolves `config`'s paths into `set` (new keys added to those known), with `agent_tgid`.
pub fn resolve(config: &[TrustedWriterConfig], agent_tgid: u32, set: &mut TrustSet) {
    set.agent_tgid = agent_tgid;
    let keys = |paths: &[std::path::PathBuf], old: &[ExecKey]| -> Vec<ExecKey> {
        let mut keys = old.to_vec();
        for k in paths.iter().filter_map(|p| key_of(p)) {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let excess = keys.len().saturating_sub(MAX_KEYS);
        keys.drain(..excess);
        keys
    };
    let old = std::mem::take(&mut set.writers);
    for c in config {
        let before = old.iter().find(|w| w.name == c.name);
        let exes = keys(&c.exe, before.map_or(&[], |w| &w.exes));
        let parents = c.parent_exe.as_ref().map(|p| {
            keys(
                p,
                before
                    .and_then(|w| w.parents.as_deref())
                    .unwrap_or_default(),
            )
        });
        set.writers.push(TrustedWriter {
            name: c.name.clone(),
            exes,
            parents,
            cgroups: c
                .cgroup
                .as_ref()
                .map(|g| g.iter().filter_map(|g| Pattern::new(g).ok()).collect()),
            pid: c.pid,
        });
    }
}

/// A line for the log: which trusted writers were found on this node.
#[must_use]
pub fn summary(set: &TrustSet) -> String {
    let found: Vec<String> = set
        .writers
        .iter()
        .map(|w| format!("{} ({} executable(s))", w.name, w.exes.len()))
        .collect();
    found.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_to_kernel_keys_and_old_keys_stay() {
        let dir = std::env::temp_dir().join(format!("nw-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let exe = dir.join("kubelet");
        std::fs::write(&exe, b"one").expect("write");
        let config = [TrustedWriterConfig {
            name: "kubelet".into(),
            exe: vec![exe.clone(), dir.join("absent")],
            parent_exe: None,
            cgroup: None,
            pid: None,
        }];
        let mut set = TrustSet::default();
        resolve(&config, 7, &mut set);
        let first = key_of(&exe).expect("key");
        assert_eq!(set.writers[0].exes, [first]);
        assert_eq!(set.agent_tgid, 7);
        // An upgrade replaces the file: both the running (old) and the new one are trusted.
        std::fs::remove_file(&exe).expect("rm");
        std::fs::write(dir.join("other"), b"keeps the old inode taken").expect("write");
        std::fs::write(&exe, b"two").expect("write");
        resolve(&config, 7, &mut set);
        let second = key_of(&exe).expect("key");
        assert_ne!(first, second);
        assert_eq!(set.writers[0].exes, [first, second]);
        std::fs::remove_dir_all(&dir).expect("rm");
    }
}
