//! Go programs' fatal errors ("concurrent map writes"...): uprobes on `runtime.fatal` and
//! `runtime.throw` read the message, a Go string, from the caller's arguments; and every exec
//! is reported, so userspace can attach them to a new Go program before it gets far.

use agent_common::{EventKind, GO_FATAL, GO_MESSAGE_LEN, GO_THROW, GoFatalEvent};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::{raw_tracepoint, uprobe},
    programs::{ProbeContext, RawTracePointContext},
};

use crate::{kernel::current_header, maps::EVENTS};

/// Where the two words of the message (pointer, length) are in the register file at entry, as
/// `u64` indexes of the architecture's `pt_regs`: Go's register ABI passes the first integer
/// arguments in RAX, RBX (amd64) or R0, R1 (arm64); aya's `arg()` follows the C convention.
#[cfg(bpf_target_arch = "x86_64")]
const REG_ARGS: (usize, usize) = (10, 5);
#[cfg(bpf_target_arch = "aarch64")]
const REG_ARGS: (usize, usize) = (0, 1);
/// The stack pointer's index: older Go passes arguments on the stack, above the return address.
#[cfg(bpf_target_arch = "x86_64")]
const REG_SP: usize = 19;
#[cfg(bpf_target_arch = "aarch64")]
const REG_SP: usize = 31;

macro_rules! go_fatal_probe {
    ($($program:ident => $function:expr, $stack_abi:literal);* $(;)?) => {$(
        #[uprobe]
        // `allow`, not `expect`: clippy does not lint code made by a local macro.
        #[allow(clippy::needless_pass_by_value, reason = "the program macro fixes the signature")]
        pub fn $program(ctx: ProbeContext) -> u32 {
            let _ = emit(&ctx, $function, $stack_abi);
            0
        }
    )*};
}

go_fatal_probe! {
    go_fatal_regs => GO_FATAL, false;
    go_throw_regs => GO_THROW, false;
    go_fatal_stack => GO_FATAL, true;
    go_throw_stack => GO_THROW, true;
}

/// One `u64` of the probed task's registers.
#[inline]
fn reg(ctx: &ProbeContext, index: usize) -> u64 {
    // SAFETY: `index` is inside the architecture's `pt_regs`, which the uprobe's ctx points to.
    unsafe { ctx.as_ptr().cast::<u64>().add(index).read() }
}

fn emit(ctx: &ProbeContext, function: u32, stack_abi: bool) -> Result<(), i32> {
    let (ptr, len) = if stack_abi {
        // The caller pushed (ptr, len) above the return address.
        let sp = reg(ctx, REG_SP);
        // SAFETY: user memory, read through the helper.
        let words: [u64; 2] = unsafe { bpf_probe_read_user((sp + 8) as *const [u64; 2])? };
        (words[0], words[1])
    } else {
        (reg(ctx, REG_ARGS.0), reg(ctx, REG_ARGS.1))
    };
    let Some(mut entry) = EVENTS.reserve::<GoFatalEvent>(0) else {
        return Err(-1);
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved ring buffer slot; every field is written before submit.
    unsafe {
        (*event).header = current_header(EventKind::GoFatal as u32);
        (*event).function = function;
        (*event).len = 0;
        (*event).message = [0; GO_MESSAGE_LEN];
        // Capped, and masked so older verifiers see the bound.
        #[expect(
            clippy::cast_possible_truncation,
            reason = "at most GO_MESSAGE_LEN after min"
        )]
        let n = (len.min(GO_MESSAGE_LEN as u64) as usize) & (GO_MESSAGE_LEN * 2 - 1);
        let n = n.min(GO_MESSAGE_LEN);
        let message = &mut (*event).message;
        if bpf_probe_read_user_buf(ptr as *const u8, &mut message[..n]).is_ok() {
            #[expect(clippy::cast_possible_truncation, reason = "n <= GO_MESSAGE_LEN")]
            let n = n as u32;
            (*event).len = n;
        }
    }
    entry.submit(0);
    Ok(())
}

/// `sched_process_exec`: a new program runs; userspace checks whether it is Go.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn process_exec(ctx: RawTracePointContext) -> i32 {
    let _ = ctx;
    if let Some(mut entry) = EVENTS.reserve::<agent_common::EventHeader>(0) {
        // SAFETY: a reserved slot, written whole.
        unsafe {
            entry
                .as_mut_ptr()
                .write(current_header(EventKind::Exec as u32));
        }
        entry.submit(0);
    }
    0
}
