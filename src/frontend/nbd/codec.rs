//! Pure encoders and decoders for NBD messages. Nothing here does I/O, so
//! every decoder can be fed arbitrary bytes by property tests.
//!
//! Invariants:
//! 1. Decoders never panic, whatever the input.
//! 2. `decode(encode(x)) == x` for every value an encoder accepts.
//! 3. [`classify`] turns any request header into exactly one of: an
//!    operation to run, an error reply (after skipping a bounded payload),
//!    or closing the connection; a payload larger than
//!    [`MAX_PAYLOAD`] is never read.

use super::protocol::*;

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of an option request header (magic, option, data length).
pub const OPTION_HEADER_LEN: usize = 16;

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// A transmission request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`), possibly unknown.
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// The request header did not start with [`REQUEST_MAGIC`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u64);

impl Request {
    /// Decode a request header.
    pub fn decode(buf: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
        let magic = be_u32(buf, 0);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic.into()));
        }
        Ok(Request {
            flags: be_u16(buf, 4),
            command: be_u16(buf, 6),
            handle: be_u64(buf, 8),
            offset: be_u64(buf, 16),
            length: be_u32(buf, 24),
        })
    }

    /// Encode a request header (what a client sends).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A validated operation ready to run against a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    /// The payload of `len` bytes follows the header on the wire.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// `NO_HOLE` is accepted and ignored: zeros read back either way, and
    /// the volume is thin, so it always stores zeros as unmapped.
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run(Op),
    /// Skip `skip` payload bytes, then reply with `error`; the connection
    /// stays usable.
    Reject {
        error: u32,
        skip: u32,
    },
    /// The stream can no longer be trusted; close the connection.
    Close(String),
}

/// Decide what a request means. Range checks against the device size are
/// left to the device ([`crate::engine::check_range`]); this only enforces
/// what the protocol layer must know before reading a payload.
pub fn classify(req: &Request) -> Action {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let allowed = |mask: u16| req.flags & !mask == 0;
    let reject = |skip| Action::Reject {
        error: NBD_EINVAL,
        skip,
    };
    let (offset, len) = (req.offset, req.length);
    match req.command {
        CMD_WRITE => {
            if len > MAX_PAYLOAD {
                Action::Close(format!(
                    "write payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte maximum"
                ))
            } else if !allowed(CMD_FLAG_FUA) {
                reject(len)
            } else {
                Action::Run(Op::Write { offset, len, fua })
            }
        }
        CMD_READ if len > MAX_PAYLOAD || !allowed(CMD_FLAG_FUA) => reject(0),
        CMD_READ => Action::Run(Op::Read { offset, len }),
        CMD_FLUSH if allowed(CMD_FLAG_FUA) => Action::Run(Op::Flush),
        CMD_TRIM if allowed(CMD_FLAG_FUA) => Action::Run(Op::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES if allowed(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) => {
            Action::Run(Op::WriteZeroes { offset, len, fua })
        }
        CMD_DISC => Action::Run(Op::Disconnect),
        _ => reject(0),
    }
}

/// Encode a simple reply header; read data (if any) follows it.
pub fn encode_simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// Decode a simple reply header: `(error, handle)`.
pub fn decode_simple_reply(buf: &[u8; SIMPLE_REPLY_LEN]) -> Result<(u32, u64), BadMagic> {
    let magic = be_u32(buf, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(BadMagic(magic.into()));
    }
    Ok((be_u32(buf, 4), be_u64(buf, 8)))
}

/// An option request header: option code and the length of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    /// Decode an option header (`IHAVEOPT`, option, length).
    pub fn decode(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, BadMagic> {
        let magic = be_u64(buf, 0);
        if magic != IHAVEOPT {
            return Err(BadMagic(magic));
        }
        Ok(OptionHeader {
            option: be_u32(buf, 8),
            length: be_u32(buf, 12),
        })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Encode an option reply: magic, option, reply type, data length, data.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    // Replies are built by this server from bounded strings and lists.
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`: an export name and the
/// information types the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

/// Malformed option data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed option data: {0}")]
pub struct BadOption(pub &'static str);

impl InfoRequest {
    /// Decode `u32 name length, name, u16 count, count × u16`; the data
    /// must have exactly that length.
    pub fn decode(data: &[u8]) -> Result<InfoRequest, BadOption> {
        if data.len() < 4 {
            return Err(BadOption("shorter than a name length"));
        }
        let name_len = be_u32(data, 0) as usize;
        if name_len > MAX_STRING {
            return Err(BadOption("export name longer than 4096 bytes"));
        }
        let rest = &data[4..];
        if rest.len() < name_len + 2 {
            return Err(BadOption("name or request count truncated"));
        }
        let name = rest[..name_len].to_vec();
        let count = be_u16(rest, name_len) as usize;
        let list = &rest[name_len + 2..];
        if list.len() != count * 2 {
            return Err(BadOption("information request list length mismatch"));
        }
        let requests = list.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
        Ok(InfoRequest { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// `NBD_INFO_EXPORT` payload: type, size, transmission flags.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE` payload with this server's constraints.
pub fn encode_info_block_size() -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` payload.
pub fn encode_info_string(info: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// `NBD_REP_SERVER` payload: name length, name.
pub fn encode_server_entry(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
