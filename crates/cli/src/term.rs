//! What reaches an operator's terminal from a program: control sequences are shown, not obeyed.
//!
//! A program's output, its exception message or a blob can hold ESC/CSI/OSC sequences (an OSC 52
//! clipboard write, a title change, cursor moves that hide lines). Written to a terminal, every
//! control character other than newline and tab is replaced by a visible escape (`\x1b`,
//! `\u{9b}`); written to a pipe or a file (and in `--json`), bytes stay exact.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};

/// `text` with every control character but `\n` and `\t` written as a visible escape: C0
/// (`\x00`–`\x1f`, so ESC and CR), DEL, and the C1 range (`U+0080`–`U+009F`, e.g. the
/// one-character CSI `U+009B`).
pub fn neutralize(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c != '\n' && c != '\t' && c.is_control();
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

/// Write program-controlled bytes to `out`: exact unless `to_terminal`, then as UTF-8 (invalid
/// bytes replaced) with control characters neutralized.
pub fn write_untrusted(
    out: &mut impl Write,
    bytes: &[u8],
    to_terminal: bool,
) -> std::io::Result<()> {
    if !to_terminal {
        return out.write_all(bytes);
    }
    out.write_all(neutralize(&String::from_utf8_lossy(bytes)).as_bytes())
}

pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// A line of program-controlled text for stderr (exception messages, failure reasons).
pub fn for_stderr(text: &str) -> Cow<'_, str> {
    if stderr_is_terminal() {
        neutralize(text)
    } else {
        Cow::Borrowed(text)
    }
}

/// The same for stdout.
pub fn for_stdout(text: &str) -> Cow<'_, str> {
    if stdout_is_terminal() {
        neutralize(text)
    } else {
        Cow::Borrowed(text)
    }
}

/// A time in ms since the Unix epoch, as RFC 3339 to the second (UTC).
pub fn time(ms: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0).unsigned_abs()),
    )
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_shown_not_obeyed() {
        assert_eq!(neutralize("plain\nline\ttab"), "plain\nline\ttab");
        assert_eq!(
            neutralize("\x1b]52;c;aGk=\x07x"),
            "\\x1b]52;c;aGk=\\x07x",
            "OSC 52 clipboard write"
        );
        assert_eq!(neutralize("a\rb"), "a\\x0db");
        assert_eq!(neutralize("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(neutralize("é ✓"), "é ✓");
        let mut v = Vec::new();
        write_untrusted(&mut v, b"\x1b[2J", false).unwrap();
        assert_eq!(v, b"\x1b[2J", "exact when not a terminal");
    }
}
