//! The audit log: one JSON line per decision, rotated by size, its total bounded (`files` of
//! at most `max_bytes` each). Root-only: decisions name processes and cgroups.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

/// An append-only log rotated by size.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    /// Files kept in all, the current one included.
    files: u32,
    file: Option<File>,
    size: u64,
}

impl AuditLog {
    /// A log at `path` (its directory made if missing).
    #[must_use]
    pub fn new(path: PathBuf, max_bytes: u64, files: u32) -> Self {
        Self {
            path,
            max_bytes: max_bytes.max(1),
            files: files.max(1),
            file: None,
            size: 0,
        }
    }

    /// The `n`th older file (`path.1` is the newest of them).
    fn older(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn open(path: &Path) -> std::io::Result<File> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    /// Moves each file one up (the oldest goes) and starts a new one.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.files == 1 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(self.older(self.files - 1));
            for n in (1..self.files - 1).rev() {
                let _ = std::fs::rename(self.older(n), self.older(n + 1));
            }
            std::fs::rename(&self.path, self.older(1))?;
        }
        self.size = 0;
        Ok(())
    }

    /// Appends `line` (and a newline).
    pub fn append(&mut self, line: &str) -> std::io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.file.is_none() {
            let f = Self::open(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
            self.file = Some(Self::open(&self.path)?);
        }
        if let Some(f) = &mut self.file {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            f.write_all(&buf)?;
            self.size += len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_a_bounded_total() {
        let dir = std::env::temp_dir().join(format!("nw-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/audit.jsonl");
        let mut log = AuditLog::new(path.clone(), 100, 3);
        for i in 0..20 {
            log.append(&format!(
                "{{\"n\":{i:04},\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}}"
            ))
            .expect("append");
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let files: Vec<PathBuf> = vec![path.clone(), log.older(1), log.older(2)];
        let total: usize = files.iter().map(|p| read(p).len()).sum();
        assert!(total <= 300, "{total}");
        assert!(!log.older(3).exists(), "at most 3 files");
        // The newest lines are in the current file, whole.
        let current = read(&path);
        assert!(
            current.ends_with("\"n\":0019,\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}\n"),
            "{current}"
        );
        assert!(
            current
                .lines()
                .all(|l| l.starts_with('{') && l.ends_with('}'))
        );
        assert!(read(&log.older(1)).contains("\"n\":0017"));
        std::fs::remove_dir_all(&dir).expect("rm");
    }
}
