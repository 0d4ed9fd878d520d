//! QEMU's human monitor on a Unix socket, asked what a silent guest is doing before it is killed.
//!
//! A guest that prints nothing for minutes is either spinning (a vCPU stuck in the kernel) or
//! idle (every task waiting, e.g. on the 9p share every command is read from). The vCPUs'
//! instruction pointers, sampled twice, tell which; on `x86_64` the guest kernel is also asked by
//! `SysRq` keys on its PS/2 keyboard (the PC board has one even with `-nodefaults`) for its
//! blocked tasks and every CPU's backtrace, at a console log level that lets them through.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The prompt after every answer (followed by a space).
const PROMPT: &str = "(qemu)";

/// How long one answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// `SysRq` keys, in order: console log level 9 (the guest boots with `loglevel=1`), the tasks in
/// uninterruptible sleep with their stacks (stuck I/O), a backtrace of every CPU (a spin), then
/// every task (one waiting interruptibly, e.g. on a console that stopped taking output).
const SYSRQ_KEYS: [&str; 4] = ["9", "w", "l", "t"];

/// The monitor socket of one QEMU.
pub struct Monitor {
    path: PathBuf,
}

impl Monitor {
    /// A monitor at `path` (QEMU creates the socket).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// QEMU's `-monitor` value: a socket QEMU listens on without waiting for a client.
    pub fn qemu_arg(&self) -> String {
        format!("unix:{},server=on,wait=off", self.path.display())
    }

    /// Every vCPU's instruction pointer and privilege level (and on `x86_64` whether it is
    /// halted), sampled twice a second apart. Then, when `sysrq`, the `SysRq` keys; what the
    /// guest prints in answer comes on its console, with the kernel's own symbols.
    pub fn diagnose(&self, sysrq: bool) -> Result<Vec<String>> {
        let mut conn = Connection::open(&self.path)?;
        let mut lines = Vec::new();
        for sample in 1..=2 {
            if sample == 2 {
                std::thread::sleep(Duration::from_secs(1));
            }
            let answer = conn.ask("info registers -a")?;
            lines.extend(
                cpu_lines(&answer)
                    .into_iter()
                    .map(|l| format!("sample {sample}: {l}")),
            );
        }
        if sysrq {
            for key in SYSRQ_KEYS {
                conn.ask(&format!("sendkey alt-sysrq-{key}"))?;
                // One key at a time: the guest handles each as the keyboard interrupt comes.
                std::thread::sleep(Duration::from_millis(500));
            }
            lines.push(format!(
                "sent SysRq {} (log level 9, blocked tasks, CPU backtraces, all tasks)",
                SYSRQ_KEYS.join(", ")
            ));
        }
        Ok(lines)
    }
}

/// A connected monitor, past its banner.
struct Connection {
    stream: UnixStream,
}

impl Connection {
    fn open(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("connecting to QEMU's monitor at {}", path.display()))?;
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        let mut conn = Self { stream };
        conn.read_to_prompt()?;
        Ok(conn)
    }

    /// Sends one command and returns what came before the next prompt.
    fn ask(&mut self, command: &str) -> Result<String> {
        self.stream
            .write_all(format!("{command}\n").as_bytes())
            .with_context(|| format!("sending {command:?} to QEMU's monitor"))?;
        self.read_to_prompt()
            .with_context(|| format!("QEMU's answer to {command:?}"))
    }

    fn read_to_prompt(&mut self) -> Result<String> {
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // The prompt ends in a space; the answer before it may end in anything.
        while !String::from_utf8_lossy(&got).trim_end().ends_with(PROMPT) {
            if start.elapsed() > ANSWER_TIMEOUT {
                bail!("no prompt within {} s", ANSWER_TIMEOUT.as_secs());
            }
            match self.stream.read(&mut buf)? {
                0 => bail!("the monitor closed"),
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    }
}

/// The lines of an `info registers -a` answer that say which CPU, where it is and whether it
/// is halted: `CPU#N`, x86's `RIP=… HLT=…`, arm64's `PC=…` and riscv64's `pc …` (written
/// `PC=…` here), the CPU's name before each.
fn cpu_lines(answer: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cpu = "";
    for line in answer
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_whitespace() || c.is_control()))
    {
        if line.starts_with("CPU#") {
            cpu = line;
        } else if line.starts_with("RIP=") || line.starts_with("PC=") {
            let fields: Vec<&str> = line
                .split_whitespace()
                .filter(|f| {
                    f.starts_with("RIP=")
                        || f.starts_with("PC=")
                        || f.starts_with("CPL=")
                        || f.starts_with("HLT=")
                })
                .collect();
            lines.push(format!("{cpu} {}", fields.join(" ")));
        } else if let Some(pc) = line.strip_prefix("pc ") {
            lines.push(format!("{cpu} PC={}", pc.trim()));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lines_keep_the_cpu_its_address_and_halt_state() {
        let answer = "info registers -a\r\n\r\nCPU#0\r\nRAX=0000000000000000 RBX=ffffffff82a0c940\r\n\
            RIP=ffffffff81c3b4c5 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\
            ES =0000 0000000000000000 ffffffff 00c00000\r\n\r\nCPU#1\r\n\
            RIP=00007f0012345678 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0\r\n(qemu) ";
        assert_eq!(
            cpu_lines(answer),
            [
                "CPU#0 RIP=ffffffff81c3b4c5 CPL=0 HLT=1",
                "CPU#1 RIP=00007f0012345678 CPL=3 HLT=0"
            ]
        );
        let arm = "CPU#0\r\n PC=ffff800080012344 X00=0000000000000000 X01=0000000000000001\r\n";
        assert_eq!(cpu_lines(arm), ["CPU#0 PC=ffff800080012344"]);
        let riscv = "CPU#1\r\n V      =   0\r\n pc       ffffffff80a1b2c4\r\n\
            mhartid  0000000000000001\r\n";
        assert_eq!(cpu_lines(riscv), ["CPU#1 PC=ffffffff80a1b2c4"]);
    }
}
