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
//! 4. Structured reply chunks are only encoded whole (header and payload
//!    agree on the length); error messages are cut to [`MAX_STRING`] bytes
//!    on a character boundary.

use super::protocol::*;

/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
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

/// What a connection negotiated that changes how its requests are read
/// and answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged: reads (and errors) are
    /// answered with structured reply chunks.
    pub structured: bool,
    /// `base:allocation` was selected for the export in use (only ever
    /// with `structured`): `NBD_CMD_BLOCK_STATUS` is served.
    pub allocation: bool,
}

/// A validated operation ready to run against a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// With structured replies, `NBD_CMD_FLAG_DF` is accepted: the data
    /// always goes out as one chunk.
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
    /// `base:allocation` of `[offset, offset+len)`; `len` is a hint (see
    /// [`block_status_span`]).
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Disconnect,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Run(Op),
    /// Skip `skip` payload bytes, then reply with `error` (and, in a
    /// structured reply, `reason`); the connection stays usable.
    Reject {
        error: u32,
        skip: u32,
        reason: &'static str,
    },
    /// The stream can no longer be trusted; close the connection.
    Close(String),
}

/// Decide what a request means on a connection that negotiated
/// `features`. Range checks against the device size are left to the
/// device ([`crate::engine::check_range`]); this only enforces what the
/// protocol layer must know before reading a payload.
pub fn classify(req: &Request, features: Features) -> Action {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let allowed = |mask: u16| req.flags & !mask == 0;
    let reject = |skip, reason| Action::Reject {
        error: NBD_EINVAL,
        skip,
        reason,
    };
    const BAD_FLAGS: &str = "command flags not valid for this command";
    let read_flags = if features.structured {
        CMD_FLAG_FUA | CMD_FLAG_DF
    } else {
        CMD_FLAG_FUA
    };
    let (offset, len) = (req.offset, req.length);
    match req.command {
        CMD_WRITE => {
            if len > MAX_PAYLOAD {
                Action::Close(format!(
                    "write payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte maximum"
                ))
            } else if !allowed(CMD_FLAG_FUA) {
                reject(len, BAD_FLAGS)
            } else {
                Action::Run(Op::Write { offset, len, fua })
            }
        }
        CMD_READ if len > MAX_PAYLOAD => reject(0, "read longer than the maximum block size"),
        CMD_READ if !allowed(read_flags) => reject(0, BAD_FLAGS),
        CMD_READ => Action::Run(Op::Read { offset, len }),
        CMD_FLUSH if allowed(CMD_FLAG_FUA) => Action::Run(Op::Flush),
        CMD_TRIM if allowed(CMD_FLAG_FUA) => Action::Run(Op::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES if allowed(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) => {
            Action::Run(Op::WriteZeroes { offset, len, fua })
        }
        CMD_BLOCK_STATUS if !features.allocation => reject(
            0,
            "NBD_CMD_BLOCK_STATUS needs base:allocation selected with NBD_OPT_SET_META_CONTEXT",
        ),
        CMD_BLOCK_STATUS if len == 0 => reject(0, "block status of zero bytes"),
        CMD_BLOCK_STATUS if allowed(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE) => {
            Action::Run(Op::BlockStatus {
                offset,
                len,
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        CMD_DISC => Action::Run(Op::Disconnect),
        CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS => reject(0, BAD_FLAGS),
        _ => reject(0, "unknown command"),
    }
}

/// Longest range one block status request looks at: the largest multiple
/// of [`MIN_BLOCK`] an extent length (`u32`) can carry.
pub const MAX_STATUS_SPAN: u64 = (u32::MAX / MIN_BLOCK * MIN_BLOCK) as u64;

/// The byte range a block status request for `len` bytes at `offset`
/// looks at, on a device of `size` bytes: the request rounded up to whole
/// blocks (the protocol lets the last extent reach past the requested
/// length) and cut to [`MAX_STATUS_SPAN`]. `None` (answer `EINVAL`) when
/// `offset` is not block-aligned, `len` is zero, or the request reaches
/// past the end of the device.
pub fn block_status_span(offset: u64, len: u32, size: u64) -> Option<u64> {
    let end = offset.checked_add(u64::from(len))?;
    if len == 0 || !offset.is_multiple_of(u64::from(MIN_BLOCK)) || end > size {
        return None;
    }
    let span = u64::from(len).div_ceil(u64::from(MIN_BLOCK)) * u64::from(MIN_BLOCK);
    Some(span.min(MAX_STATUS_SPAN).min(size - offset))
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

/// A structured reply chunk header; `length` payload bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    pub handle: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode a chunk header (what a client reads).
    pub fn decode(buf: &[u8; STRUCTURED_REPLY_LEN]) -> Result<ChunkHeader, BadMagic> {
        let magic = be_u32(buf, 0);
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(BadMagic(magic.into()));
        }
        Ok(ChunkHeader {
            flags: be_u16(buf, 4),
            kind: be_u16(buf, 6),
            handle: be_u64(buf, 8),
            length: be_u32(buf, 16),
        })
    }
}

/// A final (`DONE`) chunk of `kind` with `payload`.
fn final_chunk(handle: u64, kind: u16, payload: &[u8]) -> Vec<u8> {
    let hdr = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind,
        handle,
        // Payloads built here are bounded (descriptor lists, messages).
        length: payload.len() as u32,
    };
    let mut b = Vec::with_capacity(STRUCTURED_REPLY_LEN + payload.len());
    b.extend_from_slice(&hdr.encode());
    b.extend_from_slice(payload);
    b
}

/// The final `NBD_REPLY_TYPE_NONE` chunk: success without payload.
pub fn encode_none_chunk(handle: u64) -> Vec<u8> {
    final_chunk(handle, REPLY_TYPE_NONE, &[])
}

/// The start of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying
/// `data_len` bytes read at `offset`; the data follows it on the wire.
/// `data_len` is at most [`MAX_PAYLOAD`].
pub fn encode_data_chunk_head(handle: u64, offset: u64, data_len: u32) -> [u8; 28] {
    let hdr = ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_OFFSET_DATA,
        handle,
        length: 8 + data_len,
    };
    let mut b = [0u8; 28];
    b[..STRUCTURED_REPLY_LEN].copy_from_slice(&hdr.encode());
    b[STRUCTURED_REPLY_LEN..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk: NBD error value `error` (not 0)
/// and a message for humans, cut to [`MAX_STRING`] bytes.
pub fn encode_error_chunk(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let mut cut = message.len().min(MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    let mut payload = Vec::with_capacity(6 + msg.len());
    payload.extend_from_slice(&error.to_be_bytes());
    payload.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    payload.extend_from_slice(msg);
    final_chunk(handle, REPLY_TYPE_ERROR, &payload)
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for metadata context
/// `context`: descriptors `(length, status flags)` in order (at most
/// [`MAX_EXTENTS`], at least one).
pub fn encode_block_status_chunk(handle: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(4 + 8 * extents.len());
    payload.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in extents {
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
    }
    final_chunk(handle, REPLY_TYPE_BLOCK_STATUS, &payload)
}

/// Decode a block status payload: the context id and its descriptors.
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), BadOption> {
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(BadOption(
            "block status payload is not 4 + 8n bytes (n > 0)",
        ));
    }
    let extents = payload[4..]
        .chunks_exact(8)
        .map(|c| (be_u32(c, 0), be_u32(c, 4)))
        .collect();
    Ok((be_u32(payload, 0), extents))
}

/// Decode an error chunk payload: the error value and the message.
pub fn decode_error(payload: &[u8]) -> Result<(u32, Vec<u8>), BadOption> {
    if payload.len() < 6 {
        return Err(BadOption("error payload shorter than 6 bytes"));
    }
    let n = be_u16(payload, 4) as usize;
    let msg = payload
        .get(6..6 + n)
        .ok_or(BadOption("error message longer than the payload"))?;
    Ok((be_u32(payload, 0), msg.to_vec()))
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

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
/// an export name and queries (each `namespace:leaf`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: Vec<u8>,
    pub queries: Vec<Vec<u8>>,
}

impl MetaContextRequest {
    /// Decode `u32 name length, name, u32 count, count × (u32 length,
    /// query)`; names and queries are at most [`MAX_STRING`] bytes and the
    /// data must have exactly that length.
    pub fn decode(data: &[u8]) -> Result<MetaContextRequest, BadOption> {
        let mut rest = data;
        let name = take_string(&mut rest, "export name truncated")?;
        if rest.len() < 4 {
            return Err(BadOption("query count truncated"));
        }
        let count = be_u32(rest, 0) as usize;
        rest = &rest[4..];
        // Each query takes at least 4 bytes: a count the data cannot hold
        // is refused before anything is allocated for it.
        if count > rest.len() / 4 {
            return Err(BadOption("more queries than the data can hold"));
        }
        let mut queries = Vec::with_capacity(count);
        for _ in 0..count {
            queries.push(take_string(&mut rest, "query truncated")?);
        }
        if !rest.is_empty() {
            return Err(BadOption("bytes after the last query"));
        }
        Ok(MetaContextRequest { name, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q);
        }
        b
    }
}

/// Take a `u32 length, bytes` string of at most [`MAX_STRING`] bytes off
/// the front of `rest`; `truncated` says what is missing otherwise.
fn take_string(rest: &mut &[u8], truncated: &'static str) -> Result<Vec<u8>, BadOption> {
    if rest.len() < 4 {
        return Err(BadOption(truncated));
    }
    let n = be_u32(rest, 0) as usize;
    if n > MAX_STRING {
        return Err(BadOption("string longer than 4096 bytes"));
    }
    let s = rest.get(4..4 + n).ok_or(BadOption(truncated))?.to_vec();
    *rest = &rest[4 + n..];
    Ok(s)
}

/// `NBD_REP_META_CONTEXT` payload: context id, name.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
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
