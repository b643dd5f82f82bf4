use super::*;
use crate::engine::config::Durability;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(
        text,
        Origin::File("/etc/test.yaml".into()),
        Some(Path::new("/base")),
    )
}

fn invalid_field(text: &str) -> String {
    match parse(text) {
        Err(ConfigError::Invalid { field, .. }) => field,
        other => panic!("expected Invalid for {text:?}, got {other:?}"),
    }
}

#[test]
fn empty_file_gives_defaults() {
    for text in ["", "\n", "# only a comment\n\n", "---\n", "null\n", "~\n"] {
        let cfg = parse(text).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/shale"));
        assert_eq!(
            cfg.store,
            StoreConfig::Fs {
                path: "/var/lib/shale/store".into()
            }
        );
        assert_eq!(cfg.pool.warn_percent, 80);
        assert_eq!(cfg.pool.capacity, None);
        assert_eq!(cfg.nbd.listen, None, "no TCP listener unless asked for");
        assert_eq!(
            cfg.nbd.socket.as_deref(),
            Some(Path::new("/run/shale/nbd.sock"))
        );
        assert_eq!(cfg.lease, LeaseConfig::default());
        assert_eq!(cfg.lease.ttl_seconds, 120);
    }
}

#[test]
fn store_defaults_to_data_dir_and_relative_paths_use_the_file_dir() {
    let cfg = parse("data_dir: shale-data\n").unwrap();
    assert_eq!(cfg.data_dir, PathBuf::from("/base/shale-data"));
    assert_eq!(
        cfg.store,
        StoreConfig::Fs {
            path: "/base/shale-data/store".into()
        }
    );
    let cfg = parse("store: {type: fs, path: objs}\n").unwrap();
    assert_eq!(
        cfg.store,
        StoreConfig::Fs {
            path: "/base/objs".into()
        }
    );
    let cfg = parse("data_dir: .\n").unwrap();
    assert_eq!(cfg.data_dir, PathBuf::from("/base"));
    assert_eq!(
        cfg.volume_dir(1),
        PathBuf::from("/base/volumes/0000000000000001")
    );
    assert_eq!(cfg.external_cache_dir(1), None);
    let cfg = parse("engine:\n  cache_dir: caches\n").unwrap();
    assert_eq!(cfg.engine.cache_dir, Some(PathBuf::from("/base/caches")));
    assert_eq!(
        cfg.external_cache_dir(0x2a),
        Some(PathBuf::from("/base/caches/000000000000002a"))
    );
    let cfg = parse("data_dir: /abs\n").unwrap();
    assert_eq!(cfg.data_dir, PathBuf::from("/abs"));
    assert_eq!(
        cfg.volume_dir(0x2a),
        PathBuf::from("/abs/volumes/000000000000002a")
    );
}

#[test]
fn sizes_accept_units() {
    let cfg = parse(
        "engine:\n  chunk_size: 1MiB\n  max_unstored_bytes: 1G\n  cache_size: 0\n  durability: store\npool:\n  capacity: 2TiB\n  warn_percent: 95\n",
    )
    .unwrap();
    assert_eq!(cfg.engine.chunk_size, 1 << 20);
    assert_eq!(cfg.engine.max_unstored_bytes, 1 << 30);
    assert_eq!(cfg.engine.cache_size, 0);
    assert_eq!(cfg.engine.durability, Durability::Store);
    assert_eq!(cfg.pool.capacity, Some(2 << 40));
    assert_eq!(cfg.pool.warn_percent, 95);
}

#[test]
fn unknown_keys_are_rejected_naming_the_key_and_file() {
    for (text, key) in [
        ("bogus: 1\n", "bogus"),
        ("engine:\n  chunk_sise: 4MiB\n", "chunk_sise"),
        ("pool:\n  cap: 1\n", "cap"),
        ("nbd:\n  port: 1\n", "port"),
        ("lease:\n  ttl: 30\n", "ttl"),
        ("store: {type: fs, path: /x, extra: 1}\n", "extra"),
    ] {
        let e = parse(text).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Parse { .. }), "{msg}");
        assert!(msg.contains(key), "{msg} should name {key}");
        assert!(msg.starts_with("/etc/test.yaml: "), "{msg}");
    }
}

#[test]
fn wrong_types_and_bad_syntax_are_parse_errors() {
    for text in [
        "engine:\n  chunk_size: lots\n",
        "engine:\n  durability: sometimes\n",
        "nbd:\n  listen: not-an-address\n",
        "store: {type: ftp}\n",
        "data_dir: [1, 2]\n",
        "engine: {\n",
        "- a list\n",
    ] {
        assert!(
            matches!(parse(text), Err(ConfigError::Parse { .. })),
            "{text:?} should fail to parse"
        );
    }
}

#[test]
fn bounds_are_enforced_with_field_names() {
    assert_eq!(
        invalid_field("engine:\n  cache_dir: \"\"\n"),
        "engine.cache_dir"
    );
    assert_eq!(
        invalid_field("engine:\n  chunk_size: 1000\n"),
        "engine.chunk_size"
    );
    assert_eq!(
        invalid_field("engine:\n  destage_interval_ms: 0\n"),
        "engine.destage_interval_ms"
    );
    assert_eq!(
        invalid_field("pool:\n  warn_percent: 0\n"),
        "pool.warn_percent"
    );
    assert_eq!(
        invalid_field("pool:\n  warn_percent: 101\n"),
        "pool.warn_percent"
    );
    assert_eq!(invalid_field("pool:\n  capacity: 4KiB\n"), "pool.capacity");
    assert_eq!(invalid_field("nbd:\n  listen: 127.0.0.1:0\n"), "nbd.listen");
    assert_eq!(
        invalid_field("lease:\n  ttl_seconds: 4\n"),
        "lease.ttl_seconds"
    );
    assert_eq!(
        invalid_field("lease:\n  ttl_seconds: 3601\n"),
        "lease.ttl_seconds"
    );
    assert_eq!(
        invalid_field("lease:\n  renew_seconds: 0\n"),
        "lease.renew_seconds"
    );
    assert_eq!(
        invalid_field("lease:\n  safety_margin_seconds: 0\n"),
        "lease.safety_margin_seconds"
    );
    assert_eq!(
        invalid_field("lease:\n  ttl_seconds: 30\n  renew_seconds: 20\n"),
        "lease.renew_seconds",
        "20 + 10 leaves no time to retry"
    );
    let ok = parse("lease:\n  ttl_seconds: 30\n  renew_seconds: 10\n  safety_margin_seconds: 5\n")
        .expect("a 30 s lease renewed every 10 s");
    assert_eq!(ok.lease.renew_period(), std::time::Duration::from_secs(10));
    assert_eq!(invalid_field("data_dir: ''\n"), "data_dir");
    assert_eq!(invalid_field("store: {type: fs, path: ''}\n"), "store.path");
    assert_eq!(
        invalid_field("store: {type: s3, bucket: B}\n"),
        "store.bucket"
    );
    assert_eq!(
        invalid_field("store: {type: s3, bucket: bkt, prefix: /x}\n"),
        "store.prefix"
    );
    assert_eq!(
        invalid_field("store: {type: s3, bucket: bkt, endpoint: 'localhost:9000'}\n"),
        "store.endpoint"
    );
    assert_eq!(
        invalid_field("store: {type: s3, bucket: bkt, region: ''}\n"),
        "store.region"
    );
    let e = parse("pool:\n  warn_percent: 0\n").unwrap_err().to_string();
    assert_eq!(e, "/etc/test.yaml: pool.warn_percent: 0 must be in 1..=100");
    // An out-of-range u8 is caught by the parser, naming the field.
    let e = parse("pool:\n  warn_percent: 300\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("warn_percent"), "{e}");
}

#[test]
fn s3_store_parses_with_defaults() {
    let cfg = parse("store:\n  type: s3\n  bucket: shale-test\n  endpoint: http://127.0.0.1:5000\n  force_path_style: true\n").unwrap();
    assert_eq!(
        cfg.store,
        StoreConfig::S3 {
            bucket: "shale-test".into(),
            prefix: String::new(),
            endpoint: Some("http://127.0.0.1:5000".into()),
            region: "us-east-1".into(),
            force_path_style: true,
            request_timeout_ms: 5000,
            min_upload_rate: 2 << 20,
        }
    );
    let e = parse("store:\n  type: s3\n  bucket: shale-test\n  request_timeout_ms: 50\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("store.request_timeout_ms"), "{e}");
    assert!(parse("store: {type: memory}\n").is_ok());
}

#[test]
fn shown_config_parses_back_to_the_same_config() {
    let cfg = parse(
        "data_dir: /d\nengine:\n  chunk_size: 1MiB\n  max_unstored_bytes: 3000000\npool:\n  capacity: 1GiB\n",
    )
    .unwrap();
    let back = parse(&cfg.to_yaml()).unwrap();
    assert_eq!(back, cfg);
    let cfg = Config::default();
    assert_eq!(parse(&cfg.to_yaml()).unwrap(), cfg);
}

#[test]
fn example_config_is_valid_and_equals_the_defaults() {
    let cfg = parse(EXAMPLE_CONFIG).unwrap();
    assert_eq!(cfg, Config::default());
}

#[test]
fn load_reports_missing_and_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let e = Config::load(Some(&missing)).unwrap_err();
    assert!(matches!(e, ConfigError::Missing { .. }));
    assert!(e.to_string().contains("nope.yaml"), "{e}");
    // A directory is not a readable file.
    let e = Config::load(Some(dir.path())).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");

    let file = dir.path().join("shale.yaml");
    std::fs::write(&file, "data_dir: local\n").unwrap();
    let cfg = Config::load(Some(&file)).unwrap();
    assert_eq!(cfg.data_dir, dir.path().join("local"));
}

#[test]
fn duplicate_keys_and_non_mapping_documents_are_rejected() {
    for text in [
        "data_dir: /a\ndata_dir: /b\n",
        "42\n",
        "just text\n",
        "[1]\n",
    ] {
        assert!(
            matches!(parse(text), Err(ConfigError::Parse { .. })),
            "{text:?} should fail to parse"
        );
    }
}

#[test]
fn the_read_cache_defaults_off_for_the_local_directory_store_only() {
    // The local-directory store's chunk files are already on local disk.
    assert_eq!(parse("").unwrap().engine.cache_size, 0);
    assert_eq!(parse("data_dir: /d\n").unwrap().engine.cache_size, 0);
    assert_eq!(
        parse("store: {type: fs, path: /s}\n")
            .unwrap()
            .engine
            .cache_size,
        0
    );
    // An object store across a network gets the engine's default.
    let s3 = parse("store: {type: s3, bucket: bkt, endpoint: 'http://127.0.0.1:5000'}\n").unwrap();
    assert_eq!(s3.engine.cache_size, EngineConfig::default().cache_size);
    assert!(s3.engine.cache_size > 0);
    // A size the file sets is kept, for either store (even with other
    // engine keys around it).
    let fs = parse("engine:\n  chunk_size: 1MiB\n  cache_size: 64MiB\n").unwrap();
    assert_eq!(fs.engine.cache_size, 64 << 20);
    let s3_off = parse(
        "store: {type: s3, bucket: bkt, endpoint: 'http://127.0.0.1:5000'}\nengine:\n  cache_size: 0\n",
    )
    .unwrap();
    assert_eq!(s3_off.engine.cache_size, 0);
}
