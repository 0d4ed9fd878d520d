//! The pipeline against fake sources: a cgroup hierarchy, processes and pod names in memory,
//! and a clock the test moves.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common::LimitFile;

use super::{HealSettings, Pipeline, Settings, Sources, UNKNOWN_CGROUP, clock::Clock};
use crate::{
    enrich::{
        Cgroups, Names, Procs,
        cgroupfs::{Scan, ScannedCgroup},
        kubelet,
    },
    model::{
        cache::Evictions,
        cgroup::{Scope, Who},
        event::{
            CgroupChange, Constraint, Event, GoFatal, GoFunction, Identity, LimitWrite, Observed,
            OomControl, OomKill, Task, VictimTask,
        },
        heal::Mode,
        limit::LimitValue,
        record::{CgroupSource, FoundBy, Record, SeenBy},
        trust::TrustSet,
        update::{ResyncReason, Update},
    },
    state::{guards::GuardSettings, incidents::QUIET_NS},
};

mod heal;

/// The fake node, shared by the fakes and the test.
#[derive(Default)]
struct Node {
    /// Cgroup paths by id.
    paths: HashMap<u64, String>,
    /// `memory.events.local` `oom` counts by path.
    oom: HashMap<String, u64>,
    /// (usage, limit) by path.
    memory: HashMap<String, (u64, u64)>,
    /// Executables by pid.
    exes: HashMap<u32, String>,
    /// Cgroups of live processes by pid.
    procs: HashMap<u32, String>,
    /// How often a path was asked of the kernel.
    asked: u32,
    /// Limit files' text as the kernel shows it, by path and file.
    files: HashMap<(String, LimitFile), String>,
    /// Executables' keys by pid, as `/proc` shows them now.
    exe_keys: HashMap<u32, agent_common::ExecKey>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Node>>);

impl Fake {
    fn node(&self) -> std::sync::MutexGuard<'_, Node> {
        self.0.lock().expect("lock")
    }
}

impl Cgroups for Fake {
    fn path_of(&self, id: u64) -> Option<String> {
        let mut n = self.node();
        n.asked += 1;
        n.paths.get(&id).cloned()
    }
    fn oom_count(&self, path: &str) -> Option<u64> {
        self.node().oom.get(path).copied()
    }
    fn usage_and_limit(&self, path: &str) -> (Option<u64>, Option<u64>) {
        self.node()
            .memory
            .get(path)
            .map_or((None, None), |(u, l)| (Some(*u), Some(*l)))
    }
    fn limit(&self, _: u64, path: &str, limit: LimitFile) -> Option<String> {
        self.node().files.get(&(path.to_owned(), limit)).cloned()
    }
}

impl Procs for Fake {
    fn exe(&self, pid: u32) -> Option<String> {
        self.node().exes.get(&pid).cloned()
    }
    fn exe_key(&self, pid: u32) -> Option<agent_common::ExecKey> {
        self.node().exe_keys.get(&pid).copied()
    }
    fn comm(&self, _: u32) -> Option<String> {
        Some("gone".into())
    }
    fn cgroup(&self, pid: u32) -> Option<String> {
        self.node().procs.get(&pid).cloned()
    }
    fn node_memory(&self) -> (Option<u64>, Option<u64>) {
        (Some(100), Some(1000))
    }
}

impl Names for Fake {
    fn names(&mut self, pod_uid: &str, container_id: Option<&str>) -> Option<kubelet::Names> {
        (pod_uid == POD_UID).then(|| kubelet::Names {
            namespace: "shop".into(),
            pod: "cart".into(),
            container: container_id.map(|_| "app".into()).unwrap_or_default(),
        })
    }
}

const POD_UID: &str = "3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a6b";

/// A clock the test sets: monotonic ns, and wall time = monotonic + 1 s.
#[derive(Clone, Default)]
struct TestClock(Arc<Mutex<u64>>);

impl TestClock {
    fn set(&self, ns: u64) {
        *self.0.lock().expect("lock") = ns;
    }
}

impl Clock for TestClock {
    fn monotonic_ns(&self) -> u64 {
        *self.0.lock().expect("lock")
    }
    fn unix_nano(&self, monotonic_ns: u64) -> u64 {
        monotonic_ns + 1_000_000_000
    }
}

struct Harness {
    pipeline: Pipeline,
    fake: Fake,
    clock: TestClock,
}

const TTL_NS: u64 = 60_000_000_000;

/// Healing as the tests not about it run it: observe, the default rules, nobody trusted.
fn quiet_heal() -> HealSettings {
    HealSettings {
        mode: Mode::Observe,
        rules: crate::rules::file::default_rules().expect("valid"),
        trust: TrustSet::default(),
        guards: GuardSettings {
            cooldown_ns: 1_000_000_000,
            window_ns: 600_000_000_000,
            max_restores: 5,
            fight_rewrites: 3,
            fight_within_ns: 2_000_000_000,
            fight_backoff_ns: 600_000_000_000,
        },
        creation_grace_ns: 5_000_000_000,
        boot_id: "boot".into(),
        kept: None,
        keep: false,
        guard_active: false,
        guard_max_files: 1024,
    }
}

impl Harness {
    fn new() -> Self {
        Self::healing(quiet_heal())
    }

    fn healing(heal: HealSettings) -> Self {
        let fake = Fake::default();
        let clock = TestClock::default();
        let evictions = Evictions::default();
        let pipeline = Pipeline::new(
            Sources {
                cgroups: Box::new(fake.clone()),
                procs: Box::new(fake.clone()),
                names: Box::new(fake.clone()),
                clock: Box::new(clock.clone()),
            },
            Settings {
                limit_writes: SeenBy::Fexit,
                deleted_ttl_ns: TTL_NS,
                page_size: 4096,
            },
            heal,
            &evictions,
        );
        Self {
            pipeline,
            fake,
            clock,
        }
    }

    fn handle(&mut self, e: Event) -> Vec<Update> {
        let mut out = Vec::new();
        self.pipeline.handle(e, &mut out);
        out
    }

    fn tick(&mut self, at: u64) -> Vec<Update> {
        self.clock.set(at);
        let mut out = Vec::new();
        self.pipeline.tick(&mut out);
        out
    }

    /// A start-up scan of `cgroups` (id, path, memory.max).
    fn start(&mut self, cgroups: &[(u64, &str, &str)]) -> Vec<Update> {
        for (id, path, _) in cgroups {
            self.fake.node().paths.insert(*id, (*path).to_owned());
        }
        let scan = scan(cgroups);
        let mut out = Vec::new();
        self.pipeline
            .apply_scan(&scan, 0, ResyncReason::Start, &mut out);
        out
    }
}

fn scan(cgroups: &[(u64, &str, &str)]) -> Scan {
    Scan {
        cgroups: cgroups
            .iter()
            .map(|(id, path, max)| ScannedCgroup {
                id: *id,
                path: (*path).to_owned(),
                limits: vec![(LimitFile::MemoryMax, (*max).to_owned())],
                oom: Some(0),
            })
            .collect(),
    }
}

fn task(tgid: u32, comm: &str, cgroup_id: u64) -> Task {
    Task {
        tgid,
        pid: tgid,
        comm: comm.into(),
        cgroup_id,
    }
}

fn write(target: u64, value: &str, result: Result<u64, i32>) -> Event {
    write_at(target, value, result, 5)
}

fn write_at(target: u64, value: &str, result: Result<u64, i32>, at: u64) -> Event {
    Event::LimitWrite(LimitWrite {
        timestamp_ns: at,
        writer: task(42, "sh", 1),
        identity: Identity::default(),
        target_cgroup_id: target,
        limit: LimitFile::MemoryMax,
        value: value.into(),
        result,
    })
}

fn records(out: &[Update]) -> Vec<&Record> {
    out.iter()
        .filter_map(|u| match u {
            Update::Record(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn limit_write(out: &[Update]) -> &crate::model::record::LimitWrite {
    records(out)
        .into_iter()
        .find_map(|r| match r {
            Record::LimitWrite(w) => Some(w.as_ref()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no limit write in {out:?}"))
}

#[test]
fn writes_carry_the_previous_value_and_move_the_gauge() {
    let mut h = Harness::new();
    let start = h.start(&[(1, "/", "max"), (7, "/a", "max")]);
    assert!(start.contains(&Update::Limit {
        who: Who::cgroup("/a"),
        limit: LimitFile::MemoryMax,
        value: LimitValue::Max
    }));
    assert!(
        records(&start).is_empty(),
        "a start-up scan reports no writes"
    );
    h.fake.node().exes.insert(42, "/bin/dash".into());

    let out = h.handle(write(7, "64M", Ok(3)));
    let w = limit_write(&out);
    assert_eq!((w.cgroup.as_str(), w.value.as_str()), ("/a", "64M"));
    assert_eq!(
        (w.old.as_deref(), w.new.as_deref()),
        (Some("max"), Some("67108864"))
    );
    assert_eq!(w.result, "ok");
    assert_eq!(w.seen_by, SeenBy::Fexit);
    let writer = w.writer.as_ref().expect("writer");
    assert_eq!(
        (writer.exe.as_deref(), writer.cgroup.as_str()),
        (Some("/bin/dash"), "/")
    );
    assert_eq!(w.time_unix_nano, 1_000_000_005);
    assert!(out.contains(&Update::Limit {
        who: Who::cgroup("/a"),
        limit: LimitFile::MemoryMax,
        value: LimitValue::Bytes(64 << 20)
    }));

    // A rejected write changes nothing, and names its errno.
    let out = h.handle(write(7, "abc", Err(22)));
    let w = limit_write(&out);
    assert_eq!(w.result, "EINVAL");
    assert_eq!(
        (w.old.as_deref(), w.new.as_deref()),
        (Some("67108864"), None)
    );
    assert!(!out.iter().any(|u| matches!(u, Update::Limit { .. })));
}

/// The kernel reads `0x` and octal prefixes, wraps suffix shifts, rounds to pages and keeps
/// cpu.max's period when only a quota is written: what the agent records of a successful
/// write is the file read back, never its own reading of the text.
#[test]
fn a_successful_write_records_the_value_the_kernel_holds() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (7, "/a", "max")]);
    for (written, shown, held) in [
        ("0x4000000", "67108864", LimitValue::Bytes(64 << 20)),
        ("0100M", "104857600", LimitValue::Bytes(100 << 20)),
        ("16E", "0", LimitValue::Bytes(0)),
        ("4097", "4096", LimitValue::Bytes(4096)),
    ] {
        h.fake
            .node()
            .files
            .insert(("/a".into(), LimitFile::MemoryMax), format!("{shown}\n"));
        let out = h.handle(write(7, written, Ok(3)));
        assert_eq!(limit_write(&out).new.as_deref(), Some(shown), "{written}");
        assert!(
            out.contains(&Update::Limit {
                who: Who::cgroup("/a"),
                limit: LimitFile::MemoryMax,
                value: held,
            }),
            "{written}: {out:?}"
        );
    }
    let quota = Event::LimitWrite(LimitWrite {
        limit: LimitFile::CpuMax,
        ..match write(7, "50000", Ok(5)) {
            Event::LimitWrite(w) => w,
            _ => unreachable!("a write"),
        }
    });
    h.fake
        .node()
        .files
        .insert(("/a".into(), LimitFile::CpuMax), "50000 200000\n".into());
    let out = h.handle(quota);
    assert_eq!(limit_write(&out).new.as_deref(), Some("50000 200000"));
    assert!(
        out.iter().any(
            |u| matches!(u, Update::Limit { value, .. } if (value.as_f64() - 0.25).abs() < 1e-9)
        ),
        "{out:?}"
    );
    assert_eq!(h.pipeline.take_resync(), None);

    // The file unreadable (the cgroup just went) and the text not the agent's to read: no
    // value is guessed, and a resync is asked for.
    h.fake.node().files.clear();
    let out = h.handle(write(7, "0x10K", Ok(4)));
    assert_eq!(limit_write(&out).new, None);
    assert!(!out.iter().any(|u| matches!(u, Update::Limit { .. })));
    assert_eq!(
        h.pipeline.take_resync().map(|(r, _)| r),
        Some(ResyncReason::UnreadWrite)
    );
}

/// A batch of records holding several writes to one file: the file holds the last one's value
/// when they are handled, so only the last is read back; each earlier one is its own written
/// text.
#[test]
fn writes_to_one_file_in_a_batch_each_carry_their_own_value() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (7, "/a", "max"), (8, "/b", "max")]);
    let file = |h: &mut Harness, path: &str, text: &str| {
        h.fake
            .node()
            .files
            .insert((path.into(), LimitFile::MemoryMax), text.into());
    };
    file(&mut h, "/a", "268435456\n");
    file(&mut h, "/b", "4096\n");
    let mut out = Vec::new();
    h.pipeline.handle_all(
        vec![
            write_at(7, "64M", Ok(3), 5),
            write_at(8, "4097", Ok(4), 6),
            write_at(7, "128M", Ok(4), 7),
            write_at(7, "1G", Err(22), 8),
            write_at(7, "0x10000000", Ok(10), 9),
        ],
        &mut out,
    );
    let seen: Vec<_> = records(&out)
        .into_iter()
        .filter_map(|r| match r {
            Record::LimitWrite(w) => Some((
                w.cgroup.as_str(),
                w.old.as_deref(),
                w.new.as_deref(),
                w.result.as_str(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("/a", Some("max"), Some("67108864"), "ok"),
            // The last write to its file: read back (the kernel rounds to pages).
            ("/b", Some("max"), Some("4096"), "ok"),
            ("/a", Some("67108864"), Some("134217728"), "ok"),
            ("/a", Some("134217728"), None, "EINVAL"),
            ("/a", Some("134217728"), Some("268435456"), "ok"),
        ]
    );
    assert_eq!(h.pipeline.take_resync(), None);
}

/// The writer's executable is the kernel's, taken at the write: the path `/proc` gives later
/// is kept only while it still names that file (not after an exec, or a pid taken anew), and
/// remembered for that process and file.
#[test]
fn the_writers_path_is_kept_only_while_it_names_the_kernels_executable() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (7, "/a", "max")]);
    let key = |ino| agent_common::ExecKey {
        dev: 8 << 20 | 1,
        reserved: 0,
        ino,
    };
    h.fake.node().exes.insert(42, "/bin/dash".into());
    let written = |h: &mut Harness, at| {
        let Event::LimitWrite(mut w) = write_at(7, "64M", Ok(3), at) else {
            unreachable!("a write");
        };
        w.identity.exe = Some(key(10));
        let out = h.handle(Event::LimitWrite(w));
        limit_write(&out)
            .writer
            .as_ref()
            .expect("writer")
            .exe
            .clone()
    };
    // It exec'd another program since.
    h.fake.node().exe_keys.insert(42, key(11));
    assert_eq!(written(&mut h, 5), None);
    h.fake.node().exe_keys.insert(42, key(10));
    assert_eq!(written(&mut h, 6).as_deref(), Some("/bin/dash"));
    // Known now for that process and file: its next writes do not ask /proc, which no longer
    // has it (it exited).
    h.fake.node().exes.remove(&42);
    h.fake.node().exe_keys.remove(&42);
    assert_eq!(written(&mut h, 7).as_deref(), Some("/bin/dash"));
}

#[test]
fn kubernetes_cgroups_are_named_and_unknown_ones_ask_for_a_scan() {
    let mut h = Harness::new();
    let pod = format!("/kubepods/burstable/pod{POD_UID}");
    h.start(&[(1, "/", "max"), (9, &pod, "max")]);
    let out = h.handle(write(9, "1G", Ok(2)));
    let w = limit_write(&out);
    let k = w.k8s.as_ref().expect("k8s identity");
    assert_eq!(
        (k.namespace.as_deref(), k.pod.as_deref()),
        (Some("shop"), Some("cart"))
    );
    assert!(out.iter().any(|u| matches!(u,
        Update::Limit { who, .. } if who.pod == "cart" && who.namespace == "shop")));

    // A cgroup created while its mkdir went unseen: asked of the kernel once, resolved.
    h.fake.node().paths.insert(11, "/late".into());
    let out = h.handle(write(11, "1G", Ok(2)));
    assert_eq!(limit_write(&out).cgroup, "/late");
    // An id that names nothing: unknown, asked once, and a scan wanted.
    let before = h.fake.node().asked;
    let out = h.handle(write(12, "1G", Ok(2)));
    assert_eq!(limit_write(&out).cgroup, UNKNOWN_CGROUP);
    h.handle(write(12, "1G", Ok(2)));
    assert_eq!(h.fake.node().asked, before + 1, "not asked again at once");
    assert_eq!(
        h.pipeline.take_resync().map(|(r, _)| r),
        Some(ResyncReason::UnknownCgroup)
    );
    assert_eq!(h.pipeline.take_resync(), None);
}

#[test]
fn cgroups_start_from_defaults_and_their_counters_expire_after_removal() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max")]);
    h.clock.set(10);
    let created = h.handle(Event::Cgroup(CgroupChange {
        timestamp_ns: 10,
        id: 5,
        path: "/n".into(),
        created: true,
        truncated: false,
    }));
    let limits = created
        .iter()
        .filter(|u| matches!(u, Update::Limit { who, .. } if who.cgroup == "/n"))
        .count();
    assert_eq!(limits, 7, "every limit file's default: {created:?}");
    let out = h.handle(write_at(5, "1M", Ok(2), 15));
    assert_eq!(limit_write(&out).old.as_deref(), Some("max"));

    let removed = h.handle(Event::Cgroup(CgroupChange {
        timestamp_ns: 20,
        id: 5,
        path: "/n".into(),
        created: false,
        truncated: false,
    }));
    assert!(matches!(records(&removed)[..], [Record::CgroupRemoved(c)] if c.cgroup == "/n"));
    // A late event about it still resolves (the kernel no longer knows the id).
    h.fake.node().paths.remove(&5);
    let late = h.handle(write_at(5, "2M", Err(19), 25));
    assert_eq!(limit_write(&late).cgroup, "/n");
    h.clock.set(10);
    assert_eq!(
        h.pipeline.tick_due_in(),
        Some(Duration::from_nanos(TTL_NS)),
        "the loop may sleep until the series expire"
    );
    assert!(h.tick(10 + TTL_NS - 1).is_empty());
    assert_eq!(h.tick(10 + TTL_NS), [Update::Expired("/n".into())]);
    assert_eq!(h.pipeline.tick_due_in(), None, "nothing waits on time");
    assert!(h.tick(20 + TTL_NS).is_empty(), "expired once");
}

/// The kernel program keeps a path's first 255 bytes: a longer one is asked of the kernel by
/// id, a removal takes the one known, and without either a scan is asked for.
#[test]
fn cut_paths_are_made_whole() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max")]);
    let whole = format!("/{}/{}", "a".repeat(200), "b".repeat(150));
    let cut = whole[..255].to_owned();
    h.fake.node().paths.insert(5, whole.clone());
    let change = |id, created| {
        Event::Cgroup(CgroupChange {
            timestamp_ns: 1,
            id,
            path: cut.clone(),
            created,
            truncated: true,
        })
    };
    let created = h.handle(change(5, true));
    assert!(
        matches!(&records(&created)[..], [Record::CgroupCreated(c)] if c.cgroup == whole),
        "{created:?}"
    );
    assert!(
        created
            .iter()
            .all(|u| !matches!(u, Update::Limit { who, .. } if who.cgroup != whole))
    );
    h.fake.node().paths.remove(&5);
    let removed = h.handle(change(5, false));
    assert!(matches!(&records(&removed)[..], [Record::CgroupRemoved(c)] if c.cgroup == whole));
    assert_eq!(h.pipeline.take_resync(), None);
    // Unknown to the kernel and to the agent: marked as cut, and a scan asked for.
    let created = h.handle(change(6, true));
    let cut_mark = format!("{cut}...");
    assert!(matches!(&records(&created)[..], [Record::CgroupCreated(c)] if c.cgroup == cut_mark));
    assert_eq!(
        h.pipeline.take_resync().map(|(r, _)| r),
        Some(ResyncReason::UnknownCgroup)
    );
}

#[test]
fn a_new_cgroup_at_a_removed_ones_path_keeps_its_series() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (5, "/n", "max")]);
    let change = |id, created| {
        Event::Cgroup(CgroupChange {
            timestamp_ns: 1,
            id,
            path: "/n".into(),
            created,
            truncated: false,
        })
    };
    h.handle(change(5, false));
    h.handle(change(6, true));
    assert!(
        h.tick(TTL_NS * 2).is_empty(),
        "nothing expires: the path is in use"
    );
}

fn oom(trigger: u32, victim: u32, cgroup_id: u64, control: Option<OomControl>, at: u64) -> Event {
    Event::OomKill(OomKill {
        timestamp_ns: at,
        trigger: task(trigger, "alloc", cgroup_id),
        victim_pid: victim,
        victim: Some(VictimTask {
            tgid: victim,
            comm: "tail".into(),
            cgroup_id,
        }),
        memory: None,
        control,
    })
}

fn kills(out: &[Update]) -> Vec<&crate::model::record::OomKill> {
    records(out)
        .into_iter()
        .filter_map(|r| match r {
            Record::OomKill(k) => Some(k.as_ref()),
            _ => None,
        })
        .collect()
}

#[test]
fn victims_of_one_limit_hit_are_one_incident_reported_when_quiet() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (3, "/pod", "max"), (4, "/pod/ctr", "max")]);
    let control = OomControl {
        limit_cgroup_id: Some(3),
        usage_pages: 10,
        max_pages: 10,
        total_pages: 100,
        incident_ns: 77,
        constraint: Constraint::Memcg,
    };
    let first = h.handle(oom(50, 60, 4, Some(control), 100));
    let second = h.handle(oom(50, 61, 4, Some(control), 200));
    let (a, b) = (kills(&first)[0], kills(&second)[0]);
    assert!(a.opens_incident && !b.opens_incident);
    assert_eq!(a.incident, b.incident);
    assert_eq!(a.limit.cgroup, "/pod");
    assert_eq!(a.limit.scope, Scope::Pod);
    assert_eq!(a.limit.found_by, FoundBy::Kernel);
    assert_eq!(a.limit.limit_bytes, Some(10 * 4096));
    assert_eq!(a.victim.cgroup_source, CgroupSource::Kernel);
    // Another `out_of_memory` call: another incident.
    let other = h.handle(oom(
        50,
        62,
        4,
        Some(OomControl {
            incident_ns: 300,
            ..control
        }),
        300,
    ));
    assert_ne!(kills(&other)[0].incident, a.incident);

    h.clock.set(300);
    assert_eq!(
        h.pipeline.tick_due_in(),
        Some(Duration::from_nanos(QUIET_NS - 100)),
        "the first incident goes quiet first"
    );
    assert!(records(&h.tick(200 + QUIET_NS - 1)).is_empty());
    let closed = h.tick(300 + QUIET_NS);
    assert_eq!(h.pipeline.tick_due_in(), None);
    let incidents: Vec<_> = records(&closed)
        .into_iter()
        .filter_map(|r| match r {
            Record::OomIncident(i) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(incidents.len(), 2);
    let one = incidents
        .iter()
        .find(|i| i.id == a.incident)
        .expect("the first incident");
    assert_eq!(one.victims.len(), 2);
    assert_eq!(one.end_unix_nano, 1_000_000_200);
}

#[test]
fn without_the_kernels_word_the_limit_is_derived_from_the_counts() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (3, "/pod", "max"), (4, "/pod/ctr", "max")]);
    h.fake.node().oom.insert("/pod".into(), 1);
    h.fake.node().oom.insert("/pod/ctr".into(), 0);
    h.fake.node().memory.insert("/pod".into(), (4096, 8192));
    let out = h.handle(oom(50, 60, 4, None, 100));
    let k = kills(&out)[0];
    assert_eq!(k.limit.cgroup, "/pod");
    assert_eq!(k.limit.found_by, FoundBy::MemoryEvents);
    assert_eq!(k.limit.constraint, Constraint::Memcg);
    assert_eq!(
        (k.limit.usage_bytes, k.limit.limit_bytes),
        (Some(4096), Some(8192))
    );
    // The same thread's next kill within a second is the same incident.
    let next = h.handle(oom(50, 61, 4, None, 100 + QUIET_NS / 2));
    assert_eq!(kills(&next)[0].incident, k.incident);
    // Nothing rose: a global OOM, weighed against the node.
    let global = h.handle(oom(51, 63, 4, None, 100 + QUIET_NS * 3));
    let g = kills(&global)[0];
    assert_eq!((g.limit.cgroup.as_str(), g.limit.scope), ("/", Scope::Node));
    assert_eq!(g.limit.limit_bytes, Some(1000));
}

#[test]
fn a_victim_gone_unread_by_the_kernel_is_looked_up_in_proc() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max")]);
    h.fake.node().procs.insert(60, "/app".into());
    let Event::OomKill(mut k) = oom(50, 60, 1, None, 100) else {
        unreachable!()
    };
    k.victim = None;
    let out = h.handle(Event::OomKill(k));
    let v = &kills(&out)[0].victim;
    assert_eq!(v.cgroup_source, CgroupSource::Procfs);
    assert_eq!(kills(&out)[0].cgroup, "/app");
}

#[test]
fn one_go_crash_per_process() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max")]);
    let fatal = |tgid, at| {
        Event::GoFatal(GoFatal {
            timestamp_ns: at,
            task: task(tgid, "svc", 1),
            function: GoFunction::Fatal,
            message: "concurrent map writes".repeat(10),
        })
    };
    let first = h.handle(fatal(70, 1));
    match records(&first)[..] {
        [Record::GoFatal(g)] => {
            assert_eq!(g.reason.chars().count(), 80, "the reason label is cut");
            assert_eq!(g.function, "runtime.fatal");
        }
        ref other => panic!("{other:?}"),
    }
    assert!(h.handle(fatal(70, 2)).is_empty(), "the same crash");
    assert_eq!(records(&h.handle(fatal(71, 3))).len(), 1);
}

#[test]
fn a_resync_after_lost_events_finds_what_was_missed_and_keeps_what_is_newer() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (7, "/a", "max"), (8, "/b", "max")]);
    h.clock.set(100);
    h.pipeline.events_lost();
    let (reason, since) = h.pipeline.take_resync().expect("a resync is wanted");
    assert_eq!((reason, since), (ResyncReason::EventsLost, 100));
    // While the scan runs, an event moves /a; the scan read /a before it.
    h.handle(write_at(7, "2M", Ok(2), 150));
    // Meanwhile, unseen: /b's limit changed, /gone was removed, /c was created.
    let mut out = Vec::new();
    h.pipeline.apply_scan(
        &scan(&[
            (1, "/", "max"),
            (7, "/a", "max"),
            (8, "/b", "1048576"),
            (9, "/c", "max"),
        ]),
        since,
        reason,
        &mut out,
    );
    assert_eq!(h.pipeline.take_resync(), None, "the scan was the resync");
    let w = limit_write(&out);
    assert_eq!(w.cgroup, "/b");
    assert_eq!(w.seen_by, SeenBy::Resync);
    assert_eq!(
        (w.old.as_deref(), w.new.as_deref(), w.writer.as_ref()),
        (Some("max"), Some("1048576"), None)
    );
    assert!(
        !out.iter()
            .any(|u| matches!(u, Update::Limit { who, .. } if who.cgroup == "/a")),
        "the event after the scan started is newer: {out:?}"
    );
    assert!(out.contains(&Update::Limit {
        who: Who::cgroup("/c"),
        limit: LimitFile::MemoryMax,
        value: LimitValue::Max
    }));
    assert_eq!(
        out.last(),
        Some(&Update::Resynced(ResyncReason::EventsLost))
    );
    // The next write to /a has the event's value as its previous one.
    let next = h.handle(write_at(7, "3M", Ok(2), 200));
    assert_eq!(limit_write(&next).old.as_deref(), Some("2097152"));

    // A cgroup whose removal went unseen is removed by the next scan.
    h.clock.set(300);
    h.pipeline.events_lost();
    let (_, since) = h.pipeline.take_resync().expect("wanted");
    let mut out = Vec::new();
    h.pipeline.apply_scan(
        &scan(&[(1, "/", "max"), (7, "/a", "3M"), (8, "/b", "1048576")]),
        since,
        ResyncReason::EventsLost,
        &mut out,
    );
    assert!(
        records(&out)
            .iter()
            .any(|r| matches!(r, Record::CgroupRemoved(c) if c.cgroup == "/c")),
        "{out:?}"
    );
}

#[test]
fn a_write_that_waited_in_the_ring_does_not_undo_a_newer_scan() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (7, "/a", "max")]);
    h.clock.set(1_000);
    h.pipeline.events_lost();
    let (reason, since) = h.pipeline.take_resync().expect("wanted");
    let mut out = Vec::new();
    h.pipeline.apply_scan(
        &scan(&[(1, "/", "max"), (7, "/a", "4096")]),
        since,
        reason,
        &mut out,
    );
    // Written at 500, before the scan read the file, and handled only now.
    let late = h.handle(write_at(7, "64M", Ok(3), 500));
    let w = limit_write(&late);
    assert_eq!(
        (w.old.as_deref(), w.new.as_deref()),
        (None, Some("67108864"))
    );
    assert!(!late.iter().any(|u| matches!(u, Update::Limit { .. })));
    let next = h.handle(write_at(7, "8192", Ok(4), 2_000));
    assert_eq!(limit_write(&next).old.as_deref(), Some("4096"));
}

#[test]
fn inotify_reports_changes_only() {
    let mut h = Harness::new();
    h.start(&[(1, "/", "max"), (7, "/a", "max")]);
    let seen = |value: &str| Observed {
        id: 7,
        path: "/a".into(),
        limit: LimitFile::MemoryMax,
        value: value.into(),
    };
    let mut out = Vec::new();
    h.pipeline.observed(&seen("max"), &mut out);
    assert!(out.is_empty(), "unchanged");
    h.pipeline.observed(&seen("67108864"), &mut out);
    let w = limit_write(&out);
    assert_eq!(
        (w.seen_by, w.old.as_deref()),
        (SeenBy::Inotify, Some("max"))
    );
    assert!(w.writer.is_none());
}
