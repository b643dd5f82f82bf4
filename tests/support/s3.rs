//! Test support: a real S3 server (moto) on 127.0.0.1, one per test binary.
//!
//! Include with `#[path = "support/s3.rs"] mod s3_support;` and call
//! [`moto`]. It returns `None` after printing a SKIP line when `moto_server`
//! is not on PATH, and panics instead when `CI=true`.
//!
//! The server is started by a keeper thread that lives as long as the test
//! process, with `PR_SET_PDEATHSIG` set in the child, so the kernel kills the
//! server when the test process exits: no orphan is left, even after a panic.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use shale::store::s3::S3Settings;
use shale::store::StoreConfig;

/// A running moto server.
#[derive(Debug)]
pub struct MotoServer {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    port: u16,
}

static SERVER: OnceLock<Option<MotoServer>> = OnceLock::new();
static BUCKET_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The shared server, started on first use; `None` means "skip this test".
pub fn moto() -> Option<&'static MotoServer> {
    SERVER.get_or_init(start).as_ref()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn start() -> Option<MotoServer> {
    let Some(exe) = find_on_path("moto_server") else {
        let why = "moto_server not on PATH; pip install 'moto[server]'";
        if in_ci() {
            panic!("CI=true and the S3 tests cannot run: {why}");
        }
        eprintln!("SKIP: S3 tests ({why})");
        return None;
    };
    // Credentials for clients built from the default AWS chain (store::open).
    // moto accepts any; set once, before any client of this binary exists.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "shale-test"),
        ("AWS_SECRET_ACCESS_KEY", "shale-test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let port = free_port();
    let log = std::env::temp_dir().join(format!("shale-moto-{port}.log"));
    let (tx, rx) = mpsc::channel::<String>();
    let parent = std::process::id();
    let log_for_thread = log.clone();
    // The keeper thread must outlive every test: PDEATHSIG fires when the
    // thread that forked the child exits, not only when the process does.
    std::thread::Builder::new()
        .name("moto-keeper".into())
        .spawn(move || {
            let log_file = match std::fs::File::create(&log_for_thread) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(format!("cannot create {}: {e}", log_for_thread.display()));
                    return;
                }
            };
            // moto's own launcher races on conditional writes; ours
            // serializes requests (see tools/moto-serial.py). Use the Python
            // that sits beside moto_server (a venv or pyenv), else python3.
            let python = exe
                .parent()
                .map(|d| d.join("python3"))
                .filter(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from("python3"));
            let launcher = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/moto-serial.py");
            let mut cmd = Command::new(&python);
            cmd.args([launcher, "127.0.0.1", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file);
            // SAFETY: the closure runs in the forked child before exec and
            // only makes async-signal-safe calls (prctl, getppid, _exit).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died before prctl took effect.
                    if libc::getppid() as u32 != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
            match cmd.spawn() {
                Ok(mut child) => {
                    let status = child.wait();
                    let _ = tx.send(format!("moto_server exited: {status:?}"));
                }
                Err(e) => {
                    let _ = tx.send(format!("cannot start {}: {e}", exe.display()));
                }
            }
            // Park forever so the thread (and the PDEATHSIG link) persists.
            loop {
                std::thread::park();
            }
        })
        .expect("spawn moto keeper thread");

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(why) = rx.try_recv() {
            panic!("moto_server failed: {why} (log: {})", log.display());
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "moto_server did not answer on port {port} (log: {})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let server = MotoServer {
        endpoint: format!("http://127.0.0.1:{port}"),
        port,
    };
    // The port may answer before the app is ready; create_bucket retries.
    server.create_bucket("shale-probe");
    // Started fine: drop the log's name so runs leave no files behind (the
    // server keeps writing to the unlinked file until it exits).
    let _ = std::fs::remove_file(&log);
    Some(server)
}

impl MotoServer {
    /// Create a bucket named `name` (plain HTTP; moto does not check auth).
    pub fn create_bucket(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.put_bucket(name) {
                Ok(200) => return,
                Ok(status) if Instant::now() > deadline => {
                    panic!("creating bucket {name}: HTTP {status}")
                }
                Err(e) if Instant::now() > deadline => panic!("creating bucket {name}: {e}"),
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn put_bucket(&self, name: &str) -> std::io::Result<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok(status)
    }

    /// Create a fresh bucket whose name starts with `tag` and return its name.
    pub fn unique_bucket(&self, tag: &str) -> String {
        let n = BUCKET_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{tag}-{}-{n}", std::process::id()).to_lowercase();
        self.create_bucket(&name);
        name
    }

    /// Settings for an `S3Store` on `bucket` with fixed test credentials.
    pub fn settings(&self, bucket: &str, prefix: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".to_string(),
            force_path_style: true,
            static_credentials: Some(("shale-test".into(), "shale-test".into())),
            attempt_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            min_upload_rate: 2 << 20,
        }
    }

    /// A config for `shale::store::open` on `bucket` (credentials come from
    /// the environment variables set at startup).
    pub fn store_config(&self, bucket: &str, prefix: &str) -> StoreConfig {
        StoreConfig::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".to_string(),
            force_path_style: true,
            request_timeout_ms: 5000,
            min_upload_rate: 2 << 20,
        }
    }
}
