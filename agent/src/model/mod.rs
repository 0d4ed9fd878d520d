//! Plain types that flow through the agent, with no I/O and no imports of our other modules:
//! decoded kernel events, limit values, cgroup identity, the records the outputs consume,
//! contention snapshots, and how each probe is attached.

pub mod cache;
pub mod cgroup;
pub mod contention;
pub mod event;
pub mod guard;
pub mod heal;
pub mod label;
pub mod limit;
pub mod loss;
pub mod pattern;
pub mod pods;
pub mod probe;
pub mod record;
pub mod trust;
pub mod update;
