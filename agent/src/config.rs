//! The agent's configuration: parsed and validated whole before anything touches the kernel.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::model::pattern::Pattern;

/// The configuration `nodewarden run` uses when given none: observe only, metrics on loopback.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// Why a configuration was refused. Every problem found is listed, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("{origin}: invalid configuration:\n  - {}", problems.join("\n  - "))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

/// What the agent does about what it sees. Only `observe` exists until the rule engine lands.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Watch, count and trace; never write a cgroup.
    Observe,
}

/// How limit writes are probed: `auto` picks the best the kernel allows; the others force a mode
/// (for tests, and for kernels whose preferred probe misbehaves).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LimitWriteMode {
    #[default]
    Auto,
    Fexit,
    Kprobe,
    /// Tracepoints on write, pwrite64 and writev (for kernels without fexit and kprobes).
    Syscalls,
    /// No BPF: inotify on the cgroup directories plus polling; the writer is unknown.
    Inotify,
}

/// How the limit an OOM kill hit is found: `auto` probes `out_of_memory` where the kernel
/// allows it; `memory-events` forces the userspace derivation (for tests, and kernels whose
/// probes misbehave).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OomLimitMode {
    #[default]
    Auto,
    Fentry,
    Kprobe,
    /// From the ancestors' `memory.events.local` counters, read when the kill is seen.
    MemoryEvents,
}

/// Probe choices.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbesConfig {
    #[serde(default)]
    pub limit_writes: LimitWriteMode,
    #[serde(default)]
    pub oom_limits: OomLimitMode,
}

/// Lock contention: which processes' futex waits are measured, and how much is kept.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContentionConfig {
    /// Measure futex waits at all.
    #[serde(default = "yes")]
    pub futex_waits: bool,
    /// Which processes: empty for all, else any of `comm:NAME`, `exe:PATH`, `cgroup:GLOB`,
    /// `pod:NAMESPACE/NAME`, `map-heavy`.
    #[serde(default)]
    pub select: Vec<String>,
    /// At most this many processes are tracked at once (the kernel map's size).
    #[serde(default = "default_max_processes")]
    pub max_processes: u32,
    /// A wait at least this long (microseconds) records its user stack.
    #[serde(default = "default_stack_threshold_us")]
    pub stack_threshold_us: u64,
    /// CPU samples per second per CPU, for lock and map CPU shares (0: off).
    #[serde(default = "default_sample_hz")]
    pub sample_hz: u64,
    /// Measure the off-CPU time (lock sleeps) of the selected and the lock- or map-heavy
    /// processes.
    #[serde(default = "yes")]
    pub off_cpu: bool,
    /// At most this many processes are watched off CPU at once.
    #[serde(default = "default_off_cpu_max_processes")]
    pub off_cpu_max_processes: u32,
}

impl Default for ContentionConfig {
    fn default() -> Self {
        Self {
            futex_waits: true,
            select: Vec::new(),
            max_processes: default_max_processes(),
            stack_threshold_us: default_stack_threshold_us(),
            sample_hz: default_sample_hz(),
            off_cpu: true,
            off_cpu_max_processes: default_off_cpu_max_processes(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_off_cpu_max_processes() -> u32 {
    16
}

fn default_max_processes() -> u32 {
    1024
}

fn default_stack_threshold_us() -> u64 {
    1000
}

fn default_sample_hz() -> u64 {
    49
}

/// One process selector of `contention.select`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Comm(String),
    Exe(PathBuf),
    /// A glob on the cgroup path (`*`, `?`).
    Cgroup(Pattern),
    /// Globs on a Kubernetes pod's namespace and name (`pod:NAMESPACE/NAME`).
    Pod {
        namespace: Pattern,
        pod: Pattern,
    },
    /// Processes whose sampled CPU shows them heavy in the Go map runtime (`map-heavy`).
    MapHeavy,
}

/// Why a `contention.select` entry is not a selector.
#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    #[error("contention.select {0:?}: expected pod:NAMESPACE/NAME (globs allowed)")]
    Pod(String),
    #[error("contention.select {select:?}: {glob:?} is not a glob: {source}")]
    Glob {
        select: String,
        glob: String,
        source: globset::Error,
    },
    #[error(
        "contention.select {0:?}: expected comm:NAME (under 16 bytes), exe:/PATH, cgroup:/GLOB, \
         pod:NAMESPACE/NAME or map-heavy"
    )]
    Unknown(String),
}

impl Selector {
    fn parse(s: &str) -> Result<Self, SelectorError> {
        let glob = |g: &str| {
            Pattern::new(g).map_err(|source| SelectorError::Glob {
                select: s.to_owned(),
                glob: g.to_owned(),
                source,
            })
        };
        match s.split_once(':') {
            Some(("comm", c)) if !c.is_empty() && c.len() < 16 => Ok(Self::Comm(c.to_owned())),
            Some(("exe", p)) if p.starts_with('/') => Ok(Self::Exe(PathBuf::from(p))),
            Some(("cgroup", g)) if g.starts_with('/') => Ok(Self::Cgroup(glob(g)?)),
            Some(("pod", p)) => match p.split_once('/') {
                Some((namespace, pod)) if !namespace.is_empty() && !pod.is_empty() => {
                    Ok(Self::Pod {
                        namespace: glob(namespace)?,
                        pod: glob(pod)?,
                    })
                }
                _ => Err(SelectorError::Pod(s.to_owned())),
            },
            None if s == "map-heavy" => Ok(Self::MapHeavy),
            _ => Err(SelectorError::Unknown(s.to_owned())),
        }
    }
}

/// Where metrics are served.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`/metrics`).
    pub listen: String,
    /// How long the series of a removed cgroup stay after its removal, in seconds: long enough
    /// for Prometheus to scrape its last counts.
    #[serde(default = "default_deleted_cgroup_ttl_s")]
    pub deleted_cgroup_ttl_s: u64,
}

fn default_deleted_cgroup_ttl_s() -> u64 {
    3600
}

/// The whole configuration file, as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mode: Mode,
    metrics: MetricsConfig,
    /// Longest time spent draining events and flushing traces at shutdown, in milliseconds.
    shutdown_drain_ms: u64,
    /// The cgroup v2 mount; empty means "find it in /proc/self/mountinfo".
    #[serde(default)]
    cgroup_root: String,
    #[serde(default)]
    probes: ProbesConfig,
    #[serde(default)]
    contention: ContentionConfig,
    /// Unix socket of the live event feed (`nodewarden events`); empty disables it.
    #[serde(default = "default_events_socket")]
    events_socket: String,
    /// Where kubelet keeps `containers/` and `pods/` logs (names for pod UIDs, container IDs).
    #[serde(default = "default_kubelet_log_dir")]
    kubelet_log_dir: String,
}

fn default_kubelet_log_dir() -> String {
    crate::enrich::kubelet::DEFAULT_LOG_DIR.to_owned()
}

fn default_events_socket() -> String {
    DEFAULT_EVENTS_SOCKET.to_owned()
}

/// Where `nodewarden run` serves, and `nodewarden events` reads, the event feed by default.
pub const DEFAULT_EVENTS_SOCKET: &str = "/run/nodewarden/events.sock";

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    pub metrics_listen: SocketAddr,
    pub shutdown_drain: Duration,
    pub cgroup_root: Option<PathBuf>,
    pub probes: ProbesConfig,
    pub contention: ContentionConfig,
    /// Parsed `contention.select`; empty for every process.
    pub selectors: Vec<Selector>,
    /// How long a removed cgroup's series stay.
    pub deleted_cgroup_ttl: Duration,
    pub events_socket: Option<PathBuf>,
    pub kubelet_log_dir: PathBuf,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The embedded default configuration.
    pub fn default_config() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG, "embedded default config")
    }

    /// Parses and validates `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source: Box::new(source),
        })?;
        let mut problems = Vec::new();
        let metrics_listen = raw
            .metrics
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                problems.push(format!(
                    "metrics.listen = {:?}: not an address:port ({e})",
                    raw.metrics.listen
                ));
            })
            .ok();
        if raw.shutdown_drain_ms == 0 || raw.shutdown_drain_ms > 60_000 {
            problems.push(format!(
                "shutdown_drain_ms = {}: must be between 1 and 60000",
                raw.shutdown_drain_ms
            ));
        }
        let cgroup_root = (!raw.cgroup_root.is_empty()).then(|| PathBuf::from(&raw.cgroup_root));
        let events_socket =
            (!raw.events_socket.is_empty()).then(|| PathBuf::from(&raw.events_socket));
        if events_socket.as_ref().is_some_and(|p| !p.is_absolute()) {
            problems.push(format!(
                "events_socket = {:?}: must be an absolute path (or empty to disable)",
                raw.events_socket
            ));
        }
        if raw.metrics.deleted_cgroup_ttl_s == 0 || raw.metrics.deleted_cgroup_ttl_s > 7 * 86_400 {
            problems.push(format!(
                "metrics.deleted_cgroup_ttl_s = {}: must be between 1 and 604800 (a week)",
                raw.metrics.deleted_cgroup_ttl_s
            ));
        }
        let selectors: Vec<Selector> = raw
            .contention
            .select
            .iter()
            .filter_map(|s| {
                Selector::parse(s)
                    .map_err(|e| problems.push(e.to_string()))
                    .ok()
            })
            .collect();
        if selectors.contains(&Selector::MapHeavy) && raw.contention.sample_hz == 0 {
            problems.push(
                "contention.select \"map-heavy\" needs CPU samples (contention.sample_hz > 0)"
                    .to_owned(),
            );
        }
        if raw.contention.sample_hz > 1000 {
            problems.push(format!(
                "contention.sample_hz = {}: at most 1000 (0 turns sampling off)",
                raw.contention.sample_hz
            ));
        }
        if raw.contention.max_processes == 0 || raw.contention.max_processes > 65_536 {
            problems.push(format!(
                "contention.max_processes = {}: must be between 1 and 65536",
                raw.contention.max_processes
            ));
        }
        if raw.contention.off_cpu_max_processes == 0 || raw.contention.off_cpu_max_processes > 1024
        {
            problems.push(format!(
                "contention.off_cpu_max_processes = {}: must be between 1 and 1024",
                raw.contention.off_cpu_max_processes
            ));
        }
        if let Some(root) = &cgroup_root
            && !root.is_absolute()
        {
            problems.push(format!(
                "cgroup_root = {:?}: must be an absolute path",
                raw.cgroup_root
            ));
        }
        match metrics_listen {
            Some(metrics_listen) if problems.is_empty() => Ok(Self {
                mode: raw.mode,
                metrics_listen,
                shutdown_drain: Duration::from_millis(raw.shutdown_drain_ms),
                cgroup_root,
                probes: raw.probes,
                contention: raw.contention,
                selectors,
                deleted_cgroup_ttl: Duration::from_secs(raw.metrics.deleted_cgroup_ttl_s),
                events_socket,
                kubelet_log_dir: PathBuf::from(raw.kubelet_log_dir),
            }),
            _ => Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_observe_on_loopback() {
        let c = Config::default_config().expect("embedded config parses");
        assert_eq!(c.mode, Mode::Observe);
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:9717");
        assert!(c.cgroup_root.is_none());
        assert_eq!(c.probes, ProbesConfig::default());
        assert_eq!(c.contention, ContentionConfig::default());
        assert_eq!(c.deleted_cgroup_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn probe_modes_can_be_forced() {
        let base =
            "mode = \"observe\"\nshutdown_drain_ms = 100\n[metrics]\nlisten = \"127.0.0.1:1\"\n";
        let c = Config::parse(&format!("{base}[probes]\nlimit_writes = \"kprobe\"\n"), "t")
            .expect("valid");
        assert_eq!(c.probes.limit_writes, LimitWriteMode::Kprobe);
        let c = Config::parse(
            &format!("{base}[probes]\noom_limits = \"memory-events\"\n"),
            "t",
        )
        .expect("valid");
        assert_eq!(c.probes.oom_limits, OomLimitMode::MemoryEvents);
        let err = Config::parse(&format!("{base}[probes]\nlimit_writes = \"uprobe\"\n"), "t")
            .expect_err("no such mode");
        assert!(err.to_string().contains("uprobe"), "{err}");
    }

    #[test]
    fn contention_selectors() {
        let base =
            "mode = \"observe\"\nshutdown_drain_ms = 100\n[metrics]\nlisten = \"127.0.0.1:1\"\n";
        let c = Config::parse(
            &format!("{base}[contention]\nselect = [\"comm:nw-mutex\", \"exe:/usr/bin/x\", \"cgroup:/kubepods*\", \"pod:shop/cart-*\", \"map-heavy\"]\n"),
            "t",
        )
        .expect("valid");
        let glob = |g: &str| Pattern::new(g).expect("glob");
        assert_eq!(
            c.selectors,
            [
                Selector::Comm("nw-mutex".into()),
                Selector::Exe("/usr/bin/x".into()),
                Selector::Cgroup(glob("/kubepods*")),
                Selector::Pod {
                    namespace: glob("shop"),
                    pod: glob("cart-*")
                },
                Selector::MapHeavy,
            ]
        );
        assert!(c.contention.futex_waits);
        assert!(c.contention.off_cpu);
        assert_eq!(c.contention.off_cpu_max_processes, 16);
        let err = Config::parse(
            &format!(
                "{base}[contention]\nselect = [\"pid:1\", \"exe:relative\", \"pod:nons\", \"pod:/x\", \"cgroup:/a[\", \"map-heavy\"]\nmax_processes = 0\nsample_hz = 0\noff_cpu_max_processes = 0\n"
            ),
            "t",
        )
        .expect_err("invalid");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}");
        };
        // Two bad selectors, two malformed pods, a bad glob, map-heavy without samples, and
        // two caps.
        assert_eq!(problems.len(), 8, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("is not a glob")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("map-heavy") && p.contains("sample_hz")),
            "{problems:?}"
        );
    }

    #[test]
    fn shipped_configs_are_valid() {
        let k8s = include_str!("../../deploy/kubernetes/config.toml");
        let c = Config::parse(k8s, "deploy/kubernetes/config.toml").expect("valid");
        assert_eq!(c.metrics_listen.port(), 9717);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            mode = "observe"
            shutdown_drain_ms = 0
            cgroup_root = "relative/path"
            [metrics]
            listen = "nowhere"
            deleted_cgroup_ttl_s = 0
        "#;
        let err = Config::parse(text, "t").expect_err("invalid config");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err}");
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("metrics.listen"));
        assert!(problems[1].contains("shutdown_drain_ms"));
        assert!(problems[2].contains("deleted_cgroup_ttl_s"));
        assert!(problems[3].contains("cgroup_root"));
    }

    #[test]
    fn unknown_keys_and_modes_are_refused() {
        let base = "shutdown_drain_ms = 100\n[metrics]\nlisten = \"127.0.0.1:1\"\n";
        let err = Config::parse(&format!("mode = \"enforce\"\n{base}"), "t").expect_err("enforce");
        assert!(err.to_string().contains("enforce"), "{err}");
        let err = Config::parse(&format!("mode = \"observe\"\ncolour = 1\n{base}"), "t")
            .expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
