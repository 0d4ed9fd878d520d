//! Entry points for the fuzz targets (`fuzz/fuzz_targets/`, run by `cargo xtask fuzz`): each
//! takes any bytes and hands them to the code that reads untrusted input, which must neither
//! panic nor allocate without bound, whatever the bytes. They live in the crate so that the
//! modules stay private. The unit test below replays the kept corpus through them on every
//! `cargo test`.

use agent_common::LimitFile;

use crate::{
    config::Config,
    enrich::elf,
    kernel::decode,
    model::{cgroup, heal::Protection, limit},
    rules,
};

/// A configuration file (read as UTF-8 text, as `Config::from_file` does).
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, "fuzz");
    }
}

/// A limit file's value, for every limit file. What parses must print back as itself: the
/// agent writes values it parsed (restores, pins) and compares what it reads back.
pub fn limit(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for file in LimitFile::ALL {
        if let Ok(value) = limit::parse(file, &text) {
            let again = limit::parse(file, &value.to_string());
            assert_eq!(again, Ok(value), "{file:?} {text:?} printed as {value}");
        }
    }
}

/// A cgroup path to its Kubernetes identity, OOM scope and protection. A first line, when
/// there are two, is the OOM's limit cgroup and the second the victim's.
pub fn cgroup(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (limit_cgroup, victim) = text.split_once('\n').unwrap_or((&*text, &*text));
    let _ = cgroup::parse(victim);
    let _ = cgroup::Scope::of(Some(limit_cgroup), victim);
    let _ = cgroup::Scope::of(None, victim);
    let _ = Protection::of(victim);
}

/// A record of the events ring, and of the exec ring.
pub fn decode(data: &[u8]) {
    let _ = decode::decode(data);
    let _ = decode::decode_exec(data);
}

/// An executable's bytes: whether it is Go, its version from the build info, and the offsets
/// of the functions the Go probes want (`kernel/go.rs`).
pub fn go_buildinfo(data: &[u8]) {
    let _ = elf::inspect(data, &["runtime.fatal", "runtime.throw"]);
}

/// A rules file (read as UTF-8 text).
pub fn rules(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = rules::file::parse(text, "fuzz");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Entry = fn(&[u8]);

    /// Every target by name: its file in `fuzz/fuzz_targets/` and its corpus folder.
    const TARGETS: [(&str, Entry); 6] = [
        ("config", config),
        ("limit", limit),
        ("cgroup", cgroup),
        ("decode", decode),
        ("go_buildinfo", go_buildinfo),
        ("rules", rules),
    ];

    /// Every input kept in `fuzz/corpus/<target>/` still goes through its target: the fuzzers'
    /// finds are regression tests that need no nightly compiler.
    #[test]
    fn the_kept_corpus_replays() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let entries = std::fs::read_dir(&dir).expect("a corpus folder per target");
            let mut inputs = 0;
            for entry in entries {
                let path = entry.expect("a corpus entry").path();
                target(&std::fs::read(&path).expect("a corpus file"));
                inputs += 1;
            }
            assert!(inputs > 0, "{} is empty", dir.display());
        }
    }
}
