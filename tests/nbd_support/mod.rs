//! Shared helpers for the NBD integration tests: an in-process server on a
//! free TCP port and a unix socket, a raw protocol client for bad-input
//! tests, test devices, and detection of the external NBD clients.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use shale::engine::memdisk::MemDisk;
use shale::engine::BlockDevice;

#[path = "../support/hooked_device.rs"]
mod hooked_device;
pub use hooked_device::{DeviceHook, DeviceOp, HookedDevice};
use shale::error::BlockError;
use shale::frontend::nbd::codec::*;
use shale::frontend::nbd::protocol::*;
use shale::frontend::nbd::{ExportMap, Limits, Listener, NbdServer, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};

/// True when a missing prerequisite must fail the test instead of skipping.
pub fn ci() -> bool {
    std::env::var("CI").map(|v| v == "true").unwrap_or(false)
}

/// Whether `tool` runs (`tool args...` exits 0). Prints SKIP with the
/// reason when it does not; panics instead when CI=true.
pub fn have_tool(tool: &str, args: &[&str]) -> bool {
    let why = match Command::new(tool).args(args).output() {
        Ok(o) if o.status.success() => return true,
        Ok(o) => format!(
            "`{tool} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("{tool} not runnable: {e}"),
    };
    assert!(!ci(), "CI=true and a prerequisite is missing: {why}");
    eprintln!("SKIP: {why}");
    false
}

/// Run a command, panic with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Work to run on the server's runtime after it stops (closing volumes).
pub type Cleanup = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A server running on its own runtime thread.
pub struct TestServer {
    pub port: u16,
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Serve RAM disks of the given names and sizes; returns the disks too.
    pub fn memory(exports: &[(&str, u64)]) -> (TestServer, Vec<Arc<MemDisk>>) {
        let disks: Vec<Arc<MemDisk>> = exports
            .iter()
            .map(|(_, size)| Arc::new(MemDisk::new(*size)))
            .collect();
        let devices = exports
            .iter()
            .zip(&disks)
            .map(|((n, _), d)| (n.to_string(), d.clone() as Arc<dyn BlockDevice>));
        (TestServer::start(ExportMap::new(devices).unwrap()), disks)
    }

    pub fn start(exports: ExportMap) -> TestServer {
        TestServer::start_with(|| async move {
            let cleanup: Cleanup = Box::new(|| Box::pin(async {}));
            (exports, cleanup)
        })
    }

    /// Build the exports inside the server's runtime (volumes must be
    /// opened there), serve them, and run `cleanup` after `serve` returns.
    pub fn start_with<F, Fut>(build: F) -> TestServer
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = (ExportMap, Cleanup)>,
    {
        TestServer::start_limited(Limits::default(), build)
    }

    /// [`TestServer::start_with`] with explicit per-connection limits.
    pub fn start_limited<F, Fut>(limits: Limits, build: F) -> TestServer
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = (ExportMap, Cleanup)>,
    {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let sock = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (exports, cleanup) = build().await;
                let tcp = Listener::bind_tcp("127.0.0.1:0").await.unwrap();
                let port = match &tcp {
                    Listener::Tcp(l) => l.local_addr().unwrap().port(),
                    Listener::Unix(..) => unreachable!(),
                };
                let unix = Listener::bind_unix(&sock).unwrap();
                port_tx.send(port).unwrap();
                let served = NbdServer::new(exports)
                    .with_limits(limits)
                    .serve(vec![tcp, unix], async {
                        let _ = stop_rx.await;
                    })
                    .await;
                cleanup().await;
                served
            })
        });
        let port = port_rx.recv().expect("server thread failed to start");
        TestServer {
            port,
            socket,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop the server and return what `serve` returned.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown()
    }

    /// Ask the server to stop without waiting for it.
    pub fn request_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Whether `serve` has returned.
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn shutdown(&mut self) -> Result<(), ServerError> {
        self.request_stop();
        match self.thread.take() {
            Some(t) => t.join().expect("server thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// A device that records operations and can hold writes and reads at a
/// gate until the test releases them: a [`MemDisk`] with a [`Gate`].
pub type GatedDisk = HookedDevice<MemDisk, Gate>;

/// The hook of a [`GatedDisk`].
pub struct Gate {
    pub gate: Arc<Semaphore>,
    /// Gains a permit each time a request reaches the gate.
    pub entered: Arc<Semaphore>,
    /// Offsets whose reads and writes wait at the gate.
    pub gated_offsets: Vec<u64>,
    /// When set, flushes wait at the gate too.
    pub flush_gated: std::sync::atomic::AtomicBool,
    pub log: Mutex<Vec<String>>,
}

impl GatedDisk {
    pub fn new(size: u64, gated_offsets: Vec<u64>) -> GatedDisk {
        HookedDevice {
            inner: Arc::new(MemDisk::new(size)),
            hook: Gate {
                gate: Arc::new(Semaphore::new(0)),
                entered: Arc::new(Semaphore::new(0)),
                gated_offsets,
                flush_gated: Default::default(),
                log: Mutex::new(Vec::new()),
            },
        }
    }
}

impl Gate {
    async fn wait(&self) {
        self.entered.add_permits(1);
        self.gate.acquire().await.unwrap().forget();
    }

    async fn pass(&self, offset: u64) {
        if self.gated_offsets.contains(&offset) {
            self.wait().await;
        }
    }

    fn record(&self, what: String) {
        self.log.lock().unwrap().push(what);
    }

    pub fn events(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[async_trait]
impl DeviceHook for Gate {
    async fn before(&self, op: DeviceOp) -> Result<(), BlockError> {
        match op {
            DeviceOp::Read { offset, .. } => {
                self.pass(offset).await;
                self.record(format!("read {offset}"));
            }
            DeviceOp::Write { offset, .. } => {
                self.pass(offset).await;
                self.record(format!("write {offset}"));
            }
            DeviceOp::Flush => {
                if self.flush_gated.load(std::sync::atomic::Ordering::SeqCst) {
                    self.wait().await;
                }
                self.record("flush".into());
            }
            DeviceOp::Trim { offset, .. } => self.record(format!("trim {offset}")),
            DeviceOp::Zero { offset, .. } => self.record(format!("zero {offset}")),
        }
        Ok(())
    }
}

/// A minimal protocol client over raw sockets, for driving the server
/// with exactly the bytes a test wants.
pub struct RawClient {
    pub stream: TcpStream,
}

/// An option reply: (option, reply type, data).
pub type OptionReply = (u32, u32, Vec<u8>);

impl RawClient {
    /// Connect and read the greeting; send the given client flags.
    pub async fn greet(addr: &str, client_flags: u32) -> RawClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; 18];
        stream.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        stream.write_all(&client_flags.to_be_bytes()).await.unwrap();
        RawClient { stream }
    }

    /// Connect and complete `NBD_OPT_GO` for `export`; returns the size.
    pub async fn connect(addr: &str, export: &str) -> (RawClient, u64) {
        let mut c = RawClient::greet(addr, CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).await;
        let data = InfoRequest {
            name: export.as_bytes().to_vec(),
            requests: vec![INFO_BLOCK_SIZE],
        }
        .encode();
        c.send_option(OPT_GO, &data).await;
        let mut size = None;
        loop {
            let (opt, kind, data) = c.option_reply().await;
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO if data[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("unexpected GO reply {other:#x}: {data:?}"),
            }
        }
        (c, size.expect("no NBD_INFO_EXPORT"))
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let hdr = OptionHeader {
            option,
            length: data.len() as u32,
        };
        self.stream.write_all(&hdr.encode()).await.unwrap();
        self.stream.write_all(data).await.unwrap();
    }

    pub async fn option_reply(&mut self) -> OptionReply {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h).await.unwrap();
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.stream.read_exact(&mut data).await.unwrap();
        (opt, kind, data)
    }

    pub async fn send(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let req = Request {
            flags,
            command,
            handle,
            offset,
            length,
        };
        self.stream.write_all(&req.encode()).await.unwrap();
    }

    /// Read one simple reply header: (error, handle).
    pub async fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut h).await.unwrap();
        decode_simple_reply(&h).unwrap()
    }

    pub async fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(CMD_WRITE, 0, handle, offset, data.len() as u32)
            .await;
        self.stream.write_all(data).await.unwrap();
        let (err, h) = self.reply().await;
        assert_eq!(h, handle);
        err
    }

    /// Read `len` bytes; returns the error value and the data (empty on error).
    pub async fn read(&mut self, handle: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.send(CMD_READ, 0, handle, offset, len).await;
        let (err, h) = self.reply().await;
        assert_eq!(h, handle);
        let mut data = Vec::new();
        if err == 0 {
            data.resize(len as usize, 0);
            self.stream.read_exact(&mut data).await.unwrap();
        }
        (err, data)
    }

    pub async fn flush(&mut self, handle: u64) -> u32 {
        self.send(CMD_FLUSH, 0, handle, 0, 0).await;
        let (err, h) = self.reply().await;
        assert_eq!(h, handle);
        err
    }

    /// Read the next reply, simple or structured chunk, by its magic.
    pub async fn any_reply(&mut self) -> AnyReply {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic).await.unwrap();
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; SIMPLE_REPLY_LEN];
                h[..4].copy_from_slice(&magic);
                self.stream.read_exact(&mut h[4..]).await.unwrap();
                let (error, handle) = decode_simple_reply(&h).unwrap();
                AnyReply::Simple { error, handle }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; STRUCTURED_REPLY_LEN];
                h[..4].copy_from_slice(&magic);
                self.stream.read_exact(&mut h[4..]).await.unwrap();
                let hdr = ChunkHeader::decode(&h).unwrap();
                let mut payload = vec![0u8; hdr.length as usize];
                self.stream.read_exact(&mut payload).await.unwrap();
                AnyReply::Chunk(hdr, payload)
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// True when the server has closed the connection (EOF on read).
    pub async fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b).await, Ok(0) | Err(_))
    }
}

/// A reply as read by [`RawClient::any_reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyReply {
    Simple {
        error: u32,
        handle: u64,
    },
    /// A structured reply chunk and its payload.
    Chunk(ChunkHeader, Vec<u8>),
}

/// Bytes of a file.
pub fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Open (or create) volume `id` of `size` bytes on a local-directory store
/// under `root`, with the default engine config, at writer `epoch`.
pub async fn open_volume(
    root: &Path,
    id: u64,
    size: u64,
    epoch: u64,
) -> Arc<shale::engine::volume::Volume> {
    use shale::engine::volume::{Volume, VolumeParams};
    let store = Arc::new(shale::store::fs::FsStore::new(root.join("store")));
    let params = VolumeParams {
        id,
        size,
        epoch,
        local_dir: root.join(format!("local-{id}")),
    };
    Volume::open(
        store,
        params,
        shale::engine::config::EngineConfig::default(),
        Arc::new(shale::clock::SystemClock),
    )
    .await
    .expect("open volume")
}
