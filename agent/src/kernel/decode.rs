//! Decoding: raw ring buffer records into typed events. Nothing here trusts the bytes: a short or
//! unknown record is an error, never a panic.

use agent_common::{
    COMM_LEN, CgroupEvent, EventHeader, EventKind, ExecEvent, GO_FATAL, GoFatalEvent, GuardEvent,
    LimitFile, LimitWriteEvent, OOM_CONTROL, OomKillEvent, PATH_LEN, RSS_ANON, RSS_FILE, RSS_SHMEM,
    RSS_SWAP, VICTIM_FROM_TASK, VICTIM_MEMORY,
};

use crate::model::event::{
    CgroupChange, Constraint, Event, Exec, GoFatal, GoFunction, GuardDenial, Identity, LimitWrite,
    OomControl, OomKill, Task, VictimMemory, VictimTask,
};

/// A key the kernel could read; all zero means it could not.
fn key(k: agent_common::ExecKey) -> Option<agent_common::ExecKey> {
    (k.ino != 0).then_some(k)
}

/// A writer's identity as the kernel read it.
fn identity(w: &agent_common::WriterIdentity) -> Identity {
    Identity {
        exe: key(w.exe),
        parent_tgid: w.parent_tgid,
        parent_exe: key(w.parent_exe),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than the {need} its kind needs")]
    Short { len: usize, need: usize },
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("write to {0:?}, which is not a known limit file")]
    UnknownLimit(String),
    #[error("guard denial of limit number {0}, which is not a known limit file")]
    UnknownLimitIndex(u32),
    #[error("an exec record in the events ring, or another record in the exec ring")]
    WrongRing,
}

/// Decodes one record of the exec ring (`EXECS`).
pub fn decode_exec(bytes: &[u8]) -> Result<Exec, DecodeError> {
    let e: ExecEvent = read(bytes)?;
    if EventKind::from_u32(e.header.kind) != Some(EventKind::Exec) {
        return Err(DecodeError::WrongRing);
    }
    Ok(Exec {
        tgid: e.header.tgid,
        key: e.key,
    })
}

/// Decodes one record of the events ring (`EVENTS`).
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes)?;
    match EventKind::from_u32(header.kind) {
        Some(EventKind::LimitWrite) => {
            let e: LimitWriteEvent = read(bytes)?;
            let name = c_str(&e.file_name);
            let limit = LimitFile::from_file_name(&name).ok_or(DecodeError::UnknownLimit(name))?;
            let len = usize::try_from(e.value_len).map_or(0, |l| l.min(e.value.len()));
            Ok(Event::LimitWrite(LimitWrite {
                timestamp_ns: header.timestamp_ns,
                writer: task(&header),
                identity: identity(&e.writer),
                target_cgroup_id: e.target_cgroup_id,
                limit,
                value: String::from_utf8_lossy(&e.value[..len]).trim().to_owned(),
                // unsigned_abs: `-i64::MIN` would overflow (found by fuzzing).
                result: if e.result < 0 {
                    Err(i32::try_from(e.result.unsigned_abs()).unwrap_or(i32::MAX))
                } else {
                    Ok(e.result.unsigned_abs())
                },
            }))
        }
        Some(EventKind::OomKill) => {
            let e: OomKillEvent = read(bytes)?;
            Ok(Event::OomKill(OomKill {
                timestamp_ns: header.timestamp_ns,
                trigger: task(&header),
                victim_pid: e.victim_pid,
                victim: (e.victim_flags & VICTIM_FROM_TASK != 0).then(|| VictimTask {
                    tgid: e.victim_tgid,
                    comm: comm(&e.victim_comm),
                    cgroup_id: e.victim_cgroup_id,
                }),
                memory: (e.victim_flags & VICTIM_MEMORY != 0).then_some(VictimMemory {
                    anon_rss_pages: e.victim_rss_pages[RSS_ANON],
                    file_rss_pages: e.victim_rss_pages[RSS_FILE],
                    shmem_rss_pages: e.victim_rss_pages[RSS_SHMEM],
                    swap_pages: e.victim_rss_pages[RSS_SWAP],
                    total_vm_pages: e.victim_total_vm_pages,
                    oom_score_adj: e.victim_oom_score_adj,
                }),
                control: (e.oom_flags & OOM_CONTROL != 0).then(|| OomControl {
                    limit_cgroup_id: (e.limit_cgroup_id != 0).then_some(e.limit_cgroup_id),
                    usage_pages: e.limit_usage_pages,
                    max_pages: e.limit_max_pages,
                    total_pages: e.total_pages,
                    incident_ns: e.incident_ns,
                    constraint: Constraint::from_kernel(e.constraint),
                }),
            }))
        }
        Some(kind @ (EventKind::CgroupMkdir | EventKind::CgroupRmdir)) => {
            let e: CgroupEvent = read(bytes)?;
            let bytes = c_bytes(&e.path);
            let path = crate::model::cgroup::path_text(bytes);
            Ok(Event::Cgroup(CgroupChange {
                timestamp_ns: header.timestamp_ns,
                id: e.id,
                // The kernel gives "/" for the root and "/a/b" below it.
                path: if path.starts_with('/') {
                    path
                } else {
                    format!("/{path}")
                },
                created: kind == EventKind::CgroupMkdir,
                // The program keeps PATH_LEN - 1 bytes: a path that long may be cut.
                truncated: bytes.len() >= PATH_LEN - 1,
            }))
        }
        Some(EventKind::GoFatal) => {
            let e: GoFatalEvent = read(bytes)?;
            let len = usize::try_from(e.len).map_or(0, |l| l.min(e.message.len()));
            Ok(Event::GoFatal(GoFatal {
                timestamp_ns: header.timestamp_ns,
                task: task(&header),
                function: if e.function == GO_FATAL {
                    GoFunction::Fatal
                } else {
                    GoFunction::Throw
                },
                message: String::from_utf8_lossy(&e.message[..len]).into_owned(),
            }))
        }
        Some(EventKind::GuardDenial) => {
            let e: GuardEvent = read(bytes)?;
            let limit = usize::try_from(e.limit)
                .ok()
                .and_then(|i| LimitFile::ALL.get(i).copied())
                .ok_or(DecodeError::UnknownLimitIndex(e.limit))?;
            Ok(Event::GuardDenial(GuardDenial {
                timestamp_ns: header.timestamp_ns,
                task: task(&header),
                identity: identity(&e.writer),
                target_cgroup_id: e.target_cgroup_id,
                limit,
                file_ino: e.file_ino,
                enforced: e.enforced != 0,
            }))
        }
        Some(EventKind::Exec) => Err(DecodeError::WrongRing),
        None => Err(DecodeError::UnknownKind(header.kind)),
    }
}

/// Copies a `T` out of the front of `bytes` (ring buffer records carry no alignment promise).
fn read<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: the length was checked above and `T: Pod` accepts any bit pattern.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

fn task(h: &EventHeader) -> Task {
    Task {
        tgid: h.tgid,
        pid: h.pid,
        comm: comm(&h.comm),
        cgroup_id: h.cgroup_id,
    }
}

/// A NUL-padded kernel `comm` as a string.
#[must_use]
pub fn comm(raw: &[u8; COMM_LEN]) -> String {
    c_str(raw)
}

/// The bytes before the first NUL (or all of them) as a string.
fn c_str(raw: &[u8]) -> String {
    String::from_utf8_lossy(c_bytes(raw)).into_owned()
}

/// The bytes before the first NUL, or all of them.
fn c_bytes(raw: &[u8]) -> &[u8] {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    &raw[..end]
}

#[cfg(test)]
mod tests {
    use agent_common::{FILE_NAME_LEN, VALUE_LEN};

    use super::*;

    fn bytes_of<T: aya::Pod>(v: &T) -> Vec<u8> {
        // SAFETY: Pod types have no padding; reading their bytes is sound.
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn header(kind: EventKind) -> EventHeader {
        let mut comm = [0; COMM_LEN];
        comm[..5].copy_from_slice(b"write");
        EventHeader {
            kind: kind as u32,
            tgid: 10,
            pid: 11,
            reserved: 0,
            timestamp_ns: 5,
            cgroup_id: 7,
            comm,
        }
    }

    #[test]
    fn decodes_a_rejected_limit_write() {
        let mut value = [0; VALUE_LEN];
        value[..3].copy_from_slice(b"abc");
        let mut file_name = [0; FILE_NAME_LEN];
        file_name[..15].copy_from_slice(b"memory.swap.max");
        let mut raw = LimitWriteEvent {
            header: header(EventKind::LimitWrite),
            target_cgroup_id: 99,
            result: -22,
            reserved: 0,
            value_len: 3,
            writer: agent_common::WriterIdentity {
                exe: agent_common::ExecKey {
                    dev: 0x0080_0001,
                    reserved: 0,
                    ino: 1234,
                },
                parent_tgid: 1,
                ..Default::default()
            },
            file_name,
            value,
        };
        let Event::LimitWrite(w) = decode(&bytes_of(&raw)).expect("decodes") else {
            panic!("wrong kind");
        };
        assert_eq!(w.writer.comm, "write");
        assert_eq!((w.writer.tgid, w.writer.pid), (10, 11));
        assert_eq!(w.value, "abc");
        assert_eq!(w.result, Err(22));
        assert_eq!(w.target_cgroup_id, 99);
        assert_eq!(w.limit, LimitFile::MemorySwapMax);
        assert_eq!(w.identity.exe.map(|k| k.ino), Some(1234));
        assert_eq!(w.identity.parent_tgid, 1);
        assert_eq!(w.identity.parent_exe, None, "an unread key is no key");
        // Any result decodes: i64::MIN has no negation (a panic found by fuzzing).
        raw.result = i64::MIN;
        let Event::LimitWrite(w) = decode(&bytes_of(&raw)).expect("decodes") else {
            panic!("wrong kind");
        };
        assert_eq!(w.result, Err(i32::MAX));
        raw.file_name[..9].copy_from_slice(b"cgroup.pr");
        assert!(matches!(
            decode(&bytes_of(&raw)),
            Err(DecodeError::UnknownLimit(n)) if n == "cgroup.prap.max"
        ));
    }

    #[test]
    fn decodes_cgroup_changes() {
        let mut path = [0; PATH_LEN];
        path[..6].copy_from_slice(b"/a/b/c");
        let raw = CgroupEvent {
            header: header(EventKind::CgroupRmdir),
            id: 5,
            path_len: 6,
            reserved: 0,
            path,
        };
        assert_eq!(
            decode(&bytes_of(&raw)),
            Ok(Event::Cgroup(CgroupChange {
                timestamp_ns: 5,
                id: 5,
                path: "/a/b/c".into(),
                created: false,
                truncated: false,
            }))
        );
        // Bytes that are not UTF-8 are escaped, not replaced; a full buffer may be cut.
        let mut raw = raw;
        raw.path = [b'x'; PATH_LEN];
        raw.path[..4].copy_from_slice(b"/a\xff/");
        raw.path[PATH_LEN - 1] = 0;
        let Ok(Event::Cgroup(c)) = decode(&bytes_of(&raw)) else {
            panic!("a cgroup change");
        };
        assert!(c.path.starts_with("/a\\xff/xxx"), "{}", c.path);
        assert_eq!(c.path.len(), PATH_LEN - 1 + 3);
        assert!(c.truncated);
    }

    #[test]
    fn decodes_an_oom_kill_with_and_without_victim_task() {
        let mut raw = OomKillEvent {
            header: header(EventKind::OomKill),
            victim_cgroup_id: 42,
            victim_pid: 300,
            victim_tgid: 300,
            victim_flags: VICTIM_FROM_TASK | VICTIM_MEMORY,
            victim_oom_score_adj: -998,
            victim_comm: *b"tail\0\0\0\0\0\0\0\0\0\0\0\0",
            victim_rss_pages: [1, 2, 3, 4],
            victim_total_vm_pages: 10,
            limit_cgroup_id: 7,
            limit_usage_pages: 100,
            limit_max_pages: 101,
            total_pages: 102,
            incident_ns: 55,
            constraint: 3,
            oom_flags: OOM_CONTROL,
        };
        let Event::OomKill(k) = decode(&bytes_of(&raw)).expect("decodes") else {
            panic!("wrong kind");
        };
        let v = k.victim.expect("victim read from task");
        assert_eq!(
            (v.comm.as_str(), v.cgroup_id, k.victim_pid),
            ("tail", 42, 300)
        );
        let m = k.memory.expect("memory");
        assert_eq!(
            (
                m.file_rss_pages,
                m.anon_rss_pages,
                m.swap_pages,
                m.shmem_rss_pages
            ),
            (1, 2, 3, 4)
        );
        assert_eq!(m.oom_score_adj, -998);
        let c = k.control.expect("control");
        assert_eq!(c.limit_cgroup_id, Some(7));
        assert_eq!(c.constraint, Constraint::Memcg);
        assert_eq!(c.incident_ns, 55);
        // A global OOM: no memcg; a constraint number this agent does not know is kept.
        raw.limit_cgroup_id = 0;
        raw.constraint = 9;
        let Event::OomKill(k) = decode(&bytes_of(&raw)).expect("decodes") else {
            panic!("wrong kind");
        };
        let c = k.control.expect("control");
        assert_eq!(c.limit_cgroup_id, None);
        assert_eq!(c.constraint.kernel_name(), "CONSTRAINT_9");
        raw.victim_flags = 0;
        raw.oom_flags = 0;
        let Event::OomKill(k) = decode(&bytes_of(&raw)).expect("decodes") else {
            panic!("wrong kind");
        };
        assert_eq!((k.victim, k.memory, k.control), (None, None, None));
    }

    #[test]
    fn decodes_guard_denials_and_refuses_an_unknown_limit() {
        let mut raw = GuardEvent {
            header: header(EventKind::GuardDenial),
            target_cgroup_id: 99,
            file_ino: 4242,
            limit: 0,
            enforced: 1,
            writer: agent_common::WriterIdentity {
                exe: agent_common::ExecKey {
                    dev: 0x0080_0001,
                    reserved: 0,
                    ino: 77,
                },
                ..Default::default()
            },
        };
        let Event::GuardDenial(d) = decode(&bytes_of(&raw)).expect("decodes") else {
            panic!("wrong kind");
        };
        assert_eq!(d.limit, LimitFile::MemoryMax);
        assert!(d.enforced);
        assert_eq!(
            (d.target_cgroup_id, d.file_ino, d.task.tgid),
            (99, 4242, 10)
        );
        assert_eq!(d.identity.exe.map(|k| k.ino), Some(77));
        raw.limit = 6;
        raw.enforced = 0;
        let Event::GuardDenial(d) = decode(&bytes_of(&raw)).expect("decodes") else {
            panic!("wrong kind");
        };
        assert_eq!((d.limit, d.enforced), (LimitFile::CpuMax, false));
        raw.limit = 7;
        assert_eq!(
            decode(&bytes_of(&raw)),
            Err(DecodeError::UnknownLimitIndex(7))
        );
    }

    #[test]
    fn bad_records_are_errors() {
        assert_eq!(
            decode(&[1, 2, 3]),
            Err(DecodeError::Short { len: 3, need: 48 })
        );
        let h = header(EventKind::LimitWrite);
        let short = bytes_of(&h);
        assert!(matches!(decode(&short), Err(DecodeError::Short { .. })));
        let mut unknown = h;
        unknown.kind = 77;
        assert_eq!(
            decode(&bytes_of(&unknown)),
            Err(DecodeError::UnknownKind(77))
        );
    }

    #[test]
    fn execs_come_from_their_own_ring() {
        let key = agent_common::ExecKey {
            dev: 0x0080_0001,
            reserved: 0,
            ino: 1234,
        };
        let raw = ExecEvent {
            header: header(EventKind::Exec),
            key,
        };
        assert_eq!(decode_exec(&bytes_of(&raw)), Ok(Exec { tgid: 10, key }));
        assert_eq!(decode(&bytes_of(&raw)), Err(DecodeError::WrongRing));
        let mut other = raw;
        other.header.kind = EventKind::LimitWrite as u32;
        assert_eq!(decode_exec(&bytes_of(&other)), Err(DecodeError::WrongRing));
        assert!(matches!(
            decode_exec(&[0; 10]),
            Err(DecodeError::Short { .. })
        ));
    }
}
