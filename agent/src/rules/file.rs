//! The rules file (TOML): parsed and validated whole, every error with its line and column,
//! before anything of it is used. Its JSON Schema is generated from the types here.

use std::{fmt, ops::Range};

use agent_common::LimitFile;
use schemars::JsonSchema;
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::{Condition, Kubernetes, Matcher, Rule, Ruleset};
use crate::model::{
    cgroup::Qos,
    heal::{Action, Mode},
    limit::{self, LimitValue},
    pattern::Pattern,
};

/// The rules that apply when the configuration names no file.
pub const DEFAULT_RULES: &str = include_str!("default-rules.toml");

/// A rules file: rules tried in order; the first whose cgroups and limits match a change
/// decides about it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// The rules, in order.
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "read through the schema: rules are parsed one by one"
    )]
    pub rule: Vec<RawRule>,
}

/// One rule, as written.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Unique name: the `rule` label of the metrics and the audit log.
    pub name: String,
    /// Limit files watched: any of memory.max, memory.high, memory.swap.max, pids.max, cpu.max.
    pub limits: Vec<String>,
    /// When a change is bad: `lowered-by-untrusted` (below the desired value) or
    /// `below-usage` (below current usage plus `margin`).
    pub when: When,
    /// With `below-usage`: the room the value must leave above usage (bytes with an optional
    /// K/M/G suffix for memory files, a count for pids.max).
    #[serde(default)]
    pub margin: Option<String>,
    /// What to do about a bad change.
    pub action: Action,
    /// This rule's mode; never more active than the configuration's `mode`.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// A desired value that overrides every other source (as the limit file takes it).
    #[serde(default)]
    pub pin: Option<String>,
    /// Refuse, in the kernel, every open of these limit files for writing by a process that is
    /// not a trusted writer (BPF LSM, where the kernel has it): the bad value never takes
    /// effect. In dry-run the open goes through and a would-deny is recorded. The guard sees
    /// who opens, not what they would write: every untrusted writer is refused, whatever the
    /// value. Where the guard cannot run, the rule's `action` still applies to the write.
    #[serde(default)]
    pub protect: bool,
    /// Whether cgroups of systemd units (not pods or containers) are written. systemd
    /// re-applies its own view of a unit's limits on daemon-reload, undoing a repair: without
    /// this, such cgroups get an alert that says so.
    #[serde(default)]
    pub systemd_units: bool,
    /// Cgroup paths (relative to the cgroup2 mount, leading `/`), as globs: `*` any run of
    /// characters (`/` included), `?` one, `[a-z]` a class. Absent: any.
    #[serde(default)]
    pub cgroups: Option<Vec<String>>,
    /// Which Kubernetes cgroups: `pod`, `container`. Absent: any cgroup, in Kubernetes or not.
    #[serde(default)]
    pub kubernetes: Option<Vec<Kubernetes>>,
    /// Kubernetes namespaces, as globs (names from the API server, else kubelet's log
    /// directories).
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
    /// Pod names, as globs.
    #[serde(default)]
    pub pods: Option<Vec<String>>,
    /// Container names, as globs.
    #[serde(default)]
    pub containers: Option<Vec<String>>,
    /// QoS classes: guaranteed, burstable, besteffort.
    #[serde(default)]
    pub qos: Option<Vec<Qos>>,
}

/// When a change is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum When {
    /// An untrusted writer (or a change nobody was seen making) left the value below the
    /// desired one.
    LoweredByUntrusted,
    /// An untrusted writer (or a change nobody was seen making) left the value below current
    /// usage plus `margin`.
    BelowUsage,
}

/// The limits a rule may watch: those whose lower value restricts a workload.
pub const WATCHABLE: [LimitFile; 5] = [
    LimitFile::MemoryMax,
    LimitFile::MemoryHigh,
    LimitFile::MemorySwapMax,
    LimitFile::PidsMax,
    LimitFile::CpuMax,
];

/// A problem in a rules file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Every problem of a rules file.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {} problem(s):\n{}", errors.len(), list(origin, errors))]
pub struct RulesError {
    pub origin: String,
    pub errors: Vec<RuleError>,
}

fn list(origin: &str, errors: &[RuleError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {origin}:{e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The embedded default ruleset.
pub fn default_rules() -> Result<Ruleset, RulesError> {
    parse(DEFAULT_RULES, "embedded default rules")
}

/// Parses and validates a rules file's text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Ruleset, RulesError> {
    let mut errors = Vec::new();
    let rules = rules(text, &mut |span, message| {
        let (line, column) = line_column(text, span.start);
        errors.push(RuleError {
            line,
            column,
            message,
        });
    });
    errors.sort_by_key(|e| (e.line, e.column));
    if errors.is_empty() {
        Ok(Ruleset { rules })
    } else {
        Err(RulesError {
            origin: origin.to_owned(),
            errors,
        })
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, last)| last)
        .chars()
        .count()
        + 1;
    (line, column)
}

type Report<'a> = dyn FnMut(Range<usize>, String) + 'a;

/// The valid rules of `text`; each problem goes to `report`.
fn rules(text: &str, report: &mut Report<'_>) -> Vec<Rule> {
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            report(e.span().unwrap_or(0..0), e.message().to_owned());
        }
        return Vec::new();
    }
    let mut rules = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (key, value) in doc.get_ref() {
        if key.get_ref().as_ref() != "rule" {
            report(
                key.span(),
                format!(
                    "unknown key {:?}: a rules file holds [[rule]] tables",
                    key.get_ref()
                ),
            );
            continue;
        }
        let DeValue::Array(items) = value.get_ref() else {
            report(
                value.span(),
                "`rule` must be an array of tables ([[rule]])".into(),
            );
            continue;
        };
        for item in items {
            let DeValue::Table(table) = item.get_ref() else {
                report(item.span(), "each rule must be a table".into());
                continue;
            };
            let raw = match RawRule::deserialize(ValueDeserializer::from(item.clone())) {
                Ok(r) => r,
                Err(e) => {
                    report(e.span().unwrap_or(item.span()), e.message().to_owned());
                    continue;
                }
            };
            let at = |field: &str| span_of(table, field).unwrap_or(item.span());
            if names.contains(&raw.name) {
                report(at("name"), format!("a second rule named {:?}", raw.name));
            }
            names.push(raw.name.clone());
            if let Some(rule) = compile(raw, table, &at, report) {
                rules.push(rule);
            }
        }
    }
    rules
}

/// The span of `field`'s value in `table`.
fn span_of(table: &DeTable<'_>, field: &str) -> Option<Range<usize>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == field)
        .map(|(_, v)| v.span())
}

/// The span of element `i` of the array `field` in `table`.
fn element_span(table: &DeTable<'_>, field: &str, i: usize) -> Option<Range<usize>> {
    let (_, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == field)?;
    match v.get_ref() {
        DeValue::Array(a) => a.get(i).map(toml::Spanned::span),
        _ => None,
    }
}

/// A valid rule from its raw form, or `None` after reporting its problems.
#[expect(
    clippy::too_many_lines,
    reason = "every key of a rule checked, every problem listed"
)]
fn compile(
    raw: RawRule,
    table: &DeTable<'_>,
    at: &dyn Fn(&str) -> Range<usize>,
    report: &mut Report<'_>,
) -> Option<Rule> {
    let mut problems = 0;
    let mut bad = |span: Range<usize>, message: String| {
        problems += 1;
        report(span, message);
    };
    if raw.name.trim().is_empty() {
        bad(at("name"), "the rule's name is empty".into());
    }
    let mut limits = Vec::new();
    if raw.limits.is_empty() {
        bad(at("limits"), "`limits` names no limit file".into());
    }
    for (i, name) in raw.limits.iter().enumerate() {
        let span = element_span(table, "limits", i).unwrap_or_else(|| at("limits"));
        match LimitFile::from_file_name(name).filter(|l| WATCHABLE.contains(l)) {
            Some(l) if !limits.contains(&l) => limits.push(l),
            Some(_) => bad(span, format!("{name} is listed twice")),
            None => bad(
                span,
                format!(
                    "{name:?} is not a watchable limit file (one of {})",
                    WATCHABLE.map(LimitFile::file_name).join(", ")
                ),
            ),
        }
    }
    let when = match (raw.when, &raw.margin) {
        (When::LoweredByUntrusted, None) => Some(Condition::LoweredByUntrusted),
        (When::LoweredByUntrusted, Some(_)) => {
            bad(
                at("margin"),
                "`margin` goes with when = \"below-usage\"".into(),
            );
            None
        }
        (When::BelowUsage, margin) => {
            if let Some(l) = limits.iter().find(|l| usage_file(**l).is_none()) {
                bad(
                    at("when"),
                    format!(
                        "\"below-usage\" has no usage to compare {} with",
                        l.file_name()
                    ),
                );
            }
            let margin = match margin {
                None => Some(0),
                Some(m) => parse_margin(m, &limits)
                    .map_err(|e| bad(at("margin"), e))
                    .ok(),
            };
            margin.map(|margin| Condition::BelowUsage { margin })
        }
    };
    let pin = match &raw.pin {
        None => Some(Vec::new()),
        Some(text) => {
            let mut pins = Vec::new();
            for l in &limits {
                match limit::parse(*l, text) {
                    Ok(v) => pins.push((*l, v)),
                    Err(e) => bad(
                        at("pin"),
                        format!("pin {text:?} for {}: {e}", l.file_name()),
                    ),
                }
            }
            Some(pins)
        }
    };
    let mut globs = |field: &str, list: Option<&Vec<String>>| -> Option<Vec<Pattern>> {
        let list = list?;
        if list.is_empty() {
            bad(
                at(field),
                format!("`{field}` is empty: leave it out to match any"),
            );
        }
        let mut out = Vec::new();
        for (i, g) in list.iter().enumerate() {
            let span = element_span(table, field, i).unwrap_or_else(|| at(field));
            if field == "cgroups" && !g.starts_with('/') {
                bad(
                    span.clone(),
                    format!("{g:?}: cgroup paths start with / (relative to the cgroup2 mount)"),
                );
            }
            match Pattern::new(g) {
                Ok(p) => out.push(p),
                Err(e) => bad(span, format!("{g:?}: {e}")),
            }
        }
        Some(out)
    };
    let matcher = Matcher {
        cgroups: globs("cgroups", raw.cgroups.as_ref()),
        namespaces: globs("namespaces", raw.namespaces.as_ref()),
        pods: globs("pods", raw.pods.as_ref()),
        containers: globs("containers", raw.containers.as_ref()),
        kubernetes: raw.kubernetes.clone(),
        qos: raw.qos.clone(),
    };
    for (field, empty) in [
        (
            "kubernetes",
            raw.kubernetes.as_ref().is_some_and(Vec::is_empty),
        ),
        ("qos", raw.qos.as_ref().is_some_and(Vec::is_empty)),
    ] {
        if empty {
            bad(
                at(field),
                format!("`{field}` is empty: leave it out to match any"),
            );
        }
    }
    if problems > 0 {
        return None;
    }
    Some(Rule {
        name: raw.name,
        limits,
        when: when?,
        action: raw.action,
        mode: raw.mode,
        pins: pin?,
        protect: raw.protect,
        systemd_units: raw.systemd_units,
        matcher,
    })
}

/// The usage file `limit` is compared with by `below-usage`.
#[must_use]
pub const fn usage_file(limit: LimitFile) -> Option<&'static str> {
    match limit {
        LimitFile::MemoryMax | LimitFile::MemoryHigh => Some("memory.current"),
        LimitFile::MemorySwapMax => Some("memory.swap.current"),
        LimitFile::PidsMax => Some("pids.current"),
        _ => None,
    }
}

/// A margin, in the unit of every one of `limits` (bytes, or a count for pids.max alone).
fn parse_margin(text: &str, limits: &[LimitFile]) -> Result<u64, String> {
    let kinds: Vec<bool> = limits.iter().map(|l| *l == LimitFile::PidsMax).collect();
    if kinds.contains(&true) && kinds.contains(&false) {
        return Err(
            "`margin` cannot be both a byte count and a task count: put pids.max in a rule of its own"
                .into(),
        );
    }
    let limit = limits.first().copied().unwrap_or(LimitFile::MemoryMax);
    match limit::parse(limit, text) {
        Ok(LimitValue::Bytes(n) | LimitValue::Count(n)) => Ok(n),
        Ok(_) => Err(format!("margin {text:?} is not a number")),
        Err(e) => Err(format!("margin {text:?}: {e}")),
    }
}

/// The JSON Schema of rules files (docs/rules.schema.json).
#[must_use]
pub fn schema() -> String {
    let schema = schemars::schema_for!(RulesFile);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match parse(text, "t") {
            Ok(r) => panic!("parsed: {r:?}"),
            Err(e) => e.errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn the_default_rules_parse() {
        let r = default_rules().expect("valid");
        assert_eq!(r.rules.len(), 1);
        let rule = &r.rules[0];
        assert_eq!(
            rule.limits,
            [
                LimitFile::MemoryMax,
                LimitFile::MemoryHigh,
                LimitFile::MemorySwapMax,
                LimitFile::PidsMax
            ]
        );
        assert_eq!(rule.action, Action::Restore);
        assert_eq!(rule.when, Condition::LoweredByUntrusted);
    }

    #[test]
    fn every_error_is_listed_with_its_place() {
        let text = r#"
[[rule]]
name = "a"
limits = ["memory.max", "memory.low"]
when = "lowered-by-untrusted"
action = "restore"
pin = "lots"

[[rule]]
name = "a"
limits = ["pids.max"]
when = "below-usage"
margin = "1G"
action = "alert"
cgroups = ["kubepods/*", "/x/[y"]

[[rule]]
name = "c"
limits = ["memory.max"]
when = "sometimes"
action = "restore"

[other]
"#;
        let e = errors(text);
        assert_eq!(
            e,
            [
                "4:25: \"memory.low\" is not a watchable limit file (one of memory.max, memory.high, memory.swap.max, pids.max, cpu.max)",
                "7:7: pin \"lots\" for memory.max: \"lots\" is not a number with an optional K/M/G/T/P/E suffix, nor \"max\"",
                "10:8: a second rule named \"a\"",
                "13:10: margin \"1G\": \"1G\" is not a whole number nor \"max\"",
                "15:12: \"kubepods/*\": cgroup paths start with / (relative to the cgroup2 mount)",
                "15:26: \"/x/[y\": error parsing glob '/x/[y': unclosed character class; missing ']'",
                "20:8: unknown variant `sometimes`, expected `lowered-by-untrusted` or `below-usage`",
                "23:2: unknown key \"other\": a rules file holds [[rule]] tables",
            ],
            "{e:#?}"
        );
    }

    #[test]
    fn syntax_errors_have_places_too() {
        let e = errors("[[rule]]\nname = \"a\nlimits = []\n");
        assert!(e[0].starts_with("2:"), "{e:?}");
    }

    #[test]
    fn unknown_fields_and_empty_lists_are_refused() {
        let e = errors(
            "[[rule]]\nname = \"a\"\nlimits = [\"memory.max\"]\nwhen = \"lowered-by-untrusted\"\naction = \"restore\"\nqos = []\ncolour = \"red\"\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("unknown field `colour`"), "{e:?}");
        let e = errors(
            "[[rule]]\nname = \"a\"\nlimits = [\"memory.max\"]\nwhen = \"lowered-by-untrusted\"\naction = \"restore\"\nqos = []\n",
        );
        assert_eq!(e, ["6:7: `qos` is empty: leave it out to match any"]);
    }

    #[test]
    fn margins_and_pins_take_the_limit_files_units() {
        let ok = "[[rule]]\nname = \"a\"\nlimits = [\"memory.max\", \"memory.high\"]\nwhen = \"below-usage\"\nmargin = \"64M\"\naction = \"restore\"\npin = \"2G\"\n";
        let r = parse(ok, "t").expect("valid");
        assert_eq!(r.rules[0].when, Condition::BelowUsage { margin: 64 << 20 });
        assert_eq!(
            r.rules[0].pins,
            [
                (LimitFile::MemoryMax, LimitValue::Bytes(2 << 30)),
                (LimitFile::MemoryHigh, LimitValue::Bytes(2 << 30))
            ]
        );
        let mixed = ok.replace("\"memory.high\"", "\"pids.max\"");
        assert!(errors(&mixed)[0].contains("both a byte count and a task count"));
        let cpu = "[[rule]]\nname = \"a\"\nlimits = [\"cpu.max\"]\nwhen = \"below-usage\"\naction = \"restore\"\n";
        assert!(errors(cpu)[0].contains("no usage to compare cpu.max with"));
    }

    #[test]
    fn the_schema_in_the_docs_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/rules.schema.json");
        let docs = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            docs == schema(),
            "docs/rules.schema.json is out of date: run `nodewarden rules schema > docs/rules.schema.json`"
        );
    }
}
