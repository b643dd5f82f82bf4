//! The read cache outlives `shale nbd serve`, with real processes and a
//! real client: after an orderly stop (SIGTERM) and after `kill -9`, a new
//! server answers reads of what the last one read from its local cache
//! even with the volume's chunk objects moved out of the store.

#[path = "support/cli.rs"]
mod cli_support;
mod nbd_support;

use std::path::Path;
use std::process::Command;

use cli_support::CliEnv;
use nbd_support::{ci, have_tool, pattern};

const SIZE: usize = 16 << 20;

/// `nbdcopy` the whole volume to a file; its bytes, or the error output.
fn read_all(uri: &str, out: &Path) -> Result<Vec<u8>, String> {
    let o = Command::new("nbdcopy")
        .arg(uri)
        .arg(out)
        .output()
        .expect("run nbdcopy");
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    Ok(std::fs::read(out).expect("read copy"))
}

fn status_json(env: &CliEnv) -> serde_json::Value {
    let out = env.ok(&["status", "v", "--json", "--sample-ms", "0"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn cache_stays_warm_across_stop_and_kill_9() {
    if !have_tool("nbdcopy", &["--version"]) {
        assert!(!ci(), "nbdcopy is required when CI=true");
        eprintln!("skipped: nbdcopy not installed");
        return;
    }
    let env =
        CliEnv::with_config("data_dir: data\nengine:\n  chunk_size: 1MiB\n  cache_size: 64MiB\n");
    env.ok(&["volume", "create", "v", "--size", "16MiB"]);
    let image = env.path("image.raw");
    let data = pattern(SIZE, 7);
    std::fs::write(&image, &data).unwrap();
    env.ok(&["volume", "import", "v", image.to_str().unwrap()]);
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["volume", "info", "v", "--json"])).unwrap();
    let id = info["record"]["id"].as_u64().expect("volume id");
    // The fs store keeps key `a/b/c` as `a.d/b.d/c.o`.
    let chunks = env.path(&format!("data/store/volumes.d/{id:016x}.d/chunks.d"));
    let away = env.path("chunks.away");
    let sock = env.path("nbd.sock");
    let uri = format!("nbd+unix:///v?socket={}", sock.display());
    let copy = env.path("copy.raw");

    let cache = env.path(&format!("data/volumes/{id:016x}/cache"));
    // Read everything once through the store (the cache fills), end the
    // server with `end`, then read everything again through a new server
    // with the chunk objects out of the store.
    for kill in [false, true] {
        let what = if kill { "kill -9" } else { "stop" };
        let _ = std::fs::remove_dir_all(&cache);
        let server = env.serve_nbd("v", &sock, "warn");
        assert!(read_all(&uri, &copy).unwrap() == data, "first read differs");
        if kill {
            drop(server); // SIGKILL
        } else {
            server.stop();
        }
        let server = env.serve_nbd("v", &sock, "warn");
        std::fs::rename(&chunks, &away).unwrap();
        let got = read_all(&uri, &copy);
        std::fs::rename(&away, &chunks).unwrap();
        let got =
            got.unwrap_or_else(|e| panic!("after {what}: read without the chunks failed: {e}"));
        assert!(got == data, "after {what}: data differs");
        let s = status_json(&env);
        let ratio = s["volumes"][0]["cache_hit_ratio"].as_f64();
        assert_eq!(ratio, Some(1.0), "after {what}: {s}");
        server.stop();
    }
    // Without the cache (what every restart was before it was kept), the
    // same read fails: the chunks really are out of reach.
    std::fs::remove_dir_all(&cache).unwrap();
    let server = env.serve_nbd("v", &sock, "error");
    std::fs::rename(&chunks, &away).unwrap();
    let got = read_all(&uri, &copy);
    std::fs::rename(&away, &chunks).unwrap();
    assert!(got.is_err(), "read without chunks or cache succeeded");
    server.stop();
}
