//! The fixed-newstyle negotiation phase: greet, read client flags, answer
//! options until the client picks an export (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`) or leaves (`NBD_OPT_ABORT`, EOF).
//!
//! Invariants:
//! 1. Every option gets exactly one final reply (ACK or an error) except
//!    `NBD_OPT_EXPORT_NAME`, which the protocol answers with the export data
//!    or by closing the connection.
//! 2. Option data is read in full before replying (at most
//!    [`MAX_OPTION_DATA`] bytes); longer data closes the connection.
//! 3. Unknown options get `NBD_REP_ERR_UNSUP`, unknown exports
//!    `NBD_REP_ERR_UNKNOWN`, malformed data `NBD_REP_ERR_INVALID`; the
//!    negotiation continues after each of them.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::*;
use super::export::{Export, ExportMap};
use super::protocol::*;
use super::ConnError;

/// Largest option data accepted (a 4096-byte name plus info requests fits
/// many times over).
pub const MAX_OPTION_DATA: u32 = 64 << 10;

/// How the negotiation ended.
#[derive(Debug)]
pub enum Negotiated {
    /// The client chose this export; transmission starts.
    Transmit(Export),
    /// The client aborted or asked for nothing more; close quietly.
    Ended,
}

/// Run the negotiation on a fresh connection.
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &ExportMap,
) -> Result<Negotiated, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting).await?;
    writer.flush().await?;

    let client_flags = reader.read_u32().await?;
    if client_flags & !CLIENT_KNOWN_FLAGS != 0 {
        return Err(ConnError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(ConnError::Protocol(
            "client does not support fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        reader.read_exact(&mut hdr).await?;
        let opt = OptionHeader::decode(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if opt.length > MAX_OPTION_DATA {
            return Err(ConnError::Protocol(format!(
                "option {} carries {} bytes, more than {MAX_OPTION_DATA}",
                opt.option, opt.length
            )));
        }
        let mut data = vec![0u8; opt.length as usize];
        reader.read_exact(&mut data).await?;
        let reply = |kind, payload: &[u8]| encode_option_reply(opt.option, kind, payload);

        match opt.option {
            OPT_EXPORT_NAME => {
                let Some(export) = exports.lookup(&data) else {
                    return Err(ConnError::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                };
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.device.size().to_be_bytes());
                out.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                writer.write_all(&out).await?;
                writer.flush().await?;
                return Ok(Negotiated::Transmit(export.clone()));
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = writer.write_all(&reply(REP_ACK, &[])).await;
                let _ = writer.flush().await;
                return Ok(Negotiated::Ended);
            }
            OPT_LIST if !data.is_empty() => {
                writer
                    .write_all(&reply(REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"))
                    .await?;
            }
            OPT_LIST => {
                let mut out = Vec::new();
                for e in exports.iter() {
                    out.extend(reply(REP_SERVER, &encode_server_entry(&e.name)));
                }
                out.extend(reply(REP_ACK, &[]));
                writer.write_all(&out).await?;
            }
            OPT_INFO | OPT_GO => match InfoRequest::decode(&data) {
                Err(e) => {
                    writer
                        .write_all(&reply(REP_ERR_INVALID, e.to_string().as_bytes()))
                        .await?;
                }
                Ok(req) => match exports.lookup(&req.name) {
                    None => {
                        let msg =
                            format!("no export named {:?}", String::from_utf8_lossy(&req.name));
                        writer
                            .write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes()))
                            .await?;
                    }
                    Some(export) => {
                        writer
                            .write_all(&describe(opt.option, export, &req.requests))
                            .await?;
                        if opt.option == OPT_GO {
                            writer.flush().await?;
                            return Ok(Negotiated::Transmit(export.clone()));
                        }
                    }
                },
            },
            OPT_STARTTLS => {
                writer
                    .write_all(&reply(REP_ERR_UNSUP, b"TLS is not supported"))
                    .await?;
            }
            OPT_STRUCTURED_REPLY => {
                writer
                    .write_all(&reply(
                        REP_ERR_UNSUP,
                        b"structured replies are not supported; simple replies only",
                    ))
                    .await?;
            }
            other => {
                let msg = format!("option {other} is not supported");
                writer
                    .write_all(&reply(REP_ERR_UNSUP, msg.as_bytes()))
                    .await?;
            }
        }
        writer.flush().await?;
    }
}

/// The `NBD_REP_INFO` replies and final ACK for `NBD_OPT_INFO`/`NBD_OPT_GO`.
/// The export and block-size information are always sent (the protocol
/// allows unrequested block sizes); name and description on request.
fn describe(option: u32, export: &Export, requested: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    let info = |payload: Vec<u8>| encode_option_reply(option, REP_INFO, &payload);
    out.extend(info(encode_info_export(export.device.size(), EXPORT_FLAGS)));
    out.extend(info(encode_info_block_size()));
    if requested.contains(&INFO_NAME) {
        out.extend(info(encode_info_string(INFO_NAME, &export.name)));
    }
    if requested.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        out.extend(info(encode_info_string(
            INFO_DESCRIPTION,
            &export.description,
        )));
    }
    out.extend(encode_option_reply(option, REP_ACK, &[]));
    out
}
