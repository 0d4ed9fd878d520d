//! The agent as the cost benchmarks (`bench-syscalls`, `bench-idle`, `bench-burst`) run it: a
//! real `nodewarden run` with a configuration made from the built-in one, waited for until its
//! probes are attached, scraped, its CPU time and memory read from /proc, and stopped.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::config::DEFAULT_CONFIG;

/// The built-in configuration with each of `overrides` (TOML) merged in, in turn, table by
/// table.
pub fn config_text(overrides: &[&str]) -> Result<String> {
    let mut base: toml::Table = DEFAULT_CONFIG
        .parse()
        .context("the built-in configuration")?;
    for text in overrides {
        let extra: toml::Table = text
            .parse()
            .with_context(|| format!("overrides {text:?}"))?;
        merge(&mut base, extra);
    }
    Ok(base.to_string())
}

fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `BPF_MAP_TYPE_RINGBUF` (include/uapi/linux/bpf.h).
const BPF_MAP_TYPE_RINGBUF: u64 = 27;

/// A `nodewarden run` started by a benchmark; killed if dropped without [`Running::stop`].
#[derive(Debug)]
pub struct Running {
    child: Child,
    pub metrics: SocketAddr,
    /// Its stderr (the start-up log).
    pub log: PathBuf,
    /// From the spawn to the first scrape that shows the probes attached.
    pub ready_after: Duration,
}

impl Running {
    /// Starts `nodewarden run` (this executable) with `config` (TOML text), its files in `dir`
    /// under `name`, and waits up to `limit` for `/metrics` to show the probes attached. Its
    /// log level is its own default unless `NODEWARDEN_BENCH_RUST_LOG` says otherwise.
    pub fn start(
        dir: &Path,
        name: &str,
        config: &str,
        metrics: SocketAddr,
        limit: Duration,
    ) -> Result<Self> {
        Self::start_exe(&std::env::current_exe()?, dir, name, config, metrics, limit)
    }

    /// [`Self::start`] with the agent `exe` (another build, for a baseline).
    pub fn start_exe(
        exe: &Path,
        dir: &Path,
        name: &str,
        config: &str,
        metrics: SocketAddr,
        limit: Duration,
    ) -> Result<Self> {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let log = dir.join(format!("{name}.log"));
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let start = Instant::now();
        let mut cmd = Command::new(exe);
        // The agent's own default log level (info: a line per limit write), unless asked.
        match std::env::var_os("NODEWARDEN_BENCH_RUST_LOG") {
            Some(level) => cmd.env("RUST_LOG", level),
            None => cmd.env_remove("RUST_LOG"),
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(&path)
            .args(["--metrics-listen", &metrics.to_string()])
            .arg("--events-socket")
            .arg(&socket)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the agent")?;
        let mut running = Self {
            child,
            metrics,
            log,
            ready_after: Duration::ZERO,
        };
        loop {
            if let Ok((body, _)) = scrape(metrics)
                && body.contains("nodewarden_probe_info")
            {
                running.ready_after = start.elapsed();
                return Ok(running);
            }
            if let Some(status) = running.child.try_wait()? {
                bail!(
                    "the agent exited ({status}) before it was ready; see {}",
                    running.log.display()
                );
            }
            if start.elapsed() > limit {
                bail!(
                    "the agent was not ready within {limit:?}; see {}",
                    running.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    /// The agent's CPU time so far (user and system, all threads), in seconds.
    pub fn cpu_seconds(&self) -> Result<f64> {
        crate::enrich::procfs::cpu_seconds(self.child.id()).context("the agent has exited")
    }

    /// Each thread's CPU time so far (user and system), in seconds, summed by thread name:
    /// where an idle agent's CPU goes.
    pub fn threads_cpu_seconds(&self) -> Result<BTreeMap<String, f64>> {
        let mut by_name = BTreeMap::new();
        for task in procfs::process::Process::new(self.pid())?.tasks()? {
            // A thread that exited meanwhile has no stat any more.
            let Ok(stat) = task.and_then(|t| t.stat()) else {
                continue;
            };
            *by_name.entry(stat.comm.clone()).or_insert(0.0) +=
                crate::enrich::procfs::stat_cpu_seconds(&stat);
        }
        Ok(by_name)
    }

    /// The agent's resident anonymous memory by kind of mapping, in bytes: the `[heap]` (the
    /// main arena), other anonymous mappings (threads' arenas, large allocations, stacks), and
    /// each of the largest of those: where its own memory is.
    pub fn anon_mappings(&self) -> Result<AnonMappings> {
        let maps = procfs::process::Process::new(self.pid())?.smaps()?;
        let mut out = AnonMappings::default();
        for map in maps {
            let anon = map.extension.map.get("Anonymous").copied().unwrap_or(0);
            if anon == 0 {
                continue;
            }
            match &map.pathname {
                procfs::process::MMapPath::Heap => out.heap_bytes += anon,
                procfs::process::MMapPath::Anonymous => {
                    out.other_bytes += anon;
                    out.largest.push(anon);
                }
                _ => out.file_backed_bytes += anon,
            }
        }
        out.largest.sort_unstable_by(|a, b| b.cmp(a));
        out.largest.truncate(8);
        Ok(out)
    }

    /// The agent's resident memory and the anonymous part of it, in bytes.
    pub fn memory(&self) -> Result<(u64, u64)> {
        let status = procfs::process::Process::new(self.pid())?.status()?;
        Ok((
            status.vmrss.unwrap_or(0) * 1024,
            status.rssanon.unwrap_or(0) * 1024,
        ))
    }

    /// The kernel memory of the agent's eBPF maps: the sum of `memlock` over the map fds it
    /// holds (`/proc/PID/fdinfo`), which the kernel estimates from each map's size, and each
    /// ring buffer's size.
    pub fn maps_memory(&self) -> Result<u64> {
        let dir = format!("/proc/{}/fdinfo", self.pid());
        let mut total = 0;
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
            // An fd closed meanwhile has no info any more.
            let Ok(info) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            let Some(map_type) = field("map_type:") else {
                continue;
            };
            let memlock = field("memlock:").unwrap_or(0);
            // Kernels before 6.4 say 0 for a ring buffer's memlock: its size is its data.
            total += if map_type == BPF_MAP_TYPE_RINGBUF {
                memlock.max(field("max_entries:").unwrap_or(0))
            } else {
                memlock
            };
        }
        Ok(total)
    }

    /// SIGTERM, and the exit waited for (30 s, then SIGKILL).
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("the agent exited {status}; see {}", self.log.display());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "the agent did not stop within 30 s of SIGTERM; see {}",
            self.log.display()
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET /metrics` over HTTP/1.0 (the whole body, no chunks): the body and how long it took.
pub fn scrape(addr: SocketAddr) -> Result<(String, Duration)> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let took = start.elapsed();
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.0 200") || head.contains(" 200 ") => {
            Ok((body.to_owned(), took))
        }
        _ => bail!(
            "no metrics: {:?}",
            response.chars().take(200).collect::<String>()
        ),
    }
}

/// The sum of the samples of `name` whose labels contain every one of `labels` (`key="v"`).
pub fn sum(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            (series.is_empty() || series.starts_with('{'))
                .then_some(())
                .filter(|()| labels.iter().all(|want| series.contains(want)))?;
            value.parse::<f64>().ok()
        })
        .sum()
}

/// The samples (lines that are not comments) in an exposition text.
pub fn series(body: &str) -> usize {
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// Each capability's mode as `nodewarden_probe_info` says.
pub fn modes(body: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("nodewarden_probe_info{capability=\"")?;
            let (capability, rest) = rest.split_once('"')?;
            let mode = rest.strip_prefix(",mode=\"")?.split('"').next()?;
            Some((capability.to_owned(), mode.to_owned()))
        })
        .collect()
}

/// Refuses unless cgroup v2 with the memory controller is at /sys/fs/cgroup and the caller says
/// it runs in the kernel lab's VM: the benchmarks that create cgroups never touch a host's.
/// Where an agent's anonymous memory is resident, in bytes.
#[derive(Debug, Default, serde::Serialize)]
pub struct AnonMappings {
    pub heap_bytes: u64,
    pub other_bytes: u64,
    /// The rest: copy-on-write pages of files (the binary's data), the main thread's stack.
    pub file_backed_bytes: u64,
    /// The largest anonymous mappings besides the heap.
    pub largest: Vec<u64>,
}

pub fn require_vm() -> Result<()> {
    if std::env::var_os("NODEWARDEN_IN_VM").is_none() {
        bail!("refusing to create cgroups outside the kernel lab's VM (NODEWARDEN_IN_VM unset)");
    }
    let controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .context("no cgroup v2 at /sys/fs/cgroup")?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        bail!("no memory controller at /sys/fs/cgroup: {controllers}");
    }
    Ok(())
}

/// Creates `parent` (memory and pids enabled for its children) and `count` children in it
/// named `c00000`..., each with `memory.max` set; returns their paths.
pub fn create_cgroups(parent: &Path, count: usize) -> Result<Vec<PathBuf>> {
    let root = Path::new("/sys/fs/cgroup");
    std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids")
        .context("enabling memory and pids at the root")?;
    if !parent.exists() {
        std::fs::create_dir(parent).with_context(|| format!("mkdir {}", parent.display()))?;
    }
    std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids")
        .with_context(|| format!("enabling memory and pids in {}", parent.display()))?;
    (0..count)
        .map(|i| {
            let cg = parent.join(format!("c{i:05}"));
            if !cg.exists() {
                std::fs::create_dir(&cg).with_context(|| format!("mkdir {}", cg.display()))?;
                std::fs::write(cg.join("memory.max"), "1073741824")
                    .with_context(|| format!("{}/memory.max", cg.display()))?;
            }
            Ok(cg)
        })
        .collect()
}

/// Removes the children of `parent` and `parent` (best effort).
pub fn remove_cgroups(parent: &Path) {
    if let Ok(entries) = std::fs::read_dir(parent) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(parent);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_built_in_configuration_written_back_is_the_same() {
        let text = config_text(&[]).expect("text");
        let written = Config::parse(&text, "written").expect("parses");
        let built_in = Config::default_config().expect("built in");
        assert_eq!(format!("{written:?}"), format!("{built_in:?}"));
    }

    #[test]
    fn overrides_merge_table_by_table() {
        let text = config_text(&[
            "[contention]\nsample_hz = 0\n",
            "[contention]\noff_cpu = false\n[probes]\nlimit_writes = \"inotify\"\n",
        ])
        .expect("text");
        let c = Config::parse(&text, "merged").expect("parses");
        assert_eq!(c.contention.sample_hz, 0);
        assert!(!c.contention.off_cpu);
        assert!(c.contention.futex_waits, "kept from the built-in one");
        assert_eq!(
            c.probes.limit_writes,
            crate::config::LimitWriteMode::Inotify
        );
    }

    #[test]
    fn samples_are_summed_by_labels() {
        let body = "# HELP x\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\n\
                    x_total_other{a=\"1\"} 100\ny 1\n\
                    nodewarden_probe_info{capability=\"futex_waits\",mode=\"fexit\"} 1\n";
        assert!((sum(body, "x_total", &["a=\"1\""]) - 7.0).abs() < f64::EPSILON);
        assert!((sum(body, "x_total", &["b=\"3\""]) - 4.0).abs() < f64::EPSILON);
        assert!((sum(body, "y", &[]) - 1.0).abs() < f64::EPSILON);
        assert_eq!(series(body), 5);
        assert_eq!(modes(body)["futex_waits"], "fexit");
    }
}
