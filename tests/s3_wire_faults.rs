//! S3 trouble on the wire (issue 16, item 2): `shale nbd serve` with its
//! store on a real S3 server (moto) reached through the fault-injecting
//! proxy of tools/faultproxy, with shale's real S3 client configuration
//! (its timeouts, retries and connection pool). An NBD client writes,
//! flushes and reads, checks every byte it reads, and records what it saw:
//! errors and latency percentiles (printed; run with `--nocapture`).
//!
//! - `mixed_faults_give_the_client_no_error`: 10% of requests get a fault
//!   (latency, reset before the server sees the request, a lost response,
//!   503 SlowDown, 500 InternalError, a stalled body).
//! - `outage_with_writes_slows_writes_and_loses_nothing`: the server is
//!   down for `SHALE_OUTAGE_SECS` (default 15; 60 for the long form) while
//!   writes go on.
//! - `reads_of_stored_data_during_an_outage_fail_with_eio_after_the_timeout`.
//!
//! After each, the server is stopped, its local directory deleted, and the
//! data read back from the store alone.
//!
//! Skips with a printed reason when moto is missing; fails when CI=true.

#[path = "support/cli.rs"]
mod cli_support;
#[path = "../tools/crashcheck/nbd.rs"]
#[allow(dead_code)]
mod nbd_client;
#[path = "../tools/faultproxy/proxy.rs"]
#[allow(dead_code)]
mod proxy;
#[path = "support/rng.rs"]
mod rng;
#[path = "support/s3.rs"]
mod s3_support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cli_support::{CliEnv, NbdServer};
use nbd_client::{NbdAddr, NbdClient};
use proxy::{FaultProxy, Faults, Outage};
use rng::Rng;

const VOL: &str = "wire";
const BLOCK: usize = 64 << 10;

/// moto, the proxy in front of it, and a config whose store is the proxy.
struct Rig {
    env: CliEnv,
    proxy: FaultProxy,
    sock: PathBuf,
    /// Runs the proxy.
    _rt: tokio::runtime::Runtime,
}

impl Rig {
    /// `None` when moto is missing (the test skips).
    fn new(tag: &str, engine: &str, size: &str) -> Option<Rig> {
        let moto = s3_support::moto()?;
        let bucket = moto.unique_bucket(tag);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let upstream: SocketAddr = moto
            .endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("moto address");
        let proxy = rt
            .block_on(FaultProxy::start(
                "127.0.0.1:0".parse().unwrap(),
                upstream,
                16,
            ))
            .expect("start the proxy");
        let config = format!(
            "data_dir: data\nstore:\n  type: s3\n  bucket: {bucket}\n  endpoint: {}\n  force_path_style: true\nengine:\n{engine}",
            proxy.endpoint()
        );
        let env = CliEnv::with_config(&config);
        env.ok(&["volume", "create", VOL, "--size", size]);
        let sock = env.path("nbd.sock");
        Some(Rig {
            env,
            proxy,
            sock,
            _rt: rt,
        })
    }

    fn serve(&self) -> NbdServer {
        self.env.serve_nbd(VOL, &self.sock, "error")
    }

    fn client(&self) -> NbdClient {
        NbdClient::connect(&NbdAddr::Unix {
            socket: self.sock.to_str().unwrap().to_string(),
            export: VOL.to_string(),
        })
        .expect("connect to the NBD server")
    }

    /// Stop the server, delete the local directory (WAL, cache) and serve
    /// again: everything read from now on comes from the store.
    fn restart_from_store_only(&self, server: NbdServer) -> NbdServer {
        self.proxy.set_faults(Faults::none());
        self.proxy.set_outage(Outage::None);
        server.stop();
        std::fs::remove_dir_all(self.env.path("data/volumes")).expect("remove local dirs");
        self.serve()
    }
}

/// Deterministic content of block `b` at generation `g`.
fn block_data(b: u64, g: u64) -> Vec<u8> {
    let mut r = Rng((b << 32 | g) ^ 0x9E37_79B9_7F4A_7C15 | 1);
    let mut v = Vec::with_capacity(BLOCK);
    while v.len() < BLOCK {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v
}

/// What the client saw, per operation.
#[derive(Default)]
struct Seen {
    writes: Vec<Duration>,
    reads: Vec<Duration>,
    flushes: Vec<Duration>,
    errors: Vec<String>,
}

fn percentiles(name: &str, v: &[Duration]) -> String {
    if v.is_empty() {
        return format!("{name}: none");
    }
    let mut s = v.to_vec();
    s.sort();
    let p = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
    format!(
        "{name}: n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        s.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    )
}

impl Seen {
    fn report(&self, case: &str) {
        eprintln!(
            "WIRE {case}: errors={} | {} | {} | {}",
            self.errors.len(),
            percentiles("write", &self.writes),
            percentiles("read", &self.reads),
            percentiles("flush", &self.flushes)
        );
    }
}

/// The volume's expected content: generation per block (0 = never written).
struct Model {
    gens: Vec<u64>,
}

impl Model {
    fn new(blocks: u64) -> Model {
        Model {
            gens: vec![0; blocks as usize],
        }
    }

    /// Read block `b` and compare; a mismatch panics (wrong data is never
    /// acceptable), an error is returned.
    fn check(&self, c: &mut NbdClient, b: u64) -> Result<Duration, String> {
        let mut buf = vec![0u8; BLOCK];
        let t = Instant::now();
        c.read_at(b * BLOCK as u64, &mut buf)
            .map_err(|e| format!("{e:#}"))?;
        let took = t.elapsed();
        let g = self.gens[b as usize];
        let want = if g == 0 {
            vec![0u8; BLOCK]
        } else {
            block_data(b, g)
        };
        assert!(buf == want, "block {b} (generation {g}) read back wrong");
        Ok(took)
    }

    fn check_all(&self, c: &mut NbdClient) {
        for b in 0..self.gens.len() as u64 {
            if let Err(e) = self.check(c, b) {
                panic!("reading block {b} back: {e}");
            }
        }
    }
}

/// Random writes, flushes and checked reads over `model`'s blocks until
/// `until` says stop. Every error is recorded (and the run goes on).
fn workload(
    c: &mut NbdClient,
    model: &mut Model,
    seed: u64,
    mut until: impl FnMut(&Seen) -> bool,
) -> Seen {
    let mut rng = Rng(seed | 1);
    let mut seen = Seen::default();
    let mut gen = model.gens.iter().copied().max().unwrap_or(0);
    let blocks = model.gens.len() as u64;
    while !until(&seen) {
        let b = rng.below(blocks);
        match rng.below(10) {
            0..=5 => {
                gen += 1;
                let data = block_data(b, gen);
                let t = Instant::now();
                match c.write_at(b * BLOCK as u64, &data) {
                    Ok(()) => {
                        seen.writes.push(t.elapsed());
                        model.gens[b as usize] = gen;
                    }
                    Err(e) => {
                        // A failed write leaves the block undefined: the
                        // run stops here (the test fails on the error).
                        seen.errors.push(format!("write block {b}: {e:#}"));
                        return seen;
                    }
                }
            }
            6 => {
                let t = Instant::now();
                match c.flush() {
                    Ok(()) => seen.flushes.push(t.elapsed()),
                    Err(e) => seen.errors.push(format!("flush: {e:#}")),
                }
            }
            _ => match model.check(c, b) {
                Ok(took) => seen.reads.push(took),
                Err(e) => seen.errors.push(format!("read block {b}: {e}")),
            },
        }
    }
    seen
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?}")))
        .unwrap_or(default)
}

/// Small chunks and frequent checkpoints, so the store sees many requests
/// of every kind (chunk puts, manifest compare-and-swaps, ranged reads);
/// no read cache, so reads of destaged data go to the store.
const BUSY_ENGINE: &str = "  chunk_size: 256KiB\n  destage_interval_ms: 100\n  checkpoint_every_chunks: 4\n  cache_size: 0\n  max_unstored_bytes: 4MiB\n";

#[test]
fn mixed_faults_give_the_client_no_error() {
    let Some(rig) = Rig::new("wire-mixed", BUSY_ENGINE, "16MiB") else {
        return;
    };
    let secs = env_secs("SHALE_WIRE_SECS", 60);
    let server = rig.serve();
    let mut c = rig.client();
    let mut model = Model::new(16 * 16);
    // Some data in the store before the faults start.
    workload(&mut c, &mut model, 1, |s| s.writes.len() >= 200);
    rig.proxy.set_faults(Faults {
        stall: Duration::from_secs(120),
        ..Faults::mixed(0.10)
    });
    let start = Instant::now();
    let seen = workload(&mut c, &mut model, 2, |_| start.elapsed().as_secs() >= secs);
    let stats = rig.proxy.stats();
    seen.report("mixed 10%");
    eprintln!("WIRE mixed 10%: proxy {}", stats.summary());
    assert!(
        seen.errors.is_empty(),
        "the client saw errors: {:?}",
        seen.errors
    );
    assert!(stats.faults_total() > 0, "no fault was injected");
    for f in proxy::WireFault::ALL {
        eprintln!(
            "WIRE mixed 10%: {} injected {} times",
            f.name(),
            stats.faults[f as usize].load(Ordering::Relaxed)
        );
    }
    c.flush().expect("flush");
    c.disconnect();
    let server = rig.restart_from_store_only(server);
    let mut c = rig.client();
    model.check_all(&mut c);
    c.disconnect();
    server.stop();
}

/// The unstored bytes the server reports (`shale status --json`, which
/// asks the server over its control socket, not the store).
fn unstored_bytes(rig: &Rig) -> u64 {
    let out = rig.env.ok(&["status", VOL, "--json", "--sample-ms", "0"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    v["volumes"][0]["unstored_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no unstored_bytes in {out}"))
}

#[test]
fn outage_with_writes_slows_writes_and_loses_nothing() {
    let max_unstored: u64 = 8 << 20;
    let engine = format!(
        "  chunk_size: 1MiB\n  destage_interval_ms: 200\n  checkpoint_every_chunks: 8\n  cache_size: 0\n  max_unstored_bytes: {max_unstored}\n"
    );
    let Some(rig) = Rig::new("wire-outage", &engine, "32MiB") else {
        return;
    };
    let outage = env_secs("SHALE_OUTAGE_SECS", 15);
    let server = rig.serve();
    let mut c = rig.client();
    let mut model = Model::new(32 * 16);
    let before = workload(&mut c, &mut model, 3, |s| s.writes.len() >= 300);
    before.report("outage: before");

    // The outage runs on a timer while the client keeps writing; a second
    // thread samples the unstored bytes the server reports.
    let started = Instant::now();
    let down_for = Duration::from_secs(outage);
    rig.proxy.set_outage(Outage::Down);
    let sampler = {
        let config = rig.env.config.clone();
        std::thread::spawn(move || {
            let mut most = 0u64;
            while started.elapsed() < down_for {
                let out = cli_support::run_shale(
                    Some(&config),
                    &["status", VOL, "--json", "--sample-ms", "0"],
                );
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                    if let Some(u) = v["volumes"][0]["unstored_bytes"].as_u64() {
                        most = most.max(u);
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            most
        })
    };
    let mut during = Seen::default();
    let mut after = Seen::default();
    let mut waited_writes = 0u64;
    let mut rng = Rng(5);
    let mut gen = model.gens.iter().copied().max().unwrap_or(0);
    let ended = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        // The outage ends on a timer: writes may be waiting at the bound.
        scope.spawn(|| {
            std::thread::sleep(down_for.saturating_sub(started.elapsed()));
            rig.proxy.set_outage(Outage::None);
            ended.store(true, Ordering::SeqCst);
        });
        while started.elapsed() < down_for + Duration::from_secs(10) {
            let b = rng.below(model.gens.len() as u64);
            gen += 1;
            let t = Instant::now();
            let res = c.write_at(b * BLOCK as u64, &block_data(b, gen));
            // A write counts as "during" if the outage was on when it began.
            let seen = if t.duration_since(started) >= down_for {
                &mut after
            } else {
                &mut during
            };
            match res {
                Ok(()) => {
                    model.gens[b as usize] = gen;
                    let took = t.elapsed();
                    if took > Duration::from_secs(1) {
                        waited_writes += 1;
                    }
                    seen.writes.push(took);
                }
                Err(e) => {
                    seen.errors.push(format!("write block {b}: {e:#}"));
                    break;
                }
            }
            if gen.is_multiple_of(16) {
                let t = Instant::now();
                match c.flush() {
                    Ok(()) => seen.flushes.push(t.elapsed()),
                    Err(e) => seen.errors.push(format!("flush: {e:#}")),
                }
            }
        }
    });
    assert!(ended.load(Ordering::SeqCst));
    let most_unstored = sampler.join().expect("sampler");
    rig.proxy.set_outage(Outage::None);
    during.report(&format!("outage: during {outage}s down"));
    after.report("outage: first 10s after");
    eprintln!(
        "WIRE outage: most unstored bytes seen {most_unstored} (bound {max_unstored}); \
         {waited_writes} writes waited over 1s; proxy {}",
        rig.proxy.stats().summary()
    );
    assert!(
        during.errors.is_empty() && after.errors.is_empty(),
        "the client saw errors: {:?} {:?}",
        during.errors,
        after.errors
    );
    // A single client with 64 KiB writes overshoots the bound by at most
    // one write.
    assert!(
        most_unstored <= max_unstored + BLOCK as u64,
        "unstored bytes {most_unstored} went past the bound {max_unstored}"
    );
    assert!(
        rig.proxy.stats().outage_hits.load(Ordering::Relaxed) > 0
            || rig.proxy.stats().connections.load(Ordering::Relaxed) > 0,
        "the outage met no request"
    );
    // Full recovery: everything reaches the store.
    let deadline = Instant::now() + Duration::from_secs(300);
    while unstored_bytes(&rig) > 0 {
        assert!(Instant::now() < deadline, "unstored data never drained");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.disconnect();
    let server = rig.restart_from_store_only(server);
    let mut c = rig.client();
    model.check_all(&mut c);
    c.disconnect();
    server.stop();
}

#[test]
fn reads_of_stored_data_during_an_outage_fail_with_eio_after_the_timeout() {
    let engine = "  chunk_size: 256KiB\n  destage_interval_ms: 100\n  cache_size: 0\n  store_read_timeout_ms: 3000\n";
    let Some(rig) = Rig::new("wire-reads", engine, "8MiB") else {
        return;
    };
    let server = rig.serve();
    let mut c = rig.client();
    let mut model = Model::new(8 * 16);
    for b in 0..model.gens.len() as u64 {
        c.write_at(b * BLOCK as u64, &block_data(b, 1))
            .expect("write");
        model.gens[b as usize] = 1;
    }
    c.disconnect();
    // Everything in the store, nothing local.
    let server = rig.restart_from_store_only(server);
    let mut c = rig.client();
    for (i, outage) in [Outage::Down, Outage::Blackhole, Outage::Unavailable]
        .into_iter()
        .enumerate()
    {
        rig.proxy.set_outage(outage);
        let b = i as u64 * 3;
        let t = Instant::now();
        let err = model
            .check(&mut c, b)
            .expect_err("a read of store-only data during an outage must fail");
        let took = t.elapsed();
        eprintln!(
            "WIRE reads: {outage:?}: EIO after {:.2}s (store_read_timeout_ms 3000): {err}",
            took.as_secs_f64()
        );
        assert!(err.contains("error 5"), "expected EIO (5): {err}");
        // Writes still work (they only need the WAL).
        c.write_at((b + 1) * BLOCK as u64, &block_data(b + 1, 2))
            .expect("write during the outage");
        model.gens[(b + 1) as usize] = 2;
        rig.proxy.set_outage(Outage::None);
        model
            .check(&mut c, b)
            .expect("the same read once the store is back");
    }
    model.check_all(&mut c);
    c.disconnect();
    server.stop();
}
