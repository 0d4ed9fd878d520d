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

pub use crate::model::heal::Mode;

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

/// How futex waits are probed. fentry/fexit on the kernel's futex wait functions cost only futex
/// waits; the syscall tracepoints send every syscall of every process on the node through the
/// kernel's slower entry path while attached, so `auto` takes them only where fexit is refused.
/// (No kprobe mode: a kretprobe holds an instance per sleeping call, a few per CPU by default,
/// and a node has thousands of threads asleep in futex waits.)
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FutexMode {
    #[default]
    Auto,
    Fexit,
    /// Tracepoints on the futex syscalls.
    Syscalls,
}

/// Probe choices.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProbesConfig {
    #[serde(default)]
    pub limit_writes: LimitWriteMode,
    #[serde(default)]
    pub futex_waits: FutexMode,
    #[serde(default)]
    pub oom_limits: OomLimitMode,
    #[serde(default)]
    pub guard: GuardChoice,
    /// The ring the programs send events through, in KiB (kernel memory, locked): what a
    /// burst can fill before events are lost (counted) while the agent catches up.
    #[serde(default = "default_events_ring_kib")]
    pub events_ring_kib: u32,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            limit_writes: LimitWriteMode::default(),
            futex_waits: FutexMode::default(),
            oom_limits: OomLimitMode::default(),
            guard: GuardChoice::default(),
            events_ring_kib: default_events_ring_kib(),
        }
    }
}

fn default_events_ring_kib() -> u32 {
    1024
}

/// Named sets of defaults: `edge` for small machines (edge boards) keeps less in the kernel
/// and in the agent, at the cost of detail. Keys a file sets keep their values either way.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    #[default]
    Default,
    Edge,
}

impl Profile {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Edge => "edge",
        }
    }
}

/// The edge profile's defaults (docs/operations.md, "The edge profile", says what each gives
/// up): section, key, and how it is set.
type EdgeDefault = (&'static str, &'static str, fn(&mut RawConfig));
const EDGE: [EdgeDefault; 6] = [
    ("contention", "sample_hz", |c| c.contention.sample_hz = 19),
    ("contention", "max_processes", |c| {
        c.contention.max_processes = 256;
    }),
    ("contention", "off_cpu_max_processes", |c| {
        c.contention.off_cpu_max_processes = 4;
    }),
    ("contention", "max_stacks", |c| {
        c.contention.max_stacks = 2048;
    }),
    ("probes", "events_ring_kib", |c| {
        c.probes.events_ring_kib = 256;
    }),
    ("metrics", "deleted_cgroup_ttl_s", |c| {
        c.metrics.deleted_cgroup_ttl_s = 600;
    }),
];

/// Sets the edge profile's value of every key `text` leaves out.
fn apply_edge(raw: &mut RawConfig, text: &str) {
    // `text` parsed once already, as RawConfig.
    let table: toml::Table = text.parse().unwrap_or_default();
    for (section, key, set) in EDGE {
        let given = table
            .get(section)
            .and_then(toml::Value::as_table)
            .is_some_and(|t| t.contains_key(key));
        if !given {
            set(raw);
        }
    }
}

/// Whether the guard (BPF LSM on `file_open`) is attached: `auto` attaches it in modes dry-run
/// and enforce where the kernel allows it (rules with `protect` then refuse untrusted
/// writers); `off` never (such rules fall back to restoring).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GuardChoice {
    #[default]
    Auto,
    Off,
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
    /// At most this many distinct stacks are kept for CPU samples and off-CPU time each (and a
    /// quarter of it for futex waits): kernel memory, about 1 KiB a stack, allocated at start.
    #[serde(default = "default_max_stacks")]
    pub max_stacks: u32,
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
            max_stacks: default_max_stacks(),
        }
    }
}

fn default_max_stacks() -> u32 {
    16_384
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
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// How long the series of a removed cgroup stay after its removal, in seconds: long enough
    /// for Prometheus to scrape its last counts.
    #[serde(default = "default_deleted_cgroup_ttl_s")]
    pub deleted_cgroup_ttl_s: u64,
    /// Whether the kernel counts each eBPF program's runs and run time (`BPF_ENABLE_STATS`) for
    /// the agent's own cost metrics.
    #[serde(default)]
    pub bpf_stats: BpfStats,
}

/// Whether the kernel counts eBPF program runs and run time: two clock reads more at every run
/// of every program on the node. On a syscall tracepoint that is every write(2) of the node
/// (about 140 ns more per write on the development machine), so `auto` leaves them off there.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BpfStats {
    /// On, unless a capability attached to syscall tracepoints.
    #[default]
    Auto,
    On,
    Off,
}

fn default_deleted_cgroup_ttl_s() -> u64 {
    3600
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9717".to_owned()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
            deleted_cgroup_ttl_s: default_deleted_cgroup_ttl_s(),
            bpf_stats: BpfStats::default(),
        }
    }
}

fn default_shutdown_drain_ms() -> u64 {
    2000
}

/// A trusted writer, as configured: its changes to limits are taken as the new desired values.
/// Every condition given must hold.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedWriterConfig {
    /// The name decisions give it.
    pub name: String,
    /// Paths of the executables it runs (absolute; those that do not exist are skipped).
    pub exe: Vec<PathBuf>,
    /// Paths of the executables its parent may run; absent: any parent.
    #[serde(default)]
    pub parent_exe: Option<Vec<PathBuf>>,
    /// Globs of the cgroups it may run in; absent: any.
    #[serde(default)]
    pub cgroup: Option<Vec<String>>,
    /// The process id it must have (1 for systemd); absent: any.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// The trusted writers every node has: kubelet, the OCI runtimes under their shims and
/// monitors, and systemd as PID 1.
pub const BUILTIN_TRUSTED_WRITERS: &str = include_str!("trusted-writers.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustedWritersFile {
    trusted_writers: Vec<TrustedWriterConfig>,
}

/// The self-healing half: its guardrails and records.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RemediationConfig {
    /// Every so often (seconds), every watched limit is read and compared with its desired
    /// value.
    pub reconcile_interval_s: u64,
    /// Least time between two restores of one limit (milliseconds).
    pub cooldown_ms: u64,
    /// At most this many restores of one limit per `window_s`.
    pub max_restores: u32,
    pub window_s: u64,
    /// A fight: this many bad rewrites, each within `fight_within_ms` of a restore. The agent
    /// then leaves the cgroup alone for `fight_backoff_s`.
    pub fight_rewrites: u32,
    pub fight_within_ms: u64,
    pub fight_backoff_s: u64,
    /// Values written in a new cgroup's first moments (milliseconds), by any writer, are its
    /// first-seen values (a container runtime sets them right after creating it).
    pub creation_grace_ms: u64,
    /// The audit log: one JSON line per decision; empty disables it.
    pub audit_log: PathBuf,
    /// Rotated when it reaches this size; `audit_log_files` files are kept in all.
    pub audit_log_max_bytes: u64,
    pub audit_log_files: u32,
    /// Where desired values are kept across restarts; empty disables it.
    pub state_file: PathBuf,
    /// The guard protects at most this many limit files (the size of its kernel map).
    pub guard_max_files: u32,
}

impl Default for RemediationConfig {
    fn default() -> Self {
        Self {
            reconcile_interval_s: 30,
            cooldown_ms: 1000,
            max_restores: 5,
            window_s: 600,
            fight_rewrites: 3,
            fight_within_ms: 2000,
            fight_backoff_s: 600,
            creation_grace_ms: 5000,
            audit_log: PathBuf::from("/var/log/nodewarden/audit.jsonl"),
            audit_log_max_bytes: 10 << 20,
            audit_log_files: 5,
            state_file: PathBuf::from("/var/lib/nodewarden/desired.json"),
            guard_max_files: 65_536,
        }
    }
}

/// Whether the API server is asked about this node's pods.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum KubernetesApi {
    /// In a cluster (a kubeconfig, or the pod's service account), used; elsewhere skipped
    /// with one log line, and looked for again every minute.
    #[default]
    Auto,
    Off,
}

/// The Kubernetes API as a source of desired limits and names.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub api: KubernetesApi,
    /// This node's name as the API server knows it; empty takes `$NODE_NAME` (the downward
    /// API), else the host name.
    pub node_name: String,
}

/// The whole configuration file, as written. A file names only what it changes: every key
/// falls back to the built-in configuration's value.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    profile: Profile,
    #[serde(default)]
    mode: Mode,
    /// The rules file; empty for the embedded default rules.
    #[serde(default)]
    rules: String,
    #[serde(default)]
    remediation: RemediationConfig,
    #[serde(default)]
    kubernetes: KubernetesConfig,
    /// Whether the built-in trusted writers apply (besides `trusted_writers`).
    #[serde(default = "yes")]
    builtin_trusted_writers: bool,
    #[serde(default)]
    trusted_writers: Vec<TrustedWriterConfig>,
    #[serde(default)]
    metrics: MetricsConfig,
    /// Longest time spent draining events and flushing traces at shutdown, in milliseconds.
    #[serde(default = "default_shutdown_drain_ms")]
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
    pub profile: Profile,
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
    /// Whether the kernel's per-program run statistics are turned on.
    pub bpf_stats: BpfStats,
    pub events_socket: Option<PathBuf>,
    pub kubelet_log_dir: PathBuf,
    /// The rules file; `None` for the embedded default rules.
    pub rules: Option<PathBuf>,
    pub remediation: RemediationConfig,
    pub kubernetes: KubernetesConfig,
    /// The built-in trusted writers (unless turned off), then the configured ones.
    pub trusted_writers: Vec<TrustedWriterConfig>,
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
    #[expect(
        clippy::too_many_lines,
        reason = "every key checked, every problem listed"
    )]
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source: Box::new(source),
        })?;
        if raw.profile == Profile::Edge {
            apply_edge(&mut raw, text);
        }
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
        if !(256..=65_536).contains(&raw.contention.max_stacks) {
            problems.push(format!(
                "contention.max_stacks = {}: must be between 256 and 65536",
                raw.contention.max_stacks
            ));
        }
        let ring = raw.probes.events_ring_kib;
        if !ring.is_power_of_two() || !(64..=65_536).contains(&ring) {
            problems.push(format!(
                "probes.events_ring_kib = {ring}: must be a power of two between 64 and 65536 (the kernel's ring size is a power of two, and a whole number of pages of up to 64 KiB)"
            ));
        }
        if raw.contention.off_cpu_max_processes == 0 || raw.contention.off_cpu_max_processes > 1024
        {
            problems.push(format!(
                "contention.off_cpu_max_processes = {}: must be between 1 and 1024",
                raw.contention.off_cpu_max_processes
            ));
        }
        if let Some(root) = &cgroup_root {
            if root.is_absolute() {
                if let Err(why) = cgroup2_at(root) {
                    problems.push(format!("cgroup_root = {:?}: {why}", raw.cgroup_root));
                }
            } else {
                problems.push(format!(
                    "cgroup_root = {:?}: must be an absolute path",
                    raw.cgroup_root
                ));
            }
        }
        if !std::path::Path::new(&raw.kubelet_log_dir).is_absolute() {
            problems.push(format!(
                "kubelet_log_dir = {:?}: must be an absolute path",
                raw.kubelet_log_dir
            ));
        }
        if raw.contention.stack_threshold_us > 60_000_000 {
            problems.push(format!(
                "contention.stack_threshold_us = {}: at most 60000000 (a minute)",
                raw.contention.stack_threshold_us
            ));
        }
        let rules = (!raw.rules.is_empty()).then(|| PathBuf::from(&raw.rules));
        if rules.as_ref().is_some_and(|p| !p.is_absolute()) {
            problems.push(format!("rules = {:?}: must be an absolute path", raw.rules));
        }
        validate_remediation(&raw.remediation, &mut problems);
        let mut trusted_writers = Vec::new();
        if raw.builtin_trusted_writers {
            match toml::from_str::<TrustedWritersFile>(BUILTIN_TRUSTED_WRITERS) {
                Ok(f) => trusted_writers.extend(f.trusted_writers),
                Err(e) => problems.push(format!("the built-in trusted writers: {e}")),
            }
        }
        for w in &raw.trusted_writers {
            validate_trusted_writer(w, &mut problems);
        }
        trusted_writers.extend(raw.trusted_writers);
        if trusted_writers.len() > agent_common::GUARD_MAX_WRITERS {
            problems.push(format!(
                "{} trusted writers (built-in ones included): at most {} (the guard gives each a bit)",
                trusted_writers.len(),
                agent_common::GUARD_MAX_WRITERS
            ));
        }
        match metrics_listen {
            Some(metrics_listen) if problems.is_empty() => Ok(Self {
                profile: raw.profile,
                mode: raw.mode,
                metrics_listen,
                shutdown_drain: Duration::from_millis(raw.shutdown_drain_ms),
                cgroup_root,
                probes: raw.probes,
                contention: raw.contention,
                selectors,
                deleted_cgroup_ttl: Duration::from_secs(raw.metrics.deleted_cgroup_ttl_s),
                bpf_stats: raw.metrics.bpf_stats,
                events_socket,
                kubelet_log_dir: PathBuf::from(raw.kubelet_log_dir),
                rules,
                remediation: raw.remediation,
                kubernetes: raw.kubernetes,
                trusted_writers,
            }),
            _ => Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems,
            }),
        }
    }
}

/// The guardrails' bounds: each must be able to act, and none may run away.
/// `CGROUP2_SUPER_MAGIC` from the kernel's uapi `magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether `path` is a directory of a cgroup v2 hierarchy: anything else would have every
/// cgroup id the agent resolves by a scan walk whatever filesystem is there.
fn cgroup2_at(path: &std::path::Path) -> Result<(), String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "has a NUL byte".to_owned())?;
    // SAFETY: plain data, filled by statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct to fill.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(format!("{}", std::io::Error::last_os_error()));
    }
    let magic = st.f_type;
    if magic == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(format!(
            "not a cgroup v2 hierarchy (filesystem magic {magic:#x}, cgroup2's is {CGROUP2_SUPER_MAGIC:#x})"
        ))
    }
}

fn validate_remediation(r: &RemediationConfig, problems: &mut Vec<String>) {
    let mut within = |name: &str, v: u64, lo: u64, hi: u64| {
        if v < lo || v > hi {
            problems.push(format!(
                "remediation.{name} = {v}: must be between {lo} and {hi}"
            ));
        }
    };
    within("reconcile_interval_s", r.reconcile_interval_s, 1, 86_400);
    within("cooldown_ms", r.cooldown_ms, 0, 3_600_000);
    within("max_restores", u64::from(r.max_restores), 1, 10_000);
    within("window_s", r.window_s, 1, 86_400);
    within("fight_rewrites", u64::from(r.fight_rewrites), 1, 1000);
    within("fight_within_ms", r.fight_within_ms, 1, 3_600_000);
    within("fight_backoff_s", r.fight_backoff_s, 1, 86_400 * 7);
    within("creation_grace_ms", r.creation_grace_ms, 0, 600_000);
    within("audit_log_max_bytes", r.audit_log_max_bytes, 4096, 1 << 40);
    within("audit_log_files", u64::from(r.audit_log_files), 1, 100);
    within("guard_max_files", u64::from(r.guard_max_files), 1, 1 << 20);
    for (name, p) in [("audit_log", &r.audit_log), ("state_file", &r.state_file)] {
        if !p.as_os_str().is_empty() && !p.is_absolute() {
            problems.push(format!(
                "remediation.{name} = \"{}\": must be an absolute path (or empty to disable)",
                p.display()
            ));
        }
    }
}

fn validate_trusted_writer(w: &TrustedWriterConfig, problems: &mut Vec<String>) {
    let name = &w.name;
    if name.trim().is_empty() {
        problems.push("trusted_writers: an entry has an empty name".to_owned());
    }
    if w.exe.is_empty() {
        problems.push(format!(
            "trusted_writers {name:?}: `exe` names no executable (trust is by executable)"
        ));
    }
    for p in w.exe.iter().chain(w.parent_exe.iter().flatten()) {
        if !p.is_absolute() {
            problems.push(format!(
                "trusted_writers {name:?}: \"{}\" is not an absolute path",
                p.display()
            ));
        }
    }
    for g in w.cgroup.iter().flatten() {
        if let Err(e) = Pattern::new(g) {
            problems.push(format!("trusted_writers {name:?}: cgroup {g:?}: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn remediation_and_trusted_writers_are_validated_whole() {
        let base =
            "mode = \"enforce\"\nshutdown_drain_ms = 100\n[metrics]\nlisten = \"127.0.0.1:1\"\n";
        let c = Config::parse(base, "t").expect("valid");
        assert_eq!(c.remediation, RemediationConfig::default());
        assert_eq!(
            c.trusted_writers
                .iter()
                .map(|w| w.name.as_str())
                .collect::<Vec<_>>(),
            ["kubelet", "oci-runtime", "systemd"],
            "the built-in ones"
        );
        let text = format!(
            "rules = \"rules.toml\"\nbuiltin_trusted_writers = false\n{base}[remediation]\ncooldown_ms = 0\nmax_restores = 0\naudit_log = \"audit\"\n\n[[trusted_writers]]\nname = \"ops\"\nexe = [\"bin/ops\"]\ncgroup = [\"/x/[\"]\n"
        );
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&text, "t") else {
            panic!("invalid");
        };
        assert_eq!(problems.len(), 5, "{problems:#?}");
        for needle in [
            "rules = \"rules.toml\": must be an absolute path",
            "remediation.max_restores = 0",
            "remediation.audit_log",
            "\"bin/ops\" is not an absolute path",
            "cgroup \"/x/[\"",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:#?}"
            );
        }
        let text = format!("builtin_trusted_writers = false\n{base}");
        assert!(
            Config::parse(&text, "t")
                .expect("valid")
                .trusted_writers
                .is_empty()
        );
        // The guard gives each trusted writer a bit of a u64: 64 at most, built-in ones included.
        let mut many = String::new();
        for i in 0..62 {
            let _ = write!(
                many,
                "[[trusted_writers]]\nname = \"w{i}\"\nexe = [\"/bin/w{i}\"]\n"
            );
        }
        let Err(ConfigError::Invalid { problems, .. }) =
            Config::parse(&format!("{base}\n{many}"), "t")
        else {
            panic!("65 trusted writers accepted");
        };
        assert!(problems[0].contains("65 trusted writers"), "{problems:#?}");
        assert!(
            Config::parse(
                &format!("builtin_trusted_writers = false\n{base}\n{many}"),
                "t"
            )
            .is_ok()
        );
    }

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
    fn the_edge_profile_sets_only_the_keys_a_file_leaves_out() {
        let c = Config::parse("profile = \"edge\"\n", "t").expect("valid");
        assert_eq!(c.profile, Profile::Edge);
        assert_eq!(c.contention.sample_hz, 19);
        assert_eq!(c.contention.max_processes, 256);
        assert_eq!(c.contention.off_cpu_max_processes, 4);
        assert_eq!(c.contention.max_stacks, 2048);
        assert_eq!(c.probes.events_ring_kib, 256);
        assert_eq!(c.deleted_cgroup_ttl, Duration::from_secs(600));
        // Everything else is the built-in configuration's.
        let d = Config::default_config().expect("default");
        assert_eq!(c.mode, d.mode);
        assert_eq!(
            c.contention.stack_threshold_us,
            d.contention.stack_threshold_us
        );
        assert_eq!(c.probes.limit_writes, d.probes.limit_writes);

        let c = Config::parse(
            "profile = \"edge\"\n[contention]\nsample_hz = 49\n[probes]\nevents_ring_kib = 4096\n",
            "t",
        )
        .expect("valid");
        assert_eq!(
            c.contention.sample_hz, 49,
            "a key the file sets keeps its value"
        );
        assert_eq!(c.probes.events_ring_kib, 4096);
        assert_eq!(
            c.contention.max_stacks, 2048,
            "the others are the profile's"
        );

        // The default profile, named or not, is the built-in configuration.
        let named = Config::parse("profile = \"default\"\n", "t").expect("valid");
        assert_eq!(named.contention, d.contention);
        assert_eq!(named.probes, d.probes);
        let e = Config::parse("profile = \"tiny\"\n", "t").expect_err("unknown profile");
        assert!(e.to_string().contains("tiny"), "{e}");
    }

    #[test]
    fn map_sizes_out_of_range_are_refused() {
        for (text, key) in [
            (
                "[probes]\nevents_ring_kib = 1000\n",
                "events_ring_kib = 1000",
            ),
            ("[probes]\nevents_ring_kib = 32\n", "events_ring_kib = 32"),
            ("[contention]\nmax_stacks = 100\n", "max_stacks = 100"),
            (
                "[contention]\nmax_stacks = 1000000\n",
                "max_stacks = 1000000",
            ),
        ] {
            let e = Config::parse(text, "t").expect_err(text);
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
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
        assert_eq!(c.probes.guard, GuardChoice::Auto);
        let c = Config::parse(&format!("{base}[probes]\nguard = \"off\"\n"), "t").expect("valid");
        assert_eq!(c.probes.guard, GuardChoice::Off);
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
        for (path, text, mode) in [
            (
                "deploy/kubernetes/base/config.toml",
                include_str!("../../deploy/kubernetes/base/config.toml"),
                Mode::Observe,
            ),
            (
                "deploy/kubernetes/overlays/enforce/config.toml",
                include_str!("../../deploy/kubernetes/overlays/enforce/config.toml"),
                Mode::Enforce,
            ),
        ] {
            let c = Config::parse(text, path).expect("valid");
            assert_eq!(c.mode, mode, "{path}");
            assert_eq!(c.metrics_listen.port(), 9717);
            assert_eq!(c.kubernetes.api, KubernetesApi::Auto);
            assert!(c.remediation.audit_log.starts_with("/var/lib/nodewarden"));
            // The enforce overlay's ConfigMap holds its rules beside the configuration.
            let rules =
                (mode == Mode::Enforce).then(|| PathBuf::from("/etc/nodewarden/rules.toml"));
            assert_eq!(c.rules, rules, "{path}");
        }
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

    /// A file names only what it changes; every other key is the built-in configuration's.
    #[test]
    fn a_file_names_only_what_it_changes() {
        let builtin = Config::default_config().expect("embedded config parses");
        for text in ["", "mode = \"dry-run\"\n", "[contention]\nsample_hz = 0\n"] {
            let c = Config::parse(text, "t").unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(c.metrics_listen, builtin.metrics_listen, "{text:?}");
            assert_eq!(c.shutdown_drain, builtin.shutdown_drain, "{text:?}");
            assert_eq!(c.deleted_cgroup_ttl, builtin.deleted_cgroup_ttl, "{text:?}");
            assert_eq!(c.kubelet_log_dir, builtin.kubelet_log_dir, "{text:?}");
            assert_eq!(c.events_socket, builtin.events_socket, "{text:?}");
            assert_eq!(c.remediation, builtin.remediation, "{text:?}");
        }
        assert_eq!(Config::parse("", "t").expect("empty").mode, Mode::Observe);
        let c = Config::parse(
            "mode = \"dry-run\"\n[metrics]\ndeleted_cgroup_ttl_s = 60\n",
            "t",
        )
        .expect("valid");
        assert_eq!(c.mode, Mode::DryRun);
        assert_eq!(c.metrics_listen, builtin.metrics_listen);
        assert_eq!(c.deleted_cgroup_ttl, Duration::from_secs(60));
    }

    /// Paths that would make the agent walk the wrong filesystem, or read the wrong folder,
    /// and thresholds without a sane bound are refused, all at once.
    #[test]
    fn paths_and_thresholds_are_checked() {
        let text = "cgroup_root = \"/\"\nkubelet_log_dir = \"var/log\"\n[contention]\nstack_threshold_us = 1000000000000\n";
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(text, "t") else {
            panic!("accepted");
        };
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(
            problems[0].contains("cgroup_root = \"/\": not a cgroup v2 hierarchy"),
            "{problems:#?}"
        );
        assert!(problems[1].contains("kubelet_log_dir"), "{problems:#?}");
        assert!(problems[2].contains("stack_threshold_us"), "{problems:#?}");
        let err = Config::parse("cgroup_root = \"/nonexistent/nodewarden\"\n", "t")
            .expect_err("a missing folder");
        assert!(
            err.to_string().contains("No such file or directory"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_modes_are_refused() {
        let base = "shutdown_drain_ms = 100\n[metrics]\nlisten = \"127.0.0.1:1\"\n";
        for mode in ["observe", "dry-run", "enforce"] {
            let c = Config::parse(&format!("mode = \"{mode}\"\n{base}"), "t").expect("a mode");
            assert_eq!(c.mode.as_str(), mode);
        }
        let err = Config::parse(&format!("mode = \"heal\"\n{base}"), "t").expect_err("heal");
        assert!(err.to_string().contains("heal"), "{err}");
        let err = Config::parse(&format!("mode = \"observe\"\ncolour = 1\n{base}"), "t")
            .expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
