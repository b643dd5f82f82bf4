//! WAL segment replay from disk, with hostile records whose CRCs are valid:
//! the input describes records (kind, flags, volume, sequence, LBA, sector
//! count, data), the target encodes them with correct checksums into one or
//! two segment files, optionally appends raw garbage, and replays.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::engine::wal::record::{RecordHeader, RecordKind};
use shale::engine::wal::replay::replay;

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
        let hdr = RecordHeader {
            kind,
            volume,
            seq,
            lba: if h[14] & 1 == 1 { lba } else { lba % 4096 },
            sectors: if h[15] == 0xff { u64::MAX / 256 } else { sectors },
            data_crc: crc32c::crc32c(&payload),
            more: h[16] & 1 == 1,
        };
        let f = &mut files[i % 2 % files.len()];
        f.extend_from_slice(&hdr.encode());
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
    let _ = replay(dir.path(), VOLUME, u64::from(garbage >> 4), |_| {});
});
