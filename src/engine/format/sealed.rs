//! The framing of small binary metadata objects:
//! `magic (8 bytes) | crc32c u32 LE of the body | body`.
//!
//! Invariant: [`unseal`] hands out a body only if the magic matches and the
//! CRC covers exactly the bytes returned; decoders still check every number
//! in the body (the CRC catches damage, not hostile writers).

/// Why bytes are not a sealed object of the expected kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// Shorter than the frame, or another kind of object.
    BadMagic,
    /// The body does not match its checksum.
    Crc,
}

/// Frame `body` as an object of kind `magic`.
pub fn seal(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// The body of `b`, if it is an intact object of kind `magic`.
pub fn unseal<'a>(magic: &[u8; 8], b: &'a [u8]) -> Result<&'a [u8], SealError> {
    if b.len() < 12 || &b[..8] != magic {
        return Err(SealError::BadMagic);
    }
    let crc = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let body = &b[12..];
    if crc32c::crc32c(body) != crc {
        return Err(SealError::Crc);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_damage() {
        let m = b"SHALETS1";
        let s = seal(m, b"body");
        assert_eq!(unseal(m, &s), Ok(&b"body"[..]));
        assert_eq!(unseal(b"SHALEXX1", &s), Err(SealError::BadMagic));
        assert_eq!(unseal(m, &s[..11]), Err(SealError::BadMagic));
        let mut bad = s.clone();
        bad[13] ^= 1;
        assert_eq!(unseal(m, &bad), Err(SealError::Crc));
        assert_eq!(unseal(m, &seal(m, b"")), Ok(&b""[..]));
    }
}
