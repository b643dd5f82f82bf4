//! The real `shale` binary: `diff`, `export` (full, sparse, stdout,
//! incremental) and `import` (raw image, delta) on a local-directory store.
//! Data is written through the library on the same store and data
//! directory, and every result is compared with a reference image.

#[path = "support/cli.rs"]
mod cli_support;
#[path = "support/s3.rs"]
mod s3_support;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use shale::daemon::attach;
use shale::engine::BlockDevice;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

use cli_support::CliEnv as Env;

impl Env {
    fn new() -> Env {
        Env::with_config("data_dir: data\nengine:\n  cache_size: 0\n")
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Apply writes (`Some(data)`) and trims (`None`) at byte offsets.
    async fn change(&self, name: &str, ops: &[(u64, u64, Option<u8>)], image: &mut [u8]) {
        let attached = attach(&self.cfg(), name).await.expect("attach");
        for &(off, len, fill) in ops {
            let r = off as usize..(off + len) as usize;
            match fill {
                Some(seed) => {
                    let data = pattern(seed, len);
                    attached
                        .volume
                        .write(off, &data, false)
                        .await
                        .expect("write");
                    image[r].copy_from_slice(&data);
                }
                None => {
                    attached.volume.trim(off, len).await.expect("trim");
                    image[r].fill(0);
                }
            }
        }
        attached.close().await.expect("close");
    }

    /// The volume's content, read with `shale volume export`.
    fn volume_content(&self, name: &str) -> Vec<u8> {
        let file = self.p(&format!("{name}.volume.img"));
        self.ok(&["volume", "export", name, &file]);
        let data = std::fs::read(&file).expect("read export");
        std::fs::remove_file(&file).expect("remove export");
        data
    }

    fn volumes(&self) -> String {
        self.ok(&["volume", "list"])
    }
}

/// Non-zero bytes that differ per seed and position.
fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_export_is_sparse_and_imports_back() {
    let env = Env::new();
    env.ok(&["volume", "create", "vol", "--size", "64M"]);
    let mut image = vec![0u8; SIZE as usize];
    env.change(
        "vol",
        &[(8 * MIB, MIB, Some(1)), (40 * MIB, 4096, Some(2))],
        &mut image,
    )
    .await;
    env.ok(&["snapshot", "create", "vol@one"]);
    // Later writes do not reach the snapshot's export.
    let mut later = image.clone();
    env.change("vol", &[(0, MIB, Some(3))], &mut later).await;

    let full = env.p("full.img");
    let out = env.ok(&["export", "vol@one", &full]);
    assert!(out.contains("exported vol@one"), "{out}");
    let meta = std::fs::metadata(&full).expect("stat");
    assert_eq!(meta.len(), SIZE);
    let allocated = meta.blocks() * 512;
    assert!(
        allocated < 4 * MIB,
        "{allocated} bytes allocated for 1 MiB + 4 KiB of data"
    );
    same(&std::fs::read(&full).expect("read"), &image, "export");

    env.fails(&["export", "vol@one", &full], "--force");
    env.ok(&["export", "vol@one", &full, "--force"]);
    same(
        &std::fs::read(&full).expect("read"),
        &image,
        "forced export",
    );
    env.fails(
        &["export", "vol@nope", &env.p("x.img")],
        "there is no snapshot",
    );
    assert!(!env.path("x.img").exists());

    let out = env.run(&["export", "vol@one", "-"]);
    assert!(out.status.success());
    same(&out.stdout, &image, "export to stdout");

    let out = env.ok(&["import", &full, "copy"]);
    assert!(out.contains("created volume copy"), "{out}");
    assert!(env.volumes().contains("copy"));
    same(&env.volume_content("copy"), &image, "imported copy");
    // A volume name in use is refused, and the existing volume is kept.
    env.fails(&["import", &full, "vol"], "already exists");
    same(
        &env.volume_content("vol"),
        &later,
        "vol after refused import",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_and_incremental_export_apply_to_the_base() {
    let env = Env::new();
    env.ok(&["volume", "create", "vol", "--size", "64M"]);
    let mut one = vec![0u8; SIZE as usize];
    env.change(
        "vol",
        &[(8 * MIB, MIB, Some(1)), (40 * MIB, 64 * 1024, Some(2))],
        &mut one,
    )
    .await;
    env.ok(&["snapshot", "create", "vol@one"]);
    let mut two = one.clone();
    env.change(
        "vol",
        &[
            (8 * MIB, 64 * 1024, Some(5)),
            (8 * MIB + 512 * 1024, 128 * 1024, None),
            (50 * MIB, 8192, Some(6)),
        ],
        &mut two,
    )
    .await;
    env.ok(&["snapshot", "create", "vol@two"]);

    let lines = env.ok(&["diff", "vol@one", "vol@two"]);
    let got: Vec<(u64, u64, String)> = lines
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].to_string(),
            )
        })
        .collect();
    let want = vec![
        (8 * MIB, 64 * 1024, "data".to_string()),
        (8 * MIB + 512 * 1024, 128 * 1024, "zero".to_string()),
        (50 * MIB, 8192, "data".to_string()),
    ];
    assert_eq!(got, want, "{lines}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["diff", "vol@one", "vol@two", "--json"])).expect("json");
    assert_eq!(json["ranges"].as_array().map(Vec::len), Some(3));
    assert_eq!(json["ranges"][1]["kind"], "zero");
    assert_eq!(json["ranges"][2]["offset"], 50 * MIB);
    assert_eq!(env.ok(&["diff", "vol@two", "vol@two"]), "");

    let base = env.p("base.img");
    env.ok(&["export", "vol@one", &base]);
    env.ok(&["import", &base, "copy"]);
    let delta = env.p("one-two.delta");
    let out = env.ok(&["export", "vol@two", &delta, "--from", "vol@one"]);
    assert!(out.contains("3 ranges"), "{out}");
    let delta_len = std::fs::metadata(&delta).expect("stat").len();
    assert!(
        delta_len < 64 * 1024 + 8192 + 4096,
        "delta of {delta_len} bytes"
    );
    // Through stdout the same bytes come out.
    let out = env.run(&["export", "vol@two", "-", "--from", "vol@one"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, std::fs::read(&delta).expect("read delta"));

    // Corrupt or truncated deltas are refused and change nothing.
    let bytes = std::fs::read(&delta).expect("read delta");
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let bad = env.p("bad.delta");
    std::fs::write(&bad, &flipped).expect("write");
    env.fails(&["import", &bad, "copy"], "checksum mismatch");
    std::fs::write(&bad, &bytes[..bytes.len() - 3]).expect("write");
    env.fails(&["import", &bad, "copy"], "truncated");
    same(
        &env.volume_content("copy"),
        &one,
        "copy after refused deltas",
    );

    env.fails(&["import", &delta, "copy", "--size", "64M"], "delta file");
    env.ok(&["volume", "create", "small", "--size", "1M"]);
    env.fails(&["import", &delta, "small"], "holding vol@one");
    env.fails(&["import", &delta, "nope"], "not found");

    let out = env.ok(&["import", &delta, "copy"]);
    assert!(
        out.contains("from vol@one to vol@two to volume copy"),
        "{out}"
    );
    same(&env.volume_content("copy"), &two, "copy after the delta");
    // Applying it again finds every range already done and changes nothing.
    let out = env.ok(&["import", &delta, "copy"]);
    assert!(out.contains("3 of 3 ranges already held vol@two"), "{out}");
    same(
        &env.volume_content("copy"),
        &two,
        "copy after a second apply",
    );
    // A volume holding something else in a changed range is refused.
    env.ok(&["import", &base, "other"]);
    let mut other = one.clone();
    env.change("other", &[(50 * MIB, 512, Some(7))], &mut other)
        .await;
    env.fails(
        &["import", &delta, "other"],
        "holds neither vol@one nor vol@two at bytes 52428800+8192",
    );
    same(
        &env.volume_content("other"),
        &other,
        "other after a refused delta",
    );
}

#[test]
fn import_refuses_files_larger_than_allowed_and_leaves_nothing() {
    let env = Env::new();
    let img = env.path("two-mib.img");
    std::fs::write(&img, pattern(9, 2 * MIB)).expect("write image");
    let img = img.display().to_string();
    env.fails(
        &["import", &img, "v", "--size", "1M"],
        "larger than the requested size",
    );
    env.fails(&["import", &img, "v", "--size", "2P"], "at most");
    let huge = env.path("huge.img");
    let f = std::fs::File::create(&huge).expect("create");
    // File systems with a smaller file size limit cannot hold this file;
    // the --size case above covers the limit there.
    if f.set_len((1 << 50) + 4096).is_ok() {
        env.fails(&["import", &env.p("huge.img"), "v"], "largest volume");
    }
    let list = env.volumes();
    assert!(!list.lines().any(|l| l.starts_with("v ")), "{list}");

    // A failure after the volume was created deletes it: the volume's
    // local directory cannot be created when `volumes` is a file.
    std::fs::create_dir_all(env.path("data")).expect("data dir");
    std::fs::write(env.path("data/volumes"), b"not a directory").expect("block");
    env.fails(&["import", &img, "v"], "cannot create local directory");
    let list = env.volumes();
    assert!(!list.lines().any(|l| l.starts_with("v ")), "{list}");
}

/// An import the pool has no room for fails with the pool's error and
/// deletes the volume it created.
#[test]
fn import_into_a_full_pool_leaves_nothing() {
    let env = Env::with_config("data_dir: data\npool:\n  capacity: 2MiB\n");
    let img = env.path("four-mib.img");
    std::fs::write(&img, pattern(3, 4 * MIB)).expect("write image");
    env.fails(&["import", &env.p("four-mib.img"), "big"], "no space left");
    let list = env.volumes();
    assert!(!list.lines().any(|l| l.starts_with("big ")), "{list}");
    // A smaller image fits.
    std::fs::write(&img, pattern(3, MIB)).expect("write image");
    env.ok(&["import", &env.p("four-mib.img"), "small"]);
    assert!(env.volumes().lines().any(|l| l.starts_with("small ")));
}

/// On a terminal, export draws a progress line on stderr; otherwise
/// stderr stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_only_on_a_terminal() {
    let env = Env::new();
    env.ok(&["volume", "create", "vol", "--size", "4M"]);
    let mut image = vec![0u8; 4 * MIB as usize];
    env.change("vol", &[(0, MIB, Some(4))], &mut image).await;
    env.ok(&["snapshot", "create", "vol@s"]);
    let out = env.run(&["export", "vol@s", &env.p("plain.img")]);
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `script` runs the command on a pseudo-terminal.
    let cmd = format!(
        "{} --config {} export vol@s {}",
        env!("CARGO_BIN_EXE_shale"),
        env.config.display(),
        env.p("tty.img")
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("SHALE_CONFIG")
        .stdin(Stdio::null())
        .output();
    let Ok(out) = out else {
        panic!("`script` (util-linux) is needed to run a command on a terminal");
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("export: 4.00 MiB / 4.00 MiB (100%)"),
        "no progress line in {text:?}"
    );
    same(
        &std::fs::read(env.path("tty.img")).expect("read"),
        &image,
        "export on a terminal",
    );
}

/// The same round trip with the store on a real S3 server (moto).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_over_s3() {
    let Some(moto) = s3_support::moto() else {
        return;
    };
    let bucket = moto.unique_bucket("transfer");
    let env = Env::with_config(&format!(
        "data_dir: data\nstore:\n  type: s3\n  bucket: {bucket}\n  endpoint: {}\n  \
         force_path_style: true\nengine:\n  cache_size: 0\n  chunk_size: 1MiB\n",
        moto.endpoint
    ));
    env.ok(&["volume", "create", "vol", "--size", "16M"]);
    let mut one = vec![0u8; 16 * MIB as usize];
    env.change(
        "vol",
        &[(MIB, 3 * MIB, Some(1)), (9 * MIB, 4096, Some(2))],
        &mut one,
    )
    .await;
    env.ok(&["snapshot", "create", "vol@one"]);
    let mut two = one.clone();
    env.change(
        "vol",
        &[
            (2 * MIB, 8192, Some(3)),
            (9 * MIB, 4096, None),
            (12 * MIB, MIB, Some(4)),
        ],
        &mut two,
    )
    .await;
    env.ok(&["snapshot", "create", "vol@two"]);

    let base = env.p("one.img");
    env.ok(&["export", "vol@one", &base]);
    same(&std::fs::read(&base).expect("read"), &one, "export from S3");
    env.ok(&["import", &base, "copy"]);
    let delta = env.p("one-two.delta");
    env.ok(&["export", "vol@two", &delta, "--from", "vol@one"]);
    env.ok(&["import", &delta, "copy"]);
    same(
        &env.volume_content("copy"),
        &two,
        "copy on S3 after the delta",
    );
}
