//! `nodewarden rules validate FILE` and `nodewarden rules schema`: a rules file checked whole
//! (every problem with its line and column), and the JSON Schema of rules files.

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::rules::file;

/// Checks the rules file at `path`: prints its rules, or fails listing every problem.
pub fn validate(path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match file::parse(&text, &path.display().to_string()) {
        Ok(rules) => {
            println!("{}: {} rule(s), valid", path.display(), rules.rules.len());
            for r in &rules.rules {
                let limits: Vec<&str> = r.limits.iter().map(|l| l.file_name()).collect();
                println!(
                    "  {}: {} ({:?}, {:?})",
                    r.name,
                    limits.join(", "),
                    r.when,
                    r.action
                );
            }
            Ok(())
        }
        Err(e) => bail!("{e}"),
    }
}

/// Prints the JSON Schema of rules files.
pub fn schema() {
    print!("{}", file::schema());
}
