//! Parse the uncaught Python exception out of stderr.
//!
//! CPython prints `Traceback (most recent call last):`, then a `File "..", line N, in f` line per
//! frame (each usually followed by the source line and, on 3.11+, a caret line), then
//! `Type: message`. A syntax error in the main file prints no header, only the location and the
//! `SyntaxError: ...` line. Chained exceptions print several blocks; the last one is what killed
//! the program.

use fleetbox_proto::{ExceptionInfo, Frame};

const HEADER: &str = "Traceback (most recent call last):";
/// The most of an exception message kept (the whole text stays in stderr), and the most
/// frames (the outermost and innermost halves): a report stays small whatever a program raises.
pub const MAX_MESSAGE: usize = 64 << 10;
pub const MAX_FRAMES: usize = 200;

/// The last uncaught exception in `stderr`, if any.
pub fn parse(stderr: &str) -> Option<ExceptionInfo> {
    let lines: Vec<&str> = stderr.lines().collect();
    let start = lines.iter().rposition(|l| l.trim_end() == HEADER);
    let body = match start {
        Some(i) => &lines[i + 1..],
        None => &lines[..],
    };

    let mut frames = Vec::new();
    let mut exception = None;
    let mut i = 0;
    while i < body.len() {
        let line = body[i];
        if let Some(frame) = parse_frame_line(line) {
            let mut frame = frame;
            // The next indented line that is not a caret line is the source.
            if let Some(next) = body.get(i + 1)
                && next.starts_with("    ")
                && !is_caret_line(next)
            {
                frame.source = Some(next.trim().to_string());
                i += 1;
            }
            frames.push(frame);
        } else if !line.starts_with(' ')
            && let Some((kind, message)) = parse_exception_line(line)
        {
            // Message lines after the first (e.g. multi-line messages) are appended.
            let mut message = message;
            let mut j = i + 1;
            while j < body.len() && !body[j].is_empty() && parse_frame_line(body[j]).is_none() {
                if body[j].trim_end() == HEADER {
                    break;
                }
                message.push('\n');
                message.push_str(body[j]);
                j += 1;
            }
            exception = Some((kind, message));
            // Keep scanning: a later line may be a better candidate (chained output).
            i = j;
            continue;
        }
        i += 1;
    }

    let (kind, message) = exception?;
    if start.is_none() && frames.is_empty() {
        // Without a traceback header we only trust syntax-style errors that carry a location.
        return None;
    }
    Some(ExceptionInfo {
        kind: clip(kind, 1024),
        message: clip(message, MAX_MESSAGE),
        traceback: keep_ends(frames, MAX_FRAMES),
    })
}

/// `s` cut to at most `max` bytes (on a character boundary), saying how much was cut.
fn clip(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = s.len() - end;
    s.truncate(end);
    s.push_str(&format!("... [{cut} more bytes in stderr]"));
    s
}

/// The first and last `max / 2` frames of a deeper traceback, each line at most 1 KiB.
fn keep_ends(mut frames: Vec<Frame>, max: usize) -> Vec<Frame> {
    if frames.len() > max {
        let tail = frames.split_off(frames.len() - max / 2);
        frames.truncate(max / 2);
        frames.extend(tail);
    }
    frames
        .into_iter()
        .map(|f| Frame {
            file: clip(f.file, 1024),
            line: f.line,
            function: clip(f.function, 1024),
            source: f.source.map(|s| clip(s, 1024)),
        })
        .collect()
}

fn is_caret_line(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && t.chars().all(|c| matches!(c, '^' | '~' | ' '))
}

/// `  File "/x/main.py", line 3, in <module>`; the `in` part is absent for syntax errors.
fn parse_frame_line(line: &str) -> Option<Frame> {
    let rest = line.trim_start().strip_prefix("File \"")?;
    let quote = rest.find("\", line ")?;
    let file = rest[..quote].to_string();
    let after = &rest[quote + "\", line ".len()..];
    let (num, function) = match after.split_once(", in ") {
        Some((n, f)) => (n, f.trim().to_string()),
        None => (after.trim(), String::new()),
    };
    let line_no = num.trim().parse().ok()?;
    Some(Frame {
        file,
        line: line_no,
        function,
        source: None,
    })
}

/// `ValueError: bad`, `KeyboardInterrupt`, `mod.sub.CustomError: text`.
fn parse_exception_line(line: &str) -> Option<(String, String)> {
    let (kind, message) = match line.split_once(": ") {
        Some((k, m)) => (k, m.to_string()),
        None => (line.trim_end().trim_end_matches(':'), String::new()),
    };
    let valid_ident = |s: &str| {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if kind.is_empty() || !kind.split('.').all(valid_ident) {
        return None;
    }
    let last = kind.rsplit('.').next().unwrap_or(kind);
    let looks_like_exception = ["Error", "Exception", "Exit", "Interrupt", "Warning"]
        .iter()
        .any(|s| last.ends_with(s))
        || matches!(
            last,
            "StopIteration" | "StopAsyncIteration" | "GeneratorExit"
        );
    looks_like_exception.then(|| (kind.to_string(), message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_traceback() {
        let err = "Traceback (most recent call last):\n  File \"/w/main.py\", line 4, in <module>\n    f()\n  File \"/w/main.py\", line 2, in f\n    raise ValueError(\"bad value\")\nValueError: bad value\n";
        let e = parse(err).unwrap();
        assert_eq!(e.kind, "ValueError");
        assert_eq!(e.message, "bad value");
        assert_eq!(e.traceback.len(), 2);
        assert_eq!(e.traceback[1].function, "f");
        assert_eq!(e.traceback[1].line, 2);
        assert_eq!(
            e.traceback[1].source.as_deref(),
            Some("raise ValueError(\"bad value\")")
        );
    }

    #[test]
    fn caret_lines_are_not_source() {
        let err = "Traceback (most recent call last):\n  File \"/w/main.py\", line 1, in <module>\n    x = 1 / 0\n        ~~^~~\nZeroDivisionError: division by zero\n";
        let e = parse(err).unwrap();
        assert_eq!(e.kind, "ZeroDivisionError");
        assert_eq!(e.traceback[0].source.as_deref(), Some("x = 1 / 0"));
    }

    #[test]
    fn chained_takes_last() {
        let err = "Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\nKeyError: 'k'\n\nDuring handling of the above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File \"a.py\", line 3, in <module>\nmypkg.CustomError: wrapped\n";
        let e = parse(err).unwrap();
        assert_eq!(e.kind, "mypkg.CustomError");
        assert_eq!(e.message, "wrapped");
        assert_eq!(e.traceback[0].line, 3);
    }

    #[test]
    fn syntax_error_without_header() {
        let err =
            "  File \"/w/main.py\", line 1\n    def (\n        ^\nSyntaxError: invalid syntax\n";
        let e = parse(err).unwrap();
        assert_eq!(e.kind, "SyntaxError");
        assert_eq!(e.traceback[0].line, 1);
        assert_eq!(e.traceback[0].function, "");
    }

    #[test]
    fn bare_exception_and_noise() {
        let err = "Traceback (most recent call last):\n  File \"m.py\", line 1, in <module>\nKeyboardInterrupt\n";
        assert_eq!(parse(err).unwrap().kind, "KeyboardInterrupt");
        assert!(parse("just some log line\nError: not python\n").is_none());
        assert!(parse("").is_none());
    }

    #[test]
    fn huge_messages_and_deep_tracebacks_are_bounded() {
        let mut stderr = String::from("Traceback (most recent call last):\n");
        for i in 0..1000 {
            stderr.push_str(&format!("  File \"/w/main.py\", line {i}, in f\n"));
        }
        stderr.push_str(&format!("ValueError: {}\n", "é".repeat(100_000)));
        let e = parse(&stderr).unwrap();
        assert_eq!(e.kind, "ValueError");
        assert!(e.message.len() < MAX_MESSAGE + 64, "{}", e.message.len());
        assert!(e.message.ends_with("more bytes in stderr]"));
        assert_eq!(e.traceback.len(), MAX_FRAMES);
        assert_eq!(e.traceback[0].line, 0);
        assert_eq!(e.traceback[MAX_FRAMES - 1].line, 999);
    }
}
