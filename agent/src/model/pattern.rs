//! Globs on cgroup paths and Kubernetes names (`*` any run of characters, `/` included; `?`
//! one character; `[a-z]` a class), compiled once.

use globset::{Glob, GlobMatcher};

/// A compiled glob, compared by its text.
#[derive(Clone, Debug)]
pub struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

impl Pattern {
    pub fn new(text: &str) -> Result<Self, globset::Error> {
        Ok(Self {
            text: text.to_owned(),
            matcher: Glob::new(text)?.compile_matcher(),
        })
    }

    #[must_use]
    pub fn matches(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Pattern {}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str, s: &str) -> bool {
        Pattern::new(p).expect("valid").matches(s)
    }

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
        assert!(Pattern::new("/a[").is_err());
    }
}
