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
        rng.random_range(0..4)
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
    }
}

/// Invariant 3 of the codec, checked for one request.
fn check_classification(req: &Request) {
    match classify(req) {
        Action::Run(Op::Write { len, .. }) => assert!(len <= MAX_PAYLOAD),
        Action::Run(Op::Read { len, .. }) => assert!(len <= MAX_PAYLOAD),
        Action::Run(_) => {}
        Action::Reject { error, skip } => {
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

#[test]
fn classify_known_commands() {
    let req = |command, flags, length| Request {
        flags,
        command,
        handle: 7,
        offset: 4096,
        length,
    };
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
        classify(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 512)),
        Action::Reject {
            error: NBD_EINVAL,
            skip: 512
        }
    );
    assert!(matches!(
        classify(&req(CMD_WRITE, 0, MAX_PAYLOAD + 1)),
        Action::Close(_)
    ));
    assert_eq!(
        classify(&req(CMD_READ, 0, MAX_PAYLOAD + 1)),
        Action::Reject {
            error: NBD_EINVAL,
            skip: 0
        }
    );
    assert_eq!(classify(&req(CMD_FLUSH, 0, 0)), Action::Run(Op::Flush));
    assert_eq!(classify(&req(CMD_DISC, 0, 0)), Action::Run(Op::Disconnect));
    assert_eq!(
        classify(&req(5, 0, 512)),
        Action::Reject {
            error: NBD_EINVAL,
            skip: 0
        }
    );
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
