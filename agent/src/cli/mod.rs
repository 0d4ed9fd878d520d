//! The commands besides `run`: each reads the running agent, the kernel or a process, and
//! prints for a person.

pub mod bench;
pub mod check;
pub mod desired;
pub mod diagnose;
pub mod events;
pub mod latency;
pub mod restore_bench;
pub mod rules;
pub mod top;
