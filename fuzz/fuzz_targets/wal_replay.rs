//! WAL segment scan and replay from disk, with hostile records whose CRCs
//! are valid: the input describes records (kind, flags, volume, sequence,
//! LBA, sector count, data, one CRC or a CRC per 4 KiB block), the target
//! encodes them with correct checksums
//! into one or two segment files (with or without a segment header),
//! optionally appends raw garbage, then scans, judges the lineage and
//! replays.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::engine::wal::record::{block_table, RecordHeader, RecordKind};
use shale::engine::wal::replay::replay;
use shale::engine::wal::scan::{scan, Lineage};
use shale::engine::wal::{fs, segment};

const VOLUME: u64 = 7;

fn take<const N: usize>(d: &mut &[u8]) -> Option<[u8; N]> {
    let (h, t) = d.split_at_checked(N)?;
    *d = t;
    h.try_into().ok()
}

fuzz_target!(|data: &[u8]| {
    let mut d = data;
    let Some([segments, garbage]) = take::<2>(&mut d) else { return };
    let mut files: Vec<Vec<u8>> = vec![Vec::new(); 1 + usize::from(segments & 1)];
    if segments & 2 == 2 {
        for (n, f) in files.iter_mut().enumerate() {
            let stamp = segment::Stamp {
                epoch: 2 + n as u64,
                base_epoch: u64::from(segments >> 4),
            };
            let volume = if segments & 4 == 4 { VOLUME + 1 } else { VOLUME };
            // Bit 3: version 2 headers (records must continue a run).
            if segments & 8 == 8 {
                f.extend_from_slice(&segment::encode_v2(volume, stamp, 1 + n as u64));
            } else {
                f.extend_from_slice(&segment::encode_v1(volume, stamp));
            }
        }
    }
    let mut i = 0usize;
    while let Some(h) = take::<20>(&mut d) {
        let kind = match h[0] % 3 {
            0 => RecordKind::Write,
            1 => RecordKind::Trim,
            _ => RecordKind::Zero,
        };
        // Small deltas around plausible values reach the interesting cases.
        let seq = u64::from(u16::from_le_bytes([h[1], h[2]]));
        let lba = u64::from_le_bytes(h[3..11].try_into().unwrap());
        let sectors = u64::from(h[11] % 9);
        let volume = if h[12] == 0xff { VOLUME + 1 } else { VOLUME };
        let data_len = if kind == RecordKind::Write { sectors as usize * 512 } else { 0 };
        let payload: Vec<u8> = (0..data_len).map(|j| h[13].wrapping_add(j as u8)).collect();
        let block_crcs = h[16] & 2 == 2;
        let table = if block_crcs && kind == RecordKind::Write { block_table(&payload) } else { Vec::new() };
        let hdr = RecordHeader {
            kind,
            volume,
            seq,
            lba: if h[14] & 1 == 1 { lba } else { lba % 4096 },
            sectors: if h[15] == 0xff { u64::MAX / 256 } else { sectors },
            data_crc: crc32c::crc32c(if block_crcs { &table } else { &payload }),
            more: h[16] & 1 == 1,
            block_crcs,
        };
        let n = files.len();
        let f = &mut files[i % 2 % n];
        f.extend_from_slice(&hdr.encode());
        f.extend_from_slice(&table);
        f.extend_from_slice(&payload);
        i += 1;
    }
    if garbage & 1 == 1 {
        files.last_mut().unwrap().extend_from_slice(d);
    }
    let dir = tempfile::tempdir().unwrap();
    for (n, bytes) in files.iter().enumerate() {
        std::fs::write(dir.path().join(format!("{:016x}.wal", n + 1)), bytes).unwrap();
    }
    let fs = fs::real();
    let Ok(scans) = scan(&fs, dir.path(), VOLUME) else { return };
    let _ = Lineage::of(&scans);
    let stamp = segment::Stamp { epoch: 9, base_epoch: 1 };
    let mut last = 0u64;
    let replayed = replay(&fs, dir.path(), VOLUME, scans, u64::from(garbage >> 4), stamp, |a| {
        assert!(a.seq > last, "replay applies records in order");
        last = a.seq;
    });
    if replayed.is_ok() {
        // What replay kept reads back as a clean WAL.
        let again = scan(&fs, dir.path(), VOLUME).expect("rescan after replay");
        assert!(again.iter().all(|s| s.damage.is_none()), "{again:?}");
    }
});
