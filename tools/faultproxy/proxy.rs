//! A fault-injecting HTTP/1.1 proxy for S3 traffic: sits between shale's
//! S3 client and a real S3 server (moto in the tests) and does to chosen
//! requests what networks and S3 do to real ones.
//!
//! Used in-process by the integration tests (`#[path]`-included) and by
//! the `shale-faultproxy` binary (tools/faultproxy/main.rs) for the soak.
//!
//! # Rules
//! 1. Every request read from a client is counted once ([`Stats::requests`])
//!    and gets at most one fault, drawn from an RNG seeded at start, so the
//!    *share* of faulted requests is what [`Faults::share`] says.
//! 2. The faults ([`WireFault`]):
//!    - `Latency`: wait, then forward normally.
//!    - `ResetBefore`: reset the client's connection (RST) without
//!      forwarding: the server never saw the request.
//!    - `LostResponse`: forward, let the server do the request, then reset
//!      the client's connection instead of answering.
//!    - `SlowDown` / `InternalError`: answer 503 `SlowDown` / 500
//!      `InternalError` in S3's XML format without forwarding.
//!    - `StallBody`: forward, send the response head and half of its body,
//!      then stall for [`Faults::stall`] and reset.
//! 3. An outage ([`Outage`]) wins over the per-request faults: `Down` closes
//!    the listening socket (new connections are refused) and resets every
//!    open connection; `Blackhole` accepts and reads requests but never
//!    answers; `Unavailable` answers every request 503 `SlowDown`.
//! 4. Request and response bodies are framed by `Content-Length` or
//!    `Transfer-Encoding: chunked` and copied byte for byte; the proxy never
//!    changes a request the server sees (except dropping
//!    `Expect: 100-continue`, which it answers itself).
//! 5. Client connections are kept alive as real S3 keeps them, even when
//!    the server closes its own after each response (moto does): the
//!    `Connection` header is not passed on (a body framed by the end of the
//!    stream gets a `Content-Length`), so the client's connection pool is
//!    exercised, including reuse of a connection the proxy then resets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What can happen to one request (rule 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFault {
    Latency,
    ResetBefore,
    LostResponse,
    SlowDown,
    InternalError,
    StallBody,
}

impl WireFault {
    pub const ALL: [WireFault; 6] = [
        WireFault::Latency,
        WireFault::ResetBefore,
        WireFault::LostResponse,
        WireFault::SlowDown,
        WireFault::InternalError,
        WireFault::StallBody,
    ];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            WireFault::Latency => "latency",
            WireFault::ResetBefore => "reset",
            WireFault::LostResponse => "lost-response",
            WireFault::SlowDown => "503-slowdown",
            WireFault::InternalError => "500-internal",
            WireFault::StallBody => "stall-body",
        }
    }

    pub fn parse(s: &str) -> Option<WireFault> {
        WireFault::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// Per-request fault settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Share of requests that get a fault, 0.0..=1.0.
    pub share: f64,
    /// The faults to choose from (uniformly) for a faulted request.
    pub kinds: Vec<WireFault>,
    /// Added latency of `Latency` faults: uniform in `[latency/2, latency]`.
    pub latency: Duration,
    /// How long a `StallBody` fault stalls before it resets.
    pub stall: Duration,
}

impl Faults {
    /// No faults.
    pub fn none() -> Faults {
        Faults {
            share: 0.0,
            kinds: Vec::new(),
            latency: Duration::from_millis(500),
            stall: Duration::from_secs(30),
        }
    }

    /// `share` of requests get one of every kind of fault.
    pub fn mixed(share: f64) -> Faults {
        Faults {
            share,
            kinds: WireFault::ALL.to_vec(),
            ..Faults::none()
        }
    }
}

/// Whole-server trouble (rule 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    None,
    Down,
    Blackhole,
    Unavailable,
}

impl Outage {
    pub fn parse(s: &str) -> Option<Outage> {
        Some(match s {
            "none" => Outage::None,
            "down" => Outage::Down,
            "blackhole" => Outage::Blackhole,
            "unavailable" => Outage::Unavailable,
            _ => return None,
        })
    }
}

/// What the proxy did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests read from clients.
    pub requests: AtomicU64,
    /// Requests answered by the server and passed on whole.
    pub forwarded: AtomicU64,
    /// Faults injected, by [`WireFault`] index.
    pub faults: [AtomicU64; 6],
    /// Requests that met an outage.
    pub outage_hits: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

impl Stats {
    pub fn faults_total(&self) -> u64 {
        self.faults.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// One line: `requests=N forwarded=N outage=N latency=N reset=N ...`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "requests={} forwarded={} connections={} outage={}",
            self.requests.load(Ordering::Relaxed),
            self.forwarded.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
            self.outage_hits.load(Ordering::Relaxed),
        );
        for f in WireFault::ALL {
            s.push_str(&format!(
                " {}={}",
                f.name(),
                self.faults[f.index()].load(Ordering::Relaxed)
            ));
        }
        s
    }
}

struct Shared {
    upstream: SocketAddr,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    outage: watch::Sender<Outage>,
    stats: Stats,
}

/// A running proxy. Dropping it stops accepting (open connections end
/// with their runtime).
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FaultProxy {
    /// Listen on `listen` (port 0: any free port) and forward to `upstream`.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        seed: u64,
    ) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (outage, _) = watch::channel(Outage::None);
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(Faults::none()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            outage,
            stats: Stats::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, addr, shared.clone()));
        Ok(FaultProxy {
            addr,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for an S3 endpoint setting.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    pub fn set_outage(&self, outage: Outage) {
        self.shared.outage.send_replace(outage);
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

async fn accept_loop(mut listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    let mut outage = shared.outage.subscribe();
    loop {
        tokio::select! {
            res = listener.accept() => {
                let Ok((client, _)) = res else { continue };
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                let _ = client.set_nodelay(true);
                tokio::spawn(serve_connection(client, shared.clone()));
            }
            changed = outage.changed() => {
                if changed.is_err() {
                    return;
                }
                if *outage.borrow_and_update() == Outage::Down {
                    // Close the listening socket: connections are refused.
                    drop(listener);
                    while *outage.borrow_and_update() == Outage::Down {
                        if outage.changed().await.is_err() {
                            return;
                        }
                    }
                    listener = loop {
                        match TcpListener::bind(addr).await {
                            Ok(l) => break l,
                            Err(e) => {
                                eprintln!("faultproxy: rebinding {addr}: {e}; retrying");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    };
                }
            }
        }
    }
}

/// One parsed HTTP message head plus its raw bytes.
struct Head {
    raw: Vec<u8>,
    first_line: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Read a message head; `None` at a clean end of stream.
async fn read_head<R: AsyncBufReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Head>> {
    let mut raw = Vec::new();
    let mut first_line = String::new();
    let mut headers = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r.read_until(b'\n', &mut line).await?;
        if n == 0 {
            if raw.is_empty() {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&line);
        if raw.len() > 1 << 20 {
            return Err(std::io::Error::other("message head larger than 1 MiB"));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if first_line.is_empty() {
            if text.is_empty() {
                raw.clear();
                continue; // stray CRLF between messages
            }
            first_line = text.to_string();
        } else if text.is_empty() {
            return Ok(Some(Head {
                raw,
                first_line,
                headers,
            }));
        } else if let Some((k, v)) = text.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
}

/// Read a body framed as `head` says (`has_body`: the message may have one).
async fn read_body<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    head: &Head,
    has_body: bool,
    to_eof: bool,
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if !has_body {
        return Ok(body);
    }
    if head.chunked() {
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            body.extend_from_slice(&line);
            let text = String::from_utf8_lossy(&line);
            let size_text = text.trim().split(';').next().unwrap_or("").to_string();
            let size = u64::from_str_radix(&size_text, 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size_text:?}")))?;
            if size == 0 {
                // Trailers up to an empty line.
                loop {
                    let mut t = Vec::new();
                    if r.read_until(b'\n', &mut t).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    body.extend_from_slice(&t);
                    if t == b"\r\n" || t == b"\n" {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size as usize + 2, 0);
            r.read_exact(&mut body[start..]).await?;
        }
    }
    match head.content_length() {
        Some(n) => {
            body.resize(n as usize, 0);
            r.read_exact(&mut body).await?;
        }
        None if to_eof => {
            r.read_to_end(&mut body).await?;
        }
        None => {}
    }
    Ok(body)
}

/// Close `s` with a TCP reset (SO_LINGER 0).
fn reset(s: TcpStream) {
    // A zero linger makes close() send RST at once; it never blocks.
    let _ = s.set_zero_linger();
    drop(s);
}

fn s3_error(status: u16, reason: &str, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected by shale-faultproxy</Message><RequestId>faultproxy</RequestId></Error>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn pick_fault(shared: &Shared) -> Option<(WireFault, Duration, Duration)> {
    let faults = shared
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if faults.kinds.is_empty() || faults.share <= 0.0 {
        return None;
    }
    let mut rng = shared.rng.lock().unwrap_or_else(|e| e.into_inner());
    if rng.random_range(0.0..1.0) >= faults.share {
        return None;
    }
    let kind = faults.kinds[rng.random_range(0..faults.kinds.len())];
    let half = faults.latency / 2;
    let nanos = (faults.latency - half).as_nanos() as u64;
    let latency = half + Duration::from_nanos(rng.random_range(0..=nanos));
    Some((kind, latency, faults.stall))
}

struct Upstream {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

/// Send one request upstream and read the whole response. The connection
/// is reused while the server keeps it open.
async fn exchange(
    shared: &Shared,
    up: &mut Option<Upstream>,
    request: &[u8],
    method: &str,
) -> std::io::Result<(Head, Vec<u8>)> {
    for attempt in 0..2 {
        if up.is_none() {
            let s = TcpStream::connect(shared.upstream).await?;
            let _ = s.set_nodelay(true);
            let (r, w) = s.into_split();
            *up = Some(Upstream {
                reader: BufReader::new(r),
                writer: w,
            });
        }
        let Some(u) = up.as_mut() else { continue };
        let sent = u.writer.write_all(request).await;
        let head = match sent {
            Ok(()) => read_head(&mut u.reader).await,
            Err(e) => Err(e),
        };
        let head = match head {
            Ok(Some(h)) => h,
            // A kept-alive connection the server closed meanwhile: retry
            // once on a fresh one.
            Ok(None) | Err(_) if attempt == 0 => {
                *up = None;
                continue;
            }
            Ok(None) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Err(e) => return Err(e),
        };
        let status: u16 = head
            .first_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let has_body =
            method != "HEAD" && !(100..200).contains(&status) && status != 204 && status != 304;
        let close = head
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || head.first_line.starts_with("HTTP/1.0");
        let mut body = read_body(&mut u.reader, &head, has_body, true).await?;
        let to_eof = has_body && head.content_length().is_none() && !head.chunked();
        if close || to_eof {
            *up = None;
        }
        // Rule 5: the client's connection stays open whatever the server
        // does with ours.
        let mut raw = Vec::with_capacity(head.raw.len() + 32);
        for line in head.raw.split_inclusive(|&b| b == b'\n') {
            let text = String::from_utf8_lossy(line).to_ascii_lowercase();
            if text.starts_with("connection:") || text.starts_with("keep-alive:") {
                continue;
            }
            if text == "\r\n" || text == "\n" {
                if to_eof {
                    raw.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
                }
                raw.extend_from_slice(line);
                break;
            }
            if let Some(rest) = line.strip_prefix(b"HTTP/1.0 ") {
                raw.extend_from_slice(b"HTTP/1.1 ");
                raw.extend_from_slice(rest);
                continue;
            }
            raw.extend_from_slice(line);
        }
        if !has_body {
            body.clear();
        }
        return Ok((Head { raw, ..head }, body));
    }
    Err(std::io::ErrorKind::UnexpectedEof.into())
}

async fn serve_connection(client: TcpStream, shared: Arc<Shared>) {
    let mut outage = shared.outage.subscribe();
    if *outage.borrow_and_update() == Outage::Down {
        reset(client);
        return;
    }
    let (r, mut w) = client.into_split();
    let mut reader = BufReader::new(r);
    let mut up: Option<Upstream> = None;
    loop {
        // Wait for the next request, or for an outage to cut us off.
        let head = tokio::select! {
            h = read_head(&mut reader) => h,
            _ = wait_for(&mut outage, Outage::Down) => break,
        };
        let head = match head {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => break,
        };
        let method = head
            .first_line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let expect_continue = head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
        if expect_continue && w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
            break;
        }
        let Ok(body) = read_body(&mut reader, &head, true, false).await else {
            break;
        };
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut request = Vec::with_capacity(head.raw.len() + body.len());
        if expect_continue {
            for line in head.raw.split_inclusive(|&b| b == b'\n') {
                if !String::from_utf8_lossy(line)
                    .to_ascii_lowercase()
                    .starts_with("expect:")
                {
                    request.extend_from_slice(line);
                }
            }
        } else {
            request.extend_from_slice(&head.raw);
        }
        request.extend_from_slice(&body);

        let current = *outage.borrow_and_update();
        match current {
            Outage::None => {}
            Outage::Down => {
                shared.stats.outage_hits.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Outage::Blackhole => {
                shared.stats.outage_hits.fetch_add(1, Ordering::Relaxed);
                // Never answer; the client times out (or the outage turns
                // into `Down`, which resets us).
                let _ = wait_for(&mut outage, Outage::Down).await;
                break;
            }
            Outage::Unavailable => {
                shared.stats.outage_hits.fetch_add(1, Ordering::Relaxed);
                if w.write_all(&s3_error(503, "Slow Down", "SlowDown"))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
        }

        let fault = pick_fault(&shared);
        if let Some((kind, _, _)) = fault {
            shared.stats.faults[kind.index()].fetch_add(1, Ordering::Relaxed);
        }
        match fault {
            Some((WireFault::Latency, latency, _)) => tokio::time::sleep(latency).await,
            Some((WireFault::ResetBefore, _, _)) => break,
            Some((WireFault::SlowDown, _, _)) => {
                if w.write_all(&s3_error(503, "Slow Down", "SlowDown"))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Some((WireFault::InternalError, _, _)) => {
                let e = s3_error(500, "Internal Server Error", "InternalError");
                if w.write_all(&e).await.is_err() {
                    break;
                }
                continue;
            }
            _ => {}
        }
        let (rhead, rbody) = tokio::select! {
            r = exchange(&shared, &mut up, &request, &method) => match r {
                Ok(x) => x,
                Err(_) => break,
            },
            _ = wait_for(&mut outage, Outage::Down) => break,
        };
        match fault {
            Some((WireFault::LostResponse, _, _)) => break,
            Some((WireFault::StallBody, _, stall)) => {
                let _ = w.write_all(&rhead.raw).await;
                let _ = w.write_all(&rbody[..rbody.len() / 2]).await;
                tokio::select! {
                    _ = tokio::time::sleep(stall) => {}
                    _ = wait_for(&mut outage, Outage::Down) => {}
                }
                break;
            }
            _ => {}
        }
        if w.write_all(&rhead.raw).await.is_err() || w.write_all(&rbody).await.is_err() {
            break;
        }
        shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    }
    // Every way out of the loop but a clean end of stream is trouble: reset.
    if let Ok(client) = reader.into_inner().reunite(w) {
        reset(client);
    }
}

/// Resolve once the outage state is `want` (never if the sender is gone).
async fn wait_for(rx: &mut watch::Receiver<Outage>, want: Outage) {
    loop {
        if *rx.borrow_and_update() == want {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
