//! Property tests of the NBD codec: arbitrary bytes never panic a decoder,
//! and every encoding round-trips. Seeds are fixed so failures reproduce;
//! `SHALE_FUZZ_ITERS` raises the iteration count for longer runs.

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

use super::*;

fn iterations() -> usize {
    std::env::var("SHALE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn random_request(rng: &mut StdRng) -> Request {
    // Bias towards known commands and flags so classify's branches are hit.
    let command = if rng.random_bool(0.8) {
        rng.random_range(0..8)
    } else {
        rng.random()
    };
    let flags = if rng.random_bool(0.7) {
        rng.random_range(0..16)
    } else {
        rng.random()
    };
    let length = match rng.random_range(0..3) {
        0 => rng.random_range(0..=MAX_PAYLOAD),
        1 => MAX_PAYLOAD + rng.random_range(0..=1),
        _ => rng.random(),
    };
    Request {
        flags,
        command,
        handle: rng.random(),
        offset: rng.random(),
        length,
    }
}

#[test]
fn request_round_trips() {
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..iterations() {
        let req = random_request(&mut rng);
        assert_eq!(Request::decode(&req.encode()), Ok(req));
    }
}

#[test]
fn random_bytes_never_panic_any_decoder() {
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..iterations() {
        let mut hdr = [0u8; REQUEST_LEN];
        rng.fill_bytes(&mut hdr);
        if rng.random_bool(0.5) {
            hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        if let Ok(req) = Request::decode(&hdr) {
            check_classification(&req);
        }
        let mut opt = [0u8; OPTION_HEADER_LEN];
        rng.fill_bytes(&mut opt);
        let _ = OptionHeader::decode(&opt);
        let mut reply = [0u8; SIMPLE_REPLY_LEN];
        rng.fill_bytes(&mut reply);
        let _ = decode_simple_reply(&reply);
        let len = rng.random_range(0..64);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        if len >= 4 && rng.random_bool(0.5) {
            // Plausible name length so the deeper branches run.
            let n = rng.random_range(0..len as u32);
            data[0..4].copy_from_slice(&n.to_be_bytes());
        }
        if let Ok(info) = InfoRequest::decode(&data) {
            assert_eq!(info.encode(), data, "accepted info data re-encodes exactly");
        }
        if let Ok(meta) = MetaContextRequest::decode(&data) {
            assert_eq!(meta.encode(), data, "accepted meta data re-encodes exactly");
        }
        let _ = decode_block_status(&data);
        let _ = decode_error(&data);
        let mut chunk = [0u8; STRUCTURED_REPLY_LEN];
        rng.fill_bytes(&mut chunk);
        let _ = ChunkHeader::decode(&chunk);
    }
}

/// Every combination of negotiated features a connection can have.
const FEATURES: [Features; 3] = [
    Features {
        structured: false,
        allocation: false,
    },
    Features {
        structured: true,
        allocation: false,
    },
    Features {
        structured: true,
        allocation: true,
    },
];

/// Invariant 3 of the codec, checked for one request under every
/// combination of features.
fn check_classification(req: &Request) {
    for f in FEATURES {
        check_classification_with(req, f);
    }
}

fn check_classification_with(req: &Request, features: Features) {
    match classify(req, features) {
        Action::Run(Op::Write { len, .. }) => assert!(len <= MAX_PAYLOAD),
        Action::Run(Op::Read { len, .. }) => assert!(len <= MAX_PAYLOAD),
        Action::Run(Op::BlockStatus { len, .. }) => {
            assert!(features.allocation, "block status only with a context");
            assert!(len > 0);
        }
        Action::Run(_) => {}
        Action::Reject { error, skip, .. } => {
            assert_eq!(error, NBD_EINVAL);
            assert!(skip <= MAX_PAYLOAD);
            if req.command != CMD_WRITE {
                assert_eq!(skip, 0, "only writes carry a payload");
            }
        }
        Action::Close(_) => {
            assert_eq!(req.command, CMD_WRITE);
            assert!(req.length > MAX_PAYLOAD);
        }
    }
}

#[test]
fn classification_invariants_hold_for_random_requests() {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..iterations() {
        check_classification(&random_request(&mut rng));
    }
}

/// `classify` on a connection without structured replies.
fn classify_plain(req: &Request) -> Action {
    classify(req, Features::default())
}

/// The error and payload skip of a rejection (`None` if not rejected).
fn rejected(a: Action) -> Option<(u32, u32)> {
    match a {
        Action::Reject { error, skip, .. } => Some((error, skip)),
        _ => None,
    }
}

#[test]
fn classify_known_commands() {
    let req = |command, flags, length| Request {
        flags,
        command,
        handle: 7,
        offset: 4096,
        length,
    };
    let classify = |r: &Request| classify_plain(r);
    assert_eq!(
        classify(&req(CMD_WRITE, CMD_FLAG_FUA, 512)),
        Action::Run(Op::Write {
            offset: 4096,
            len: 512,
            fua: true
        })
    );
    assert_eq!(
        classify(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 1 << 30)),
        Action::Run(Op::WriteZeroes {
            offset: 4096,
            len: 1 << 30,
            fua: false
        })
    );
    assert_eq!(
        rejected(classify(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 512))),
        Some((NBD_EINVAL, 512))
    );
    assert!(matches!(
        classify(&req(CMD_WRITE, 0, MAX_PAYLOAD + 1)),
        Action::Close(_)
    ));
    assert_eq!(
        rejected(classify(&req(CMD_READ, 0, MAX_PAYLOAD + 1))),
        Some((NBD_EINVAL, 0))
    );
    assert_eq!(classify(&req(CMD_FLUSH, 0, 0)), Action::Run(Op::Flush));
    assert_eq!(classify(&req(CMD_DISC, 0, 0)), Action::Run(Op::Disconnect));
    assert_eq!(rejected(classify(&req(5, 0, 512))), Some((NBD_EINVAL, 0)));
}

#[test]
fn classify_structured_reads_and_block_status() {
    let req = |command, flags, length| Request {
        flags,
        command,
        handle: 7,
        offset: 4096,
        length,
    };
    let [plain, structured, allocation] = FEATURES;
    // DF only once structured replies are negotiated.
    let df = req(CMD_READ, CMD_FLAG_DF, 512);
    assert_eq!(rejected(classify(&df, plain)), Some((NBD_EINVAL, 0)));
    assert_eq!(
        classify(&df, structured),
        Action::Run(Op::Read {
            offset: 4096,
            len: 512
        })
    );
    // BLOCK_STATUS only with base:allocation selected; REQ_ONE and FUA
    // allowed, other flags and zero length refused.
    let bs = req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE | CMD_FLAG_FUA, 1 << 31);
    for f in [plain, structured] {
        assert_eq!(rejected(classify(&bs, f)), Some((NBD_EINVAL, 0)));
    }
    assert_eq!(
        classify(&bs, allocation),
        Action::Run(Op::BlockStatus {
            offset: 4096,
            len: 1 << 31,
            req_one: true
        })
    );
    for bad in [
        req(CMD_BLOCK_STATUS, CMD_FLAG_DF, 512),
        req(CMD_BLOCK_STATUS, 0, 0),
    ] {
        assert_eq!(rejected(classify(&bad, allocation)), Some((NBD_EINVAL, 0)));
    }
}

#[test]
fn block_status_span_rounds_up_and_checks_bounds() {
    let size = 1 << 20;
    assert_eq!(block_status_span(0, 512, size), Some(512));
    assert_eq!(block_status_span(0, 1, size), Some(512), "rounded up");
    assert_eq!(
        block_status_span(4096, u32::MAX, 1 << 40),
        Some(MAX_STATUS_SPAN)
    );
    assert_eq!(block_status_span(size - 512, 512, size), Some(512));
    assert_eq!(
        block_status_span(size - 512, 513, size),
        None,
        "past the end"
    );
    assert_eq!(block_status_span(size, 512, size), None);
    assert_eq!(block_status_span(1, 512, size), None, "unaligned offset");
    assert_eq!(block_status_span(0, 0, size), None);
    assert_eq!(block_status_span(u64::MAX - 10, 512, u64::MAX), None);
    assert!(MAX_STATUS_SPAN <= u64::from(u32::MAX));
    assert_eq!(MAX_STATUS_SPAN % u64::from(MIN_BLOCK), 0);
}

#[test]
fn structured_chunks_layout_and_round_trip() {
    let h = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_BLOCK_STATUS,
        handle: 0x0102_0304_0506_0708,
        length: 20,
    };
    assert_eq!(ChunkHeader::decode(&h.encode()), Ok(h));
    assert_eq!(&h.encode()[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());

    let c = encode_block_status_chunk(9, META_ALLOCATION_ID, &[(4096, 0), (512, 3)]);
    let hdr = ChunkHeader::decode(c[..STRUCTURED_REPLY_LEN].try_into().unwrap()).unwrap();
    assert_eq!(
        (hdr.flags, hdr.kind, hdr.handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 9)
    );
    assert_eq!(hdr.length as usize, c.len() - STRUCTURED_REPLY_LEN);
    assert_eq!(
        decode_block_status(&c[STRUCTURED_REPLY_LEN..]),
        Ok((META_ALLOCATION_ID, vec![(4096, 0), (512, 3)]))
    );
    assert!(decode_block_status(&[0; 4]).is_err());
    assert!(decode_block_status(&[0; 13]).is_err());

    let head = encode_data_chunk_head(5, 8192, 4096);
    let hdr = ChunkHeader::decode(head[..STRUCTURED_REPLY_LEN].try_into().unwrap()).unwrap();
    assert_eq!((hdr.kind, hdr.length), (REPLY_TYPE_OFFSET_DATA, 8 + 4096));
    assert_eq!(&head[STRUCTURED_REPLY_LEN..], &8192u64.to_be_bytes());

    let none = encode_none_chunk(6);
    assert_eq!(none.len(), STRUCTURED_REPLY_LEN);
    let hdr = ChunkHeader::decode(none[..].try_into().unwrap()).unwrap();
    assert_eq!(
        (hdr.flags, hdr.kind, hdr.length),
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
    );

    // Error messages are cut to 4096 bytes on a character boundary.
    let long = "é".repeat(3000);
    let e = encode_error_chunk(7, NBD_EINVAL, &long);
    let hdr = ChunkHeader::decode(e[..STRUCTURED_REPLY_LEN].try_into().unwrap()).unwrap();
    assert_eq!(hdr.kind, REPLY_TYPE_ERROR);
    let (err, msg) = decode_error(&e[STRUCTURED_REPLY_LEN..]).unwrap();
    assert_eq!(err, NBD_EINVAL);
    assert_eq!(msg.len(), 4096);
    assert!(std::str::from_utf8(&msg).is_ok());
    assert!(decode_error(&[0, 0, 0, 22, 0, 9, b'x']).is_err());
}

#[test]
fn meta_context_request_round_trip_and_rejects() {
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..2000 {
        let mut name = vec![0u8; rng.random_range(0..40)];
        rng.fill_bytes(&mut name);
        let queries: Vec<Vec<u8>> = (0..rng.random_range(0..5))
            .map(|_| {
                let mut q = vec![0u8; rng.random_range(0..30)];
                rng.fill_bytes(&mut q);
                q
            })
            .collect();
        let req = MetaContextRequest { name, queries };
        let enc = req.encode();
        assert_eq!(MetaContextRequest::decode(&enc), Ok(req));
        let mut longer = enc.clone();
        longer.push(0);
        assert!(MetaContextRequest::decode(&longer).is_err());
        assert!(MetaContextRequest::decode(&enc[..enc.len() - 1]).is_err());
    }
    // A query count the data cannot hold is refused up front.
    let mut huge = 0u32.to_be_bytes().to_vec();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(MetaContextRequest::decode(&huge).is_err());
    let mut long_query = 0u32.to_be_bytes().to_vec();
    long_query.extend_from_slice(&1u32.to_be_bytes());
    long_query.extend_from_slice(&4097u32.to_be_bytes());
    long_query.extend(vec![b'a'; 4097]);
    assert!(MetaContextRequest::decode(&long_query).is_err());
}

#[test]
fn option_header_and_reply_layout() {
    let h = OptionHeader {
        option: OPT_GO,
        length: 9,
    };
    assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
    let mut bad = h.encode();
    bad[0] ^= 1;
    assert!(OptionHeader::decode(&bad).is_err());
    let r = encode_option_reply(OPT_LIST, REP_ACK, b"ab");
    assert_eq!(r.len(), 22);
    assert_eq!(&r[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&r[16..20], &2u32.to_be_bytes());
}

#[test]
fn info_request_round_trip_and_rejects() {
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..2000 {
        let name_len = rng.random_range(0..300);
        let mut name = vec![0u8; name_len];
        rng.fill_bytes(&mut name);
        let requests: Vec<u16> = (0..rng.random_range(0..6)).map(|_| rng.random()).collect();
        let info = InfoRequest { name, requests };
        assert_eq!(InfoRequest::decode(&info.encode()), Ok(info.clone()));
        let mut longer = info.encode();
        longer.push(0);
        assert!(InfoRequest::decode(&longer).is_err());
        let enc = info.encode();
        assert!(InfoRequest::decode(&enc[..enc.len() - 1]).is_err());
    }
    let mut huge = (u32::MAX).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0, 0]);
    assert!(InfoRequest::decode(&huge).is_err());
}

#[test]
fn simple_reply_round_trip() {
    let b = encode_simple_reply(0xdead_beef_0102_0304, NBD_ENOSPC);
    assert_eq!(
        decode_simple_reply(&b),
        Ok((NBD_ENOSPC, 0xdead_beef_0102_0304))
    );
}
