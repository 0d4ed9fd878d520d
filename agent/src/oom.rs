//! OOM kills into incidents: which limit was hit (from the kernel, or derived from the cgroups'
//! `memory.events.local`), its scope, and the grouping of victims killed for one limit hit.

use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

/// How long an incident stays open after its last victim. The kernel kills every victim of one
/// limit hit (several with `memory.oom.group`) within one `out_of_memory` call, microseconds
/// apart; a second is far beyond that and short enough for `nodewarden events` to feel live.
pub const QUIET_NS: u64 = 1_000_000_000;

/// Where a limit was hit, relative to the victim: `container` (its own cgroup, or a Kubernetes
/// container's), `pod` (a pod cgroup, or any other ancestor) or `node` (a global OOM, or a
/// node-wide cgroup: `kubepods` and its QoS classes).
#[must_use]
pub fn scope(limit_cgroup: Option<&str>, victim_cgroup: &str) -> &'static str {
    let Some(limit) = limit_cgroup else {
        return "node";
    };
    match crate::k8s::parse(limit) {
        Some(id) if id.container.is_some() => "container",
        None if limit == "/" || limit.split('/').any(is_kubepods_level) => "node",
        None if limit == victim_cgroup => "container",
        Some(_) | None => "pod",
    }
}

/// `kubepods`, `kubepods.slice`, `kubepods-burstable.slice`, `burstable`... the levels above pods.
fn is_kubepods_level(part: &str) -> bool {
    part == "kubepods"
        || part
            .strip_prefix("kubepods")
            .and_then(|rest| rest.strip_suffix(".slice"))
            .is_some()
}

/// The `oom` counts of `memory.events.local` by cgroup path: a memory cgroup's count goes up
/// each time its own limit puts it in OOM (the `.local` file does not count descendants), so
/// the one that went up since last look is the one whose limit the kill is about.
#[derive(Debug, Default)]
pub struct MemoryEvents {
    root: Option<PathBuf>,
    oom: HashMap<String, u64>,
}

impl MemoryEvents {
    /// Counts of every cgroup in `paths` now: kills derived later compare against these.
    pub fn new<'a>(root: Option<&Path>, paths: impl Iterator<Item = &'a str>) -> Self {
        let mut m = Self {
            root: root.map(Path::to_path_buf),
            oom: HashMap::new(),
        };
        for p in paths {
            if let Some(n) = m.read(p) {
                m.oom.insert(p.to_owned(), n);
            }
        }
        m
    }

    /// A new cgroup: its count starts at zero (reading it could already include an OOM).
    pub fn created(&mut self, path: &str) {
        self.oom.insert(path.to_owned(), 0);
    }

    pub fn removed(&mut self, path: &str) {
        self.oom.remove(path);
    }

    /// The limit a kill of a task in `victim_cgroup` hit: the deepest of it and its ancestors
    /// whose `oom` count rose since last look, or `None` when none did (a global OOM). Every
    /// count read is remembered, so the next kill compares against it.
    pub fn limit_of(&mut self, victim_cgroup: &str) -> Option<String> {
        let mut found = None;
        for path in ancestors(victim_cgroup) {
            let Some(now) = self.read(&path) else {
                continue;
            };
            // A cgroup not seen before (created while the agent missed it) counts from now.
            let before = self.oom.insert(path.clone(), now).unwrap_or(now);
            if now > before && found.is_none() {
                found = Some(path);
            }
        }
        found
    }

    /// `oom` of `<path>/memory.events.local`, or `None` (no memory controller there, gone).
    fn read(&self, path: &str) -> Option<u64> {
        let file = self
            .root
            .as_ref()?
            .join(path.trim_start_matches('/'))
            .join("memory.events.local");
        let text = std::fs::read_to_string(file).ok()?;
        event_count(&text, "oom")
    }
}

/// `name`'s count in a `memory.events` style file (`oom 3` lines).
#[must_use]
pub fn event_count(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// `/a/b/c`, `/a/b`, `/a`: a path and its ancestors below the root, deepest first.
fn ancestors(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut p = path.trim_end_matches('/');
    while !p.is_empty() {
        out.push(p.to_owned());
        p = p.rsplit_once('/').map_or("", |(parent, _)| parent);
    }
    out
}

/// A memory cgroup's usage and limit in bytes, read from its files (after the kill, so the
/// usage is what is left).
#[must_use]
pub fn usage_and_limit(root: Option<&Path>, path: &str) -> (Option<u64>, Option<u64>) {
    let Some(dir) = root.map(|r| r.join(path.trim_start_matches('/'))) else {
        return (None, None);
    };
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let usage = read("memory.current").and_then(|s| s.trim().parse().ok());
    // "max" (no limit) has no byte figure.
    let limit = read("memory.max").and_then(|s| s.trim().parse().ok());
    (usage, limit)
}

/// The node's memory in use and its total (RAM and swap, what a global OOM weighs against),
/// in bytes, from /proc/meminfo.
#[must_use]
pub fn node_memory() -> (Option<u64>, Option<u64>) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
        return (None, None);
    };
    let kib = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            rest.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok()
        })
    };
    let used = kib("MemTotal")
        .zip(kib("MemAvailable"))
        .map(|(t, a)| t.saturating_sub(a) * 1024);
    let total = kib("MemTotal").map(|t| (t + kib("SwapTotal").unwrap_or(0)) * 1024);
    (used, total)
}

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
    /// What the caller keeps for the incident (its record, its trace).
    pub data: T,
}

/// The incidents still taking victims.
#[derive(Debug)]
pub struct Incidents<T> {
    open: Vec<Open<T>>,
}

impl<T> Default for Incidents<T> {
    fn default() -> Self {
        Self { open: Vec::new() }
    }
}

impl<T> Incidents<T> {
    /// The open incident a victim seen at `at_ns` with `key` belongs to.
    pub fn find(&mut self, key: &Key, at_ns: u64) -> Option<&mut Open<T>> {
        self.open
            .iter_mut()
            .find(|o| o.key == *key && at_ns.saturating_sub(o.last_ns) < QUIET_NS)
    }

    /// Opens an incident with a new id.
    pub fn open(&mut self, key: Key, at_ns: u64, data: T) -> &mut Open<T> {
        self.open.push(Open {
            id: new_id(),
            key,
            last_ns: at_ns,
            data,
        });
        self.open.last_mut().expect("just pushed")
    }

    /// Removes and returns the incidents whose last victim is [`QUIET_NS`] before `now_ns`.
    pub fn close_quiet(&mut self, now_ns: u64) -> Vec<Open<T>> {
        let (done, open) = std::mem::take(&mut self.open)
            .into_iter()
            .partition(|o| now_ns.saturating_sub(o.last_ns) >= QUIET_NS);
        self.open = open;
        done
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
    fn scopes() {
        let pod = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice";
        let ctr = format!("{pod}/cri-containerd-{}.scope", "ab".repeat(32));
        assert_eq!(scope(Some(&ctr), &ctr), "container");
        assert_eq!(scope(Some(pod), &ctr), "pod");
        assert_eq!(
            scope(Some("/kubepods.slice/kubepods-burstable.slice"), &ctr),
            "node"
        );
        assert_eq!(scope(None, &ctr), "node");
        assert_eq!(scope(Some("/app/worker"), "/app/worker"), "container");
        assert_eq!(scope(Some("/app"), "/app/worker"), "pod");
    }

    #[test]
    fn ancestors_deepest_first() {
        assert_eq!(ancestors("/a/b/c"), ["/a/b/c", "/a/b", "/a"]);
        assert!(ancestors("/").is_empty());
    }

    #[test]
    fn event_counts() {
        let text = "low 0\nhigh 2\nmax 7\noom 3\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(event_count(text, "oom"), Some(3));
        assert_eq!(event_count(text, "oom_kill"), Some(1));
        assert_eq!(event_count(text, "nope"), None);
        assert_eq!(event_count("oom x\n", "oom"), None);
    }

    /// A stand-in hierarchy in a temporary directory (unit test only: the VM tests derive
    /// limits from the kernel's own files).
    #[test]
    fn derives_the_deepest_cgroup_whose_oom_count_rose() {
        let dir = std::env::temp_dir().join(format!("nw-oom-{}", std::process::id()));
        let write = |p: &str, oom: u64| {
            let d = dir.join(p.trim_start_matches('/'));
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(
                d.join("memory.events.local"),
                format!("oom {oom}\noom_kill 0\n"),
            )
            .expect("write");
        };
        write("/pod", 1);
        write("/pod/ctr", 0);
        let mut m = MemoryEvents::new(Some(&dir), ["/pod", "/pod/ctr"].into_iter());
        // Nothing rose: a global OOM.
        assert_eq!(m.limit_of("/pod/ctr"), None);
        write("/pod", 2);
        assert_eq!(m.limit_of("/pod/ctr").as_deref(), Some("/pod"));
        // Counted once: the next kill of the same incident finds no new rise.
        assert_eq!(m.limit_of("/pod/ctr"), None);
        write("/pod/ctr", 1);
        write("/pod", 3);
        assert_eq!(m.limit_of("/pod/ctr").as_deref(), Some("/pod/ctr"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn incidents_group_by_key_and_close_when_quiet() {
        let mut i: Incidents<u32> = Incidents::default();
        let key = Key::Kernel {
            trigger_tid: 7,
            entered_ns: 100,
        };
        let id = i.open(key.clone(), 1_000, 1).id.clone();
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
}
