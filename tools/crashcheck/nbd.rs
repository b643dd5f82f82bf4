//! A minimal synchronous NBD client: fixed newstyle handshake with
//! `NBD_OPT_GO`, simple replies, one request in flight at a time.
//!
//! The wire formats come from shale's own codec (`shale::frontend::nbd`),
//! which the server side tests against real clients.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context, Result};
use shale::frontend::nbd::codec::{
    decode_simple_reply, InfoRequest, OptionHeader, Request, SIMPLE_REPLY_LEN,
};
use shale::frontend::nbd::protocol::*;

/// A byte stream to the server (TCP or unix socket).
pub trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// An open export.
pub struct NbdClient {
    stream: Box<dyn Stream>,
    size: u64,
    next_handle: u64,
}

/// Where an NBD export is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp { addr: String, export: String },
    Unix { socket: String, export: String },
}

impl NbdAddr {
    /// Parse `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`;
    /// `None` for anything else.
    pub fn parse(uri: &str) -> Option<NbdAddr> {
        if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
            let (export, socket) = rest.split_once("?socket=")?;
            return Some(NbdAddr::Unix {
                socket: socket.to_string(),
                export: export.to_string(),
            });
        }
        let rest = uri.strip_prefix("nbd://")?;
        let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
        Some(NbdAddr::Tcp {
            addr: addr.to_string(),
            export: export.to_string(),
        })
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl NbdClient {
    /// Connect and negotiate the export.
    pub fn connect(addr: &NbdAddr) -> Result<NbdClient> {
        let (stream, export): (Box<dyn Stream>, &str) = match addr {
            NbdAddr::Tcp { addr, export } => (
                Box::new(TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?),
                export,
            ),
            NbdAddr::Unix { socket, export } => (
                Box::new(
                    UnixStream::connect(socket).with_context(|| format!("connect to {socket}"))?,
                ),
                export,
            ),
        };
        let mut c = NbdClient {
            stream,
            size: 0,
            next_handle: 1,
        };
        c.handshake(export).context("NBD handshake")?;
        Ok(c)
    }

    fn handshake(&mut self, export: &str) -> Result<()> {
        let mut greeting = [0u8; 18];
        self.stream.read_exact(&mut greeting)?;
        if be_u64(&greeting[0..8]) != NBD_MAGIC || be_u64(&greeting[8..16]) != IHAVEOPT {
            bail!("not a fixed-newstyle NBD server");
        }
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("server lacks fixed newstyle negotiation");
        }
        let mut client_flags = CLIENT_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client_flags |= CLIENT_NO_ZEROES;
        }
        self.stream.write_all(&client_flags.to_be_bytes())?;
        let data = InfoRequest {
            name: export.as_bytes().to_vec(),
            requests: vec![],
        }
        .encode();
        let header = OptionHeader {
            option: OPT_GO,
            length: data.len() as u32,
        };
        self.stream.write_all(&header.encode())?;
        self.stream.write_all(&data)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            self.stream.read_exact(&mut h)?;
            if be_u64(&h[0..8]) != OPTION_REPLY_MAGIC {
                bail!("bad option reply magic");
            }
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            if len > MAX_STRING + 64 {
                bail!("option reply of {len} bytes is too long");
            }
            let mut data = vec![0u8; len];
            self.stream.read_exact(&mut data)?;
            match kind {
                REP_INFO if data.len() >= 10 && data[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(be_u64(&data[2..10]));
                }
                REP_INFO => {}
                REP_ACK => break,
                k if k & REP_FLAG_ERROR != 0 => bail!(
                    "server refused export {export:?} (reply {k:#x}): {}",
                    String::from_utf8_lossy(&data)
                ),
                k => bail!("unexpected option reply {k:#x}"),
            }
        }
        self.size = size.context("server sent no export size")?;
        Ok(())
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, command: u16, offset: u64, length: u32, payload: &[u8]) -> Result<()> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let req = Request {
            flags: 0,
            command,
            handle,
            offset,
            length,
        };
        self.stream.write_all(&req.encode())?;
        self.stream.write_all(payload)?;
        let mut r = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut r)?;
        let (error, got) = decode_simple_reply(&r)?;
        if got != handle {
            bail!("reply for handle {got}, expected {handle}");
        }
        if error != 0 {
            bail!("server answered error {error}");
        }
        Ok(())
    }

    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)
            .with_context(|| format!("NBD write at {offset}"))
    }

    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.request(CMD_READ, offset, buf.len() as u32, &[])
            .with_context(|| format!("NBD read at {offset}"))?;
        self.stream
            .read_exact(buf)
            .with_context(|| format!("NBD read data at {offset}"))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[]).context("NBD flush")
    }

    /// End the session politely (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) {
        let req = Request {
            flags: 0,
            command: CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        };
        let _ = self.stream.write_all(&req.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            NbdAddr::parse("nbd://127.0.0.1:10809/vol"),
            Some(NbdAddr::Tcp {
                addr: "127.0.0.1:10809".into(),
                export: "vol".into()
            })
        );
        assert_eq!(
            NbdAddr::parse("nbd+unix:///vol?socket=/run/n.sock"),
            Some(NbdAddr::Unix {
                socket: "/run/n.sock".into(),
                export: "vol".into()
            })
        );
        assert_eq!(NbdAddr::parse("/dev/ublkb0"), None);
    }
}
