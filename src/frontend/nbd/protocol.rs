//! NBD wire constants (fixed newstyle negotiation, simple and structured
//! replies, metadata contexts) and the translation of Linux errno values
//! into NBD error values.
//!
//! All integers on the wire are big-endian.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after [`NBD_MAGIC`], and by the client
/// before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic that starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic that starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic that starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server will not send (and client need not expect) 124 zero bytes after
/// the `NBD_OPT_EXPORT_NAME` reply.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (client → server).
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client does not want the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit ends the session.
pub const CLIENT_KNOWN_FLAGS: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

/// Options (client → server).
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// Error reply types have bit 31 set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information types inside `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (per export).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is understood; only with structured replies.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// The transmission flags every shale export advertises. `CAN_MULTI_CONN`
/// holds because the `BlockDevice` contract makes a flush cover every write
/// completed before it, whichever connection sent it.
pub const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

/// The transmission flags for a connection: [`EXPORT_FLAGS`], plus
/// `SEND_DF` once structured replies are negotiated (a read is always
/// answered with one data chunk, so "don't fragment" holds anyway).
pub fn export_flags(structured: bool) -> u16 {
    if structured {
        EXPORT_FLAGS | TFLAG_SEND_DF
    } else {
        EXPORT_FLAGS
    }
}

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ: answer with at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS: answer with exactly one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error chunk types have bit 15 set.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// The one metadata context this server offers.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id `base:allocation` gets from `NBD_OPT_SET_META_CONTEXT` (any
/// value works; clients treat it as opaque).
pub const META_ALLOCATION_ID: u32 = 1;
/// `base:allocation` status flags: not allocated / reads as zeros.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// Most extents in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (64 KiB of
/// descriptors); a client asks again where the reply stopped.
pub const MAX_EXTENTS: usize = 8192;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`. Requests
/// not aligned to [`MIN_BLOCK`] are answered with `EINVAL` (clients honour
/// the advertised minimum, so no read-modify-write is done).
pub const MIN_BLOCK: u32 = 512;
/// Preferred block size: the volume's page size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest READ or WRITE payload; a WRITE announcing more closes the
/// connection, a READ asking for more gets `EINVAL`.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Longest export name or other string the protocol allows.
pub const MAX_STRING: usize = 4096;

/// NBD error values (they happen to equal Linux errno values, but the
/// protocol fixes this list; anything else must be translated).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Translate an errno (from [`crate::error::BlockError::errno`], the one
/// errno mapping) into the closest value the NBD protocol allows.
/// A read-only volume answers `EPERM`, as the protocol asks; unknown values
/// become `EIO`.
pub fn nbd_error_from_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ENOTSUP => NBD_ENOTSUP,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BlockError;

    #[test]
    fn magics_spell_their_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn block_errors_map_to_protocol_values() {
        let cases = [
            (BlockError::InvalidArgument("x".into()), NBD_EINVAL),
            (
                BlockError::OutOfRange {
                    offset: 0,
                    len: 1,
                    size: 0,
                },
                NBD_EINVAL,
            ),
            (BlockError::NoSpace, NBD_ENOSPC),
            (BlockError::ReadOnly, NBD_EPERM),
            (BlockError::Io("x".into()), NBD_EIO),
            (BlockError::Fenced("x".into()), NBD_EIO),
            (BlockError::Closed, NBD_EIO),
        ];
        for (err, want) in cases {
            assert_eq!(nbd_error_from_errno(err.errno()), want, "{err}");
        }
        assert_eq!(nbd_error_from_errno(libc::ENOTSUP), NBD_ENOTSUP);
        assert_eq!(nbd_error_from_errno(libc::ESHUTDOWN), NBD_ESHUTDOWN);
        assert_eq!(nbd_error_from_errno(libc::EBADF), NBD_EIO);
    }
}
