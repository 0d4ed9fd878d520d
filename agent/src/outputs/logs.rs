//! The agent's log: `tracing`, with aya-log's and other `log` records bridged in; one line per
//! event.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::model::record::Record;

/// Installs the log subscriber: `RUST_LOG` filters (default `info`), output to stderr, in
/// colour only on a terminal (not in the journal or a container's log) and without `NO_COLOR`.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .try_init();
}

/// The log line of a record.
pub fn record(record: &Record) {
    match record {
        Record::LimitWrite(r) => tracing::info!(
            cgroup = %r.cgroup,
            limit = %r.limit.file_name(),
            value = %r.value,
            old = r.old.as_deref().unwrap_or("unknown"),
            new = r.new.as_deref().unwrap_or("unknown"),
            writer = r.writer.as_ref().map_or("unknown", |w| w.comm.as_str()),
            writer_pid = r.writer.as_ref().map_or(0, |w| w.pid),
            seen_by = %r.seen_by.as_str(),
            result = %r.result,
            "cgroup limit write"
        ),
        Record::OomKill(r) => {
            let memory = r.victim.memory;
            tracing::warn!(
                victim_pid = r.victim.pid,
                victim_comm = %r.victim.comm,
                victim_cgroup = %r.cgroup,
                victim_cgroup_from = %r.victim.cgroup_source.as_str(),
                victim_anon_rss_bytes = memory.map(|m| m.anon_rss_bytes),
                victim_oom_score_adj = memory.map(|m| m.oom_score_adj),
                trigger = %r.trigger.comm,
                trigger_pid = r.trigger.pid,
                trigger_cgroup = %r.trigger.cgroup,
                limit_cgroup = %r.limit.cgroup,
                scope = %r.limit.scope.as_str(),
                constraint = %r.limit.constraint.kernel_name(),
                limit_found_by = %r.limit.found_by.as_str(),
                incident = %r.incident,
                "OOM kill"
            );
        }
        Record::OomIncident(r) => tracing::warn!(
            incident = %r.id,
            limit_cgroup = %r.limit.cgroup,
            scope = %r.limit.scope.as_str(),
            constraint = %r.limit.constraint.kernel_name(),
            victims = r.victims.len(),
            "OOM incident"
        ),
        Record::GoFatal(r) => tracing::warn!(
            pid = r.process.pid,
            comm = %r.process.comm,
            cgroup = %r.cgroup,
            reason = %r.reason,
            function = %r.function,
            "Go fatal error"
        ),
        Record::CgroupCreated(r) | Record::CgroupRemoved(r) => {
            tracing::debug!(cgroup = %r.cgroup, kind = record.kind().as_str(), "cgroup change");
        }
        Record::Decision(r) => tracing::warn!(
            cgroup = %r.cgroup,
            limit = %r.limit.file_name(),
            rule = %r.rule,
            mode = %r.mode.as_str(),
            verdict = %r.verdict.as_str(),
            reason = r.reason.map_or("", |r| r.as_str()),
            value = %r.value,
            desired = r.desired.as_deref().unwrap_or("unknown"),
            desired_source = r.desired_source.map_or("", |s| s.as_str()),
            writer = r.writer.as_ref().map_or("unseen", |w| w.comm.as_str()),
            writer_pid = r.writer.as_ref().map_or(0, |w| w.pid),
            result = r.outcome.as_ref().map_or("", |o| o.label()),
            repeated = r.repeated,
            "remediation decision"
        ),
        Record::GuardDenial(r) => tracing::warn!(
            cgroup = %r.cgroup,
            limit = %r.limit.file_name(),
            rule = %r.rule,
            result = %r.result.as_str(),
            writer = %r.writer.comm,
            writer_pid = r.writer.pid,
            writer_exe = r.writer.exe.as_deref().unwrap_or("unknown"),
            "guard: untrusted open of a protected limit file for writing"
        ),
    }
}
