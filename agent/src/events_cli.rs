//! `nodewarden events`: the running agent's events, live, for a person (one line each) or as
//! JSON lines, filtered by cgroup glob and kind.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context as _, Result, bail};

use crate::record::{KINDS, Record};

/// What to show.
#[derive(Debug)]
pub struct Filter {
    /// Glob on the cgroup path (`*` any run of characters, `?` one).
    pub cgroup: Option<String>,
    /// Kinds to keep; empty keeps all.
    pub kinds: Vec<String>,
}

/// Streams events from the agent's socket to stdout until the agent goes away.
pub fn run(socket: &Path, filter: &Filter, json: bool) -> Result<()> {
    for k in &filter.kinds {
        if !KINDS.contains(&k.as_str()) {
            bail!("unknown kind {k:?}: one of {}", KINDS.join(", "));
        }
    }
    let stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is `nodewarden run` running?)",
            socket.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading from the agent")?;
        let shown = match serde_json::from_str::<Record>(&line) {
            Ok(r) if !keep(filter, &r) => continue,
            Ok(r) if !json => r.human(),
            // JSON lines pass through as the agent wrote them, records of kinds this CLI does
            // not know (a newer agent) and loss notices included.
            _ if json || filter.kinds.is_empty() && filter.cgroup.is_none() => line,
            _ => continue,
        };
        if writeln!(out, "{shown}").and_then(|()| out.flush()).is_err() {
            // The reader went away (`| head`): not an error.
            return Ok(());
        }
    }
    Ok(())
}

fn keep(filter: &Filter, r: &Record) -> bool {
    (filter.kinds.is_empty() || filter.kinds.iter().any(|k| k == r.kind()))
        && filter.cgroup.as_deref().is_none_or(|g| glob(g, r.cgroup()))
}

/// Glob match with `*` (any run, `/` included) and `?` (one character).
#[must_use]
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        assert!(glob("/kubepods*", "/kubepods.slice/a/b"));
        assert!(glob(
            "*/cri-containerd-*.scope",
            "/k/p/cri-containerd-ab.scope"
        ));
        assert!(glob("/nw-?", "/nw-1"));
        assert!(!glob("/nw-?", "/nw-12"));
        assert!(!glob("/a*", "/b/a"));
        assert!(glob("*", ""));
        assert!(glob("/x", "/x"));
        assert!(!glob("/x", "/xy"));
    }
}
