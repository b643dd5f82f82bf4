//! S3 backend over `aws-sdk-s3` (AWS or any S3-compatible server).
//!
//! # Mapping
//! - Create = `PutObject` with `If-None-Match: *`; IfMatch = `If-Match: <etag>`.
//!   The [`Version`] is the ETag as S3 returns it (quotes included). ETags of
//!   single-part uploads are content hashes, so rewriting identical bytes keeps
//!   the version: CAS callers must write distinct content (leases and
//!   manifests carry an epoch or sequence number).
//! - 412 → `AlreadyExists` for Create, `PreconditionFailed` for IfMatch.
//!   404 → `NotFound`, except for IfMatch, where a missing object is a failed
//!   precondition (protocol rule 2).
//! - 409 `ConditionalRequestConflict` (a concurrent conditional write on the
//!   same key was in flight) → `Transient`: AWS says to retry, and the retry
//!   gets the true answer (412 if the other writer won, success otherwise).
//! - 429, 5xx, `SlowDown`/`RequestTimeout`-style codes, timeouts, connection
//!   and dispatch failures, unreadable responses and body read failures →
//!   `Transient`. Everything else → `Permanent`, naming the S3 code.
//! - The SDK's own retries are disabled: [`super::retry::RetryStore`] is the
//!   one retry layer, and it alone knows how to resolve a conditional put
//!   whose response was lost (the SDK would report our own write as 412).
//! - Empty ranges are answered from `HeadObject` (S3 has no empty byte range).
//!
//! # Timeouts
//! A request that gets no answer is cut off and retried (by the retry
//! decorator) rather than waited for: a connection taken from the pool may
//! be dead (reset or silently dropped by the network), and one stuck chunk
//! upload holds every later chunk back, so writes soon wait at the
//! unstored bound. Each attempt must see the first byte of its response
//! within [`S3Settings::request_timeout`], plus, for uploads, the time the
//! body takes at [`S3Settings::min_upload_rate`]. A response body that
//! stops flowing is cut off by the SDK's stalled-stream protection (5 s
//! without progress). [`S3Settings::attempt_timeout`] caps a whole attempt.

use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::aligned::PooledBuf;
use super::{
    check_range, validate_key, validate_prefix, Body, Object, ObjectMeta, ObjectStore, PutMode,
    StoreConfig, StoreError, StoreResult, Version,
};

mod parts_body;
pub use parts_body::base64;

/// Where and how to reach the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// Key prefix inside the bucket; "" for none. Joined to keys with `/`.
    pub prefix: String,
    /// Endpoint URL of an S3-compatible server; AWS when `None`.
    pub endpoint: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    /// Fixed access key id and secret; `None` uses the usual AWS chain
    /// (environment, profile files, instance metadata).
    pub static_credentials: Option<(String, String)>,
    /// Time limit of one HTTP attempt. Default 60 s (raised for uploads
    /// that need longer at `min_upload_rate`).
    pub attempt_timeout: Duration,
    /// Time limit to establish a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Time from sending a request until the first byte of its response,
    /// not counting the upload of a request body. Default 5 s.
    pub request_timeout: Duration,
    /// Uploads get `len / min_upload_rate` more time. Bytes per second;
    /// default 2 MiB.
    pub min_upload_rate: u64,
}

/// [`ObjectStore::puts_in_flight`] of S3: one connection carries a few
/// tens of MB/s, so a chunk upload stream needs many at once to fill a
/// fast link. Not more: uploads sharing a slow link must each keep
/// [`S3Settings::min_upload_rate`] to beat their timeouts.
pub const PUTS_IN_FLIGHT: usize = 32;

/// Default of [`S3Settings::request_timeout`], in milliseconds.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// Default of [`S3Settings::min_upload_rate`], in bytes per second.
pub const DEFAULT_MIN_UPLOAD_RATE: u64 = 2 << 20;

impl S3Settings {
    /// Settings for the S3 variant of a [`StoreConfig`]; `None` for others.
    pub fn from_config(cfg: &StoreConfig) -> Option<S3Settings> {
        match cfg {
            StoreConfig::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                force_path_style,
                request_timeout_ms,
                min_upload_rate,
            } => Some(S3Settings {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                endpoint: endpoint.clone(),
                region: region.clone(),
                force_path_style: *force_path_style,
                static_credentials: None,
                attempt_timeout: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_millis(*request_timeout_ms),
                min_upload_rate: *min_upload_rate,
            }),
            _ => None,
        }
    }
}

/// Objects in one S3 bucket under a key prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or the configured prefix followed by exactly one `/`.
    prefix: String,
    /// The timeouts uploads are given (see the module docs).
    timeouts: Timeouts,
}

/// The timeout settings of a store, for per-upload overrides.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    request: Duration,
    attempt: Duration,
    /// Bytes per second; at least 1.
    upload_rate: u64,
}

impl Timeouts {
    /// `(first byte, attempt)` limits of an upload of `len` bytes, or
    /// `None` when the client's own limits already cover it.
    fn for_upload(&self, len: usize) -> Option<(Duration, Duration)> {
        let extra = Duration::from_secs_f64(len as f64 / self.upload_rate as f64);
        if extra < Duration::from_millis(100) {
            return None;
        }
        let first_byte = self.request.saturating_add(extra);
        Some((first_byte, self.attempt.max(first_byte + self.request)))
    }
}

/// What a failed request was trying to do, for error mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Read,
    Create,
    IfMatch,
    Other,
}

impl S3Store {
    /// Build a client from `settings`. Makes no request.
    pub async fn connect(settings: &S3Settings) -> StoreResult<S3Store> {
        if settings.bucket.is_empty() {
            return Err(StoreError::Permanent("S3 bucket name is empty".into()));
        }
        let trimmed = settings.prefix.trim_matches('/');
        if !trimmed.is_empty() {
            validate_key(trimmed).map_err(|e| {
                StoreError::Permanent(format!("invalid S3 prefix {:?}: {e}", settings.prefix))
            })?;
        }
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(settings.connect_timeout)
                    .read_timeout(settings.request_timeout)
                    .operation_attempt_timeout(settings.attempt_timeout)
                    .build(),
            );
        if let Some((id, secret)) = &settings.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "shale-static",
            ));
        }
        let sdk = loader.load().await;
        let mut conf =
            aws_sdk_s3::config::Builder::from(&sdk).force_path_style(settings.force_path_style);
        if let Some(endpoint) = &settings.endpoint {
            conf = conf.endpoint_url(endpoint.clone());
        }
        let mut store = S3Store::from_client(
            Client::from_conf(conf.build()),
            &settings.bucket,
            &settings.prefix,
        );
        store.timeouts = Timeouts {
            connect: settings.connect_timeout,
            request: settings.request_timeout,
            attempt: settings.attempt_timeout,
            upload_rate: settings.min_upload_rate.max(1),
        };
        Ok(store)
    }

    /// Use an already configured client. Its retries should be disabled.
    pub fn from_client(client: Client, bucket: &str, prefix: &str) -> S3Store {
        let trimmed = prefix.trim_matches('/');
        S3Store {
            client,
            bucket: bucket.to_string(),
            prefix: if trimmed.is_empty() {
                String::new()
            } else {
                format!("{trimmed}/")
            },
            timeouts: Timeouts {
                connect: Duration::from_secs(5),
                request: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
                attempt: Duration::from_secs(60),
                upload_rate: DEFAULT_MIN_UPLOAD_RATE,
            },
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn full_key(&self, key: &str) -> StoreResult<String> {
        validate_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

const TRANSIENT_CODES: [&str; 8] = [
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "ConditionalRequestConflict",
];

/// Turn an SDK error into a [`StoreError`] by the rules in the module docs.
fn map_err<E>(op: &str, key: &str, intent: Intent, err: SdkError<E>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let detail = || format!("S3 {op} {key}: {}", DisplayErrorContext(&err));
    let service = match &err {
        SdkError::ServiceError(_) => true,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            return StoreError::Transient(detail())
        }
        _ => false,
    };
    if !service {
        return StoreError::Permanent(detail());
    }
    let status = err.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
    let code = err.code().unwrap_or("");
    let key = key.to_string();
    match (status, intent) {
        (412, Intent::Create) => StoreError::AlreadyExists { key },
        (412, Intent::IfMatch) => StoreError::PreconditionFailed { key },
        (404, _) if code == "NoSuchBucket" => StoreError::Permanent(detail()),
        (404, Intent::IfMatch) => StoreError::PreconditionFailed { key },
        (404, _) => StoreError::NotFound { key },
        (409, _) if code == "ConditionalRequestConflict" => StoreError::Transient(detail()),
        (429, _) | (500..=599, _) => StoreError::Transient(detail()),
        _ if TRANSIENT_CODES.contains(&code) => StoreError::Transient(detail()),
        _ => StoreError::Permanent(detail()),
    }
}

fn etag(op: &str, key: &str, tag: Option<&str>) -> StoreResult<Version> {
    tag.map(|t| Version(t.to_string()))
        .ok_or_else(|| StoreError::Permanent(format!("S3 {op} {key}: response has no ETag")))
}

fn size(op: &str, key: &str, len: Option<i64>) -> StoreResult<u64> {
    len.and_then(|l| u64::try_from(l).ok())
        .ok_or_else(|| StoreError::Permanent(format!("S3 {op} {key}: response has no valid size")))
}

async fn read_body(op: &str, key: &str, body: ByteStream) -> StoreResult<Bytes> {
    body.collect()
        .await
        .map(|b| b.into_bytes())
        .map_err(|e| StoreError::Transient(format!("S3 {op} {key}: reading body: {e}")))
}

/// A body of exactly `len` bytes, received straight into a pooled
/// page-aligned buffer ([`PooledBuf`]: the read cache writes it to disk from
/// there), starting `lead` bytes past a page boundary; `None` if the body
/// is longer or shorter.
///
/// Each frame hyper hands over (a slice of its socket read buffer) is
/// copied once, to its place in the buffer: the body is never gathered
/// into an intermediate allocation first. That copy is the only one in
/// user space between the socket and the cache fill; avoiding it would
/// need the socket read into our buffer, below the SDK's HTTP client.
/// An overlong body is refused at the first frame that runs past `len`,
/// without reading the rest.
async fn read_body_aligned(
    op: &str,
    key: &str,
    mut body: ByteStream,
    len: usize,
    lead: usize,
) -> StoreResult<Option<Bytes>> {
    let mut buf = PooledBuf::take_placed(len, lead);
    let dst = buf.bytes_mut();
    let mut at = 0;
    while let Some(part) = body
        .try_next()
        .await
        .map_err(|e| StoreError::Transient(format!("S3 {op} {key}: reading body: {e}")))?
    {
        let Some(to) = dst.get_mut(at..at + part.len()) else {
            return Ok(None);
        };
        to.copy_from_slice(&part);
        at += part.len();
    }
    Ok((at == len).then(|| buf.freeze()))
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn get(&self, key: &str) -> StoreResult<Object> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| map_err("GetObject", key, Intent::Read, e))?;
        let version = etag("GetObject", key, out.e_tag())?;
        let data = read_body("GetObject", key, out.body).await?;
        Ok(Object { data, version })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let page_at = range.start;
        self.get_range_placed(key, range, page_at).await
    }

    async fn get_range_placed(
        &self,
        key: &str,
        range: Range<u64>,
        page_at: u64,
    ) -> StoreResult<Bytes> {
        let full = self.full_key(key)?;
        if range.start >= range.end {
            let meta = self.head(key).await?;
            check_range(key, &range, meta.size)?;
            return Ok(Bytes::new());
        }
        let invalid = || StoreError::InvalidRange {
            key: key.to_string(),
            start: range.start,
            end: range.end,
        };
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            // Every caller checks a range against CRCs of its own (a chunk's
            // block-CRC table, its header's table CRC), and S3 sends a
            // checksum for a range only when it is the whole object: the
            // SDK's check of it cost ~1.5% of the server's CPU in a cold
            // sequential read (perf) and guarded nothing more.
            .customize()
            .config_override(
                aws_sdk_s3::config::Builder::new()
                    .response_checksum_validation(ResponseChecksumValidation::WhenRequired),
            )
            .send()
            .await
            .map_err(|e| {
                if e.raw_response().map(|r| r.status().as_u16()) == Some(416) {
                    invalid()
                } else {
                    map_err("GetObject", key, Intent::Read, e)
                }
            })?;
        // S3 clips a range that runs past the end instead of refusing it:
        // a body of any other length than asked for is refused.
        let len = usize::try_from(range.end - range.start).map_err(|_| invalid())?;
        let lead = PooledBuf::lead_for(range.start, page_at);
        read_body_aligned("GetObject", key, out.body, len, lead)
            .await?
            .ok_or_else(invalid)
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> StoreResult<Version> {
        self.put_body(key, Body::from(data), mode).await
    }

    async fn put_body(&self, key: &str, body: Body, mode: PutMode) -> StoreResult<Version> {
        let full = self.full_key(key)?;
        let len = body.len();
        let upload = self.timeouts.for_upload(len);
        // The body carries a CRC32C that the server verifies (a mismatch is
        // refused), so the SigV4 SHA-256 of the payload is skipped: it cost
        // ~12% of the server's CPU while destaging (perf), for an integrity
        // check the checksum already gives. The parts are sent from where
        // they lie ([`parts_body`]).
        let (stream, crc) = parts_body::stream(body);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .checksum_crc32_c(crc)
            .body(stream);
        let intent = match &mode {
            PutMode::Overwrite => Intent::Other,
            PutMode::Create => {
                req = req.if_none_match("*");
                Intent::Create
            }
            PutMode::IfMatch(v) => {
                req = req.if_match(v.0.clone());
                Intent::IfMatch
            }
        };
        let req = req.customize().disable_payload_signing();
        let sent = match upload {
            None => req.send().await,
            Some((first_byte, attempt)) => {
                let timeouts = TimeoutConfig::builder()
                    .connect_timeout(self.timeouts.connect)
                    .read_timeout(first_byte)
                    .operation_attempt_timeout(attempt)
                    .build();
                req.config_override(aws_sdk_s3::config::Builder::new().timeout_config(timeouts))
                    .send()
                    .await
            }
        };
        let out = sent.map_err(|e| map_err("PutObject", key, intent, e))?;
        etag("PutObject", key, out.e_tag())
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| map_err("HeadObject", key, Intent::Read, e))?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size: size("HeadObject", key, out.content_length())?,
            version: etag("HeadObject", key, out.e_tag())?,
        })
    }

    async fn list(&self, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| map_err("ListObjectsV2", prefix, Intent::Other, e))?;
            for obj in page.contents() {
                let Some(full) = obj.key() else { continue };
                let Some(key) = full.strip_prefix(&self.prefix) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: key.to_string(),
                    size: size("ListObjectsV2", key, obj.size())?,
                    version: etag("ListObjectsV2", key, obj.e_tag())?,
                });
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let full = self.full_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match map_err("DeleteObject", key, Intent::Other, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    fn puts_in_flight(&self) -> usize {
        PUTS_IN_FLIGHT
    }

    fn writes_parts(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::aligned::PAGE;
    use aws_sdk_s3::config::http::HttpResponse;
    use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_s3::operation::put_object::PutObjectError;
    use aws_sdk_s3::primitives::SdkBody;

    fn service(status: u16, code: &str) -> SdkError<PutObjectError> {
        let err = PutObjectError::generic(ErrorMetadata::builder().code(code).build());
        let status = status.try_into().expect("valid status");
        SdkError::service_error(err, HttpResponse::new(status, SdkBody::empty()))
    }

    fn mapped(status: u16, code: &str, intent: Intent) -> StoreError {
        map_err("PutObject", "k", intent, service(status, code))
    }

    #[test]
    fn conditional_refusals() {
        let e = mapped(412, "PreconditionFailed", Intent::Create);
        assert!(matches!(e, StoreError::AlreadyExists { .. }), "{e:?}");
        let e = mapped(412, "PreconditionFailed", Intent::IfMatch);
        assert!(matches!(e, StoreError::PreconditionFailed { .. }), "{e:?}");
        let e = mapped(404, "NoSuchKey", Intent::IfMatch);
        assert!(matches!(e, StoreError::PreconditionFailed { .. }), "{e:?}");
        let e = mapped(409, "ConditionalRequestConflict", Intent::IfMatch);
        assert!(e.is_transient(), "{e:?}");
    }

    #[test]
    fn not_found_versus_missing_bucket() {
        let e = mapped(404, "NoSuchKey", Intent::Read);
        assert!(matches!(e, StoreError::NotFound { .. }), "{e:?}");
        let e = mapped(404, "NoSuchBucket", Intent::Read);
        assert!(matches!(e, StoreError::Permanent(_)), "{e:?}");
        assert!(e.to_string().contains("NoSuchBucket"), "{e}");
    }

    #[test]
    fn server_trouble_is_transient() {
        for (status, code) in [
            (500, "InternalError"),
            (503, "SlowDown"),
            (502, ""),
            (429, "TooManyRequests"),
            (400, "RequestTimeout"),
        ] {
            let e = mapped(status, code, Intent::Other);
            assert!(e.is_transient(), "{status} {code}: {e:?}");
        }
    }

    #[test]
    fn client_errors_are_permanent_and_named() {
        for (status, code) in [
            (403, "AccessDenied"),
            (400, "InvalidArgument"),
            (409, "BucketNotEmpty"),
        ] {
            let e = mapped(status, code, Intent::Other);
            assert!(
                matches!(e, StoreError::Permanent(_)),
                "{status} {code}: {e:?}"
            );
            assert!(e.to_string().contains(code), "{e}");
        }
    }

    #[test]
    fn uploads_get_time_for_their_bytes() {
        let t = Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(5),
            attempt: Duration::from_secs(60),
            upload_rate: 2 << 20,
        };
        assert_eq!(t.for_upload(100 << 10), None, "small: the client's limits");
        let (first, attempt) = t.for_upload(4 << 20).unwrap();
        assert_eq!(first, Duration::from_secs(7));
        assert_eq!(attempt, Duration::from_secs(60));
        let (first, attempt) = t.for_upload(256 << 20).unwrap();
        assert_eq!(first, Duration::from_secs(133));
        assert_eq!(attempt, Duration::from_secs(138));
    }

    /// A body delivered as `frames` (an `Err` frame fails the stream there).
    fn body_of(frames: Vec<Result<Vec<u8>, std::io::Error>>) -> ByteStream {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        let frames = frames
            .into_iter()
            .map(|f| f.map(|b| Frame::data(Bytes::from(b))));
        ByteStream::from_body_1_x(StreamBody::new(futures::stream::iter(frames)))
    }

    /// `len` bytes of a recognisable pattern.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[tokio::test]
    async fn a_body_in_many_small_frames_lands_intact_where_it_was_placed() {
        let len = (2 << 20) + 12_345; // a huge-page mapped pool buffer
        let want = pattern(len);
        for lead in [0, 1, 517, 4095] {
            // Frames of uneven sizes, some empty, none aligned.
            let mut frames = Vec::new();
            let (mut at, mut step) = (0, 1);
            while at < len {
                let end = (at + step).min(len);
                frames.push(Ok(want[at..end].to_vec()));
                if step % 5 == 0 {
                    frames.push(Ok(Vec::new()));
                }
                at = end;
                step = step * 3 % 70_001 + 1;
            }
            assert!(frames.len() > 50, "{} frames", frames.len());
            let got = read_body_aligned("GetObject", "k", body_of(frames), len, lead)
                .await
                .unwrap()
                .expect("exact length");
            assert_eq!(got.len(), len);
            assert!(got[..] == want[..], "lead {lead}: bytes differ");
            assert_eq!(
                got.as_ptr() as usize % PAGE,
                lead,
                "the body does not start {lead} bytes past a page boundary"
            );
        }
    }

    #[tokio::test]
    async fn a_short_or_overlong_body_is_refused() {
        let want = pattern(100_000);
        let split = |b: &[u8]| -> Vec<Result<Vec<u8>, std::io::Error>> {
            b.chunks(30_000).map(|c| Ok(c.to_vec())).collect()
        };
        // Short by one byte.
        let got = read_body_aligned(
            "GetObject",
            "k",
            body_of(split(&want[..99_999])),
            100_000,
            0,
        );
        assert!(got.await.unwrap().is_none(), "short body accepted");
        // Empty.
        let got = read_body_aligned("GetObject", "k", body_of(Vec::new()), 100_000, 0);
        assert!(got.await.unwrap().is_none(), "empty body accepted");
        // One byte too many, in the last frame or in a frame of its own.
        let mut long = want.clone();
        long.push(1);
        let got = read_body_aligned("GetObject", "k", body_of(split(&long)), 100_000, 0);
        assert!(got.await.unwrap().is_none(), "overlong body accepted");
        let mut frames = split(&want);
        frames.push(Ok(vec![1]));
        let got = read_body_aligned("GetObject", "k", body_of(frames), 100_000, 0);
        assert!(got.await.unwrap().is_none(), "extra frame accepted");
        // Exactly right, for contrast.
        let got = read_body_aligned("GetObject", "k", body_of(split(&want)), 100_000, 0);
        assert!(got.await.unwrap().is_some_and(|b| b[..] == want[..]));
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_a_transient_error() {
        let frames = vec![
            Ok(pattern(40_000)),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset",
            )),
            Ok(pattern(60_000)),
        ];
        let e = read_body_aligned("GetObject", "k", body_of(frames), 100_000, 0)
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        assert!(e.to_string().contains("reading body"), "{e}");
    }

    #[test]
    fn transport_failures() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let e: SdkError<PutObjectError> = SdkError::dispatch_failure(ConnectorError::io(io.into()));
        assert!(map_err("PutObject", "k", Intent::Create, e).is_transient());
        let e: SdkError<PutObjectError> = SdkError::timeout_error("attempt timed out");
        assert!(map_err("PutObject", "k", Intent::Create, e).is_transient());
        let e: SdkError<PutObjectError> = SdkError::construction_failure("bad request");
        let e = map_err("PutObject", "k", Intent::Create, e);
        assert!(matches!(e, StoreError::Permanent(_)), "{e:?}");
    }
}
