//! The commands besides `run`: each reads the running agent, the kernel or a process, and
//! prints for a person.

pub mod agent_bench;
pub mod bench;
pub mod burst_bench;
pub mod check;
pub mod desired;
pub mod diagnose;
pub mod events;
pub mod guard_bench;
pub mod idle_bench;
pub mod latency;
pub mod restore_bench;
pub mod rules;
pub mod syscall_bench;
pub mod top;

/// `text` for a terminal: control characters (an escape sequence in a process's name, a path
/// or a value anyone can choose) written as `\u{1b}`, so that nothing printed can move the
/// cursor, recolour or retitle the terminal. Line ends stay when `lines` is set.
#[must_use]
pub fn printable(text: &str, lines: bool) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && !(lines && c == '\n'))
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && !(lines && c == '\n') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}
