//! Helpers shared by the kernel tests: run the agent binary, scrape it, receive its spans.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod contention;
pub mod otlp;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// The agent binary cargo built for these tests.
pub const NODEWARDEN: &str = env!("CARGO_BIN_EXE_nodewarden");

/// Longest an agent may take to attach its programs and serve its metrics. It takes 2 to 5 s
/// under emulation; under arm64 emulation a start now and then runs about ten times slower, the
/// agent alone and on CPU in user space parsing the kernel's BTF (15 s seen for a step that
/// took 1.8 s in the runs around it, and once more than 60 s in CI).
pub const START_LIMIT: Duration = Duration::from_secs(150);

/// A start slower than this is said in the test's output.
const START_NOTED: Duration = Duration::from_secs(20);

/// The capabilities the agents this process starts are limited to, when set (a mask of
/// capability numbers), with `no_new_privs`: what a deployment grants.
static CAPABILITIES: std::sync::Mutex<Option<u64>> = std::sync::Mutex::new(None);

/// From now on, the agents this process starts hold only the capabilities in `mask`.
pub fn restrict_capabilities(mask: u64) {
    *CAPABILITIES.lock().expect("lock") = Some(mask);
}

/// Limits `cmd` as [`restrict_capabilities`] asked, if it did.
pub fn limit(cmd: &mut Command) {
    if let Some(keep) = *CAPABILITIES.lock().expect("lock") {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe and changes only the child's own credentials.
        unsafe { cmd.pre_exec(move || keep_only(keep)) };
    }
}

/// In a child about to exec the agent, as root: every capability outside `keep` leaves the
/// bounding set, so the exec grants root only `keep`; no ambient capabilities; `no_new_privs`.
fn keep_only(keep: u64) -> std::io::Result<()> {
    for cap in 0..64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: plain prctl on the calling process.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            // Past the kernel's last capability.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(e);
        }
    }
    // SAFETY: as above.
    let cleared = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    // SAFETY: as above.
    if cleared != 0 || unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A running `nodewarden run`, killed if the test ends without stopping it.
pub struct Agent {
    pub child: Child,
    pub metrics: SocketAddr,
    log: std::path::PathBuf,
}

impl Agent {
    /// Starts the agent with the default config on a free loopback port and extra environment.
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with(None, env)
    }

    /// Starts the agent with `config` (TOML text; the built-in one when `None`).
    pub fn start_with(config: Option<&str>, env: &[(&str, &str)]) -> Self {
        Self::spawn(config, env, None)
    }

    /// Starts the agent with the default config and its open files limited to `nofile` (soft
    /// and hard: it cannot raise them).
    pub fn start_with_nofile(config: Option<&str>, nofile: u64) -> Self {
        Self::spawn(config, &[], Some(nofile))
    }

    fn spawn(config: Option<&str>, env: &[(&str, &str)], nofile: Option<u64>) -> Self {
        let metrics = free_port();
        let log = std::env::temp_dir().join(format!("nodewarden-test-{}.log", metrics.port()));
        let log_file = std::fs::File::create(&log).expect("create agent log");
        let mut cmd = Command::new(NODEWARDEN);
        limit(&mut cmd);
        let events = Self::events_socket_for(metrics);
        cmd.args(["run", "--metrics-listen", &metrics.to_string()])
            .arg("--events-socket")
            .arg(&events);
        if let Some(text) = config {
            let path =
                std::env::temp_dir().join(format!("nodewarden-test-{}.toml", metrics.port()));
            std::fs::write(&path, text).expect("write test config");
            cmd.arg("--config").arg(path);
        }
        cmd.env("RUST_LOG", "info,nodewarden=debug,agent_ebpf=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt as _;
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = cmd.spawn().expect("spawn nodewarden");
        let mut agent = Self {
            child,
            metrics,
            log,
        };
        agent.wait_for_metrics(START_LIMIT);
        agent
    }

    /// The event socket of the agent serving metrics on `metrics` (one per agent: tests run
    /// several at once).
    pub fn events_socket_for(metrics: SocketAddr) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("nodewarden-test-{}.sock", metrics.port()))
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many lines of the agent's log so far contain `needle` (read line by line: a flooded
    /// log can be large).
    pub fn log_lines_containing(&self, needle: &str) -> usize {
        use std::io::BufRead as _;
        let Ok(file) = std::fs::File::open(&self.log) else {
            return 0;
        };
        std::io::BufReader::new(file)
            .split(b'\n')
            .map_while(Result::ok)
            .filter(|l| String::from_utf8_lossy(l).contains(needle))
            .count()
    }

    fn wait_for_metrics(&mut self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited ({status}) before serving metrics; log:\n{}",
                    self.log()
                );
            }
            if let Some(body) = scrape(self.metrics)
                && body.contains("nodewarden_probe_info")
            {
                if start.elapsed() > START_NOTED {
                    eprintln!(
                        "note: the agent took {:.0?} to serve its metrics",
                        start.elapsed()
                    );
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "agent served no metrics within {limit:?}; log:\n{}\n{}",
            self.log(),
            tasks_of(self.child.id())
        );
    }

    /// The value of the sample whose line starts with `series` (name and labels exactly as
    /// exposed), or `None` when absent.
    pub fn sample(&self, series: &str) -> Option<f64> {
        let body = scrape(self.metrics)?;
        sample(&body, series)
    }

    /// The mode `nodewarden_probe_info` reports for `capability`.
    pub fn probe_mode(&self, capability: &str) -> String {
        let body = scrape(self.metrics).expect("scrape");
        let prefix = format!("nodewarden_probe_info{{capability=\"{capability}\",mode=\"");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(&prefix)?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no nodewarden_probe_info for {capability} in:\n{body}"))
    }

    /// Polls until `series` has `value`, failing with the last scrape after `limit`.
    pub fn wait_for_sample(&self, series: &str, value: f64, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.sample(series) == Some(value) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{series} never reached {value} within {limit:?}\nlast scrape:\n{}\nlog:\n{}",
            scrape(self.metrics).unwrap_or_default(),
            self.log()
        );
    }

    /// Sends SIGTERM and waits (bounded) for the exit status; returns it with the whole log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "agent did not exit within 20 s of SIGTERM; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr")
}

/// `GET /metrics`, returning the body, or `None` when the endpoint is not answering.
pub fn scrape(addr: SocketAddr) -> Option<String> {
    http_get(addr, "/metrics")
}

/// A plain HTTP/1.1 GET; the body of a 200 response, else `None`.
pub fn http_get(addr: SocketAddr, path_and_query: &str) -> Option<String> {
    let (status, body) = http_request(addr, path_and_query, Duration::from_secs(10)).ok()?;
    (status == 200).then_some(body)
}

/// A plain HTTP/1.1 GET that must be answered within `limit` (connecting, sending and reading);
/// the status and body, or why not.
pub fn http_request(
    addr: SocketAddr,
    path_and_query: &str,
    limit: Duration,
) -> Result<(u16, String), String> {
    let start = Instant::now();
    let left = || {
        limit
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {limit:?}"))
    };
    let mut s = TcpStream::connect_timeout(&addr, left()?).map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(left()?))
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut resp = Vec::new();
    let mut buf = [0; 8192];
    loop {
        s.set_read_timeout(Some(left()?))
            .map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read after {:?}: {e}", start.elapsed())),
        }
    }
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete answer: {resp:?}"))?;
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status: {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, dechunk(body)));
    }
    Ok((status, body.to_owned()))
}

/// One request on the agent's event socket (`contention`: the snapshot as one JSON line);
/// the first line of the answer, or `None` when the socket does not answer.
pub fn feed_request(socket: &std::path::Path, request: &str) -> Option<String> {
    use std::io::BufRead as _;
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    writeln!(s, "{request}").ok()?;
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).ok()?;
    Some(answer)
}

/// Joins the chunks of a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the sample line starting with `series ` in an exposition text.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The running kernel's `(major, minor)` version, from /proc/sys/kernel/osrelease.
pub fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Tells the person running the tests that a check was skipped, and why. Written to stderr
/// directly: libtest hides `eprintln!` output of passing tests, and a skip must be visible.
pub fn skip_notice(what: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIP: {what}: {why}");
}

/// Whether `tool` is missing from PATH, said visibly. Only the lab's arm64 guest may lack one
/// (it boots a minimal arm64 userland); elsewhere CI installs them, so a missing one fails.
pub fn skip_without(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()));
    if found {
        return false;
    }
    // Only the arm64 guest may lack a tool; elsewhere its absence is a failure.
    let arm64_guest = std::env::consts::ARCH == "aarch64";
    assert!(
        arm64_guest,
        "{tool} is not installed (`cargo xtask test` installs it)"
    );
    skip_notice(
        &format!("needs {tool}"),
        "not in the arm64 guest's userland",
    );
    true
}

/// Raises this process's open files limit (soft and hard) to at least `n`; tests that open
/// thousands of connections need it. Root may raise the hard limit too.
pub fn raise_own_nofile(n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills in the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) },
        0
    );
    limit.rlim_cur = limit.rlim_cur.max(n);
    limit.rlim_max = limit.rlim_max.max(n);
    // SAFETY: setrlimit reads the struct it is given.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    assert_eq!(
        set,
        0,
        "raising RLIMIT_NOFILE to {n}: {}",
        std::io::Error::last_os_error()
    );
}

/// Whether the test runs as root (kernel tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Kills and reaps a helper process when the test ends, however it ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What each thread of process `pid` is doing (its state, the kernel function it waits in and
/// its kernel stack), and the kernel's last messages: for a start-up that did not finish, where
/// it is stuck.
pub fn tasks_of(pid: u32) -> String {
    use std::fmt::Write as _;
    let mut out = format!("threads of process {pid}:\n");
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(t) => t,
        Err(e) => return format!("{out}/proc/{pid}/task: {e}\n"),
    };
    for task in tasks.flatten() {
        let path = task.path();
        let read =
            |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_else(|e| e.to_string());
        let stat = read("stat");
        // The state is the field after the command name, which ends at the last ')'.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').next())
            .unwrap_or("?");
        let _ = writeln!(
            out,
            "{} {} state {state} wchan {}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        );
    }
    if let Ok(dmesg) = Command::new("dmesg").output() {
        let text = String::from_utf8_lossy(&dmesg.stdout);
        let lines: Vec<&str> = text.lines().collect();
        let _ = writeln!(out, "kernel log, last lines:");
        for l in &lines[lines.len().saturating_sub(30)..] {
            let _ = writeln!(out, "{l}");
        }
    }
    out
}
