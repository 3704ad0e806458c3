//! Content-addressed blob store for large outputs (a local directory, keyed by sha256).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::ids::sha256_hex;

/// Values larger than this go to the blob store instead of the database.
pub const INLINE_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct Blobs {
    root: PathBuf,
}

impl Blobs {
    pub fn open(root: &Path) -> std::io::Result<Blobs> {
        fs_err::create_dir_all(root)?;
        Ok(Blobs {
            root: root.to_path_buf(),
        })
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.root.join(&hash[..2]).join(hash)
    }

    /// Store `data` (durably: written to a temporary name, synced, renamed); returns its hash.
    pub fn put(&self, data: &[u8]) -> std::io::Result<String> {
        let hash = sha256_hex(data);
        let path = self.path(&hash);
        if path.exists() {
            return Ok(hash);
        }
        let dir = path.parent().expect("blob paths have a parent");
        fs_err::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(data)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(hash)
    }

    /// A blob written in pieces (an upload streamed to disk), stored once finished.
    pub fn writer(&self) -> std::io::Result<BlobWriter> {
        let tmp = tempfile::NamedTempFile::new_in(&self.root)?;
        Ok(BlobWriter {
            blobs: self.clone(),
            tmp,
            hasher: sha2::Sha256::default(),
            bytes: 0,
        })
    }

    /// Whether a blob is stored (`hash` must be a sha256).
    pub fn contains(&self, hash: &str) -> bool {
        is_sha256(hash) && self.path(hash).is_file()
    }

    /// A stored blob's size in bytes; `None` when it is not stored.
    pub fn size(&self, hash: &str) -> Option<u64> {
        if !is_sha256(hash) {
            return None;
        }
        fs_err::metadata(self.path(hash)).ok().map(|m| m.len())
    }

    pub fn get(&self, hash: &str) -> std::io::Result<Vec<u8>> {
        if !is_sha256(hash) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{hash}` is not a sha256"),
            ));
        }
        fs_err::read(self.path(hash))
    }
}

/// A lowercase hex sha256: the only names the store has.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An upload on its way to the store: bytes go to a temporary file while they are hashed.
pub struct BlobWriter {
    blobs: Blobs,
    tmp: tempfile::NamedTempFile,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        use sha2::Digest;
        self.hasher.update(data);
        self.bytes += data.len() as u64;
        self.tmp.write_all(data)
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The hash of what was written. Stored (synced, renamed into place) only if it is
    /// `expected`; otherwise the temporary file is dropped and the actual hash is the error.
    pub fn finish(self, expected: &str) -> Result<String, FinishError> {
        use sha2::Digest;
        let hash = hex::encode(self.hasher.finalize());
        if hash != expected {
            return Err(FinishError::Mismatch { actual: hash });
        }
        let path = self.blobs.path(&hash);
        if path.exists() {
            return Ok(hash);
        }
        let dir = path.parent().expect("blob paths have a parent");
        fs_err::create_dir_all(dir)?;
        self.tmp.as_file().sync_all()?;
        self.tmp.persist(&path).map_err(|e| e.error)?;
        Ok(hash)
    }
}

/// Why an upload was not stored.
#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    /// What was written hashes to `actual`, not the hash it was sent as.
    #[error("the body hashes to `{actual}`")]
    Mismatch { actual: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let a = blobs.put(b"hello").unwrap();
        let b = blobs.put(b"hello").unwrap();
        assert_eq!(a, b);
        assert_eq!(blobs.get(&a).unwrap(), b"hello");
        assert!(blobs.get("../etc/passwd").is_err());
        assert!(blobs.contains(&a));
        assert!(!blobs.contains("../etc/passwd"));
    }

    #[test]
    fn a_streamed_blob_is_stored_only_under_its_own_hash() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(dir.path()).unwrap();
        let want = sha256_hex(b"hello world");
        let mut w = blobs.writer().unwrap();
        w.write(b"hello ").unwrap();
        w.write(b"world").unwrap();
        assert_eq!(w.len(), 11);
        assert_eq!(w.finish(&want).unwrap(), want.clone());
        assert_eq!(blobs.get(&want).unwrap(), b"hello world");
        let mut w = blobs.writer().unwrap();
        w.write(b"other").unwrap();
        let wrong = "0".repeat(64);
        match w.finish(&wrong) {
            Err(FinishError::Mismatch { actual }) => assert_eq!(actual, sha256_hex(b"other")),
            other => panic!("{other:?}"),
        }
        assert!(!blobs.contains(&wrong));
        // Nothing but the stored blob's directory is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }
}
