//! The fuzzers' seed corpora (`fuzz/corpus/<target>/`) are generated here
//! from the real encoders, so they are valid inputs of the current formats.
//! This test checks that each committed seed equals what the encoders make
//! now and that the decoders accept it; after a format change, regenerate
//! with `SHALE_WRITE_FUZZ_SEEDS=1 cargo test --release --test fuzz_seeds`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use shale::engine::checkpoint::codec::DeltaPages;
use shale::engine::checkpoint::delta::{CheckpointObject, Delta};
use shale::engine::checkpoint::{Checkpoint, ChunkInfo};
use shale::engine::format::chunk::{self, ChunkExtent, ChunkHeader};
use shale::engine::snapshot::SnapshotObject;
use shale::engine::wal::record::{RecordHeader, RecordKind};
use shale::frontend::nbd::codec::{InfoRequest, MetaContextRequest, OptionHeader, Request};
use shale::frontend::nbd::protocol::*;
use shale::transfer::delta::{DeltaHeader, DeltaWriter};

type Seeds = BTreeMap<(&'static str, &'static str), Vec<u8>>;

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OptionHeader {
        option: opt,
        length: data.len() as u32,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(data);
    v
}

fn request(command: u16, handle: u64, offset: u64, length: u32) -> Vec<u8> {
    Request {
        flags: 0,
        command,
        handle,
        offset,
        length,
    }
    .encode()
    .to_vec()
}

fn go(name: &str) -> Vec<u8> {
    InfoRequest {
        name: name.as_bytes().to_vec(),
        requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
    }
    .encode()
}

fn wal_record(kind: RecordKind, seq: u64, lba: u64, data: &[u8]) -> Vec<u8> {
    let h = RecordHeader {
        kind,
        volume: 7,
        seq,
        lba,
        sectors: if data.is_empty() {
            8
        } else {
            data.len() as u64 / 512
        },
        data_crc: crc32c::crc32c(data),
        more: false,
        block_crcs: false,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(data);
    v
}

/// A write record with a CRC per 4 KiB block (the kind written now).
fn wal_record_blocks(seq: u64, lba: u64, data: &[u8]) -> Vec<u8> {
    let table = shale::engine::wal::record::block_table(data);
    let h = RecordHeader {
        kind: RecordKind::Write,
        volume: 7,
        seq,
        lba,
        sectors: data.len() as u64 / 512,
        data_crc: crc32c::crc32c(&table),
        more: false,
        block_crcs: true,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(&table);
    v.extend_from_slice(data);
    v
}

fn checkpoint() -> Checkpoint {
    Checkpoint {
        volume: 7,
        epoch: 2,
        chunk_seq: 3,
        last_seq: 40,
        chunks: vec![ChunkInfo {
            seq: 3,
            epoch: 2,
            data_start: 128,
            data_len: 4096,
            table_crc: 0xdead_beef,
        }],
        extents: vec![(0, 8, 3, 0)],
        zeros: vec![(64, 8)],
    }
}

fn seeds() -> Seeds {
    let mut s = Seeds::new();
    // NBD.
    s.insert(
        ("nbd_codec", "write-header"),
        request(CMD_WRITE, 1, 4096, 4096),
    );
    s.insert(("nbd_codec", "go"), go("a"));
    let mut session = vec![0u8];
    session.extend((CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    session.extend(option(OPT_LIST, &[]));
    session.extend(option(OPT_GO, &go("a")));
    session.extend(request(CMD_WRITE, 1, 0, 4096));
    session.extend([0x42u8; 4096]);
    session.extend(request(CMD_READ, 2, 0, 4096));
    session.extend(request(CMD_WRITE_ZEROES, 3, 8192, 4096));
    session.extend(request(CMD_FLUSH, 4, 0, 0));
    session.extend(request(CMD_DISC, 5, 0, 0));
    s.insert(("nbd_session", "plain-go-write-read"), session);
    let meta = MetaContextRequest {
        name: b"a".to_vec(),
        queries: vec![b"base:allocation".to_vec(), b"qemu:dirty-bitmap:x".to_vec()],
    }
    .encode();
    s.insert(("nbd_codec", "set-meta-context"), meta.clone());
    let mut status = vec![0u8];
    status.extend((CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    status.extend(option(OPT_STRUCTURED_REPLY, &[]));
    status.extend(option(OPT_LIST_META_CONTEXT, &meta));
    status.extend(option(OPT_SET_META_CONTEXT, &meta));
    status.extend(option(OPT_GO, &go("a")));
    status.extend(request(CMD_WRITE, 1, 4096, 4096));
    status.extend([0x42u8; 4096]);
    status.extend(request(CMD_BLOCK_STATUS, 2, 0, 1 << 20));
    status.extend(request(CMD_READ, 3, 0, 8192));
    status.extend(request(CMD_TRIM, 4, 4096, 4096));
    status.extend(request(CMD_BLOCK_STATUS, 5, 0, 1 << 20));
    status.extend(request(CMD_READ, 6, 1 << 20, 512));
    status.extend(request(CMD_DISC, 7, 0, 0));
    s.insert(("nbd_session", "structured-block-status"), status);
    let mut tls = vec![1u8];
    tls.extend(CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    tls.extend(option(OPT_GO, &go("a")));
    tls.extend(option(OPT_STARTTLS, &[]));
    s.insert(("nbd_session", "tls-required"), tls);
    // WAL.
    let mut wal = wal_record(RecordKind::Write, 1, 0, &[7u8; 1024]);
    wal.extend(wal_record(RecordKind::Trim, 2, 16, &[]));
    wal.extend(wal_record(RecordKind::Zero, 3, 32, &[]));
    let mut stamped = shale::engine::wal::segment::encode_v1(
        7,
        shale::engine::wal::segment::Stamp {
            epoch: 2,
            base_epoch: 1,
        },
    )
    .to_vec();
    stamped.extend_from_slice(&wal);
    s.insert(("wal_record", "three-records"), wal);
    s.insert(("wal_record", "stamped-segment"), stamped);
    s.insert(
        ("wal_record", "block-crcs"),
        wal_record_blocks(4, 64, &[9u8; 4096 + 1024]),
    );
    // wal_replay: [segments, garbage] then 20-byte record descriptions.
    let mut replay = vec![1u8, 0];
    for (i, kind) in [0u8, 1, 2, 0].into_iter().enumerate() {
        let mut d = [0u8; 20];
        d[0] = kind;
        d[1] = i as u8 + 1;
        d[3] = 8 * i as u8;
        d[11] = 2;
        d[13] = 0x30 + i as u8;
        replay.extend(d);
    }
    let mut stamped = replay.clone();
    stamped[0] = 1 | 2 | (1 << 4);
    s.insert(("wal_replay", "two-segments"), replay);
    // Bit 1: each segment starts with a header (base epoch 1).
    s.insert(("wal_replay", "two-stamped-segments"), stamped);
    // Store objects.
    let data = vec![0x11u8; 4096];
    let header = ChunkHeader {
        volume: 7,
        epoch: 2,
        chunk_seq: 3,
        first_seq: 1,
        last_seq: 4,
        extents: vec![
            ChunkExtent {
                lba: 0,
                sectors: 8,
                data_off: Some(0),
            },
            ChunkExtent {
                lba: 64,
                sectors: 8,
                data_off: None,
            },
        ],
        block_crcs: chunk::block_crcs(&data),
        data_len: data.len() as u64,
        header_len: 0,
    };
    s.insert(
        ("chunk_header", "two-extents"),
        chunk::encode(&header, &data),
    );
    s.insert(("checkpoint_manifest", "checkpoint"), checkpoint().encode());
    s.insert(
        ("checkpoint_manifest", "checkpoint-json"),
        checkpoint().encode_json(),
    );
    let delta = Delta {
        body: Checkpoint {
            chunk_seq: 4,
            last_seq: 50,
            chunks: vec![ChunkInfo {
                seq: 4,
                ..checkpoint().chunks[0].clone()
            }],
            extents: vec![(8, 8, 4, 0)],
            zeros: vec![],
            ..checkpoint()
        },
        pages: DeltaPages {
            position: 1,
            prev_chunk_seq: 0,
            base: "volumes/0000000000000007/checkpoints/0000000000000000-00000002".into(),
            prev: "volumes/0000000000000007/checkpoints/0000000000000000-00000002".into(),
            ranges: vec![(0, 24)],
            removed: vec![],
        },
    };
    s.insert(("checkpoint_manifest", "checkpoint-delta"), delta.encode());
    let snap = SnapshotObject {
        id: 1,
        name: "mon".into(),
        volume: 7,
        created_ms: 1_700_000_000_000,
        checkpoint: checkpoint(),
        parent: None,
        deleting: false,
    };
    s.insert(("snapshot_object", "mon"), snap.encode());
    s.insert(("snapshot_object", "mon-json"), snap.encode_json());
    let record = shale::catalog::VolumeRecord {
        id: 7,
        name: "data".into(),
        size: 1 << 30,
        thick: false,
        created_ms: 1_700_000_000_000,
        parent: Some("base@mon".into()),
        state: Default::default(),
    };
    s.insert(
        ("catalog_records", "volume-record"),
        serde_json::to_vec(&record).unwrap(),
    );
    let identity = shale::catalog::local_dir::LocalIdentity {
        store_id: "3f2a9c".into(),
        volume_id: 7,
        dir_id: "b81e07".into(),
    };
    s.insert(
        ("catalog_records", "local-identity"),
        serde_json::to_vec(&identity).unwrap(),
    );
    // Delta file.
    let mut w = DeltaWriter::new(
        Vec::new(),
        &DeltaHeader {
            base: "v@a".into(),
            target: "v@b".into(),
            base_size: 1 << 20,
            target_size: 1 << 20,
        },
    )
    .unwrap();
    w.data(0, &[5u8; 4096], 0).unwrap();
    w.zero(8192, 4096, 0).unwrap();
    s.insert(("delta_file", "data-and-zero"), w.finish().unwrap().1);
    // Local files.
    s.insert(
        ("runstate_mountinfo", "mountinfo"),
        b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
          30 22 259:0 / /mnt/data\\040x rw - ext4 /dev/ublkb0 rw\n"
            .to_vec(),
    );
    s.insert(
        ("runstate_mountinfo", "device-record"),
        br#"{"volume":"data","dev_id":0,"pid":42,"queues":1,"depth":128,"backing":[]}"#.to_vec(),
    );
    s.insert(
        ("config_file", "example"),
        shale::config::EXAMPLE_CONFIG.as_bytes().to_vec(),
    );
    s.insert(("cert_name", "minimal"), minimal_cert());
    s
}

/// A minimal DER certificate shape with the subject CN "client-a".
fn minimal_cert() -> Vec<u8> {
    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag, body.len() as u8];
        v.extend_from_slice(body);
        v
    }
    let cn = der(
        0x31,
        &der(
            0x30,
            &[der(0x06, &[0x55, 4, 3]), der(0x0c, b"client-a")].concat(),
        ),
    );
    let tbs = [
        der(0xa0, &der(0x02, &[2])),
        der(0x02, &[1]),
        der(0x30, &der(0x06, &[1, 2])),
        der(0x30, &cn),
        der(0x30, &[]),
        der(0x30, &cn),
    ]
    .concat();
    der(0x30, &[der(0x30, &tbs), der(0x30, &[])].concat())
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

#[test]
fn seeds_decode_and_match_the_committed_corpus() {
    let seeds = seeds();
    // Each seed is a valid input for its decoder.
    for ((target, name), bytes) in &seeds {
        let ok = match *target {
            "wal_record" if *name == "stamped-segment" => {
                use shale::engine::wal::segment::{decode, Head, SEG_HEADER_LEN};
                matches!(decode(bytes), Head::Stamped { volume: 7, .. })
                    && shale::engine::wal::record::decode_at(bytes, SEG_HEADER_LEN).is_ok()
            }
            "wal_record" => shale::engine::wal::record::decode_at(bytes, 0).is_ok(),
            "catalog_records" if *name == "local-identity" => {
                serde_json::from_slice::<shale::catalog::local_dir::LocalIdentity>(bytes).is_ok()
            }
            "chunk_header" => chunk::decode_header(bytes).is_ok(),
            "checkpoint_manifest" => CheckpointObject::decode(bytes).is_ok(),
            "snapshot_object" => SnapshotObject::decode(bytes).is_ok(),
            "catalog_records" => {
                serde_json::from_slice::<shale::catalog::VolumeRecord>(bytes).is_ok()
            }
            "delta_file" => shale::transfer::delta::validate(&bytes[..]).is_ok(),
            "nbd_codec" if *name == "set-meta-context" => {
                MetaContextRequest::decode(bytes).is_ok_and(|m| m.queries.len() == 2)
            }
            "cert_name" => {
                shale::frontend::nbd::cert_name::common_name(bytes).as_deref() == Some("client-a")
            }
            "runstate_mountinfo" if *name == "mountinfo" => {
                let m = shale::frontend::ublk::mountns::parse_mountinfo(
                    std::str::from_utf8(bytes).unwrap(),
                );
                m.len() == 2 && m[1].major == 259
            }
            _ => true,
        };
        assert!(ok, "seed {target}/{name} does not decode");
    }
    let write = std::env::var("SHALE_WRITE_FUZZ_SEEDS").is_ok_and(|v| v == "1");
    for ((target, name), bytes) in &seeds {
        let path = corpus_dir(target).join(name);
        if write {
            std::fs::create_dir_all(corpus_dir(target)).unwrap();
            std::fs::write(&path, bytes).unwrap();
        } else {
            let committed = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; regenerate with SHALE_WRITE_FUZZ_SEEDS=1",
                    path.display()
                )
            });
            assert!(
                &committed == bytes,
                "{} is stale; regenerate with SHALE_WRITE_FUZZ_SEEDS=1",
                path.display()
            );
        }
    }
}
