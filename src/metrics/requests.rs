//! Request metrics of one frontend: a [`MeteredDevice`] wraps the
//! [`BlockDevice`] a frontend serves and counts every request, its bytes,
//! its latency and its errors, in one place outside the protocol code.
//!
//! Invariants:
//! 1. Counting never changes a request: the wrapper passes arguments and
//!    results through unchanged and adds no await point of its own.
//! 2. A request is counted once, when it completes (Ok or Err); bytes only
//!    for requests that succeeded; latency for both.
//! 3. The hot path takes no lock: atomics only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::histogram::Histogram;
use super::report::{Family, Kind, Sample, Unit};
use crate::engine::{BlockDevice, ReadParts};
use crate::error::BlockError;

/// Request operations, as labelled (`op="..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
        }
    }
}

/// Error kinds, as labelled (`kind="..."`); one per [`BlockError`] variant.
pub const ERROR_KINDS: [&str; 7] = [
    "invalid",
    "out_of_range",
    "no_space",
    "fenced",
    "read_only",
    "io",
    "closed",
];

fn error_kind(e: &BlockError) -> usize {
    match e {
        BlockError::InvalidArgument(_) => 0,
        BlockError::OutOfRange { .. } => 1,
        BlockError::NoSpace | BlockError::LocalNoSpace(_) => 2,
        BlockError::Fenced(_) => 3,
        BlockError::ReadOnly => 4,
        BlockError::Io(_) => 5,
        BlockError::Closed => 6,
    }
}

#[derive(Debug, Default)]
struct OpMetrics {
    requests: AtomicU64,
    bytes: AtomicU64,
    latency: Histogram,
    errors: [AtomicU64; ERROR_KINDS.len()],
}

/// Counters of one frontend of one volume.
#[derive(Debug)]
pub struct RequestMetrics {
    frontend: String,
    ops: [OpMetrics; 5],
}

impl RequestMetrics {
    /// Metrics labelled `frontend="<frontend>"` (`nbd`, `ublk`).
    pub fn new(frontend: &str) -> RequestMetrics {
        RequestMetrics {
            frontend: frontend.to_string(),
            ops: Default::default(),
        }
    }

    pub fn frontend(&self) -> &str {
        &self.frontend
    }

    fn op(&self, op: Op) -> &OpMetrics {
        &self.ops[op as usize]
    }

    /// Count a completed request.
    pub fn record<T>(&self, op: Op, bytes: u64, started: Instant, result: &Result<T, BlockError>) {
        let m = self.op(op);
        m.latency.observe(started.elapsed());
        m.requests.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(_) => {
                m.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Err(e) => {
                m.errors[error_kind(e)].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Requests completed so far, all operations.
    pub fn total_requests(&self) -> u64 {
        self.ops
            .iter()
            .map(|m| m.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Add this frontend's samples to the request families
    /// (see [`request_families`]).
    pub fn add_samples(&self, fams: &mut [Family; 4]) {
        let fe = self.frontend.as_str();
        for op in Op::ALL {
            let m = self.op(op);
            let labels = [("frontend", fe), ("op", op.as_str())];
            let n = m.requests.load(Ordering::Relaxed) as f64;
            fams[0].samples.push(Sample::value(&labels, n));
            if matches!(op, Op::Read | Op::Write | Op::Trim | Op::WriteZeroes) {
                let b = m.bytes.load(Ordering::Relaxed) as f64;
                fams[1].samples.push(Sample::value(&labels, b));
            }
            fams[2]
                .samples
                .push(Sample::histogram(&labels, m.latency.snapshot()));
            for (i, kind) in ERROR_KINDS.iter().enumerate() {
                let n = m.errors[i].load(Ordering::Relaxed);
                if n > 0 {
                    let labels = [("frontend", fe), ("op", op.as_str()), ("kind", kind)];
                    fams[3].samples.push(Sample::value(&labels, n as f64));
                }
            }
        }
    }
}

/// The empty request families, in the order [`RequestMetrics::add_samples`] fills.
pub fn request_families() -> [Family; 4] {
    [
        Family::new(
            "requests",
            Kind::Counter,
            None,
            "Block requests completed, by frontend and operation",
        ),
        Family::new(
            "request",
            Kind::Counter,
            Some(Unit::Bytes),
            "Bytes of block requests completed successfully, by frontend and operation (trim and write_zeroes: the range)",
        ),
        Family::new(
            "request_duration",
            Kind::Histogram,
            Some(Unit::Seconds),
            "Block request latency from arrival at the volume to completion, by frontend and operation",
        ),
        Family::new(
            "request_errors",
            Kind::Counter,
            None,
            "Block requests that failed, by frontend, operation and error kind",
        ),
    ]
}

/// A [`BlockDevice`] that counts what passes through it.
pub struct MeteredDevice {
    inner: Arc<dyn BlockDevice>,
    metrics: Arc<RequestMetrics>,
}

impl MeteredDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, metrics: Arc<RequestMetrics>) -> MeteredDevice {
        MeteredDevice { inner, metrics }
    }
}

#[async_trait]
impl BlockDevice for MeteredDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let t = Instant::now();
        let len = buf.len() as u64;
        let r = self.inner.read(offset, buf).await;
        self.metrics.record(Op::Read, len, t, &r);
        r
    }

    async fn read_parts(&self, offset: u64, buf: Vec<u8>) -> Result<ReadParts, BlockError> {
        let t = Instant::now();
        let len = buf.len() as u64;
        let r = self.inner.read_parts(offset, buf).await;
        self.metrics.record(Op::Read, len, t, &r);
        r
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        let t = Instant::now();
        let r = self.inner.write(offset, data, fua).await;
        self.metrics.record(Op::Write, data.len() as u64, t, &r);
        r
    }

    async fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        let t = Instant::now();
        let len = data.len() as u64;
        let r = self.inner.write_owned(offset, data, fua).await;
        self.metrics.record(Op::Write, len, t, &r);
        r
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let t = Instant::now();
        let r = self.inner.flush().await;
        self.metrics.record(Op::Flush, 0, t, &r);
        r
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let t = Instant::now();
        let r = self.inner.trim(offset, len).await;
        self.metrics.record(Op::Trim, len, t, &r);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, fua).await;
        self.metrics.record(Op::WriteZeroes, len, t, &r);
        r
    }

    /// Not counted: it reads only the map, never data.
    fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<crate::engine::Extent>, BlockError> {
        self.inner.allocation(offset, len, max_runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::memdisk::MemDisk;

    #[tokio::test]
    async fn counts_requests_bytes_and_errors_without_changing_results() {
        let m = Arc::new(RequestMetrics::new("nbd"));
        let dev = MeteredDevice::new(Arc::new(MemDisk::new(1 << 20)), m.clone());
        dev.write(4096, &[7u8; 8192], false).await.unwrap();
        let mut buf = vec![0u8; 4096];
        dev.read(8192, &mut buf).await.unwrap();
        assert_eq!(buf, vec![7u8; 4096]);
        dev.flush().await.unwrap();
        dev.trim(0, 4096).await.unwrap();
        let err = dev.write(1 << 20, &[1u8; 512], false).await.unwrap_err();
        assert!(matches!(err, BlockError::OutOfRange { .. }));
        assert_eq!(m.total_requests(), 5);

        let mut fams = request_families();
        m.add_samples(&mut fams);
        let get = |f: &Family, op: &str| {
            f.samples
                .iter()
                .find(|s| s.label("op") == Some(op))
                .map(|s| s.value)
        };
        assert_eq!(get(&fams[0], "write"), Some(2.0));
        assert_eq!(
            get(&fams[1], "write"),
            Some(8192.0),
            "failed write adds no bytes"
        );
        assert_eq!(get(&fams[1], "read"), Some(4096.0));
        assert_eq!(get(&fams[1], "trim"), Some(4096.0));
        assert_eq!(get(&fams[1], "flush"), None, "flush has no bytes");
        let lat = fams[2]
            .samples
            .iter()
            .find(|s| s.label("op") == Some("write"))
            .and_then(|s| s.histogram.clone())
            .unwrap();
        assert_eq!(lat.count(), 2);
        assert_eq!(fams[3].samples.len(), 1);
        assert_eq!(fams[3].samples[0].label("kind"), Some("out_of_range"));
        assert!(fams
            .iter()
            .all(|f| f.samples.iter().all(|s| s.label("frontend") == Some("nbd"))));
    }
}
