//! What shale's S3 PUT puts on the wire: the body's CRC32C for the server to
//! verify (S3 refuses a body that does not match it), and no SHA-256 of the
//! payload (skipped for speed; the checksum is the integrity check).
//!
//! moto accepts any checksum and any payload hash, so a real server cannot
//! show this; a one-request HTTP listener records the request instead.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use bytes::Bytes;
use shale::store::s3::{base64, S3Settings, S3Store};
use shale::store::{ObjectStore, PutMode};

/// Accept one connection, read one request (head, then the body by
/// Content-Length), answer 200 with an ETag; returns head and body.
fn capture_one(listener: TcpListener) -> (String, Vec<u8>) {
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        // Header names are case-insensitive: keep them lower case.
        let line = match line.split_once(':') {
            Some((name, value)) => format!("{}:{value}", name.to_ascii_lowercase()),
            None => line,
        };
        head.push_str(&line);
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).unwrap();
    let mut stream = stream;
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nETag: \"e\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    (head, body)
}

#[tokio::test]
async fn a_put_carries_the_crc32c_of_its_body_and_no_payload_hash() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = std::thread::spawn(move || capture_one(listener));
    let store = S3Store::connect(&S3Settings {
        bucket: "b".into(),
        prefix: String::new(),
        endpoint: Some(endpoint),
        region: "us-east-1".into(),
        force_path_style: true,
        static_credentials: Some(("id".into(), "secret".into())),
        attempt_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        min_upload_rate: 1 << 20,
    })
    .await
    .unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    store
        .put("chunks/c1", Bytes::from(data.clone()), PutMode::Create)
        .await
        .unwrap();
    let (head, body) = server.join().unwrap();

    let crc = base64(&crc32c::crc32c(&data).to_be_bytes());
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
    };
    // The checksum goes either in a header (body sent as is) or in the
    // trailer of an aws-chunked body; either way the server checks it.
    match header("x-amz-checksum-crc32c") {
        Some(sent) => {
            assert_eq!(sent, crc, "the header is the CRC32C of the body");
            assert_eq!(body, data, "the body is sent as is");
        }
        None => {
            assert_eq!(
                header("x-amz-trailer").as_deref(),
                Some("x-amz-checksum-crc32c"),
                "no CRC32C header and no CRC32C trailer in:\n{head}"
            );
            let text = String::from_utf8_lossy(&body);
            assert!(
                text.contains(&format!("x-amz-checksum-crc32c:{crc}")),
                "the trailer holds the CRC32C of the data"
            );
        }
    }
    let payload_hash = header("x-amz-content-sha256").unwrap_or_default();
    assert!(
        payload_hash.contains("UNSIGNED-PAYLOAD"),
        "the payload is not hashed (x-amz-content-sha256: {payload_hash})"
    );
    assert!(
        head.contains("if-none-match: *"),
        "a create stays conditional"
    );
}
