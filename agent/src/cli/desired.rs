//! `nodewarden desired [--cgroup GLOB]`: every watched limit, its desired value and where that
//! value comes from, as the running agent last wrote them to its state file (every 5 s when
//! they change).

use std::{fmt::Write as _, path::Path, time::SystemTime};

use anyhow::{Context as _, Result, bail};

use crate::{
    executor,
    model::{heal::StateFile, pattern::Pattern},
};

/// Prints the desired values in `state_file` of cgroups matching `cgroup`.
pub fn run(state_file: &Path, cgroup: Option<&Pattern>, json: bool) -> Result<()> {
    if state_file.as_os_str().is_empty() {
        bail!(
            "remediation.state_file is empty in this configuration: the agent keeps no desired values on disk"
        );
    }
    let text = std::fs::read(state_file).with_context(|| {
        format!(
            "reading {} (is the agent running with this configuration?)",
            state_file.display()
        )
    })?;
    let file: StateFile = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a state file", state_file.display()))?;
    let age = std::fs::metadata(state_file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok());
    let mut out = String::new();
    if !json {
        if file.boot_id != executor::boot_id() {
            writeln!(
                out,
                "note: written before this boot; the agent takes none of it up"
            )?;
        }
        if let Some(age) = age {
            writeln!(
                out,
                "as of {} s ago ({})",
                age.as_secs(),
                state_file.display()
            )?;
        }
        writeln!(
            out,
            "{:<72} {:<16} {:<22} SOURCE",
            "CGROUP", "LIMIT", "DESIRED"
        )?;
    }
    for k in file
        .values
        .iter()
        .filter(|k| cgroup.is_none_or(|g| g.matches(&k.path)))
    {
        if json {
            writeln!(out, "{}", serde_json::to_string(k)?)?;
        } else {
            writeln!(
                out,
                "{:<72} {:<16} {:<22} {}",
                k.path,
                k.limit,
                k.value,
                k.source.as_str()
            )?;
        }
    }
    print!("{}", super::printable(&out, true));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::heal::{DesiredSource, Kept};

    #[test]
    fn reads_what_the_agent_kept() {
        let dir = std::env::temp_dir().join(format!("nw-desired-{}", std::process::id()));
        let path = dir.join("desired.json");
        let file = StateFile {
            boot_id: executor::boot_id(),
            values: vec![Kept {
                id: 7,
                path: "/kubepods/burstable/podx".into(),
                limit: "memory.max".into(),
                value: "2147483648".into(),
                source: DesiredSource::Kubernetes,
            }],
        };
        executor::save(&path, &file).expect("saved");
        run(&path, None, false).expect("printed");
        let glob = Pattern::new("/system.slice/*").expect("a glob");
        run(&path, Some(&glob), true).expect("printed");
        assert!(run(Path::new(""), None, false).is_err());
        assert!(run(&dir.join("absent.json"), None, false).is_err());
        std::fs::write(&path, "{").expect("written");
        assert!(run(&path, None, false).is_err(), "not a state file");
        let _ = std::fs::remove_dir_all(dir);
    }
}
