//! `nodewarden events`: the running agent's events, live, for a person (one line each) or as
//! JSON lines, filtered by cgroup glob and kind.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
};

use anyhow::{Context as _, Result};

use crate::{
    model::{
        guard::GuardResult,
        pattern::Pattern,
        record::{OomLimit, Process, Record, RecordKind},
    },
    outputs::feed,
};

/// What to show.
#[derive(Debug)]
pub struct Filter {
    /// Glob on the cgroup path.
    pub cgroup: Option<Pattern>,
    /// Kinds to keep; empty keeps all.
    pub kinds: Vec<RecordKind>,
}

/// Streams events from the agent's socket to stdout until the agent goes away.
pub fn run(socket: &Path, filter: &Filter, json: bool) -> Result<()> {
    let stream = feed::connect(socket, feed::Request::Events).with_context(|| {
        format!(
            "connecting to {} (is `nodewarden run` running? the socket is root-only)",
            socket.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading from the agent")?;
        let shown = match serde_json::from_str::<Record>(&line) {
            Ok(r) if !keep(filter, &r) => continue,
            Ok(r) if !json => human(&r),
            // JSON lines pass through as the agent wrote them, records of kinds this CLI does
            // not know (a newer agent) and loss notices included.
            _ if json || filter.kinds.is_empty() && filter.cgroup.is_none() => line,
            _ => continue,
        };
        if writeln!(out, "{shown}").and_then(|()| out.flush()).is_err() {
            // The reader went away (`| head`): not an error.
            return Ok(());
        }
    }
    Ok(())
}

fn keep(filter: &Filter, r: &Record) -> bool {
    (filter.kinds.is_empty() || filter.kinds.contains(&r.kind()))
        && filter.cgroup.as_ref().is_none_or(|g| g.matches(r.cgroup()))
}

/// What the executor did, in words.
fn outcome(o: &crate::model::heal::Outcome) -> String {
    use crate::model::heal::Outcome;
    match o {
        Outcome::Restored {
            read_back,
            latency_seconds,
        } => format!(
            "restored to {read_back} in {:.1} ms",
            latency_seconds * 1000.0
        ),
        Outcome::Failed { error } => format!("restore failed: {error}"),
        Outcome::Checked => "checked, not written".to_owned(),
        Outcome::NotWritten { reason } => format!("not written: {}", reason.as_str()),
        Outcome::Recorded => "recorded".to_owned(),
    }
}

/// One readable line.
#[must_use]
pub fn human(record: &Record) -> String {
    super::printable(&line(record), false).into_owned()
}

/// [`human`] before control characters are escaped.
#[expect(clippy::too_many_lines, reason = "one arm per kind of record")]
fn line(record: &Record) -> String {
    let mut s = format!(
        "{} {:<14} {}",
        utc(record.time_unix_nano()),
        record.kind().as_str(),
        record.cgroup()
    );
    match record {
        Record::LimitWrite(r) => {
            let _ = write!(s, " {} = {:?}", r.limit.file_name(), r.value);
            if let (Some(old), Some(new)) = (&r.old, &r.new) {
                let _ = write!(s, " ({old} -> {new})");
            }
            match &r.writer {
                Some(w) => {
                    let _ = write!(s, " {} by {}", r.result, process(w));
                }
                None => {
                    let _ = write!(
                        s,
                        " {} by an unknown writer (seen by {})",
                        r.result,
                        r.seen_by.as_str()
                    );
                }
            }
        }
        Record::OomKill(r) => {
            let _ = write!(
                s,
                " victim {}[{}] (cgroup from {})",
                r.victim.comm,
                r.victim.pid,
                r.victim.cgroup_source.as_str(),
            );
            if let Some(m) = &r.victim.memory {
                let _ = write!(
                    s,
                    " anon-rss {} file-rss {} shmem-rss {} oom_score_adj {}",
                    mib(m.anon_rss_bytes),
                    mib(m.file_rss_bytes),
                    mib(m.shmem_rss_bytes),
                    m.oom_score_adj
                );
            }
            let _ = write!(
                s,
                ", triggered by {}; {}, incident {}",
                process(&r.trigger),
                limit(&r.limit),
                r.incident
            );
        }
        Record::OomIncident(r) => {
            let _ = write!(
                s,
                " {}, incident {}, triggered by {}; {} killed:",
                limit(&r.limit),
                r.id,
                process(&r.trigger),
                r.victims.len()
            );
            for v in &r.victims {
                let _ = write!(s, " {}[{}] in {};", v.comm, v.pid, v.cgroup);
            }
            s.pop();
        }
        Record::GoFatal(r) => {
            let _ = write!(
                s,
                " fatal error: {} ({}) in {}",
                r.reason,
                r.function,
                process(&r.process)
            );
        }
        Record::CgroupCreated(_) | Record::CgroupRemoved(_) => {}
        Record::Decision(r) => {
            let _ = write!(
                s,
                " {} = {:?}: {} by rule {} ({})",
                r.limit.file_name(),
                r.value,
                r.verdict.as_str(),
                r.rule,
                r.mode.as_str()
            );
            if let Some(reason) = r.reason {
                let _ = write!(s, ", {}", reason.as_str());
            }
            if let (Some(d), Some(src)) = (&r.desired, r.desired_source) {
                let _ = write!(s, "; desired {d} ({})", src.as_str());
            }
            match (&r.writer, &r.trusted_writer) {
                (Some(w), Some(t)) => {
                    let _ = write!(s, "; written by {} (trusted: {t})", process(w));
                }
                (Some(w), None) => {
                    let _ = write!(s, "; written by {}", process(w));
                }
                (None, _) => {
                    let _ = write!(s, "; found by a scan");
                }
            }
            if let Some(o) = &r.outcome {
                let _ = write!(s, "; {}", outcome(o));
            }
            if r.repeated > 0 {
                let _ = write!(s, " (and {} more like it)", r.repeated);
            }
        }
        Record::GuardDenial(r) => {
            let _ = write!(
                s,
                " {}: open for writing {} by rule {}; by {}",
                r.limit.file_name(),
                match r.result {
                    GuardResult::Denied => "refused",
                    GuardResult::WouldDeny => "would be refused (dry-run)",
                },
                r.rule,
                process(&r.writer)
            );
        }
    }
    if let Some(k) = record.k8s() {
        match (&k.namespace, &k.pod) {
            (Some(ns), Some(pod)) => {
                let _ = write!(s, " [pod {ns}/{pod} {}", k.qos.as_str());
            }
            _ => {
                let _ = write!(s, " [pod {} {}", k.pod_uid, k.qos.as_str());
            }
        }
        if let Some(c) = &k.container {
            let _ = write!(s, " container {c}");
        }
        if let (None, Some(c)) = (&k.container, &k.container_id) {
            let _ = write!(s, " container {}", &c[..c.len().min(12)]);
        }
        s.push(']');
    }
    s
}

/// `limit of /a hit (scope container, CONSTRAINT_MEMCG, 64.0 MiB of 64.0 MiB, found by kernel)`.
fn limit(l: &OomLimit) -> String {
    let figure = |b: Option<u64>| b.map_or_else(|| "?".to_owned(), mib);
    format!(
        "limit of {} hit (scope {}, {}, {} of {}, found by {})",
        l.cgroup,
        l.scope.as_str(),
        l.constraint.kernel_name(),
        figure(l.usage_bytes),
        figure(l.limit_bytes),
        l.found_by.as_str()
    )
}

/// Bytes as MiB with one decimal.
#[expect(clippy::cast_precision_loss, reason = "a figure for people")]
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

fn process(p: &Process) -> String {
    let exe = p
        .exe
        .as_deref()
        .map(|e| format!(" {e}"))
        .unwrap_or_default();
    format!("{}[{}]{exe} in {}", p.comm, p.pid, p.cgroup)
}

/// `2026-11-26T06:50:01.123Z` for nanoseconds since the epoch (days to a civil date per
/// Howard Hinnant's algorithm, to need no date crate for one format).
#[must_use]
pub fn utc(unix_nano: u64) -> String {
    let secs = unix_nano / 1_000_000_000;
    let millis = (unix_nano / 1_000_000) % 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        cgroup::Scope,
        event::Constraint,
        record::{FoundBy, IncidentVictim, OomIncident},
    };

    #[test]
    /// Expected values from `date -u -d @SECONDS`.
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_795_000_000_123_000_000), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn an_incident_reads_as_one_line_with_its_victims() {
        let trigger = Process {
            pid: 9,
            tid: 9,
            comm: "tail".into(),
            exe: None,
            cgroup: "/p/c".into(),
        };
        let r = Record::OomIncident(Box::new(OomIncident {
            time_unix_nano: 0,
            end_unix_nano: 0,
            id: "ab".repeat(16),
            limit: OomLimit {
                cgroup: "/p".into(),
                k8s: None,
                scope: Scope::Pod,
                constraint: Constraint::Memcg,
                found_by: FoundBy::Kernel,
                usage_bytes: Some(48 << 20),
                limit_bytes: Some(48 << 20),
            },
            trigger,
            victims: vec![
                IncidentVictim {
                    pid: 9,
                    comm: "tail".into(),
                    cgroup: "/p/c".into(),
                },
                IncidentVictim {
                    pid: 8,
                    comm: "sleep".into(),
                    cgroup: "/p/c".into(),
                },
            ],
        }));
        assert_eq!(r.cgroup(), "/p");
        assert_eq!(
            human(&r),
            format!(
                "1970-01-01T00:00:00.000Z oom_incident   /p limit of /p hit (scope pod, CONSTRAINT_MEMCG, 48.0 MiB of 48.0 MiB, found by kernel), incident {}, triggered by tail[9] in /p/c; 2 killed: tail[9] in /p/c; sleep[8] in /p/c",
                "ab".repeat(16)
            )
        );
    }

    #[test]
    fn a_limit_write_reads_as_one_line_and_filters_by_kind_and_glob() {
        let r = crate::model::record::tests::limit_write_example();
        assert_eq!(
            human(&r),
            "1970-01-01T00:00:00.000Z limit_write    /a memory.max = \"64M\" (max -> 67108864) ok by sh[1] /bin/dash in /"
        );
        let filter = |cgroup: &str, kinds: Vec<RecordKind>| Filter {
            cgroup: Some(Pattern::new(cgroup).expect("glob")),
            kinds,
        };
        assert!(keep(&filter("/a*", vec![]), &r));
        assert!(!keep(&filter("/b*", vec![]), &r));
        assert!(!keep(&filter("*", vec![RecordKind::OomKill]), &r));
        assert!(keep(&filter("*", vec![RecordKind::LimitWrite]), &r));
    }

    #[test]
    fn control_characters_are_printed_escaped() {
        let mut r = crate::model::record::tests::limit_write_example();
        if let Record::LimitWrite(w) = &mut r {
            if let Some(p) = &mut w.writer {
                p.comm = "\u{1b}[2J\u{1b}]0;owned\u{7}sh".into();
            }
            w.value = "64M\n".into();
        }
        let line = human(&r);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(
            line.contains(r"\u{1b}[2J\u{1b}]0;owned\u{7}sh[1]"),
            "{line}"
        );
    }
}
