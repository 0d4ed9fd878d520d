//! What the agent knows of the node, kept current by the events: the limits of every cgroup,
//! the OOM counts the limit derivation compares against, the OOM incidents still taking
//! victims, and the Go processes already reported dying. Plain data, no I/O.

pub mod desired;
pub mod go_crashes;
pub mod guarded;
pub mod guards;
pub mod incidents;
pub mod limits;
pub mod memory_events;
pub mod pods;
