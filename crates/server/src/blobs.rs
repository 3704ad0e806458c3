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

    pub fn get(&self, hash: &str) -> std::io::Result<Vec<u8>> {
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{hash}` is not a sha256"),
            ));
        }
        fs_err::read(self.path(hash))
    }
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
    }
}
