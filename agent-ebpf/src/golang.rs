//! Go programs' fatal errors ("concurrent map writes"...): uprobes on `runtime.fatal` and
//! `runtime.throw` read the message, a Go string, from the caller's arguments; and the first
//! exec of each executable file is reported, so userspace can attach them to a new Go program
//! before it gets far.

use agent_common::{
    EventKind, ExecEvent, ExecKey, GO_FATAL, GO_MESSAGE_LEN, GO_THROW, GoFatalEvent, LossKind,
    LossReason,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::{raw_tracepoint, uprobe},
    programs::{ProbeContext, RawTracePointContext},
};

use crate::{
    kernel::{current_header, file_key, read_field},
    maps::{EVENTS, EXEC_SEEN, EXECS, Lost, OFFSETS, counted},
};

/// Where the two words of the message (pointer, length) are in the register file at entry, as
/// `u64` indexes of the architecture's `pt_regs`: Go's register ABI passes the first integer
/// arguments in RAX, RBX (amd64), R0, R1 (arm64) or X10, X11 (riscv64, after `epc` and X1..X9);
/// aya's `arg()` follows the C convention.
#[cfg(bpf_target_arch = "x86_64")]
const REG_ARGS: (usize, usize) = (10, 5);
#[cfg(bpf_target_arch = "aarch64")]
const REG_ARGS: (usize, usize) = (0, 1);
#[cfg(bpf_target_arch = "riscv64")]
const REG_ARGS: (usize, usize) = (10, 11);
/// The stack pointer's index: older Go passes arguments on the stack, above the return address
/// (on arm64 and riscv64, above the slot kept for the saved link register).
#[cfg(bpf_target_arch = "x86_64")]
const REG_SP: usize = 19;
#[cfg(bpf_target_arch = "aarch64")]
const REG_SP: usize = 31;
#[cfg(bpf_target_arch = "riscv64")]
const REG_SP: usize = 2;

macro_rules! go_fatal_probe {
    ($($program:ident => $function:expr, $stack_abi:literal);* $(;)?) => {$(
        #[uprobe]
        // `allow`, not `expect`: clippy does not lint code made by a local macro.
        #[allow(clippy::needless_pass_by_value, reason = "the program macro fixes the signature")]
        pub fn $program(ctx: ProbeContext) -> u32 {
            counted(emit(&ctx, $function, $stack_abi));
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

fn emit(ctx: &ProbeContext, function: u32, stack_abi: bool) -> Result<(), Lost> {
    let (ptr, len) = if stack_abi {
        // The caller pushed (ptr, len) above the return address. Unreadable: the event still
        // goes, without its message.
        let sp = reg(ctx, REG_SP);
        // SAFETY: user memory, read through the helper.
        let words: [u64; 2] =
            unsafe { bpf_probe_read_user((sp + 8) as *const [u64; 2]) }.unwrap_or([0; 2]);
        (words[0], words[1])
    } else {
        (reg(ctx, REG_ARGS.0), reg(ctx, REG_ARGS.1))
    };
    let Some(mut entry) = EVENTS.reserve::<GoFatalEvent>(0) else {
        return Err(Lost(LossKind::GoFatal, LossReason::RingFull));
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

/// `sched_process_exec(p, old_pid, bprm)`: a new program runs; the first exec of each file is
/// reported, so userspace checks whether it is Go once per file, however often it runs.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the program macro fixes the signature"
)]
pub fn process_exec(ctx: RawTracePointContext) -> i32 {
    counted(exec(&ctx));
    0
}

fn exec(ctx: &RawTracePointContext) -> Result<(), Lost> {
    let bprm: *const u8 = ctx.arg(2);
    // SAFETY: the tracepoint's `struct linux_binprm *`; offsets come from BTF (the loader
    // attaches this program only when it found them).
    let key =
        unsafe { exec_key(bprm) }.map_err(|_| Lost(LossKind::Exec, LossReason::ReadFailed))?;
    // Reported before: nothing to do. A lookup first: an LRU map's insert takes a free node
    // before it finds the key, the costlier path for the common case.
    // SAFETY: the value is not used.
    if unsafe { EXEC_SEEN.get(key) }.is_some() {
        return Ok(());
    }
    // Being reported by another CPU right now: nothing to do either.
    if EXEC_SEEN.insert(key, 0, u64::from(BPF_NOEXIST)).is_err() {
        return Ok(());
    }
    let Some(mut entry) = EXECS.reserve::<ExecEvent>(0) else {
        // Forgotten again, so that the file's next exec is reported.
        let _ = EXEC_SEEN.remove(key);
        return Err(Lost(LossKind::Exec, LossReason::RingFull));
    };
    // SAFETY: a reserved slot, written whole.
    unsafe {
        entry.as_mut_ptr().write(ExecEvent {
            header: current_header(EventKind::Exec as u32),
            key,
        });
    }
    entry.submit(0);
    Ok(())
}

/// The executable's (device, inode): `bprm->file->f_inode->{i_sb->s_dev, i_ino}`.
///
/// # Safety
/// `bprm` must point to a `struct linux_binprm`.
unsafe fn exec_key(bprm: *const u8) -> Result<ExecKey, i32> {
    let off = OFFSETS.load();
    unsafe {
        let file: *const u8 = read_field(bprm, off.linux_binprm_file)?;
        file_key(&off, file)
    }
}
