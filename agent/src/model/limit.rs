//! Values of cgroup v2 limit files, parsed the way the kernel parses them.

use std::fmt;

use agent_common::LimitFile;

/// A limit's value as the kernel understood it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitValue {
    /// `max`: no limit.
    Max,
    /// memory.*: bytes (the kernel stores pages, so reading back rounds down to a page).
    Bytes(u64),
    /// pids.max: a count of tasks.
    Count(u64),
    /// cpu.max: quota (None for `max`) per period, both in microseconds.
    Cpu {
        quota_us: Option<u64>,
        period_us: u64,
    },
}

impl LimitValue {
    /// The value as a gauge: bytes or count, `+Inf` for `max`; cpu.max as cores (quota/period).
    #[must_use]
    #[expect(
        clippy::cast_precision_loss,
        reason = "gauges are f64; limits fit with room"
    )]
    pub fn as_f64(self) -> f64 {
        match self {
            Self::Max | Self::Cpu { quota_us: None, .. } => f64::INFINITY,
            Self::Bytes(n) | Self::Count(n) => n as f64,
            Self::Cpu {
                quota_us: Some(q),
                period_us,
            } => q as f64 / period_us.max(1) as f64,
        }
    }
}

impl fmt::Display for LimitValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Max => f.write_str("max"),
            Self::Bytes(n) | Self::Count(n) => write!(f, "{n}"),
            Self::Cpu {
                quota_us: None,
                period_us,
            } => write!(f, "max {period_us}"),
            Self::Cpu {
                quota_us: Some(q),
                period_us,
            } => write!(f, "{q} {period_us}"),
        }
    }
}

/// Why a value is not one the kernel would accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("empty value")]
    Empty,
    #[error("{0:?} is not a number with an optional K/M/G/T/P/E suffix, nor \"max\"")]
    Bytes(String),
    #[error("{0:?} is not a whole number nor \"max\"")]
    Count(String),
    #[error("{0:?} is not \"QUOTA [PERIOD]\" (QUOTA a number or \"max\")")]
    Cpu(String),
    #[error("{0} overflows 64 bits")]
    Overflow(String),
}

/// The kernel's default cpu.max period, used when a write gives only the quota.
pub const DEFAULT_CPU_PERIOD_US: u64 = 100_000;

/// Parses `raw` (surrounding whitespace ignored) as the kernel would for `limit`.
pub fn parse(limit: LimitFile, raw: &str) -> Result<LimitValue, ParseError> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(ParseError::Empty);
    }
    match limit {
        LimitFile::PidsMax => {
            if s == "max" {
                return Ok(LimitValue::Max);
            }
            s.parse()
                .map(LimitValue::Count)
                .map_err(|_| ParseError::Count(s.to_owned()))
        }
        LimitFile::CpuMax => parse_cpu(s),
        _ => {
            if s == "max" {
                return Ok(LimitValue::Max);
            }
            memparse(s).map(LimitValue::Bytes)
        }
    }
}

/// The kernel's `memparse`: digits, then an optional binary suffix.
fn memparse(s: &str) -> Result<u64, ParseError> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    if num.is_empty() {
        return Err(ParseError::Bytes(s.to_owned()));
    }
    let shift = match suffix {
        "" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(ParseError::Bytes(s.to_owned())),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| ParseError::Overflow(s.to_owned()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| ParseError::Overflow(s.to_owned()))
}

fn parse_cpu(s: &str) -> Result<LimitValue, ParseError> {
    let bad = || ParseError::Cpu(s.to_owned());
    let mut words = s.split_whitespace();
    let quota = words.next().ok_or_else(bad)?;
    let period_us = match words.next() {
        Some(p) => p.parse().map_err(|_| bad())?,
        None => DEFAULT_CPU_PERIOD_US,
    };
    if words.next().is_some() {
        return Err(bad());
    }
    let quota_us = match quota {
        "max" => None,
        q => Some(q.parse().map_err(|_| bad())?),
    };
    Ok(LimitValue::Cpu {
        quota_us,
        period_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_values() {
        let p = |s| parse(LimitFile::MemoryMax, s);
        assert_eq!(p("max\n"), Ok(LimitValue::Max));
        assert_eq!(p("64M"), Ok(LimitValue::Bytes(64 << 20)));
        assert_eq!(p("512m"), Ok(LimitValue::Bytes(512 << 20)));
        assert_eq!(p(" 67108864 "), Ok(LimitValue::Bytes(67_108_864)));
        assert_eq!(p("1G"), Ok(LimitValue::Bytes(1 << 30)));
        assert_eq!(p("0"), Ok(LimitValue::Bytes(0)));
        assert_eq!(p("abc"), Err(ParseError::Bytes("abc".into())));
        assert_eq!(p("64MB"), Err(ParseError::Bytes("64MB".into())));
        assert_eq!(p("-1"), Err(ParseError::Bytes("-1".into())));
        assert_eq!(p(""), Err(ParseError::Empty));
        assert_eq!(p("16E"), Err(ParseError::Overflow("16E".into())));
        assert_eq!(
            parse(LimitFile::MemoryHigh, "1K"),
            Ok(LimitValue::Bytes(1024))
        );
    }

    #[test]
    fn pids_and_cpu_values() {
        assert_eq!(parse(LimitFile::PidsMax, "100"), Ok(LimitValue::Count(100)));
        assert_eq!(parse(LimitFile::PidsMax, "max"), Ok(LimitValue::Max));
        assert!(parse(LimitFile::PidsMax, "1K").is_err());
        assert_eq!(
            parse(LimitFile::CpuMax, "50000 100000"),
            Ok(LimitValue::Cpu {
                quota_us: Some(50_000),
                period_us: 100_000
            })
        );
        assert_eq!(
            parse(LimitFile::CpuMax, "max"),
            Ok(LimitValue::Cpu {
                quota_us: None,
                period_us: DEFAULT_CPU_PERIOD_US
            })
        );
        assert!(parse(LimitFile::CpuMax, "1 2 3").is_err());
        assert!(parse(LimitFile::CpuMax, "half").is_err());
        let half = parse(LimitFile::CpuMax, "50000 100000").expect("valid");
        assert!((half.as_f64() - 0.5).abs() < f64::EPSILON);
        assert!(LimitValue::Max.as_f64().is_infinite());
        assert_eq!(half.to_string(), "50000 100000");
    }
}
