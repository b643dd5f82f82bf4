//! Instant restart after a local crash (issue 16, item 1), with real
//! processes: `kill -9` of `shale nbd serve`, then a new server on the same
//! host and data_dir takes the volume over at once, with every flushed
//! write. What must still block: a live server of this host, and a lease
//! holder on another host (until its lease expires).
//!
//! The time from spawning the restarted server to its "listening" line is
//! printed for the record; nothing asserts on it.

#[path = "support/cli.rs"]
mod cli_support;
mod nbd_support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli_support::CliEnv;
use nbd_support::{have_tool, run_ok};
use shale::catalog::lease::{read_lease, AcquireOptions, HolderId, Lease};
use shale::catalog::local_dir::read_identity;
use shale::catalog::Catalog;
use shale::clock::{DynClock, SystemClock};
use shale::engine::format::layout::lease_key;
use shale::store::fs::FsStore;
use shale::store::{DynStore, ObjectStore, PutMode};

/// A running `shale nbd serve`; killed (SIGKILL) when dropped.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// kill -9, as a crash.
    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM: the orderly shutdown, which must exit 0.
    fn stop(mut self) {
        // SAFETY: kill(2) on a child we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "shale nbd serve exited with {status}");
    }
}

/// Start `shale nbd serve v --socket SOCK`: the server once it listens and
/// how long that took, or its error output if it exited instead.
fn start(env: &CliEnv, sock: &Path, log_name: &str) -> Result<(Server, Duration), String> {
    let log = env.path(log_name);
    let stderr = std::fs::File::create(&log).expect("log file");
    let began = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shale"))
        .env_remove("SHALE_CONFIG")
        .env("RUST_LOG", "warn")
        .arg("--config")
        .arg(&env.config)
        .args(["nbd", "serve", "v", "--socket"])
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn shale nbd serve");
    let stdout = child.stdout.take().expect("stdout");
    let line = BufReader::new(stdout).lines().next();
    let took = began.elapsed();
    match line {
        Some(Ok(l)) if l.starts_with("listening on") => Ok((Server { child }, took)),
        _ => {
            let status = child.wait().expect("wait");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Err(format!("exited with {status}: {text}"))
        }
    }
}

fn qemu_io(sock: &Path, cmds: &[&str]) {
    let uri = format!("nbd+unix:///v?socket={}", sock.display());
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &uri]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run_ok(&mut cmd);
}

fn tools_present() -> bool {
    have_tool("qemu-io", &["--version"])
}

fn volume_env() -> CliEnv {
    let env = CliEnv::with_config("data_dir: data\n");
    env.ok(&["volume", "create", "v", "--size", "64MiB"]);
    env
}

/// kill -9 of the server, three times over: each restart serves at once
/// (on main it was refused, "in use: lease held by <host>:<pid>", until
/// the dead server's lease expired, about 30 s), and every flushed write
/// is there.
#[test]
fn kill_9_then_restart_serves_at_once_with_every_flushed_write() {
    if !tools_present() {
        return;
    }
    let env = volume_env();
    let sock = env.path("nbd.sock");
    let (mut server, cold) = start(&env, &sock, "start.log").expect("first start");
    eprintln!(
        "first start (no lease to take over): {} ms",
        cold.as_millis()
    );
    let mut flushed = Vec::new();
    for cycle in 0..3u32 {
        let offset = cycle * 4;
        let pattern = 0x50 + cycle;
        qemu_io(
            &sock,
            &[&format!("write -P {pattern:#x} {offset}M 1M"), "flush"],
        );
        flushed.push((offset, pattern));
        server.kill9();
        let (restarted, took) = start(&env, &sock, &format!("restart-{cycle}.log"))
            .unwrap_or_else(|e| panic!("restart {cycle} after kill -9 was refused: {e}"));
        eprintln!(
            "restart {cycle} after kill -9: serving after {} ms",
            took.as_millis()
        );
        server = restarted;
        let reads: Vec<String> = flushed
            .iter()
            .map(|(o, p)| format!("read -P {p:#x} {o}M 1M"))
            .collect();
        let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
        qemu_io(&sock, &reads);
    }
    server.stop();
}

/// A live server of this host still blocks a second one (whose error
/// names the local directory in use), and keeps serving.
#[test]
fn a_live_local_server_still_blocks() {
    if !tools_present() {
        return;
    }
    let env = volume_env();
    let sock = env.path("a.sock");
    let (server, _) = start(&env, &sock, "a.log").expect("server a");
    qemu_io(&sock, &["write -P 0x11 0 64k", "flush"]);
    let err = match start(&env, &env.path("b.sock"), "b.log") {
        Ok(_) => panic!("a second server opened a volume a live server holds"),
        Err(e) => e,
    };
    assert!(err.contains("in use"), "{err}");
    assert!(err.contains("data/volumes/"), "names the directory: {err}");
    qemu_io(&sock, &["read -P 0x11 0 64k"]);
    server.stop();
}

/// Write `record` as the volume's lease, whatever is there.
async fn plant_lease(store: &DynStore, id: u64, record: &shale::catalog::lease::LeaseRecord) {
    store
        .put(
            &lease_key(id),
            serde_json::to_vec(record).expect("json").into(),
            PutMode::Overwrite,
        )
        .await
        .expect("plant lease");
}

/// A lease holder on another host blocks until its lease expires, even if
/// it names this host's local directory and a pid that does not exist
/// here; so does a live process of this host that holds the lease (its pid
/// and start time match a running process) though not the directory lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_hosts_and_live_local_holders_still_block() {
    if !tools_present() {
        return;
    }
    let env = volume_env();
    let sock = env.path("nbd.sock");
    // One clean run gives the local directory its identity.
    let (server, _) = start(&env, &sock, "first.log").expect("first start");
    qemu_io(&sock, &["write -P 0x22 0 64k", "flush"]);
    server.stop();

    let store: DynStore = Arc::new(FsStore::new(env.path("data/store")));
    let id = Catalog::new(store.clone())
        .get("v")
        .await
        .expect("record")
        .id;
    let dir = env.cfg().volume_dir(id);
    let dir_id = read_identity(&dir)
        .expect("identity")
        .expect("written by the first run")
        .dir_id;
    let here = HolderId::this_process(&dir_id);

    // Another machine: a pid that is gone here proves nothing.
    let elsewhere = HolderId {
        machine: "another-machine-id".into(),
        pid: 999_999,
        start: 1,
        ..here.clone()
    };
    let clock: DynClock = Arc::new(SystemClock);
    let opts = AcquireOptions {
        owner: Some(elsewhere.clone()),
        ..AcquireOptions::default()
    };
    let _held = Lease::acquire_with(
        store.clone(),
        id,
        "other-host:999999",
        Duration::from_secs(3600),
        clock,
        opts,
    )
    .await
    .expect("the other host takes the lease");
    let err = match start(&env, &sock, "other-host.log") {
        Ok(_) => panic!("took over a live lease of another host"),
        Err(e) => e,
    };
    assert!(err.contains("other-host:999999"), "{err}");

    // This host and directory, but a live process (this test) holds it.
    let (mut record, _) = read_lease(&store, id).await.expect("read").expect("lease");
    record.holder = "live-local:1".into();
    record.owner = Some(here);
    plant_lease(&store, id, &record).await;
    let err = match start(&env, &sock, "live-local.log") {
        Ok(_) => panic!("took over the lease of a live local process"),
        Err(e) => e,
    };
    assert!(err.contains("live-local:1"), "{err}");

    // Once the other host's lease has expired, the volume opens.
    record.holder = "other-host:999999".into();
    record.owner = Some(elsewhere);
    record.expires_at_ms = 1;
    plant_lease(&store, id, &record).await;
    let (server, _) = start(&env, &sock, "expired.log").expect("an expired lease is taken over");
    qemu_io(&sock, &["read -P 0x22 0 64k"]);
    server.stop();
}
