//! The end-of-program record the container's boot script writes to stderr (see `boot.py`):
//! found in the stream, checked against the run's nonce, and kept out of the program's stderr.

use serde::Deserialize;

const MARK: &[u8] = b"\0FLEETBOX-END ";
/// A candidate record longer than this is the program's own output, not ours.
const MAX_RECORD: usize = 4096;

/// What the boot script saw when the program ended.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(super) struct EndRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub utime_ms: u64,
    pub stime_ms: u64,
    pub maxrss_kb: u64,
    /// Bytes of the program's stdout and stderr it forwarded before the record.
    pub stdout: u64,
    pub stderr: u64,
}

/// Splits the container's stderr into the program's bytes and the record.
pub(super) struct EndScanner {
    nonce: Vec<u8>,
    held: Vec<u8>,
    pub record: Option<EndRecord>,
}

impl EndScanner {
    pub fn new(nonce: &str) -> EndScanner {
        EndScanner {
            nonce: nonce.as_bytes().to_vec(),
            held: Vec::new(),
            record: None,
        }
    }

    /// The bytes of this chunk that are the program's; a possible start of a record is held
    /// back until the rest of it comes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.record.is_some() {
            return chunk.to_vec();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(buf.len());
        let mut rest: &[u8] = &buf;
        loop {
            let Some(at) = find(rest, MARK) else {
                let keep = partial_suffix(rest);
                out.extend_from_slice(&rest[..rest.len() - keep]);
                self.held = rest[rest.len() - keep..].to_vec();
                return out;
            };
            out.extend_from_slice(&rest[..at]);
            let candidate = &rest[at..];
            let Some(nl) = candidate.iter().position(|&b| b == b'\n') else {
                if candidate.len() > MAX_RECORD {
                    out.extend_from_slice(candidate);
                } else {
                    self.held = candidate.to_vec();
                }
                return out;
            };
            match self.parse(&candidate[MARK.len()..nl]) {
                Some(record) => {
                    self.record = Some(record);
                    out.extend_from_slice(&candidate[nl + 1..]);
                    return out;
                }
                None => {
                    // A lookalike the program printed: its bytes are output like any other.
                    out.extend_from_slice(&candidate[..=nl]);
                    rest = &candidate[nl + 1..];
                }
            }
        }
    }

    /// Whatever is still held back (the stream ended in the middle of a lookalike).
    pub fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    fn parse(&self, line: &[u8]) -> Option<EndRecord> {
        let rest = line.strip_prefix(self.nonce.as_slice())?;
        let json = rest.strip_prefix(b" ")?;
        serde_json::from_slice(json).ok()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// How many bytes at the end of `buf` could begin [`MARK`].
fn partial_suffix(buf: &[u8]) -> usize {
    (1..MARK.len().min(buf.len() + 1))
        .rev()
        .find(|&n| buf[buf.len() - n..] == MARK[..n])
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REC: &str = r#"{"code": 3, "signal": null, "utime_ms": 1, "stime_ms": 2, "maxrss_kb": 9, "stdout": 5, "stderr": 6}"#;

    fn record_line(nonce: &str) -> Vec<u8> {
        let mut v = MARK.to_vec();
        v.extend_from_slice(format!("{nonce} {REC}\n").as_bytes());
        v
    }

    #[test]
    fn the_record_is_found_across_chunks_and_kept_out_of_stderr() {
        let mut all = b"oops\n".to_vec();
        all.extend(record_line("n1"));
        for split in 0..all.len() {
            let mut s = EndScanner::new("n1");
            let mut out = s.push(&all[..split]);
            out.extend(s.push(&all[split..]));
            out.extend(s.flush());
            assert_eq!(out, b"oops\n", "split at {split}");
            assert_eq!(s.record.as_ref().unwrap().code, Some(3));
        }
    }

    #[test]
    fn a_lookalike_with_the_wrong_nonce_is_output() {
        let mut s = EndScanner::new("secret");
        let mut fake = record_line("guess");
        fake.extend_from_slice(b"more");
        let mut out = s.push(&fake);
        out.extend(s.flush());
        assert_eq!(out, fake);
        assert!(s.record.is_none());
        let out = s.push(&record_line("secret"));
        assert!(out.is_empty());
        assert_eq!(s.record.as_ref().unwrap().stderr, 6);
    }
}
