//! The subject common name (CN) of an X.509 certificate, read with a small
//! DER walker: just enough to name a TLS client for the export rules.
//!
//! Invariants:
//! 1. Any input, however malformed, yields `None` or a name; never a panic
//!    and never a read outside the input (every length is checked against
//!    what remains before it is used).
//! 2. Only the subject is consulted (never the issuer), and only a CN whose
//!    string type is UTF8String, PrintableString or IA5String and whose
//!    bytes are valid UTF-8. With several CNs the last one counts (the most
//!    specific, by convention).
//!
//! The certificate has already been verified against the configured CA by
//! rustls when this runs, so its contents are signed by that CA.

/// DER tags used here.
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const CONTEXT_0: u8 = 0xa0;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;

/// The DER encoding of OID 2.5.4.3 (id-at-commonName).
const COMMON_NAME_OID: &[u8] = &[0x55, 0x04, 0x03];

/// One TLV: its tag, its contents, and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-byte tags never occur in the parts we read
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None; // indefinite or absurd lengths
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if len > rest.len() {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The contents of a TLV that must have tag `want`, and what follows.
fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    match tlv(input)? {
        (tag, body, rest) if tag == want => Some((body, rest)),
        _ => None,
    }
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut fields = tbs;
    if let Some((CONTEXT_0, _, rest)) = tlv(fields) {
        fields = rest; // version
    }
    // serialNumber, signature, issuer, validity: skipped whatever they hold.
    for _ in 0..4 {
        let (_, _, rest) = tlv(fields)?;
        fields = rest;
    }
    let (mut subject, _) = expect(fields, SEQUENCE)?;
    let mut name = None;
    while !subject.is_empty() {
        let (mut rdn, rest) = expect(subject, SET)?;
        subject = rest;
        while !rdn.is_empty() {
            let (attr, rest) = expect(rdn, SEQUENCE)?;
            rdn = rest;
            let (oid, value) = expect(attr, OID)?;
            if oid != COMMON_NAME_OID {
                continue;
            }
            let (tag, text, _) = tlv(value)?;
            if matches!(tag, UTF8_STRING | PRINTABLE_STRING | IA5_STRING) {
                if let Ok(s) = std::str::from_utf8(text) {
                    name = Some(s.to_string());
                }
            }
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER TLV with a definite length.
    fn der(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = body.len();
        if n < 0x80 {
            out.push(n as u8);
        } else if n < 0x100 {
            out.extend([0x81, n as u8]);
        } else {
            out.extend([0x82, (n >> 8) as u8, n as u8]);
        }
        out.extend_from_slice(body);
        out
    }

    fn attr(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        der(
            SET,
            &der(SEQUENCE, &[der(OID, oid), der(tag, value)].concat()),
        )
    }

    fn cert(subject: Vec<u8>, with_version: bool) -> Vec<u8> {
        let mut tbs = Vec::new();
        if with_version {
            tbs.extend(der(CONTEXT_0, &der(0x02, &[2])));
        }
        tbs.extend(der(0x02, &[1, 2, 3])); // serial
        tbs.extend(der(SEQUENCE, &der(OID, &[1, 2]))); // signature alg
        tbs.extend(der(
            SEQUENCE,
            &attr(COMMON_NAME_OID, UTF8_STRING, b"the-ca"),
        )); // issuer
        tbs.extend(der(SEQUENCE, &[])); // validity
        tbs.extend(der(SEQUENCE, &subject));
        tbs.extend(der(SEQUENCE, &[0u8; 200])); // public key (long form length)
        der(
            SEQUENCE,
            &[der(SEQUENCE, &tbs), der(SEQUENCE, &[])].concat(),
        )
    }

    #[test]
    fn reads_the_subject_cn_not_the_issuer() {
        let subject = [
            attr(&[0x55, 0x04, 0x06], PRINTABLE_STRING, b"DE"),
            attr(COMMON_NAME_OID, UTF8_STRING, b"host-a"),
        ]
        .concat();
        assert_eq!(
            common_name(&cert(subject.clone(), true)).as_deref(),
            Some("host-a")
        );
        assert_eq!(
            common_name(&cert(subject, false)).as_deref(),
            Some("host-a")
        );
        let none = attr(&[0x55, 0x04, 0x06], PRINTABLE_STRING, b"DE");
        assert_eq!(common_name(&cert(none, true)), None);
        let bmp = attr(COMMON_NAME_OID, 0x1e, b"\0h");
        assert_eq!(common_name(&cert(bmp, true)), None);
    }

    #[test]
    fn truncations_and_garbage_give_none() {
        let good = cert(attr(COMMON_NAME_OID, IA5_STRING, b"x"), true);
        assert_eq!(common_name(&good).as_deref(), Some("x"));
        for cut in 0..good.len() {
            assert_eq!(common_name(&good[..cut]), None, "cut at {cut}");
        }
        for bad in [
            &[0x30, 0x80][..],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x3f, 0x01, 0],
        ] {
            assert_eq!(common_name(bad), None);
        }
    }
}
