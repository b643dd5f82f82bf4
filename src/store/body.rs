//! An object's bytes as a list of parts ([`Body`]), for
//! [`super::ObjectStore::put_body`]: a writer that holds the bytes in
//! several buffers already (a chunk's header, then record data shared from
//! the WAL's tail) hands them over without first copying them into one.
//!
//! Invariant: the object is exactly the parts concatenated, in order; no
//! part is empty, and `len` is their total length. The `streamed` hint
//! changes how a store may write the bytes, never which bytes it stores.

use bytes::Bytes;

use super::aligned::PooledBuf;

/// The bytes of one object, in parts (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Body {
    parts: Vec<Bytes>,
    len: usize,
    /// The bytes come from a stream of large writes, unlikely to be read
    /// again soon: a store on a local file system writes them around the
    /// page cache ([`Body::mark_streamed`]).
    streamed: bool,
}

impl Body {
    /// An empty body.
    pub fn new() -> Body {
        Body::default()
    }

    /// Append `part` (an empty one is dropped).
    pub fn push(&mut self, part: Bytes) {
        if !part.is_empty() {
            self.len += part.len();
            self.parts.push(part);
        }
    }

    /// The object's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// Mark the bytes as streamed: written by large sequential writes, so
    /// keeping them in the page cache is not worth a copy into it.
    pub fn mark_streamed(&mut self) {
        self.streamed = true;
    }

    /// Whether [`Body::mark_streamed`] was called.
    pub fn streamed(&self) -> bool {
        self.streamed
    }

    /// The object in one buffer: the part itself when there is one, else
    /// the parts copied once into a buffer of the aligned pool.
    pub fn into_bytes(mut self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.pop().unwrap_or_default(),
            _ => {
                let mut buf = PooledBuf::take(self.len);
                let out = buf.bytes_mut();
                let mut at = 0;
                for p in &self.parts {
                    out[at..at + p.len()].copy_from_slice(p);
                    at += p.len();
                }
                buf.freeze()
            }
        }
    }

    /// Whether the object is exactly `other`.
    pub fn eq_bytes(&self, other: &[u8]) -> bool {
        if other.len() != self.len {
            return false;
        }
        let mut at = 0;
        self.parts.iter().all(|p| {
            let same = other[at..at + p.len()] == p[..];
            at += p.len();
            same
        })
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        let mut body = Body::new();
        body.push(b);
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> Body {
        let mut b = Body::new();
        for p in parts {
            b.push(Bytes::from_static(p));
        }
        b
    }

    #[test]
    fn a_body_is_its_parts_concatenated() {
        let b = body(&[b"ab", b"", b"cde", b"f"]);
        assert_eq!((b.len(), b.parts().len()), (6, 3));
        assert!(b.eq_bytes(b"abcdef"));
        assert!(!b.eq_bytes(b"abcdeg"));
        assert!(!b.eq_bytes(b"abcde"));
        assert!(!b.eq_bytes(b"abcdefg"));
        assert_eq!(&b.clone().into_bytes()[..], b"abcdef");
        let one = Body::from(Bytes::from_static(b"xyz"));
        assert_eq!(&one.into_bytes()[..], b"xyz");
        let none = body(&[b""]);
        assert!(none.is_empty() && none.eq_bytes(b""));
        assert!(none.into_bytes().is_empty());
    }
}
