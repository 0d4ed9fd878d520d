//! Start-up of the self-healing half: the rules (refused whole when invalid), the trusted
//! writers, the desired values the previous agent kept, the check that enforce can be honoured,
//! and the executor's thread.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
};

use anyhow::{Context as _, Result, bail};

use super::workers;
use crate::{
    config::Config,
    enrich::{cgroupfs::CgroupFs, trust},
    executor::{
        self, Executor, Job, Sinks,
        audit::AuditLog,
        files::{Attempt, Cgroup2, LimitFiles},
        guard::Guard,
    },
    model::{
        heal::{Mode, Reason},
        trust::TrustSet,
    },
    outputs::{feed::Feed, metrics::Metrics, traces::Traces},
    pipeline::HealSettings,
    rules::{
        Ruleset,
        file::{self, RulesError},
    },
    state::guards::GuardSettings,
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;

/// The rules: the configured file, or the embedded default.
pub fn rules(path: Option<&Path>) -> Result<Ruleset, RulesError> {
    match path {
        None => file::default_rules(),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => file::parse(&text, &p.display().to_string()),
            Err(e) => Err(RulesError {
                origin: p.display().to_string(),
                errors: vec![file::RuleError {
                    line: 0,
                    column: 0,
                    message: format!("cannot be read: {e}"),
                }],
            }),
        },
    }
}

/// What tells that the rules file changed: its inode, size and modification time.
#[must_use]
pub fn stamp(path: &Path) -> Option<(u64, u64, i64, i64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The trusted writers as this node has them, keeping `before`'s keys.
#[must_use]
pub fn trust(config: &Config, before: &TrustSet) -> TrustSet {
    let mut set = before.clone();
    trust::resolve(&config.trusted_writers, std::process::id(), &mut set);
    set
}

/// The pipeline's self-healing settings.
pub fn settings(config: &Config) -> Result<HealSettings> {
    let rules = rules(config.rules.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let trust = trust(config, &TrustSet::default());
    tracing::info!(
        mode = config.mode.as_str(),
        rules = rules.rules.len(),
        "self-healing: trusted writers found on this node: {}",
        trust::summary(&trust)
    );
    let r = &config.remediation;
    let state_file = (!r.state_file.as_os_str().is_empty()).then(|| r.state_file.clone());
    let kept = state_file.as_deref().and_then(executor::load);
    Ok(HealSettings {
        mode: config.mode,
        rules,
        trust,
        guards: GuardSettings {
            cooldown_ns: r.cooldown_ms * MS,
            window_ns: r.window_s * S,
            max_restores: r.max_restores,
            fight_rewrites: r.fight_rewrites,
            fight_within_ns: r.fight_within_ms * MS,
            fight_backoff_ns: r.fight_backoff_s * S,
        },
        creation_grace_ns: r.creation_grace_ms * MS,
        boot_id: executor::boot_id(),
        keep: state_file.is_some(),
        kept,
        // Set once the probes are attached.
        guard_active: false,
        guard_max_files: usize::try_from(r.guard_max_files).unwrap_or(usize::MAX),
    })
}

/// In mode enforce, whether the agent can write limits: the hierarchy is there and writable,
/// and cgroups open by id. Anything else refuses to start, saying why: enforce never degrades
/// silently.
pub fn preflight(config: &Config, cgroupfs: Option<&Arc<CgroupFs>>) -> Result<()> {
    if config.mode != Mode::Enforce {
        return Ok(());
    }
    let Some(fs) = cgroupfs else {
        bail!("mode enforce: no cgroup v2 hierarchy is mounted; nothing could be restored");
    };
    let root = fs.root();
    let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .context("the cgroup2 mount's path")?;
    // SAFETY: a NUL-terminated path and a struct to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &raw mut st) } != 0 {
        bail!(
            "mode enforce: statvfs {}: {}",
            root.display(),
            std::io::Error::last_os_error()
        );
    }
    if st.f_flag & libc::ST_RDONLY != 0 {
        bail!(
            "mode enforce: {} is mounted read-only; limits cannot be restored (mount it read-write, or run in mode dry-run)",
            root.display()
        );
    }
    let probe = std::ffi::CString::new("cgroup.subtree_control").context("name")?;
    let dir = std::fs::File::open(root).with_context(|| format!("opening {}", root.display()))?;
    // SAFETY: a directory fd and a NUL-terminated name.
    let writable = unsafe {
        libc::faccessat(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            probe.as_ptr(),
            libc::W_OK,
            libc::AT_EACCESS,
        )
    } == 0;
    if !writable {
        bail!(
            "mode enforce: cgroup files under {} are not writable by this process ({}); run as root with CAP_SYS_ADMIN, or in mode dry-run",
            root.display(),
            std::io::Error::last_os_error()
        );
    }
    let files = Cgroup2::open(root, 4096).with_context(|| format!("opening {}", root.display()))?;
    let root_id = std::fs::metadata(root)
        .with_context(|| format!("stat {}", root.display()))?
        .ino();
    // The root cgroup has no limit files: a check of its memory.max fails to read, but only
    // after the cgroup opened by id, which is what this asks.
    if let Attempt::Failed(e) = files.restore(
        root_id,
        agent_common::LimitFile::MemoryMax,
        crate::model::limit::LimitValue::Max,
        false,
    ) && e.starts_with("opening the cgroup")
    {
        bail!(
            "mode enforce: cgroups cannot be opened by id ({e}); the agent needs CAP_DAC_READ_SEARCH"
        );
    }
    Ok(())
}

/// No hierarchy: every restore fails, said so.
#[derive(Debug)]
struct NoHierarchy;

impl LimitFiles for NoHierarchy {
    fn restore(
        &self,
        _: u64,
        _: agent_common::LimitFile,
        _: crate::model::limit::LimitValue,
        _: bool,
    ) -> Attempt {
        Attempt::NotWritten(Reason::Stale)
    }

    fn inode(&self, _: u64, _: agent_common::LimitFile) -> Result<u64, String> {
        Err("no cgroup v2 hierarchy".to_owned())
    }
}

/// The executor's thread.
#[expect(clippy::too_many_arguments, reason = "the sinks it records to")]
pub fn start_executor(
    config: &Config,
    cgroupfs: Option<&Arc<CgroupFs>>,
    page_size: u64,
    jobs: mpsc::Receiver<Job>,
    metrics: &Metrics,
    feed: Feed,
    traces: Traces,
    panics: &workers::Panics,
    guard: Option<crate::kernel::guard::GuardMaps>,
) -> Result<workers::Worker> {
    let files: Box<dyn LimitFiles + Send> = match cgroupfs {
        Some(fs) => Box::new(
            Cgroup2::open(fs.root(), page_size)
                .with_context(|| format!("opening {}", fs.root().display()))?,
        ),
        None => Box::new(NoHierarchy),
    };
    let r = &config.remediation;
    let path = |p: &PathBuf| (!p.as_os_str().is_empty()).then(|| p.clone());
    let sinks = Sinks {
        metrics: metrics.clone(),
        feed,
        traces,
        audit: path(&r.audit_log)
            .map(|p| AuditLog::new(p, r.audit_log_max_bytes, r.audit_log_files)),
        state_file: path(&r.state_file),
    };
    let mut executor = Executor::new(files, sinks);
    if let Some(maps) = guard {
        executor = executor.with_guard(Guard::new(Box::new(maps)));
    }
    Ok(workers::spawn("executor", metrics, panics, move |stop| {
        executor.run(&jobs, stop);
    })?)
}
