//! The object-store seam: one trait, one file per backend, plus decorators.
//!
//! # Protocol (every backend upholds these)
//! 1. `put` with [`PutMode::Create`] succeeds for exactly one of any number of
//!    concurrent callers on the same absent key; the others get
//!    [`StoreError::AlreadyExists`]. It never overwrites.
//! 2. `put` with [`PutMode::IfMatch`] replaces the object only if its current
//!    version equals the given one; otherwise (including when the object is
//!    missing) it returns [`StoreError::PreconditionFailed`]. Of concurrent
//!    callers holding the same version, exactly one wins.
//! 3. A successful `put` is durable and visible to every later `get`, `head`
//!    and `list` (read-after-write, as S3 gives).
//! 4. Objects are written whole: a reader sees the old object, the new one or
//!    nothing, never a torn mix.
//! 5. `get_range` returns exactly the requested bytes or an error; a range
//!    past the end of the object is [`StoreError::InvalidRange`].
//! 6. `list` returns every key under the prefix, sorted ascending.
//! 7. `delete` of a missing key succeeds (idempotent, as S3).
//! 8. Transient failures (timeouts, throttling, 5xx) are
//!    [`StoreError::Transient`]; only those are retried by the retry decorator.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use body::Body;

pub mod aligned;
pub mod body;
pub mod delete_many;
pub mod faulty;
pub mod free_list;
pub mod fs;
pub mod memory;
pub mod metered;
pub mod retry;
pub mod s3;

/// An opaque object version (an ETag on S3), used for compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(pub String);

/// How a `put` treats an existing object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutMode {
    /// Unconditional write (create or replace).
    Overwrite,
    /// Create only if absent (If-None-Match: *).
    Create,
    /// Replace only if the current version matches (If-Match).
    IfMatch(Version),
}

/// What `head` and `list` report about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub version: Version,
}

/// An object's bytes together with the version they were read at.
#[derive(Debug, Clone)]
pub struct Object {
    pub data: Bytes,
    pub version: Version,
}

/// Errors from a store backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object not found: {key}")]
    NotFound { key: String },
    #[error("object already exists: {key}")]
    AlreadyExists { key: String },
    #[error("version precondition failed: {key}")]
    PreconditionFailed { key: String },
    #[error("range {start}..{end} is outside object {key}")]
    InvalidRange { key: String, start: u64, end: u64 },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    /// Worth retrying: timeouts, throttling, 5xx, connection resets.
    #[error("transient store error: {0}")]
    Transient(String),
    /// Not worth retrying: bad credentials, missing bucket, local I/O errors.
    #[error("store error: {0}")]
    Permanent(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Transient(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An object store. Keys are `/`-separated UTF-8 paths without `..`, leading
/// `/` or empty segments. See the module docs for the protocol.
#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Read a whole object.
    async fn get(&self, key: &str) -> StoreResult<Object>;
    /// Read `range` (byte offsets, end exclusive) of an object.
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes>;
    /// [`ObjectStore::get_range`], with a placement hint: where the
    /// backend can, the returned bytes lie in memory so that object offset
    /// `page_at` (and so every [`aligned::PAGE`] after it) is page-aligned,
    /// letting the read cache write them with `O_DIRECT` from where they
    /// are (a chunk's data area after a header of any length). The bytes
    /// are the same either way; the default ignores the hint. Decorators
    /// pass it on.
    async fn get_range_placed(
        &self,
        key: &str,
        range: Range<u64>,
        page_at: u64,
    ) -> StoreResult<Bytes> {
        let _ = page_at;
        self.get_range(key, range).await
    }
    /// Write a whole object; returns the new version.
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version>;
    /// [`ObjectStore::put`] of the object `body` holds in parts. The
    /// default joins them into one buffer first ([`Body::into_bytes`], on
    /// the caller's thread: a caller with a big body in many parts joins
    /// it itself where the store does not [write parts](Self::writes_parts));
    /// a backend that can write the parts from where they are overrides
    /// it. Decorators pass it on.
    async fn put_body(&self, key: &str, body: Body, mode: PutMode) -> StoreResult<Version> {
        self.put(key, body.into_bytes(), mode).await
    }
    /// Size and version of an object.
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta>;
    /// Every object whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>>;
    /// Remove an object; succeeds if it is already gone.
    async fn delete(&self, key: &str) -> StoreResult<()>;
    /// How many chunk-sized `put`s the backend can usefully have in
    /// flight at once: a hint callers may stay below (the destage task
    /// grows towards it while throughput grows). Default
    /// [`DEFAULT_PUTS_IN_FLIGHT`]; decorators pass the backend's on.
    fn puts_in_flight(&self) -> usize {
        DEFAULT_PUTS_IN_FLIGHT
    }
    /// Whether [`ObjectStore::put_body`] writes the parts from where they
    /// lie. When it does not, a caller that holds big buffers only to put
    /// them had better join them itself, early, and let them go. Default
    /// false; decorators that pass `put_body` on pass this on.
    fn writes_parts(&self) -> bool {
        false
    }
}

/// [`ObjectStore::puts_in_flight`] of a backend that does not say (the
/// in-memory store), and the floor of destage's window for one that asks
/// for more.
pub const DEFAULT_PUTS_IN_FLIGHT: usize = 8;

/// A shared handle to any store.
pub type DynStore = Arc<dyn ObjectStore>;

/// A shared store is a store, so decorators can wrap a [`DynStore`].
#[async_trait]
impl<T: ObjectStore + ?Sized> ObjectStore for Arc<T> {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        (**self).get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        (**self).get_range(key, range).await
    }
    async fn get_range_placed(
        &self,
        key: &str,
        range: Range<u64>,
        page_at: u64,
    ) -> StoreResult<Bytes> {
        (**self).get_range_placed(key, range, page_at).await
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        (**self).put(key, data, mode).await
    }
    async fn put_body(&self, key: &str, body: Body, mode: PutMode) -> StoreResult<Version> {
        (**self).put_body(key, body, mode).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        (**self).head(key).await
    }
    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        (**self).list(prefix).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        (**self).delete(key).await
    }
    fn puts_in_flight(&self) -> usize {
        (**self).puts_in_flight()
    }
    fn writes_parts(&self) -> bool {
        (**self).writes_parts()
    }
}

/// Which backend to use and where, as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// A local directory (the embedded default).
    Fs {
        /// Directory holding the objects. Created if missing.
        path: std::path::PathBuf,
    },
    /// Process memory; lost on exit (tests only).
    Memory,
    /// An S3 bucket (or S3-compatible server).
    S3 {
        bucket: String,
        /// Key prefix inside the bucket ("" for none).
        #[serde(default)]
        prefix: String,
        /// Endpoint URL for S3-compatible servers; AWS when absent.
        #[serde(default)]
        endpoint: Option<String>,
        /// Region. Default us-east-1.
        #[serde(default = "default_region")]
        region: String,
        /// Use path-style addressing (needed by most local servers). Default false.
        #[serde(default)]
        force_path_style: bool,
        /// Milliseconds a request may wait for the first byte of its
        /// response (uploads get more, see `min_upload_rate`); then it is
        /// cut off and retried. Default 5000; 100..=600000.
        #[serde(default = "default_request_timeout_ms")]
        request_timeout_ms: u64,
        /// Upload rate to allow time for: an upload of N bytes may take
        /// N / min_upload_rate seconds more. Default 2 MiB (per second);
        /// at least 1 KiB.
        #[serde(default = "default_min_upload_rate", with = "crate::size::serde_bytes")]
        min_upload_rate: u64,
    },
}

/// Jitter seed used by [`open`]: a constant mixed with the process id, so
/// that processes retrying against the same store spread apart while a
/// process stays reproducible. Tests pass their own seed to [`open_with`].
pub fn default_jitter_seed() -> u64 {
    0x5EED_5A1E_u64 ^ (u64::from(std::process::id()) << 17)
}

/// Open the configured backend wrapped in [`retry::RetryStore`] with the
/// default [`retry::RetryPolicy`]. A local directory is created if missing
/// and checked for writability; an S3 client is built but nothing is sent.
pub async fn open(cfg: &StoreConfig) -> StoreResult<DynStore> {
    open_with(cfg, retry::RetryPolicy::default(), default_jitter_seed()).await
}

/// [`open`] with an explicit retry policy and jitter seed.
pub async fn open_with(
    cfg: &StoreConfig,
    policy: retry::RetryPolicy,
    seed: u64,
) -> StoreResult<DynStore> {
    let backend = open_backend(cfg).await?;
    Ok(Arc::new(retry::RetryStore::new(backend, policy, seed)))
}

/// The configured backend alone, without the retry decorator, for callers
/// that stack their own decorators (e.g. different retry budgets for reads
/// and writes). Same checks as [`open`].
pub async fn open_backend(cfg: &StoreConfig) -> StoreResult<DynStore> {
    Ok(match cfg {
        StoreConfig::Fs { path } => {
            let store = fs::FsStore::new(path.clone());
            store.ensure_root().await?;
            Arc::new(store)
        }
        StoreConfig::Memory => Arc::new(memory::MemoryStore::new()),
        StoreConfig::S3 { .. } => {
            let settings = s3::S3Settings::from_config(cfg)
                .ok_or_else(|| StoreError::Permanent("not an S3 config".into()))?;
            Arc::new(s3::S3Store::connect(&settings).await?)
        }
    })
}

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_request_timeout_ms() -> u64 {
    s3::DEFAULT_REQUEST_TIMEOUT_MS
}

fn default_min_upload_rate() -> u64 {
    s3::DEFAULT_MIN_UPLOAD_RATE
}

/// Longest key in bytes (S3's limit, applied to every backend so keys that
/// work on one backend work on all).
pub const MAX_KEY_LEN: usize = 1024;
/// Longest key segment in bytes (what a local file name can hold once the
/// fs backend adds its suffixes).
pub const MAX_SEGMENT_LEN: usize = 200;

/// Check a key against the rules in [`ObjectStore`]'s docs, plus
/// [`MAX_KEY_LEN`] and [`MAX_SEGMENT_LEN`].
pub fn validate_key(key: &str) -> StoreResult<()> {
    let bad = |reason: &str| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("longer than 1024 bytes");
    }
    if key.split('/').any(|s| s.len() > MAX_SEGMENT_LEN) {
        return bad("a segment is longer than 200 bytes");
    }
    if key.starts_with('/') || key.ends_with('/') {
        return bad("leading or trailing '/'");
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("empty, '.' or '..' segment");
    }
    if key.chars().any(|c| c.is_control()) {
        return bad("control character");
    }
    Ok(())
}

/// Check a list prefix: empty (everything) or a key-like string that may end
/// in `/` or in the middle of a segment. Control characters, a leading `/`
/// and `.`/`..` or empty segments are rejected.
pub fn validate_prefix(prefix: &str) -> StoreResult<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    let bad = |reason: &str| {
        Err(StoreError::InvalidKey {
            key: prefix.to_string(),
            reason: reason.to_string(),
        })
    };
    if prefix.starts_with('/') {
        return bad("leading '/'");
    }
    if prefix.chars().any(|c| c.is_control()) {
        return bad("control character");
    }
    let segments: Vec<&str> = prefix.split('/').collect();
    // The last segment may be empty (trailing '/') or partial.
    let whole = &segments[..segments.len() - 1];
    if whole
        .iter()
        .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        return bad("empty, '.' or '..' segment");
    }
    Ok(())
}

/// Check `range` against an object of `size` bytes (protocol rule 5): it must
/// not be reversed and must end at or before the end of the object. An empty
/// range at or before the end is valid and reads nothing.
pub fn check_range(key: &str, range: &Range<u64>, size: u64) -> StoreResult<()> {
    if range.start > range.end || range.end > size {
        return Err(StoreError::InvalidRange {
            key: key.to_string(),
            start: range.start,
            end: range.end,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rules() {
        assert!(validate_key("vol/1/chunk-0001").is_ok());
        for k in ["", "/a", "a/", "a//b", "a/../b", "./a", "a\nb"] {
            assert!(validate_key(k).is_err(), "{k:?} should be rejected");
        }
        let segment = "s".repeat(MAX_SEGMENT_LEN);
        assert!(validate_key(&segment).is_ok());
        assert!(validate_key(&format!("{segment}x")).is_err());
        let long = [segment.as_str(); 5].join("/");
        assert!(long.len() <= MAX_KEY_LEN && validate_key(&long).is_ok());
        let too_long = [segment.as_str(); 6].join("/");
        assert!(too_long.len() > MAX_KEY_LEN && validate_key(&too_long).is_err());
    }

    #[test]
    fn prefix_rules() {
        for p in ["", "vol", "vol/", "vol/1/chu"] {
            assert!(validate_prefix(p).is_ok(), "{p:?} should be accepted");
        }
        for p in ["/a", "a//", "../a", "a/./b", "a\tb"] {
            assert!(validate_prefix(p).is_err(), "{p:?} should be rejected");
        }
    }

    /// S3 asks for more puts in flight than a local directory, only a
    /// local directory writes a body's parts where they lie, and every
    /// decorator stack `open` builds passes the backend's answers on.
    #[tokio::test]
    async fn puts_in_flight_reaches_the_caller_through_the_decorators() {
        let s3 = StoreConfig::S3 {
            bucket: "b".into(),
            prefix: String::new(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: default_region(),
            force_path_style: true,
            request_timeout_ms: default_request_timeout_ms(),
            min_upload_rate: default_min_upload_rate(),
        };
        let dir = tempfile::tempdir().unwrap();
        let fs = StoreConfig::Fs {
            path: dir.path().join("objects"),
        };
        for (cfg, want, parts) in [
            (&s3, s3::PUTS_IN_FLIGHT, true),
            (&fs, super::fs::PUTS_IN_FLIGHT, true),
            (&StoreConfig::Memory, DEFAULT_PUTS_IN_FLIGHT, false),
        ] {
            let backend = open_backend(cfg).await.unwrap();
            assert_eq!(
                (backend.puts_in_flight(), backend.writes_parts()),
                (want, parts)
            );
            let opened = open(cfg).await.unwrap();
            assert_eq!(
                (opened.puts_in_flight(), opened.writes_parts()),
                (want, parts)
            );
            let (metered, _) = metered::open(cfg).await.unwrap();
            assert_eq!(
                (metered.puts_in_flight(), metered.writes_parts()),
                (want, parts)
            );
            let faulty = faulty::FaultyStore::new(metered, 1);
            // Its put_body joins the parts, to put them through its faults.
            assert_eq!(
                (faulty.puts_in_flight(), faulty.writes_parts()),
                (want, false)
            );
        }
        const { assert!(s3::PUTS_IN_FLIGHT > DEFAULT_PUTS_IN_FLIGHT) };
        const { assert!(super::fs::PUTS_IN_FLIGHT < DEFAULT_PUTS_IN_FLIGHT) };
    }

    #[test]
    fn range_rules() {
        assert!(check_range("k", &(0..10), 10).is_ok());
        assert!(check_range("k", &(10..10), 10).is_ok());
        assert!(check_range("k", &(0..11), 10).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = 5..4;
        assert!(check_range("k", &reversed, 10).is_err());
        assert!(check_range("k", &(11..11), 10).is_err());
    }
}
