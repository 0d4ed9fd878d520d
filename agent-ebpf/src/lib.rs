//! Empty library target: lets the agent declare this crate as a build dependency so cargo
//! rebuilds the agent when the programs change (the programs are the `agent-ebpf` binary).
#![no_std]
