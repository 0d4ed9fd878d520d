//! The edge profile (`profile = "edge"`) sizes the kernel's maps down as documented, and the
//! agent attaches what it attaches with the default profile.

use super::{common, privileges, require_vm};
use common::Agent;

/// `BPF_MAP_TYPE_STACK_TRACE` and `BPF_MAP_TYPE_RINGBUF` (include/uapi/linux/bpf.h).
const STACK_TRACE: u32 = 7;
const RINGBUF: u32 = 27;

/// One map the agent holds, from /proc/PID/fdinfo.
#[derive(Debug)]
struct MapInfo {
    map_type: u32,
    max_entries: u64,
    memlock: u64,
}

fn maps(agent: &Agent) -> Vec<MapInfo> {
    let dir = format!("/proc/{}/fdinfo", agent.child.id());
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("fdinfo") {
        let Ok(text) = std::fs::read_to_string(entry.expect("entry").path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(map_type), Some(max_entries), Some(memlock)) =
            (field("map_type:"), field("max_entries:"), field("memlock:"))
        {
            found.push(MapInfo {
                map_type: u32::try_from(map_type).expect("a map type"),
                max_entries,
                memlock,
            });
        }
    }
    found
}

/// The sizes of the maps of `map_type`, sorted.
fn sizes(maps: &[MapInfo], map_type: u32) -> Vec<u64> {
    let mut s: Vec<u64> = maps
        .iter()
        .filter(|m| m.map_type == map_type)
        .map(|m| m.max_entries)
        .collect();
    s.sort_unstable();
    s
}

#[test]
#[ignore = "loads eBPF programs: runs in the VM via `cargo xtask test`"]
fn the_edge_profile_shrinks_the_maps_and_attaches_the_same() {
    require_vm();
    let mut measured = Vec::new();
    for (profile, events_ring, stacks) in
        [("default", 1024 * 1024, 16_384), ("edge", 256 * 1024, 2048)]
    {
        let agent = Agent::start_with(Some(&format!("profile = \"{profile}\"\n")), &[]);
        let held = maps(&agent);
        // The exec ring (64 KiB), aya-log's (128 KiB), and the events ring.
        let mut rings = vec![64 * 1024, 128 * 1024, events_ring];
        rings.sort_unstable();
        assert_eq!(sizes(&held, RINGBUF), rings, "{profile}: {held:?}");
        // Futex and diagnose stacks (a quarter), CPU-sample and off-CPU stacks.
        assert_eq!(
            sizes(&held, STACK_TRACE),
            [stacks / 4, stacks / 4, stacks, stacks],
            "{profile}: {held:?}"
        );
        // Kernels before 6.4 say 0 for a ring's memlock: its size is its data.
        let memlock: u64 = held
            .iter()
            .map(|m| {
                if m.map_type == RINGBUF {
                    m.memlock.max(m.max_entries)
                } else {
                    m.memlock
                }
            })
            .sum();
        let probes = privileges::probes(agent.metrics);
        assert!(
            agent.log().contains(&format!("profile {profile}")),
            "the start-up log names the profile:\n{}",
            agent.log()
        );
        let (status, log) = agent.stop();
        assert!(
            status.success(),
            "{profile}: agent exit {status}; log:\n{log}"
        );
        measured.push((profile, memlock, probes));
    }
    let (default, edge) = (&measured[0], &measured[1]);
    assert_eq!(
        edge.2, default.2,
        "the edge profile attaches what the default attaches"
    );
    eprintln!(
        "kernel memory of the maps: default {} KiB, edge {} KiB",
        default.1 / 1024,
        edge.1 / 1024
    );
    assert!(
        edge.1 + 30 * 1024 * 1024 < default.1,
        "the edge profile's maps take {} bytes, the default's {}",
        edge.1,
        default.1
    );
}
