//! `shale scrub` with the real binary, on the local-directory store and on a
//! real S3 server (moto on 127.0.0.1): clean volumes and snapshots pass
//! (exit 0); a flipped byte in a chunk object and a missing chunk object are
//! found (exit 3), named by key, and the volume range scrub blames is the
//! range a read then fails on.

#[path = "support/cli.rs"]
mod cli_support;
#[path = "support/s3.rs"]
mod s3_support;

use bytes::Bytes;
use cli_support::CliEnv;
use shale::catalog::Catalog;
use shale::daemon::attach;
use shale::engine::format::layout::chunk_prefix;
use shale::engine::BlockDevice;
use shale::store::{DynStore, PutMode};

const MIB: u64 = 1 << 20;

/// Non-zero bytes that differ per seed and position.
fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

async fn write(env: &CliEnv, vol: &str, ops: &[(u64, u64, u8)]) {
    let attached = attach(&env.cfg(), vol).await.expect("attach");
    for &(off, len, seed) in ops {
        attached
            .volume
            .write(off, &pattern(seed, len), false)
            .await
            .expect("write");
    }
    attached.close().await.expect("close");
}

/// `shale scrub ARGS`: exit status and standard output.
fn scrub(env: &CliEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["scrub"];
    all.extend_from_slice(args);
    let out = env.run(&all);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The keys of `vol`'s chunk objects.
async fn chunk_keys(store: &DynStore, vol: &str) -> Vec<String> {
    let id = Catalog::new(store.clone()).get(vol).await.expect("vol").id;
    let keys: Vec<String> = store
        .list(&chunk_prefix(id))
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert!(!keys.is_empty(), "{vol} has no chunks");
    keys
}

/// The `(offset, end)` pairs of the "volume bytes A..B" lines.
fn blamed_ranges(stdout: &str) -> Vec<(u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("volume bytes "))
        .map(|r| {
            let r = r.split_whitespace().next().expect("range");
            let (a, b) = r.split_once("..").expect("a..b");
            (a.parse().expect("start"), b.parse().expect("end"))
        })
        .collect()
}

async fn finds_damage(env: CliEnv) {
    env.ok(&["volume", "create", "vol", "--size", "64MiB"]);
    write(&env, "vol", &[(0, 2 * MIB, 1), (8 * MIB, 3 * MIB, 2)]).await;
    env.ok(&["snapshot", "create", "vol@s1"]);
    write(&env, "vol", &[(20 * MIB, MIB, 3)]).await;

    // Clean: the volume and its snapshot.
    let (code, out, err) = scrub(&env, &["vol"]);
    assert_eq!(code, Some(0), "clean volume: {out}{err}");
    assert!(out.contains("0 damaged"), "{out}");
    let (code, out, err) = scrub(&env, &["vol@s1", "--rate", "64MiB"]);
    assert_eq!(code, Some(0), "clean snapshot: {out}{err}");
    let (code, out, _) = scrub(&env, &["vol", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(v["bytes_checked"].as_u64().unwrap() >= 6 * MIB, "{v}");
    assert_eq!(v["damage"].as_array().unwrap().len(), 0);

    // Flip one byte near the end of the first chunk object (in its data).
    let store = shale::store::open(&env.cfg().store).await.expect("store");
    let keys = chunk_keys(&store, "vol").await;
    let victim = keys[0].clone();
    let mut data = store.get(&victim).await.expect("get").data.to_vec();
    let at = data.len() - 100;
    data[at] ^= 0x40;
    store
        .put(&victim, Bytes::from(data), PutMode::Overwrite)
        .await
        .expect("put");

    let (code, out, err) = scrub(&env, &["vol"]);
    assert_eq!(code, Some(3), "damaged volume: {out}{err}");
    assert!(out.contains(&format!("damaged {victim}")), "{out}");
    assert!(out.contains("1 block(s) fail their checksum"), "{out}");
    assert!(err.contains("1 damaged object(s) found"), "{err}");
    let blamed = blamed_ranges(&out);
    assert_eq!(blamed.len(), 1, "{out}");
    let (start, end) = blamed[0];
    assert_eq!(end - start, 4096, "{out}");
    // The snapshot reads the same chunk: its scrub finds it too.
    let (code, out, _) = scrub(&env, &["vol@s1"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains(&format!("damaged {victim}")), "{out}");

    // Scrub blames exactly what reads refuse: the blamed block fails with
    // an I/O error, the block before it still reads back its data.
    let attached = attach(&env.cfg(), "vol").await.expect("attach");
    let mut buf = vec![0u8; 4096];
    let r = attached.volume.read(start, &mut buf).await;
    assert!(r.is_err(), "read of the blamed block succeeded");
    let neighbour = if start >= 4096 { start - 4096 } else { end };
    attached
        .volume
        .read(neighbour, &mut buf)
        .await
        .expect("neighbour");
    assert!(buf.iter().all(|&b| b != 0), "neighbour reads data");
    attached.close().await.expect("close");

    // A missing chunk object is damage to every range it held.
    let gone = keys.last().unwrap().clone();
    store.delete(&gone).await.expect("delete");
    let (code, out, _) = scrub(&env, &["vol"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains(&format!("damaged {gone}: object missing")),
        "{out}"
    );
    assert!(out.contains("2 damaged"), "{out}");

    // Bad arguments: clear errors, nothing read.
    let (code, _, err) = scrub(&env, &["nope"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nope"), "{err}");
    let (code, _, err) = scrub(&env, &["vol@nope"]);
    assert_eq!(code, Some(1), "{err}");
    let (code, _, err) = scrub(&env, &["vol", "--rate", "0"]);
    assert_eq!(code, Some(2), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_damage_in_the_local_directory_store() {
    finds_damage(CliEnv::with_config(
        "data_dir: data\nengine:\n  cache_size: 0\n  chunk_size: 2MiB\n",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_damage_in_the_s3_store() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    let bucket = moto.unique_bucket("scrub");
    finds_damage(CliEnv::with_config(&format!(
        "data_dir: data\nstore:\n  type: s3\n  bucket: {bucket}\n  prefix: scrub/\n  endpoint: {}\n  force_path_style: true\nengine:\n  cache_size: 0\n  chunk_size: 2MiB\n",
        moto.endpoint
    )))
    .await;
}
