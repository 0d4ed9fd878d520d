//! Empty programs on the write syscall tracepoints: the baseline `cargo xtask bench` measures
//! the syscalls mode against (what merely having a program on those hooks costs).

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

#[tracepoint(category = "syscalls", name = "sys_enter_write")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn bench_empty_enter(ctx: TracePointContext) -> u32 {
    let _ = ctx;
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_write")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn bench_empty_exit(ctx: TracePointContext) -> u32 {
    let _ = ctx;
    0
}
