//! Host lane of issue 10's proof: `shale nbd serve` is killed with SIGKILL
//! at random moments while the verifying writer (`shale-crashcheck write`,
//! tools/crashcheck) writes stamped blocks and flushes at random points;
//! after each kill the server is started again and every block is checked
//! (`shale-crashcheck check`) against the ledger of what was acknowledged.
//!
//! A killed process leaves the host's page cache intact, so the check is
//! the strict one: every *acknowledged* write must survive (`--durable-on-ack`),
//! not only the flushed ones; never an older generation, never a torn or
//! foreign block, never a generation that was not written.
//!
//! 50 kills by default; `SHALE_KILL_CYCLES=N` for a long run and
//! `SHALE_KILL_SEED=S` to replay one (the seed is printed).

#[path = "support/cli.rs"]
mod cli_support;
#[path = "support/rng.rs"]
mod rng;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use cli_support::CliEnv;
use rng::Rng;

const CHECK: &str = env!("CARGO_BIN_EXE_shale-crashcheck");
const VOL: &str = "kv";
const BLOCKS: u64 = 256;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

/// The engine settings of one server run: either everything stays in the
/// WAL (replay is all of recovery), or small chunks are destaged and
/// checkpointed all the time (recovery reads the store, then the WAL).
fn config(destaging: bool) -> String {
    let engine = if destaging {
        "  chunk_size: 64KiB\n  max_unstored_bytes: 256KiB\n  destage_interval_ms: 20\n  checkpoint_every_chunks: 4\n"
    } else {
        "  destage_interval_ms: 3600000\n  max_unstored_seconds: 86400\n"
    };
    // A relative data_dir is resolved against the config file's directory.
    format!("data_dir: data\nengine:\n  cache_size: 1MiB\n{engine}")
}

/// `shale-crashcheck ARGS`; panics with its output unless it exits 0.
fn crashcheck(args: &[&str]) -> String {
    let out = Command::new(CHECK)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run shale-crashcheck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "shale-crashcheck {args:?} exited with {}:\n{}",
        out.status,
        text.lines()
            .filter(|l| !l.starts_with("CC SCAN "))
            .collect::<Vec<_>>()
            .join("\n")
    );
    text
}

#[test]
fn kill_9_of_nbd_serve_loses_no_acknowledged_write() {
    let cycles = env_u64("SHALE_KILL_CYCLES").unwrap_or(50);
    let seed = env_u64("SHALE_KILL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    eprintln!("kill -9 lane: {cycles} cycles, seed {seed} (SHALE_KILL_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let env = CliEnv::with_config(&config(false));
    env.ok(&["volume", "create", VOL, "--size", "4MiB"]);
    let sock = env.path("nbd.sock");
    let uri = format!("nbd+unix:///{VOL}?socket={}", sock.display());
    let journal = env.path("ledger");
    let journal_s = journal.to_str().unwrap().to_string();
    let seed_s = seed.to_string();
    let blocks_s = BLOCKS.to_string();
    let line = crashcheck(&["line", "RUN", &seed_s, &blocks_s, "4096"]);
    std::fs::write(&journal, line).unwrap();

    let mut kills_mid_write = 0;
    for cycle in 1..=cycles {
        let destaging = rng.below(2) == 0;
        std::fs::write(&env.config, config(destaging)).unwrap();
        // From the second cycle on, the killed server's lease is still live:
        // the restart on this host must take it over at once by itself.
        let server = env.serve_nbd(VOL, &sock, "warn");
        if cycle > 1 {
            crashcheck(&[
                "check",
                "--target",
                &uri,
                "--journal",
                &journal_s,
                "--durable-on-ack",
            ]);
        }
        let from = (cycle * 1_000_000).to_string();
        let kill_after = 1 + rng.below(300);
        let count = (kill_after + rng.below(200)).to_string();
        let flush_prob = ["0", "0.02", "0.2"][rng.below(3) as usize];
        let mut writer = Command::new(CHECK)
            .args(["write", "--target", &uri, "--seed", &seed_s])
            .args(["--blocks", &blocks_s, "--from", &from, "--count", &count])
            .args([
                "--flush-prob",
                flush_prob,
                "--log-acks",
                "--journal",
                &journal_s,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the writer");
        let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
        let mut acked = 0;
        while acked < kill_after {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("CC ACKED") || l.starts_with("CC FLUSHED") => {
                    acked += 1
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        // SIGKILL of the server (dropping it kills it), writes in flight.
        drop(server);
        for _ in lines.by_ref() {}
        let out = writer.wait_with_output().expect("wait for the writer");
        match out.status.code() {
            Some(0) => {}
            // The target went away: the ledger says after which write.
            Some(3) => kills_mid_write += 1,
            other => panic!(
                "writer exited with {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    // Restart once more and check what the last kill left; then an orderly
    // stop must still work.
    let server = env.serve_nbd(VOL, &sock, "warn");
    let report = crashcheck(&[
        "check",
        "--target",
        &uri,
        "--journal",
        &journal_s,
        "--durable-on-ack",
    ]);
    server.stop();
    let verdict = report.lines().last().unwrap_or("").to_string();
    assert!(
        verdict.starts_with(&format!("PASS {cycles} scan(s) verified")),
        "{verdict}"
    );
    eprintln!("kill -9 lane: {verdict}; {kills_mid_write} of {cycles} kills hit a running writer");
}
