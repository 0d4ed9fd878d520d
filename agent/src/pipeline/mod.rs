//! From decoded events to updates: enrich (cgroup paths, Kubernetes identity, the writer), move
//! the state (limits, OOM incidents, crashed Go processes), and say what changed. Pure but for
//! its sources (traits): the outputs consume what it returns.

pub mod clock;
mod guard;
mod heal;
mod oom;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use agent_common::ExecKey;

pub use self::heal::HealSettings;
use self::{clock::Clock, heal::Heal};
use crate::{
    enrich::{
        Cgroups, Names, Procs,
        cgroupfs::Scan,
        k8s, kubelet,
        paths::{CgroupPaths, Resolved},
    },
    model::{
        cache::{Bounded, Cache, Evictions},
        cgroup::Who,
        event::{CgroupChange, Event, GoFatal, Identity, LimitWrite, Observed, Task},
        limit,
        record::{self, K8s, Process, Record, SeenBy},
        update::{ResyncReason, Update},
    },
    state::{
        go_crashes::GoCrashes,
        incidents::Incidents,
        limits::{LimitState, Recorded},
        memory_events::MemoryEvents,
        pods::Pods,
    },
};

/// Names from the API server's pods first, kubelet's directories second.
struct PodNames<'a> {
    pods: &'a Pods,
    kubelet: &'a mut (dyn Names + Send),
}

impl Names for PodNames<'_> {
    fn names(&mut self, pod_uid: &str, container_id: Option<&str>) -> Option<kubelet::Names> {
        let Some(pod) = self.pods.get(pod_uid) else {
            return self.kubelet.names(pod_uid, container_id);
        };
        let container = match container_id.map(|id| pod.container(id)) {
            Some(Some(c)) => c.name.clone(),
            // Not in the pod's status yet.
            Some(None) => return self.kubelet.names(pod_uid, container_id),
            None => String::new(),
        };
        Some(kubelet::Names {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container,
        })
    }
}

/// Label value for a cgroup whose path could not be found.
pub const UNKNOWN_CGROUP: &str = "unknown";

/// Removed cgroups whose series are kept until they expire.
const MAX_REMOVED: usize = 65_536;

/// Writers whose executable's path is kept.
const MAX_WRITER_EXES: usize = 4_096;

/// Reconciler passes that compare the values known read the files again once this many
/// passes went by since the last read (5 minutes at the default interval): a belt to the
/// probes' braces.
const READ_EVERY_NTH_RECONCILE: u32 = 10;

/// What the pipeline asks of the node.
pub struct Sources {
    pub cgroups: Box<dyn Cgroups + Send>,
    pub procs: Box<dyn Procs + Send>,
    pub names: Box<dyn Names + Send>,
    pub clock: Box<dyn Clock + Send>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

/// How the pipeline runs.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How the probes see limit writes (what their records say).
    pub limit_writes: SeenBy,
    /// How long a removed cgroup's series stay, in ns.
    pub deleted_ttl_ns: u64,
    /// The kernel's page size (memory limits are kept in pages).
    pub page_size: u64,
}

/// Enriches decoded events into records and keeps the state they move.
#[derive(Debug)]
pub struct Pipeline {
    sources: Sources,
    settings: Settings,
    paths: CgroupPaths,
    limits: LimitState,
    memory_events: MemoryEvents,
    incidents: Incidents<record::OomIncident>,
    crashes: GoCrashes,
    /// Removed cgroups' paths and when (monotonic ns): their series go after the TTL.
    removed: Bounded<String, u64>,
    /// Why the limit state must be read again, if it must.
    resync: Option<ResyncReason>,
    /// The pods of this node, from the API server.
    pods: Pods,
    heal: Heal,
    /// The path of a writer's executable, by its tgid and the file the kernel saw it run:
    /// asking `/proc` (a readlink and a stat) for every write of a burst cost a quarter of the
    /// agent's time. A pid reused by the same file names the same file.
    writer_exes: Bounded<(u32, ExecKey), String>,
    /// Reconciler passes since the files were last read (by any scan).
    reconciles_since_read: u32,
}

impl Pipeline {
    #[must_use]
    pub fn new(
        sources: Sources,
        settings: Settings,
        heal: HealSettings,
        evictions: &Evictions,
    ) -> Self {
        Self {
            heal: Heal::new(heal, evictions),
            sources,
            settings,
            paths: CgroupPaths::new(evictions),
            limits: LimitState::new(settings.page_size, evictions),
            memory_events: MemoryEvents::default(),
            incidents: Incidents::new(evictions),
            crashes: GoCrashes::new(evictions),
            removed: Bounded::new(Cache::RemovedCgroups, MAX_REMOVED, evictions.clone()),
            resync: None,
            pods: Pods::new(evictions),
            writer_exes: Bounded::new(Cache::WriterExes, MAX_WRITER_EXES, evictions.clone()),
            reconciles_since_read: 0,
        }
    }

    /// Handles one decoded event.
    pub fn handle(&mut self, event: Event, out: &mut Vec<Update>) {
        match event {
            Event::LimitWrite(w) => self.limit_write(&w, false, out),
            Event::OomKill(k) => self.oom_kill(&k, out),
            Event::Cgroup(c) => self.cgroup_change(c, out),
            Event::GoFatal(g) => self.go_fatal(&g, out),
            Event::GuardDenial(d) => self.guard_denial(&d, out),
        }
    }

    /// Handles decoded events in their order. A successful limit write followed in the same
    /// batch by another to the same file is not read back: the file holds the later value
    /// already, so the written text, parsed, says what it left.
    pub fn handle_all(&mut self, events: Vec<Event>, out: &mut Vec<Update>) {
        let mut last = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            if let Event::LimitWrite(w) = e
                && w.result.is_ok()
            {
                last.insert((w.target_cgroup_id, w.limit), i);
            }
        }
        for (i, e) in events.into_iter().enumerate() {
            match e {
                Event::LimitWrite(w) => {
                    let superseded = last.get(&(w.target_cgroup_id, w.limit)) != Some(&i);
                    self.limit_write(&w, superseded, out);
                }
                e => self.handle(e, out),
            }
        }
    }

    /// Events that change limits or cgroups were lost: the state must be read again before
    /// anything relies on it.
    pub fn events_lost(&mut self) {
        self.resync = Some(ResyncReason::EventsLost);
        let now = self.sources.clock.monotonic_ns();
        self.heal_lost(now);
    }

    /// The reconciler's pass: every watched limit compared with its desired value (which
    /// moves without a write: a pod's new spec). Where the probes see every write in the
    /// kernel's handler (fexit, kprobe), nothing was lost since the files were last read and
    /// every cgroup's limits are tracked, the values known are the files' and are compared as
    /// they are, without reading a file: on a node of 1,000 cgroups reading them all took most
    /// of an idle agent's CPU. The files are read (a scan) otherwise, and when
    /// [`READ_EVERY_NTH_RECONCILE`] passes went by since they were last read.
    pub fn reconcile(&mut self, out: &mut Vec<Update>) {
        self.reconciles_since_read = self.reconciles_since_read.saturating_add(1);
        let known = matches!(self.settings.limit_writes, SeenBy::Fexit | SeenBy::Kprobe)
            && self.resync.is_none()
            && !self.heal_stale()
            && !self.limits.full();
        if !known || self.reconciles_since_read >= READ_EVERY_NTH_RECONCILE {
            self.resync.get_or_insert(ResyncReason::Reconcile);
            return;
        }
        let now = self.sources.clock.monotonic_ns();
        let ids: Vec<u64> = self.limits.ids().collect();
        for id in ids {
            let Some(path) = self.paths.known(id).map(str::to_owned) else {
                continue;
            };
            let k8s = self.k8s(&path);
            for limit in crate::rules::file::WATCHABLE {
                if let Some(value) = self.limits.get(id, limit) {
                    self.heal_found(id, &path, k8s.as_ref(), limit, value, now, out);
                }
            }
        }
    }

    /// The periodic poll of the limit files (limit writes seen without BPF): a scan, unless
    /// one is wanted already.
    pub fn poll(&mut self) {
        self.resync.get_or_insert(ResyncReason::Poll);
    }

    /// Why the limit state should be read again (a scan off the event loop), if it should.
    /// Taking it says a scan starts now: the time to give [`Self::apply_scan`].
    pub fn take_resync(&mut self) -> Option<(ResyncReason, u64)> {
        self.resync.take().map(|r| (r, self.scan_starts()))
    }

    /// The time a scan starting now gives [`Self::apply_scan`].
    #[must_use]
    pub fn scan_starts(&self) -> u64 {
        self.sources.clock.monotonic_ns()
    }

    /// A scan of the hierarchy that started at `since` (monotonic ns): values events changed
    /// after it are newer and kept; every other difference is a change the agent missed
    /// (reported, seen by `reason`), a cgroup it did not know of, or one it missed the removal
    /// of.
    pub fn apply_scan(
        &mut self,
        scan: &Scan,
        since: u64,
        reason: ResyncReason,
        out: &mut Vec<Update>,
    ) {
        let now = self.sources.clock.monotonic_ns();
        let time = self.sources.clock.unix_nano(now);
        let scanned: std::collections::HashSet<u64> = scan.cgroups.iter().map(|c| c.id).collect();
        self.heal_scan_applies(since);
        self.reconciles_since_read = 0;
        if reason == ResyncReason::Start {
            self.guard_trust(out);
        }
        for c in &scan.cgroups {
            self.paths.insert(c.id, c.path.clone());
            if let Some(n) = c.oom
                && (reason == ResyncReason::Start || !self.limits.knows(c.id))
            {
                self.memory_events.seed(&c.path, n);
            }
            let k8s = k8s::identity(&c.path, self.sources.names.as_mut());
            let who = Who::of(&c.path, k8s.as_ref());
            self.guard_cgroup(c.id, &c.path, k8s.as_ref(), out);
            for (limit, text) in &c.limits {
                let Ok(value) = limit::parse(*limit, text) else {
                    tracing::warn!(cgroup = %c.path, limit = limit.file_name(), "unparsable value {text:?}");
                    continue;
                };
                let Some((old, changed)) = self.limits.set_read(c.id, *limit, value, since) else {
                    continue;
                };
                if reason == ResyncReason::Start || old.is_none() {
                    self.heal_first_seen(c.id, &c.path, *limit, value);
                }
                // Every watched limit is compared with its desired value (the reconciler).
                self.heal_found(c.id, &c.path, k8s.as_ref(), *limit, value, since, out);
                if !changed {
                    continue;
                }
                out.push(Update::Limit {
                    who: who.clone(),
                    limit: *limit,
                    value,
                });
                // A change to a cgroup already known is a write the agent did not see.
                if let Some(old) = old
                    && reason != ResyncReason::Start
                {
                    let seen_by = match reason {
                        ResyncReason::Poll => SeenBy::Poll,
                        _ => SeenBy::Resync,
                    };
                    let write = UnattributedWrite {
                        time_unix_nano: time,
                        cgroup: &c.path,
                        limit: *limit,
                        text,
                        old: Some(old),
                        now: value,
                    };
                    out.push(write.record(k8s.clone(), seen_by));
                }
            }
        }
        // Cgroups gone while their removal went unseen (and not recreated meanwhile).
        let gone: Vec<u64> = self
            .limits
            .ids()
            .filter(|id| !scanned.contains(id) && !self.limits.changed_since(*id, since))
            .collect();
        for id in gone {
            let path = self.paths.known(id).unwrap_or(UNKNOWN_CGROUP).to_owned();
            self.removed_cgroup(id, path, time, out);
        }
        self.guard_scanned(&scanned, out);
        self.heal_scanned();
        out.push(Update::Resynced(reason));
    }

    /// A limit file seen modified without BPF (inotify); reported when its value differs from
    /// the one known.
    pub fn observed(&mut self, o: &Observed, out: &mut Vec<Update>) {
        let Ok(value) = limit::parse(o.limit, &o.value) else {
            tracing::warn!(cgroup = %o.path, limit = o.limit.file_name(), "unparsable value {:?}", o.value);
            return;
        };
        // Without the writer's syscall only changes can be told apart: a cgroup not known yet
        // is new, so it starts from the kernel's defaults.
        let at = self.sources.clock.monotonic_ns();
        if !self.limits.knows(o.id) {
            self.paths.insert(o.id, o.path.clone());
            self.limits.seed_defaults(o.id, at);
        }
        if self.limits.get(o.id, o.limit) == Some(value) {
            return;
        }
        let k8s = k8s::identity(&o.path, self.sources.names.as_mut());
        let Recorded::Moved { old, now } = self.limits.record(o.id, o.limit, value, at) else {
            return;
        };
        out.push(Update::Limit {
            who: Who::of(&o.path, k8s.as_ref()),
            limit: o.limit,
            value: now,
        });
        let time = self.sources.clock.unix_nano(at);
        let write = UnattributedWrite {
            time_unix_nano: time,
            cgroup: &o.path,
            limit: o.limit,
            text: &o.value,
            old,
            now,
        };
        out.push(write.record(k8s.clone(), SeenBy::Inotify));
        self.heal_found(o.id, &o.path, k8s.as_ref(), o.limit, now, at, out);
    }

    /// How long until [`Self::tick`] has work: an incident goes quiet, a removed cgroup's
    /// series expire, a limit is looked at again, desired values are offered; `None` when
    /// nothing waits on time. The event loop sleeps that long when nothing happens.
    #[must_use]
    pub fn tick_due_in(&self) -> Option<std::time::Duration> {
        let ttl = self.settings.deleted_ttl_ns;
        let due = [
            self.incidents.next_quiet_ns(),
            self.removed
                .iter()
                .map(|(_, at)| at.saturating_add(ttl))
                .min(),
            self.heal_due_ns(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        let now = self.sources.clock.monotonic_ns();
        Some(std::time::Duration::from_nanos(due.saturating_sub(now)))
    }

    /// Time-driven work: incidents whose kills stopped are reported, and the series of cgroups
    /// removed longer ago than the configured time expire. Call it within a few hundred ms of
    /// [`Self::tick_due_in`].
    pub fn tick(&mut self, out: &mut Vec<Update>) {
        let now = self.sources.clock.monotonic_ns();
        for done in self.incidents.close_quiet(now) {
            self.incident_closed(done.data, out);
        }
        let ttl = self.settings.deleted_ttl_ns;
        let expired: Vec<String> = self
            .removed
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) >= ttl)
            .map(|(p, _)| p.clone())
            .collect();
        for path in expired {
            self.removed.remove(&path);
            out.push(Update::Expired(path));
        }
        self.heal_tick(out);
    }

    /// At shutdown: reports the incidents still open, and offers the desired values to the
    /// state file.
    pub fn finish(&mut self, out: &mut Vec<Update>) {
        for done in self.incidents.close_all() {
            self.incident_closed(done.data, out);
        }
        self.heal_keep(out);
    }

    /// The label of cgroup `id`: its path, or [`UNKNOWN_CGROUP`] (and a scan is asked for,
    /// which finds a cgroup whose creation went unseen).
    fn cgroup_label(&mut self, id: u64) -> String {
        let now = self.sources.clock.monotonic_ns();
        match self.paths.path(id, self.sources.cgroups.as_ref(), now) {
            Resolved::Path(p) => p,
            Resolved::NewlyUnknown => {
                self.resync.get_or_insert(ResyncReason::UnknownCgroup);
                UNKNOWN_CGROUP.to_owned()
            }
            Resolved::Unknown => UNKNOWN_CGROUP.to_owned(),
        }
    }

    /// The Kubernetes identity of a cgroup path, named by the API server's pods, else by
    /// kubelet's directories.
    fn k8s(&mut self, path: &str) -> Option<K8s> {
        k8s::identity(
            path,
            &mut PodNames {
                pods: &self.pods,
                kubelet: self.sources.names.as_mut(),
            },
        )
    }

    /// A task as a record's process: its executable asked of `/proc` (the writer may be gone
    /// already, a shell's `echo`: then it is unknown).
    fn process(&mut self, t: &Task) -> Process {
        let exe = self.sources.procs.exe(t.tgid);
        self.process_with(t, exe)
    }

    /// [`Self::process`] for a task whose executable the kernel identified at the moment
    /// (`identity`): the path `/proc` gives later is kept only if it still names that file. A
    /// writer that exec'd since, or whose pid a new process took, leaves the path unknown
    /// rather than another program's.
    fn process_as(&mut self, t: &Task, identity: &Identity) -> Process {
        let exe = match identity.exe {
            Some(key) => self.writer_exe(t.tgid, key),
            None => self.sources.procs.exe(t.tgid),
        };
        self.process_with(t, exe)
    }

    /// The path of `tgid`'s executable while it is still the file `key`; a path found is kept
    /// for that process and file.
    fn writer_exe(&mut self, tgid: u32, key: ExecKey) -> Option<String> {
        if let Some(path) = self.writer_exes.get(&(tgid, key)) {
            return Some(path.clone());
        }
        let procs = &self.sources.procs;
        let path = procs
            .exe(tgid)
            .filter(|_| procs.exe_key(tgid) == Some(key))?;
        self.writer_exes.put((tgid, key), path.clone());
        Some(path)
    }

    fn process_with(&mut self, t: &Task, exe: Option<String>) -> Process {
        Process {
            pid: t.tgid,
            tid: t.pid,
            comm: t.comm.clone(),
            exe,
            cgroup: self.cgroup_label(t.cgroup_id),
        }
    }

    /// A write to a limit file; `superseded`: a later successful write to the same file is
    /// known already (see [`Self::held`]).
    fn limit_write(&mut self, w: &LimitWrite, superseded: bool, out: &mut Vec<Update>) {
        let cgroup = self.cgroup_label(w.target_cgroup_id);
        let result = match w.result {
            Ok(_) => "ok".to_owned(),
            Err(errno) => errno_name(errno),
        };
        let k8s = self.k8s(&cgroup);
        // A write the kernel refused leaves the limit as it was; one older than the value
        // known (it waited in the ring while a scan read the file) leaves it too, and its
        // previous value is unknown.
        let writer = self.process_as(&w.writer, &w.identity);
        let mut moved = None;
        let held = match w.result {
            Ok(_) => self.held(&cgroup, w, superseded),
            Err(_) => None,
        };
        let (old, new) = match (w.result, held) {
            (Ok(_), Some(v)) => {
                match self
                    .limits
                    .record(w.target_cgroup_id, w.limit, v, w.timestamp_ns)
                {
                    Recorded::Moved { old, now } => {
                        out.push(Update::Limit {
                            who: Who::of(&cgroup, k8s.as_ref()),
                            limit: w.limit,
                            value: now,
                        });
                        moved = Some(now);
                        (old, Some(now))
                    }
                    Recorded::Older => (None, Some(self.limits.stored(w.limit, v))),
                }
            }
            _ => (self.limits.get(w.target_cgroup_id, w.limit), None),
        };
        let by = self.writer_of(w.writer.tgid, &w.identity, &writer.cgroup);
        let incident = moved.and_then(|_| self.incident_of(w.writer.pid, w.timestamp_ns));
        out.push(Update::Record(Record::LimitWrite(Box::new(
            record::LimitWrite {
                time_unix_nano: self.sources.clock.unix_nano(w.timestamp_ns),
                k8s: k8s.clone(),
                cgroup: cgroup.clone(),
                limit: w.limit,
                value: w.value.clone(),
                old: old.map(|v| v.to_string()),
                new: new.map(|v| v.to_string()),
                result,
                writer: Some(writer.clone()),
                seen_by: self.settings.limit_writes,
                incident: incident.clone(),
            },
        ))));
        if let Some(value) = moved {
            let written = heal::Written {
                process: &writer,
                at_ns: w.timestamp_ns,
                incident,
            };
            self.heal_write(
                w.target_cgroup_id,
                &cgroup,
                k8s.as_ref(),
                w.limit,
                value,
                by,
                written,
                out,
            );
        }
    }

    /// The value a successful write left: the file read back, as the kernel holds it (it
    /// parses `0x`, octal and wrapping suffixes, rounds to pages, keeps cpu.max's period when
    /// only a quota is written); the written text parsed only when the file cannot be read (the
    /// cgroup is gone), or holds a later write's value already (`superseded`: read back, it
    /// would give this write the later one's value). A value known neither way asks for a
    /// resync, so the gauge does not keep reporting the old limit.
    fn held(
        &mut self,
        cgroup: &str,
        w: &LimitWrite,
        superseded: bool,
    ) -> Option<limit::LimitValue> {
        let written = || limit::parse(w.limit, &w.value).ok();
        let read = || {
            (cgroup != UNKNOWN_CGROUP)
                .then(|| {
                    self.sources
                        .cgroups
                        .limit(w.target_cgroup_id, cgroup, w.limit)
                })
                .flatten()
                .and_then(|text| limit::parse(w.limit, &text).ok())
        };
        let held = if superseded {
            written().or_else(read)
        } else {
            read().or_else(written)
        };
        if held.is_none() {
            self.resync.get_or_insert(ResyncReason::UnreadWrite);
        }
        held
    }

    fn cgroup_change(&mut self, mut c: CgroupChange, out: &mut Vec<Update>) {
        let time = self.sources.clock.unix_nano(c.timestamp_ns);
        if c.truncated {
            // Only the path's first bytes came: the whole one is the kernel's to give (by id),
            // else the one known from before (a removal), else a scan's.
            let whole = if c.created {
                self.sources.cgroups.path_of(c.id)
            } else {
                self.paths.known(c.id).map(str::to_owned)
            };
            if let Some(path) = whole {
                c.path = path;
            } else {
                self.resync.get_or_insert(ResyncReason::UnknownCgroup);
                c.path.push_str("...");
            }
        }
        if !c.created {
            self.removed_cgroup(c.id, c.path, time, out);
            return;
        }
        let k8s = self.k8s(&c.path);
        let who = Who::of(&c.path, k8s.as_ref());
        for (limit, value) in self.limits.seed_defaults(c.id, c.timestamp_ns) {
            out.push(Update::Limit {
                who: who.clone(),
                limit,
                value,
            });
        }
        self.memory_events.created(&c.path);
        self.heal_created(c.id, c.timestamp_ns);
        self.guard_cgroup(c.id, &c.path, k8s.as_ref(), out);
        // A new cgroup at the path of a removed one continues its series.
        self.removed.remove(&c.path);
        self.paths.insert(c.id, c.path.clone());
        out.push(Update::Record(Record::CgroupCreated(
            record::CgroupChange {
                time_unix_nano: time,
                cgroup: c.path,
            },
        )));
    }

    /// Cgroup `id` at `path` is gone: its limits go, its counters stay until they expire. Its
    /// path stays known, for events still in flight.
    fn removed_cgroup(&mut self, id: u64, path: String, time: u64, out: &mut Vec<Update>) {
        self.limits.forget(id);
        self.heal_removed(id);
        self.guard_removed(id, out);
        self.memory_events.removed(&path);
        self.removed
            .put(path.clone(), self.sources.clock.monotonic_ns());
        out.push(Update::Record(Record::CgroupRemoved(
            record::CgroupChange {
                time_unix_nano: time,
                cgroup: path,
            },
        )));
    }

    /// A Go fatal error; nothing for the same process's second one (several goroutines can
    /// hit the same race; the process dies once).
    fn go_fatal(&mut self, g: &GoFatal, out: &mut Vec<Update>) {
        if !self.crashes.first(g.task.tgid, g.timestamp_ns) {
            return;
        }
        let process = self.process(&g.task);
        let cgroup = process.cgroup.clone();
        // The reason is a label: cut, so a long message cannot make a long series.
        let reason: String = g.message.chars().take(80).collect();
        out.push(Update::Record(Record::GoFatal(Box::new(record::GoFatal {
            time_unix_nano: self.sources.clock.unix_nano(g.timestamp_ns),
            k8s: self.k8s(&cgroup),
            cgroup,
            process,
            reason,
            function: g.function.name().to_owned(),
        }))));
    }
}

/// A successful write found by its effect (a scan or inotify), without its writer.
struct UnattributedWrite<'a> {
    time_unix_nano: u64,
    cgroup: &'a str,
    limit: agent_common::LimitFile,
    text: &'a str,
    old: Option<limit::LimitValue>,
    now: limit::LimitValue,
}

impl UnattributedWrite<'_> {
    fn record(self, k8s: Option<K8s>, seen_by: SeenBy) -> Update {
        Update::Record(Record::LimitWrite(Box::new(record::LimitWrite {
            time_unix_nano: self.time_unix_nano,
            cgroup: self.cgroup.to_owned(),
            k8s,
            limit: self.limit,
            value: self.text.to_owned(),
            old: self.old.map(|v| v.to_string()),
            new: Some(self.now.to_string()),
            result: "ok".to_owned(),
            writer: None,
            seen_by,
            incident: None,
        })))
    }
}

/// The symbolic name of an errno ("EINVAL"), or its number when it has none.
#[must_use]
pub fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => format!("errno{errno}"),
        e => format!("{e:?}"),
    }
}
