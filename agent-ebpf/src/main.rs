//! nodewarden's eBPF programs. Entry points are thin; each probe family has its own module and
//! all maps live in `maps`.
#![no_std]
#![no_main]
// The BPF target has no atomic read-modify-write in `core::sync::atomic`; the intrinsic is what
// those methods call (see `maps::pending_add`). Enabled by RUSTC_BOOTSTRAP for this crate only.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "core_intrinsics, for atomic_xadd")]

mod bench;
mod cgroups;
mod diagnose;
mod futex;
mod golang;
mod guard;
mod kernel;
mod limits;
mod maps;
mod offcpu;
mod oom;
mod sampling;
mod syscalls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
