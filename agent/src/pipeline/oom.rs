//! OOM kills: the victim and its cgroup, the limit hit (as the kernel's `out_of_memory` call
//! said, or derived from the cgroups' counts), and the incident the kill belongs to.

use super::{Pipeline, UNKNOWN_CGROUP};
use crate::{
    model::{
        cgroup::Scope,
        event::{Constraint, OomKill},
        record::{self, CgroupSource, FoundBy, Record},
        update::Update,
    },
    state::incidents::Key,
};

impl Pipeline {
    pub(super) fn oom_kill(&mut self, k: &OomKill, out: &mut Vec<Update>) {
        // The victim's cgroup comes from its task in the kernel; failing that, from /proc while
        // the victim is still there (it can be gone already: then the cgroup is unknown).
        let (cgroup, comm, tgid, source) = match &k.victim {
            Some(v) => (
                self.cgroup_label(v.cgroup_id),
                v.comm.clone(),
                Some(v.tgid),
                CgroupSource::Kernel,
            ),
            None => (
                self.sources
                    .procs
                    .cgroup(k.victim_pid)
                    .unwrap_or_else(|| UNKNOWN_CGROUP.to_owned()),
                self.sources.procs.comm(k.victim_pid).unwrap_or_default(),
                None,
                CgroupSource::Procfs,
            ),
        };
        let page = self.settings.page_size;
        let victim = record::Victim {
            pid: k.victim_pid,
            tgid,
            comm,
            cgroup_source: source,
            memory: k.memory.map(|m| record::VictimMemory {
                anon_rss_bytes: m.anon_rss_pages.saturating_mul(page),
                file_rss_bytes: m.file_rss_pages.saturating_mul(page),
                shmem_rss_bytes: m.shmem_rss_pages.saturating_mul(page),
                swap_bytes: m.swap_pages.saturating_mul(page),
                total_vm_bytes: m.total_vm_pages.saturating_mul(page),
                oom_score_adj: m.oom_score_adj,
            }),
        };
        let trigger = self.process(&k.trigger);
        let key = key_of(k);
        let seen = record::IncidentVictim {
            pid: victim.pid,
            comm: victim.comm.clone(),
            cgroup: cgroup.clone(),
        };
        let at = self.sources.clock.unix_nano(k.timestamp_ns);
        let (incident, limit, opens) = if let Some(open) = self.incidents.find(&key, k.timestamp_ns)
        {
            open.last_ns = k.timestamp_ns;
            open.data.end_unix_nano = at;
            open.data.victims.push(seen);
            (open.id.clone(), open.data.limit.clone(), false)
        } else {
            let limit = self.oom_limit(k, &cgroup);
            let incident = record::OomIncident {
                time_unix_nano: at,
                end_unix_nano: at,
                id: String::new(),
                limit: limit.clone(),
                trigger: trigger.clone(),
                victims: vec![seen],
            };
            let (open, pushed_out) = self.incidents.open(key, k.timestamp_ns, incident);
            open.data.id.clone_from(&open.id);
            let id = open.id.clone();
            if let Some(old) = pushed_out {
                self.incident_closed(old.data, out);
            }
            (id, limit, true)
        };
        if k.control.is_some() {
            // The kernel said which limit it was: the counts move on without a derivation.
            let _ = self
                .memory_events
                .limit_of(&cgroup, self.sources.cgroups.as_ref());
        }
        out.push(Update::Record(Record::OomKill(Box::new(record::OomKill {
            time_unix_nano: at,
            k8s: self.k8s(&cgroup),
            cgroup,
            victim,
            trigger,
            incident,
            opens_incident: opens,
            limit,
        }))));
    }

    /// The limit a kill hit: as the kernel's `out_of_memory` call said, or derived from the
    /// cgroups' `memory.events.local` counts when the call was not seen.
    fn oom_limit(&mut self, k: &OomKill, victim_cgroup: &str) -> record::OomLimit {
        let page = self.settings.page_size;
        let (cgroup, constraint, found_by, usage, limit) = if let Some(c) = &k.control {
            let cgroup = c.limit_cgroup_id.map(|id| self.cgroup_label(id));
            let (usage, limit) = match cgroup {
                Some(_) => (
                    Some(c.usage_pages.saturating_mul(page)),
                    Some(c.max_pages.saturating_mul(page)),
                ),
                None => (
                    self.sources.procs.node_memory().0,
                    Some(c.total_pages.saturating_mul(page)),
                ),
            };
            (cgroup, c.constraint, FoundBy::Kernel, usage, limit)
        } else {
            let cgroup = self
                .memory_events
                .limit_of(victim_cgroup, self.sources.cgroups.as_ref());
            let (usage, limit) = match &cgroup {
                Some(p) => self.sources.cgroups.usage_and_limit(p),
                None => self.sources.procs.node_memory(),
            };
            // Derived, the kernel's cpuset and mempolicy constraints cannot be told apart
            // from a global OOM.
            let constraint = if cgroup.is_some() {
                Constraint::Memcg
            } else {
                Constraint::None
            };
            (cgroup, constraint, FoundBy::MemoryEvents, usage, limit)
        };
        let scope = Scope::of(cgroup.as_deref(), victim_cgroup);
        let cgroup = cgroup.unwrap_or_else(|| "/".to_owned());
        record::OomLimit {
            k8s: self.k8s(&cgroup),
            cgroup,
            scope,
            constraint,
            found_by,
            usage_bytes: usage,
            limit_bytes: limit,
        }
    }

    /// An incident whose kills stopped: reported with its victims.
    pub(super) fn incident_closed(&mut self, incident: record::OomIncident, out: &mut Vec<Update>) {
        // A limit hit can count more OOMs than kills (a charge failing again while the victim
        // exits): take them in now, so the next derivation does not see them.
        for v in &incident.victims {
            let _ = self
                .memory_events
                .limit_of(&v.cgroup, self.sources.cgroups.as_ref());
        }
        out.push(Update::Record(Record::OomIncident(Box::new(incident))));
    }
}

/// The incident key of a kill (see [`Key`]).
fn key_of(k: &OomKill) -> Key {
    match &k.control {
        Some(c) => Key::Kernel {
            trigger_tid: k.trigger.pid,
            entered_ns: c.incident_ns,
        },
        None => Key::Derived {
            trigger_tid: k.trigger.pid,
        },
    }
}
