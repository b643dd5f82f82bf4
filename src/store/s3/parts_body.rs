//! An upload body sent straight from a [`Body`]'s parts: the SDK streams
//! them one frame each, so a chunk is never joined into one buffer first
//! (on 1 MiB writes at QD8 to moto, joining cost ~20% of the server's CPU:
//! the copy and, above all, the fresh huge pages it faulted in and zeroed).
//!
//! Invariants:
//! 1. Every attempt sends exactly the parts, in order, and says its exact
//!    length up front: the body is rebuilt from the shared parts for each
//!    retry, never half consumed.
//! 2. The CRC32C sent with it is computed over those same parts, so the
//!    server refuses an object that does not arrive whole.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use aws_sdk_s3::primitives::{ByteStream, SdkBody};
use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use crate::store::Body;

/// The parts still to send and their total length.
struct Parts {
    left: VecDeque<Bytes>,
    len: u64,
}

impl hyper::body::Body for Parts {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.left.pop_front().map(|part| {
            self.len -= part.len() as u64;
            Ok(Frame::data(part))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.left.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len)
    }
}

/// `body` as a stream the SDK can send again on each attempt
/// (invariant 1), and the base64 of its big-endian CRC32C (invariant 2),
/// as the `x-amz-checksum-crc32c` header wants it.
pub(super) fn stream(body: Body) -> (ByteStream, String) {
    let crc = body
        .parts()
        .iter()
        .fold(0, |crc, p| crc32c::crc32c_append(crc, p));
    let parts: Vec<Bytes> = body.parts().to_vec();
    let len = body.len() as u64;
    let sdk = SdkBody::retryable(move || {
        SdkBody::from_body_1_x(Parts {
            left: parts.iter().cloned().collect(),
            len,
        })
    });
    (ByteStream::new(sdk), base64(&crc.to_be_bytes()))
}

/// Standard base64 with padding (as S3 spells checksums).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0xfd, 0xfc]), "//79/A==");
    }

    #[tokio::test]
    async fn every_attempt_sends_the_parts_whole_with_their_crc() {
        let mut body = Body::new();
        body.push(Bytes::from_static(b"header"));
        body.push(Bytes::from(vec![7u8; 70_000]));
        body.push(Bytes::from_static(b"tail"));
        let whole = [&b"header"[..], &[7u8; 70_000][..], &b"tail"[..]].concat();
        let (stream, crc) = stream(body);
        assert_eq!(
            crc,
            base64(&crc32c::crc32c(&whole).to_be_bytes()),
            "the checksum covers the whole object"
        );
        let sdk = stream.into_inner();
        assert_eq!(sdk.content_length(), Some(whole.len() as u64));
        let again = sdk.try_clone().expect("a retry can rebuild the body");
        for b in [sdk, again] {
            let got = b.collect().await.unwrap().to_bytes();
            assert_eq!(got, whole, "each attempt sends every part, in order");
        }
    }
}
