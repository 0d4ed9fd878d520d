//! nodewarden's eBPF programs. Entry points are thin; each probe family has its own module and
//! all maps live in `maps`.
#![no_std]
#![no_main]

mod bench;
mod cgroups;
mod kernel;
mod limits;
mod maps;
mod oom;
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
