//! The agent's own cost as the process metrics of the Prometheus client libraries (`process_*`,
//! with the names, types and help texts of the Go client's), read from `/proc/self` at each
//! scrape. CPU time is in fractional seconds, as the Go client exports it: the agent uses a
//! small fraction of a core, and whole seconds would hide that from `rate()`.

use procfs::{
    ProcResult, WithCurrentSystemInfo as _,
    process::{LimitValue, Process},
};
use prometheus::{
    core::{Collector, Desc},
    proto::{Gauge, Metric, MetricFamily, MetricType},
};

use super::metrics::{desc, float_counter_family};
use crate::enrich::procfs::stat_cpu_seconds;

/// One of the process metric families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    CpuSeconds,
    ResidentBytes,
    VirtualBytes,
    OpenFds,
    MaxFds,
    StartTime,
    Threads,
}

impl Family {
    const ALL: [Self; 7] = [
        Self::CpuSeconds,
        Self::ResidentBytes,
        Self::VirtualBytes,
        Self::OpenFds,
        Self::MaxFds,
        Self::StartTime,
        Self::Threads,
    ];

    const fn name(self) -> &'static str {
        match self {
            Self::CpuSeconds => "process_cpu_seconds_total",
            Self::ResidentBytes => "process_resident_memory_bytes",
            Self::VirtualBytes => "process_virtual_memory_bytes",
            Self::OpenFds => "process_open_fds",
            Self::MaxFds => "process_max_fds",
            Self::StartTime => "process_start_time_seconds",
            Self::Threads => "process_threads",
        }
    }

    const fn help(self) -> &'static str {
        match self {
            Self::CpuSeconds => "Total user and system CPU time spent in seconds.",
            Self::ResidentBytes => "Resident memory size in bytes.",
            Self::VirtualBytes => "Virtual memory size in bytes.",
            Self::OpenFds => "Number of open file descriptors.",
            Self::MaxFds => "Maximum number of open file descriptors.",
            Self::StartTime => "Start time of the process since unix epoch in seconds.",
            // The Go client has no thread count here; this is the Rust client's help text.
            Self::Threads => "Number of OS threads in the process.",
        }
    }

    /// The family with one series of `value`, without labels.
    fn with(self, value: f64) -> MetricFamily {
        if self == Self::CpuSeconds {
            return float_counter_family(
                self.name(),
                self.help(),
                std::iter::once((Vec::new(), value)),
            );
        }
        let mut g = Gauge::default();
        g.set_value(value);
        let mut m = Metric::default();
        m.set_gauge(g);
        let mut f = MetricFamily::default();
        f.set_name(self.name().to_owned());
        f.set_help(self.help().to_owned());
        f.set_field_type(MetricType::GAUGE);
        f.mut_metric().push(m);
        f
    }
}

/// The agent's CPU time, memory, open files, threads and start time. A family whose read fails
/// (said at debug level) is left out of that scrape.
#[derive(Debug)]
pub struct ProcessCollector {
    descs: Vec<Desc>,
    /// Read once: it does not change.
    start_time: Option<f64>,
}

impl ProcessCollector {
    #[must_use]
    pub fn new() -> Self {
        Self {
            descs: Family::ALL
                .iter()
                .map(|f| desc(f.name(), f.help(), &[]))
                .collect(),
            start_time: start_time(),
        }
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let start = self.start_time.map(|t| (Family::StartTime, t));
        read(Process::myself())
            .into_iter()
            .chain(start)
            .map(|(family, value)| family.with(value))
            .collect()
    }
}

/// The value of a read, or `None` with the error at debug level.
fn ok<T>(what: &str, read: ProcResult<T>) -> Option<T> {
    read.map_err(|e| tracing::debug!("process metrics: {what}: {e}"))
        .ok()
}

/// The clock ticks of the process's CPU times, per second.
#[expect(clippy::cast_precision_loss, reason = "a hundred or so")]
fn ticks_per_second() -> f64 {
    procfs::ticks_per_second().max(1) as f64
}

/// When this process started, in seconds since the epoch (with the tick's resolution).
#[expect(clippy::cast_precision_loss, reason = "seconds and ticks")]
fn start_time() -> Option<f64> {
    let stat = ok("stat", Process::myself().and_then(|p| p.stat()))?;
    let boot = ok("boot time", procfs::boot_time_secs())?;
    Some(boot as f64 + stat.starttime as f64 / ticks_per_second())
}

/// Every family but the start time, with its value now; the families of a failed read are
/// missing.
#[expect(clippy::cast_precision_loss, reason = "exposed as floats")]
fn read(process: ProcResult<Process>) -> Vec<(Family, f64)> {
    let Some(p) = ok("process", process) else {
        return Vec::new();
    };
    let mut values = Vec::with_capacity(Family::ALL.len());
    if let Some(stat) = ok("stat", p.stat()) {
        values.extend([
            (Family::CpuSeconds, stat_cpu_seconds(&stat)),
            (Family::ResidentBytes, stat.rss_bytes().get() as f64),
            (Family::VirtualBytes, stat.vsize as f64),
            (Family::Threads, stat.num_threads as f64),
        ]);
    }
    if let Some(n) = ok("open files", p.fd_count()) {
        values.push((Family::OpenFds, n as f64));
    }
    if let Some(limits) = ok("limits", p.limits()) {
        let max = match limits.max_open_files.soft_limit {
            LimitValue::Value(v) => v as f64,
            LimitValue::Unlimited => f64::INFINITY,
        };
        values.push((Family::MaxFds, max));
    }
    values
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use prometheus::Registry;

    use super::*;

    /// This process's user and system CPU time, in clock ticks.
    fn cpu_ticks() -> u64 {
        let stat = Process::myself().and_then(|p| p.stat()).expect("stat");
        stat.utime + stat.stime
    }

    /// This process's `VmRSS`, in bytes.
    fn vm_rss() -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .expect("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .expect("VmRSS")
            * 1024.0
    }

    #[test]
    fn exports_this_process_with_fractional_cpu_seconds() {
        // A CPU time that is not whole seconds, so that seconds rounded down would show.
        let tps = procfs::ticks_per_second();
        let deadline = Instant::now() + Duration::from_secs(5);
        while cpu_ticks().is_multiple_of(tps) && Instant::now() < deadline {
            std::hint::black_box((0..100_000u64).sum::<u64>());
        }
        let registry = Registry::new();
        registry
            .register(Box::new(ProcessCollector::new()))
            .expect("register");
        let before = cpu_ticks();
        let families = registry.gather();
        let after = cpu_ticks();

        let by_name: HashMap<&str, &MetricFamily> =
            families.iter().map(|f| (f.name(), f)).collect();
        assert_eq!(by_name.len(), Family::ALL.len(), "{families:?}");
        let value = |family: Family| {
            let f = by_name
                .get(family.name())
                .unwrap_or_else(|| panic!("no {}", family.name()));
            assert_eq!(f.help(), family.help());
            assert_eq!(f.get_metric().len(), 1, "{f:?}");
            let m = &f.get_metric()[0];
            if family == Family::CpuSeconds {
                assert_eq!(f.get_field_type(), MetricType::COUNTER);
                m.get_counter().get_value()
            } else {
                assert_eq!(f.get_field_type(), MetricType::GAUGE, "{}", family.name());
                m.get_gauge().get_value()
            }
        };

        #[expect(clippy::cast_precision_loss, reason = "ticks")]
        let (tps, before, after) = (tps as f64, before as f64, after as f64);
        // To the tick: whole seconds would fall short of `before`.
        let cpu = value(Family::CpuSeconds);
        assert!(
            cpu >= 0.0 && cpu * tps >= before - 0.5 && cpu * tps <= after + 0.5,
            "{cpu} s, {before} to {after} ticks at {tps} a second"
        );

        let rss = value(Family::ResidentBytes);
        let vm_rss = vm_rss();
        assert!(
            rss > 0.0 && (0.5..=2.0).contains(&(rss / vm_rss)),
            "{rss} bytes, VmRSS {vm_rss}"
        );
        assert!(value(Family::VirtualBytes) >= rss);
        let open = value(Family::OpenFds);
        assert!(open > 0.0, "{open}");
        let max = value(Family::MaxFds);
        assert!(max >= open, "{max} < {open}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let start = value(Family::StartTime);
        assert!(
            start > now - 86_400.0 && start <= now + 1.0,
            "started at {start}, now {now}"
        );
        assert!(value(Family::Threads) >= 1.0);
    }

    #[test]
    fn a_process_that_cannot_be_read_has_no_series() {
        assert_eq!(read(Process::new(i32::MAX)), Vec::new());
    }
}
