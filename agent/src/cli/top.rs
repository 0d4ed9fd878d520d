//! `nodewarden top`: the most contended processes and their hottest futex words with stacks,
//! from the running agent's event socket (root-only: stacks, names and cgroups of every
//! process), refreshed in the terminal.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{model::contention::Snapshot, outputs::feed};

/// How many words, and frames of each, are shown.
const WORDS: usize = 5;
const FRAMES: usize = 8;

/// Prints the view every `interval` (clearing the terminal), or once.
pub fn run(socket: &Path, interval: Duration, once: bool) -> Result<()> {
    loop {
        let snapshot = fetch(socket)?;
        let view = render(&snapshot, socket);
        let mut out = std::io::stdout().lock();
        if !once {
            // Home and clear: the view replaces the previous one.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        out.write_all(view.as_bytes())?;
        out.flush()?;
        if once {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

/// The contention snapshot from the agent's socket.
fn fetch(socket: &Path) -> Result<Snapshot> {
    let s = feed::connect(socket, feed::Request::Contention).with_context(|| {
        format!(
            "connecting to {} (is `nodewarden run` running? the socket is root-only)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One line; read as a line, not to the end: a refused client gets its error line, then
    // possibly a reset (the agent did not read its request).
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .context("reading from the agent")?;
    let value: serde_json::Value =
        serde_json::from_str(&answer).context("decoding the agent's answer")?;
    if let Some(error) = value.get("error").and_then(serde_json::Value::as_str) {
        bail!("the agent refused: {error}");
    }
    serde_json::from_value(value).context("decoding the contention snapshot")
}

/// The view as text, control characters escaped.
fn render(s: &Snapshot, socket: &Path) -> String {
    super::printable(&view(s, socket), true).into_owned()
}

/// [`render`] before control characters are escaped.
fn view(s: &Snapshot, socket: &Path) -> String {
    let mut v = String::new();
    let _ = writeln!(
        v,
        "nodewarden top: futex waits of tracked processes (agent {})\n",
        socket.display()
    );
    let _ = writeln!(
        v,
        "{:>8} {:<16} {:>10} {:>11} {:>10} {:>8}  CGROUP",
        "PID", "COMM", "WOKEN", "WAITED s", "EAGAIN", "TIMEOUT"
    );
    for p in s.processes.iter().take(20) {
        let _ = writeln!(
            v,
            "{:>8} {:<16} {:>10} {:>11.3} {:>10} {:>8}  {}",
            p.pid, p.comm, p.woken, p.wait_seconds, p.eagain, p.timeouts, p.cgroup
        );
    }
    if !s.cpu.is_empty() {
        let _ = writeln!(
            v,
            "\nmost contended: share of thread time on locks (CONT), of on-CPU samples in lock \
             slow paths (LOCK) and the Go map runtime (MAP), of running-or-lock-blocked time \
             asleep on a lock (OFF, processes watched off CPU)"
        );
        let _ = writeln!(
            v,
            "{:>8} {:<16} {:>8} {:>6} {:>6} {:>6} {:>6}  LOCK CALL SITE",
            "PID", "COMM", "SAMPLES", "CONT %", "LOCK %", "MAP %", "OFF %"
        );
        for p in s.cpu.iter().take(10) {
            let off = p.off_cpu.as_ref().map_or_else(
                || "-".to_owned(),
                |o| format!("{:.1}", o.lock_share * 100.0),
            );
            let site = p
                .off_cpu
                .as_ref()
                .and_then(|o| o.lock_call_site.as_deref())
                .or(p.lock_call_site.as_deref())
                .unwrap_or("-");
            let _ = writeln!(
                v,
                "{:>8} {:<16} {:>8} {:>6.1} {:>6.1} {:>6.1} {off:>6}  {site}",
                p.pid,
                p.comm,
                p.samples,
                p.contention * 100.0,
                p.lock_share * 100.0,
                p.map_share * 100.0,
            );
        }
    }
    let _ = writeln!(v, "\nhottest futex words (stack of the longest wait):");
    for h in s.hot.iter().take(WORDS) {
        #[expect(clippy::cast_precision_loss, reason = "figures for people")]
        let (total, max) = (h.total_ns as f64 / 1e9, h.max_ns as f64 / 1e6);
        let _ = writeln!(
            v,
            "  {}[{}] word {:#x}: {} waits, {total:.3} s, longest {max:.2} ms",
            h.comm, h.pid, h.uaddr, h.waits
        );
        for f in h.stack.iter().take(FRAMES) {
            let _ = writeln!(v, "      {f}");
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::contention::{HotLock, OffCpuFigures, ProcessCpu, ProcessWaits};

    #[test]
    fn renders_processes_and_stacks() {
        let s = Snapshot {
            processes: vec![ProcessWaits {
                pid: 7,
                comm: "nw-mutex".into(),
                cgroup: "/a".into(),
                woken: 10,
                wait_seconds: 0.5,
                eagain: 3,
                timeouts: 0,
            }],
            hot: vec![HotLock {
                pid: 7,
                comm: "nw-mutex".into(),
                cgroup: "/a".into(),
                uaddr: 0x1000,
                waits: 10,
                total_ns: 500_000_000,
                max_ns: 2_000_000,
                stack: vec!["__lll_lock_wait+0x1e".into(), "worker+0x42".into()],
            }],
            cpu: vec![ProcessCpu {
                pid: 9,
                comm: "nw-go-rwmutex".into(),
                cgroup: "/a".into(),
                samples: 100,
                lock_share: 0.42,
                map_share: 0.1,
                lock_call_site: Some("main.main.func1".into()),
                off_cpu: Some(OffCpuFigures {
                    watched_seconds: 10.0,
                    cpu_seconds: 1.0,
                    lock_seconds: 1.0,
                    total_seconds: 3.0,
                    lock_share: 0.5,
                    lock_call_site: Some("main.worker".into()),
                }),
                contention: 0.71,
            }],
        };
        let v = render(&s, Path::new("/run/nodewarden/events.sock"));
        assert!(v.contains("       7 nw-mutex"), "{v}");
        assert!(
            v.contains("nw-mutex[7] word 0x1000: 10 waits, 0.500 s, longest 2.00 ms"),
            "{v}"
        );
        assert!(v.contains("      worker+0x42"), "{v}");
        let mut hostile = s.clone();
        hostile.processes[0].comm = "\u{1b}[31mred".into();
        let v = render(&hostile, Path::new("/run/nodewarden/events.sock"));
        assert!(
            !v.chars().any(|c| c.is_control() && c != '\n') && v.contains(r"\u{1b}[31mred"),
            "{v}"
        );
        assert!(
            v.contains(
                "       9 nw-go-rwmutex         100   71.0   42.0   10.0   50.0  main.worker"
            ),
            "{v}"
        );
    }
}
