//! Every map and global the programs share with userspace. Names come from `agent_common::maps`.

use agent_common::{KernelOffsets, KilledTask, LimitWriteArgs, PendingWrite};
use aya_ebpf::{
    Global,
    macros::map,
    maps::{LruHashMap, RingBuf},
};

/// All events to userspace. 256 KiB holds thousands of events: bursts of OOM kills fit.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Recent SIGKILL targets by pid. The kernel sends an OOM victim SIGKILL just before it marks it,
/// and `oom/mark_victim` carries only the pid on older kernels, so the victim's cgroup is read
/// from the task here. LRU so that ordinary kills never fill it.
#[map(name = "KILLED")]
pub static KILLED: LruHashMap<u32, KilledTask> = LruHashMap::with_max_entries(1024, 0);

/// Limit writes in flight between kprobe and kretprobe, by `pid_tgid`. A thread writes one file at
/// a time, so a few hundred entries cover every writer on a node; LRU so that an entry whose
/// return was missed cannot fill the map.
#[map(name = "LIMIT_WRITE_ARGS")]
pub static LIMIT_WRITE_ARGS: LruHashMap<u64, LimitWriteArgs> =
    LruHashMap::with_max_entries(1024, 0);

/// Limit writes seen at syscall entry, by `pid_tgid`, until the syscall returns (syscalls mode).
#[map(name = "PENDING_WRITES")]
pub static PENDING_WRITES: LruHashMap<u64, PendingWrite> = LruHashMap::with_max_entries(1024, 0);

/// Kernel struct offsets, set by the loader from the running kernel's BTF.
#[unsafe(no_mangle)]
pub static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::UNKNOWN);
