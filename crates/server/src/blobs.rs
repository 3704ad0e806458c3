//! Content-addressed blob store for large outputs, keyed by sha256: a local directory, or an
//! S3-compatible bucket (`--blob-store s3://bucket/prefix`) with the directory as its cache.
//!
//! With a bucket, the bucket is the store every coordinator sharing the database reads:
//! a blob is written to the local directory and uploaded before it is named anywhere, and one
//! this coordinator lacks is fetched from the bucket into the directory on first read.
//! Uploads stream from the local file (multipart), so a large blob is never whole in memory
//! on its way to the bucket.
//!
//! The bucket is keyed per tenant: a blob a tenant owns is kept under
//! `PREFIX/tenants/<tenant>/<aa>/<sha256>` (a blob two tenants produced is stored once for
//! each), so a tenant's objects can be listed, measured, given their own bucket policy or
//! deleted by prefix. `PREFIX/<aa>/<sha256>` (the shared area) holds what was stored before a
//! tenant was known (an upload that named no lease) and blobs stored before the bucket was
//! keyed per tenant; reads look there after the tenant's area. The local directory is one
//! cache for all tenants: who may read a blob is the database's `blob_owners`, checked by the
//! API before any read.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::{ObjectStore, ObjectStoreExt};

use crate::ids::sha256_hex;

/// Values larger than this go to the blob store instead of the database.
pub const INLINE_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct Blobs {
    root: PathBuf,
    remote: Option<Remote>,
}

/// Where blobs go besides the local directory: `s3://bucket/prefix` and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobStoreConfig {
    pub url: String,
    /// An endpoint other than AWS's (`http://127.0.0.1:9000`, R2's, Ceph's, ...); path-style
    /// requests are used with it.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

#[derive(Clone)]
struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// Why the blob store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("`{}`: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`--blob-store {url}`: {why}")]
    Remote { url: String, why: String },
}

impl Blobs {
    pub fn open(root: &Path) -> std::io::Result<Blobs> {
        fs_err::create_dir_all(root)?;
        Ok(Blobs {
            root: root.to_path_buf(),
            remote: None,
        })
    }

    /// The local directory `root`, and the bucket of `remote` when given (reached now, so a
    /// wrong address or key stops the start rather than the first upload).
    pub async fn open_with(
        root: &Path,
        remote: Option<&BlobStoreConfig>,
    ) -> Result<Blobs, OpenError> {
        let mut blobs = Blobs::open(root).map_err(|source| OpenError::Dir {
            path: root.to_path_buf(),
            source,
        })?;
        if let Some(config) = remote {
            let r = Remote::open(config)?;
            r.check().await.map_err(|e| OpenError::Remote {
                url: config.url.clone(),
                why: e.to_string(),
            })?;
            blobs.remote = Some(r);
        }
        Ok(blobs)
    }

    /// Whether blobs are kept apart by tenant: with a bucket (the local directory is one cache
    /// for all).
    pub fn keyed_per_tenant(&self) -> bool {
        self.remote.is_some()
    }

    /// Where blobs are kept, for logs: the bucket's URL or the directory.
    pub fn describe(&self) -> String {
        match &self.remote {
            Some(r) => r.url.clone(),
            None => self.root.display().to_string(),
        }
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.root.join(&hash[..2]).join(hash)
    }

    /// Store `data` for `owner`'s area of the bucket (durably: written to a temporary name,
    /// synced, renamed); returns its hash.
    pub fn put(&self, owner: Option<&str>, data: &[u8]) -> std::io::Result<String> {
        let hash = sha256_hex(data);
        let path = self.path(&hash);
        if !path.exists() {
            let dir = path.parent().expect("blob paths have a parent");
            fs_err::create_dir_all(dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            tmp.write_all(data)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
        } else {
            touch(&path)?;
        }
        self.upload(owner, &hash)?;
        Ok(hash)
    }

    /// Make sure `tenant`'s area of the bucket holds blob `hash` (fetched first if this
    /// coordinator lacks it): a report names it for that tenant. Its size; `None` when it is
    /// stored nowhere.
    pub fn claim(&self, tenant: &str, hash: &str) -> std::io::Result<Option<u64>> {
        if !is_sha256(hash) || !self.fetch(Some(tenant), hash)? {
            return Ok(None);
        }
        self.upload(Some(tenant), hash)?;
        Ok(Some(fs_err::metadata(self.path(hash))?.len()))
    }

    /// Remove blob `hash` from `tenant`'s area of the bucket: the tenant owns it no more. The
    /// local copy and the shared area stay (other tenants may own it; the sweep removes what
    /// nobody owns). Nothing to do without a bucket.
    pub fn forget(&self, tenant: &str, hash: &str) -> std::io::Result<()> {
        let Some(r) = &self.remote else {
            return Ok(());
        };
        if !is_sha256(hash) {
            return Ok(());
        }
        match wait(r.store.delete(&r.key(Some(tenant), hash))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// Remove blob `hash` (here and in the bucket's shared area) unless it was stored or sent again within
    /// `grace`: a report naming it may be on its way. Whether it was removed. The caller has
    /// found that no tenant owns it.
    pub fn remove_if_idle(&self, hash: &str, grace: std::time::Duration) -> std::io::Result<bool> {
        if !is_sha256(hash) {
            return Ok(false);
        }
        let path = self.path(hash);
        match fs_err::metadata(&path).and_then(|m| m.modified()) {
            Ok(at) if at.elapsed().unwrap_or_default() < grace => return Ok(false),
            Ok(_) => fs_err::remove_file(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(r) = &self.remote {
            match wait(r.store.delete(&r.key(None, hash))) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        Ok(true)
    }

    /// The local blobs whose names start with the two hex digits of `shard` (0–255) and that
    /// were last stored or sent more than `grace` ago: one slice of the blob sweep.
    pub fn idle_in(&self, shard: u8, grace: std::time::Duration) -> Vec<String> {
        let dir = self.root.join(format!("{shard:02x}"));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut idle: Vec<String> = entries
            .flatten()
            .filter(|e| {
                e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|at| at.elapsed().unwrap_or_default() >= grace)
            })
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| is_sha256(name))
            .collect();
        idle.sort();
        idle
    }

    /// With a bucket: make sure `owner`'s area holds the local blob `hash` (streamed from the
    /// file).
    fn upload(&self, owner: Option<&str>, hash: &str) -> std::io::Result<()> {
        let Some(r) = &self.remote else {
            return Ok(());
        };
        wait(r.upload(owner, hash, &self.path(hash)))
    }

    /// With a bucket: fetch blob `hash` into the local directory from `owner`'s area or the
    /// shared one; whether it is local now.
    fn fetch(&self, owner: Option<&str>, hash: &str) -> std::io::Result<bool> {
        let path = self.path(hash);
        if path.is_file() {
            return Ok(true);
        }
        let Some(r) = &self.remote else {
            return Ok(false);
        };
        for area in Remote::areas(owner) {
            if wait(r.download(area, hash, &path))? {
                return Ok(true);
            }
        }
        Ok(false)
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

    /// Whether a blob is stored here, in `owner`'s area or in the shared one (`hash` must be a
    /// sha256).
    pub fn contains(&self, owner: Option<&str>, hash: &str) -> bool {
        self.size(owner, hash).is_some()
    }

    /// A stored blob's size in bytes (here, in `owner`'s area or in the shared one); `None`
    /// when it is not stored.
    pub fn size(&self, owner: Option<&str>, hash: &str) -> Option<u64> {
        if !is_sha256(hash) {
            return None;
        }
        if let Ok(m) = fs_err::metadata(self.path(hash)) {
            return Some(m.len());
        }
        let r = self.remote.as_ref()?;
        Remote::areas(owner)
            .into_iter()
            .find_map(|area| wait(r.size(area, hash)))
    }

    /// Blob `hash`, from here, `owner`'s area of the bucket or the shared one.
    pub fn get(&self, owner: Option<&str>, hash: &str) -> std::io::Result<Vec<u8>> {
        if !is_sha256(hash) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("`{hash}` is not a sha256"),
            ));
        }
        if !self.fetch(owner, hash)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("blob `{hash}` is not stored"),
            ));
        }
        fs_err::read(self.path(hash))
    }
}

impl Remote {
    fn open(config: &BlobStoreConfig) -> Result<Remote, OpenError> {
        let bad = |why: String| OpenError::Remote {
            url: config.url.clone(),
            why,
        };
        let rest = config
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("only s3:// URLs are supported".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("the URL names no bucket".into()));
        }
        // reqwest 0.13 takes rustls' process default: ring, as the rest of the coordinator.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(config.region.clone().unwrap_or_else(|| "us-east-1".into()));
        if let Some(e) = &config.endpoint {
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let (Some(k), Some(s)) = (&config.access_key_id, &config.secret_access_key) {
            b = b.with_access_key_id(k).with_secret_access_key(s);
        }
        let store = b.build().map_err(|e| bad(e.to_string()))?;
        Ok(Remote {
            store: Arc::new(store),
            prefix: prefix.trim_matches('/').to_string(),
            url: config.url.clone(),
        })
    }

    /// `PREFIX/tenants/<tenant>/<aa>/<hash>` for a tenant's blob, `PREFIX/<aa>/<hash>` for
    /// the shared area. A tenant id is one path segment whatever it holds.
    fn key(&self, owner: Option<&str>, hash: &str) -> object_store::path::Path {
        let prefix = object_store::path::Path::from(self.prefix.as_str());
        let mut parts: Vec<object_store::path::PathPart<'_>> = prefix.parts().collect();
        if let Some(tenant) = owner {
            parts.push("tenants".into());
            parts.push(tenant.into());
        }
        parts.push((&hash[..2]).into());
        parts.push(hash.into());
        object_store::path::Path::from_iter(parts)
    }

    /// Where a read for `owner` looks: its own area, then the shared one.
    fn areas(owner: Option<&str>) -> Vec<Option<&str>> {
        match owner {
            Some(t) => vec![Some(t), None],
            None => vec![None],
        }
    }

    /// Reach the bucket: a listing of at most one key under the prefix.
    async fn check(&self) -> Result<(), object_store::Error> {
        use futures_util::StreamExt;
        let prefix = object_store::path::Path::from(self.prefix.as_str());
        let mut list = self.store.list(Some(&prefix));
        match list.next().await {
            Some(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    async fn size(&self, owner: Option<&str>, hash: &str) -> Option<u64> {
        self.store
            .head(&self.key(owner, hash))
            .await
            .ok()
            .map(|m| m.size)
    }

    async fn upload(&self, owner: Option<&str>, hash: &str, local: &Path) -> std::io::Result<()> {
        if self.size(owner, hash).await.is_some() {
            return Ok(()); // content-addressed: there already
        }
        let file = tokio::fs::File::open(local).await?;
        let mut writer =
            object_store::buffered::BufWriter::new(self.store.clone(), self.key(owner, hash));
        let mut reader = tokio::io::BufReader::new(file);
        tokio::io::copy(&mut reader, &mut writer).await?;
        tokio::io::AsyncWriteExt::shutdown(&mut writer).await?;
        Ok(())
    }

    /// Stream blob `hash` from `owner`'s area into `local` (through a temporary file, renamed
    /// when whole); whether the area had it.
    async fn download(
        &self,
        owner: Option<&str>,
        hash: &str,
        local: &Path,
    ) -> std::io::Result<bool> {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        let got = match self.store.get(&self.key(owner, hash)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(std::io::Error::other(e)),
        };
        let dir = local.parent().expect("blob paths have a parent");
        tokio::fs::create_dir_all(dir).await?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        let mut out = tokio::fs::File::from_std(tmp.reopen()?);
        let mut stream = got.into_stream();
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            sha2::Digest::update(&mut hasher, &chunk);
            out.write_all(&chunk).await?;
        }
        out.sync_all().await?;
        // The bucket is trusted no more than the disk: a blob is what its name says.
        let actual = hex::encode(sha2::Digest::finalize(hasher));
        if actual != hash {
            return Err(std::io::Error::other(format!(
                "the bucket's `{hash}` hashes to `{actual}`"
            )));
        }
        tmp.persist(local).map_err(|e| e.error)?;
        Ok(true)
    }
}

/// Run `fut` to its end from synchronous code, inside the runtime or outside it (the store's
/// callers are synchronous; with a bucket, they wait for it).
fn wait<T>(fut: impl std::future::Future<Output = T>) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => tokio::task::block_in_place(|| h.block_on(fut)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
            .block_on(fut),
    }
}

/// Mark a blob stored again now (the sweep leaves it for its grace).
fn touch(path: &Path) -> std::io::Result<()> {
    std::fs::File::options()
        .append(true)
        .open(path)?
        .set_modified(std::time::SystemTime::now())
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

    /// The hash of what was written. Stored (synced, renamed into place, and in `owner`'s area
    /// of the bucket) only if it is `expected`; otherwise the temporary file is dropped and the
    /// actual hash is the error.
    pub fn finish(self, expected: &str, owner: Option<&str>) -> Result<String, FinishError> {
        use sha2::Digest;
        let hash = hex::encode(self.hasher.finalize());
        if hash != expected {
            return Err(FinishError::Mismatch { actual: hash });
        }
        let path = self.blobs.path(&hash);
        if !path.exists() {
            let dir = path.parent().expect("blob paths have a parent");
            fs_err::create_dir_all(dir)?;
            self.tmp.as_file().sync_all()?;
            self.tmp.persist(&path).map_err(|e| e.error)?;
        } else {
            touch(&path)?;
        }
        self.blobs.upload(owner, &hash)?;
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
        let a = blobs.put(None, b"hello").unwrap();
        let b = blobs.put(None, b"hello").unwrap();
        assert_eq!(a, b);
        assert_eq!(blobs.get(None, &a).unwrap(), b"hello");
        assert!(blobs.get(None, "../etc/passwd").is_err());
        assert!(blobs.contains(None, &a));
        assert!(!blobs.contains(None, "../etc/passwd"));
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
        assert_eq!(w.finish(&want, None).unwrap(), want.clone());
        assert_eq!(blobs.get(None, &want).unwrap(), b"hello world");
        let mut w = blobs.writer().unwrap();
        w.write(b"other").unwrap();
        let wrong = "0".repeat(64);
        match w.finish(&wrong, None) {
            Err(FinishError::Mismatch { actual }) => assert_eq!(actual, sha256_hex(b"other")),
            other => panic!("{other:?}"),
        }
        assert!(!blobs.contains(None, &wrong));
        // Nothing but the stored blob's directory is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }
}
