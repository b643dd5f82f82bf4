//! The fixed-newstyle negotiation phase: greet, read client flags, answer
//! options until the client picks an export (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`), asks for TLS (`NBD_OPT_STARTTLS`) or leaves
//! (`NBD_OPT_ABORT`, EOF).
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
//! 4. An export the client may not open ([`AccessPolicy::may_open`]) is
//!    answered exactly like one that does not exist, and `NBD_OPT_LIST`
//!    leaves it out.
//! 5. While TLS is required and not yet up, only `NBD_OPT_STARTTLS` and
//!    `NBD_OPT_ABORT` are served; every other option gets
//!    `NBD_REP_ERR_TLS_REQD` and `NBD_OPT_EXPORT_NAME` closes.
//! 6. Nothing is read past the `NBD_OPT_STARTTLS` request before the ACK
//!    is sent, so the TLS handshake starts on a clean stream.
//! 7. Negotiated state (structured replies, the selected metadata context)
//!    lives in one call of [`options`], so nothing chosen before STARTTLS
//!    survives it. `NBD_OPT_SET_META_CONTEXT` first clears the selection,
//!    and is refused before `NBD_OPT_STRUCTURED_REPLY`; `base:allocation`
//!    is served only if it was selected for the export finally chosen.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::access::{AccessPolicy, Peer};
use super::codec::*;
use super::export::{Export, ExportMap};
use super::meta::selects_allocation;
use super::protocol::*;
use super::ConnError;

/// Largest option data accepted (a 4096-byte name plus info requests fits
/// many times over).
pub const MAX_OPTION_DATA: u32 = 64 << 10;

/// How one round of option haggling ended.
#[derive(Debug)]
pub enum Negotiated {
    /// The client chose this export; transmission starts with these
    /// features.
    Transmit(Export, Features),
    /// The client aborted or asked for nothing more; close quietly.
    Ended,
    /// `NBD_OPT_STARTTLS` was acknowledged: the caller runs the TLS
    /// handshake and then calls [`options`] again on the TLS stream.
    StartTls,
}

/// Where TLS stands for [`options`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsState {
    /// The server has no TLS: `NBD_OPT_STARTTLS` is unsupported.
    Off,
    /// TLS is configured and required but not yet started.
    Required,
    /// The connection already runs over TLS.
    Active,
}

/// What the negotiation needs to know about the server and the client.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    pub exports: &'a ExportMap,
    pub policy: &'a AccessPolicy,
    pub peer: &'a Peer,
}

impl<'a> Gate<'a> {
    /// An export the client asked for by name and may open.
    fn lookup(&self, name: &[u8]) -> Option<&'a Export> {
        let export = self.exports.lookup(name)?;
        if self.policy.may_open(self.peer, &export.name) {
            Some(export)
        } else {
            log::info!(
                "{} asked for export {:?}, which the access rules do not give it",
                self.peer,
                export.name
            );
            None
        }
    }
}

/// Send the greeting and read the client's flags. Returns whether the
/// client asked for no zero padding after `NBD_OPT_EXPORT_NAME`.
pub async fn greet<S>(stream: &mut S) -> Result<bool, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
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
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// [`greet`] then [`options`] for a server without TLS.
pub async fn negotiate<S>(stream: &mut S, gate: Gate<'_>) -> Result<Negotiated, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greet(stream).await?;
    options(stream, gate, no_zeroes, TlsState::Off).await
}

/// Answer options until the client picks an export, leaves, or (when
/// `tls` is [`TlsState::Required`]) starts TLS.
pub async fn options<S>(
    stream: &mut S,
    gate: Gate<'_>,
    no_zeroes: bool,
    tls: TlsState,
) -> Result<Negotiated, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut structured = false;
    // The export name `base:allocation` was selected for (invariant 7).
    let mut allocation_for: Option<String> = None;
    let features = |export: &Export, structured: bool, allocation_for: &Option<String>| Features {
        structured,
        allocation: structured && allocation_for.as_deref() == Some(export.name.as_str()),
    };
    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        stream.read_exact(&mut hdr).await?;
        let opt = OptionHeader::decode(&hdr).map_err(|e| ConnError::Protocol(e.to_string()))?;
        if opt.length > MAX_OPTION_DATA {
            return Err(ConnError::Protocol(format!(
                "option {} carries {} bytes, more than {MAX_OPTION_DATA}",
                opt.option, opt.length
            )));
        }
        let mut data = vec![0u8; opt.length as usize];
        stream.read_exact(&mut data).await?;
        let reply = |kind, payload: &[u8]| encode_option_reply(opt.option, kind, payload);

        if tls == TlsState::Required && !matches!(opt.option, OPT_STARTTLS | OPT_ABORT) {
            if opt.option == OPT_EXPORT_NAME {
                return Err(ConnError::Protocol(
                    "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS on a server that requires TLS"
                        .into(),
                ));
            }
            stream
                .write_all(&reply(
                    REP_ERR_TLS_REQD,
                    b"this server requires TLS: send NBD_OPT_STARTTLS first",
                ))
                .await?;
            stream.flush().await?;
            continue;
        }

        match opt.option {
            OPT_EXPORT_NAME => {
                let Some(export) = gate.lookup(&data) else {
                    return Err(ConnError::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                };
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.device.size().to_be_bytes());
                out.extend_from_slice(&export_flags(structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&out).await?;
                stream.flush().await?;
                let features = features(export, structured, &allocation_for);
                return Ok(Negotiated::Transmit(export.clone(), features));
            }
            OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = stream.write_all(&reply(REP_ACK, &[])).await;
                let _ = stream.flush().await;
                return Ok(Negotiated::Ended);
            }
            OPT_LIST if !data.is_empty() => {
                stream
                    .write_all(&reply(REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"))
                    .await?;
            }
            OPT_LIST => {
                let mut out = Vec::new();
                for e in gate.exports.iter() {
                    if gate.policy.may_open(gate.peer, &e.name) {
                        out.extend(reply(REP_SERVER, &encode_server_entry(&e.name)));
                    }
                }
                out.extend(reply(REP_ACK, &[]));
                stream.write_all(&out).await?;
            }
            OPT_INFO | OPT_GO => match InfoRequest::decode(&data) {
                Err(e) => {
                    stream
                        .write_all(&reply(REP_ERR_INVALID, e.to_string().as_bytes()))
                        .await?;
                }
                Ok(req) => match gate.lookup(&req.name) {
                    None => {
                        let msg =
                            format!("no export named {:?}", String::from_utf8_lossy(&req.name));
                        stream
                            .write_all(&reply(REP_ERR_UNKNOWN, msg.as_bytes()))
                            .await?;
                    }
                    Some(export) => {
                        stream
                            .write_all(&describe(opt.option, export, &req.requests, structured))
                            .await?;
                        if opt.option == OPT_GO {
                            stream.flush().await?;
                            let features = features(export, structured, &allocation_for);
                            return Ok(Negotiated::Transmit(export.clone(), features));
                        }
                    }
                },
            },
            OPT_STARTTLS => {
                let (kind, msg): (u32, &[u8]) = match tls {
                    TlsState::Off => (REP_ERR_UNSUP, &b"TLS is not configured on this server"[..]),
                    TlsState::Active => (REP_ERR_INVALID, &b"TLS is already active"[..]),
                    TlsState::Required if !data.is_empty() => {
                        (REP_ERR_INVALID, &b"NBD_OPT_STARTTLS takes no data"[..])
                    }
                    TlsState::Required => {
                        stream.write_all(&reply(REP_ACK, &[])).await?;
                        stream.flush().await?;
                        return Ok(Negotiated::StartTls);
                    }
                };
                stream.write_all(&reply(kind, msg)).await?;
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                stream
                    .write_all(&reply(
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    ))
                    .await?;
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                stream.write_all(&reply(REP_ACK, &[])).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let setting = opt.option == OPT_SET_META_CONTEXT;
                if setting {
                    allocation_for = None;
                }
                let out = match meta_context(gate, structured, setting, &data) {
                    Err((kind, msg)) => reply(kind, msg.as_bytes()),
                    Ok(None) => reply(REP_ACK, &[]),
                    Ok(Some(export)) => {
                        let id = if setting { META_ALLOCATION_ID } else { 0 };
                        if setting {
                            allocation_for = Some(export.name.clone());
                        }
                        let mut out = reply(
                            REP_META_CONTEXT,
                            &encode_meta_context(id, META_BASE_ALLOCATION),
                        );
                        out.extend(reply(REP_ACK, &[]));
                        out
                    }
                };
                stream.write_all(&out).await?;
            }
            other => {
                let msg = format!("option {other} is not supported");
                stream
                    .write_all(&reply(REP_ERR_UNSUP, msg.as_bytes()))
                    .await?;
            }
        }
        stream.flush().await?;
    }
}

/// Answer `NBD_OPT_LIST_META_CONTEXT` (`setting` false) or
/// `NBD_OPT_SET_META_CONTEXT`: the export whose `base:allocation` the
/// queries list or select, `None` when they name no context, or the error
/// reply to send.
fn meta_context<'a>(
    gate: Gate<'a>,
    structured: bool,
    setting: bool,
    data: &[u8],
) -> Result<Option<&'a Export>, (u32, String)> {
    if !structured {
        return Err((
            REP_ERR_INVALID,
            "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts".into(),
        ));
    }
    let req = MetaContextRequest::decode(data).map_err(|e| (REP_ERR_INVALID, e.to_string()))?;
    let Some(export) = gate.lookup(&req.name) else {
        let name = String::from_utf8_lossy(&req.name);
        return Err((REP_ERR_UNKNOWN, format!("no export named {name:?}")));
    };
    match selects_allocation(&req.queries, !setting) {
        Err(e) => Err((REP_ERR_INVALID, e.to_string())),
        Ok(true) => Ok(Some(export)),
        Ok(false) => Ok(None),
    }
}

/// The `NBD_REP_INFO` replies and final ACK for `NBD_OPT_INFO`/`NBD_OPT_GO`.
/// The export and block-size information are always sent (the protocol
/// allows unrequested block sizes); name and description on request.
fn describe(option: u32, export: &Export, requested: &[u16], structured: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let info = |payload: Vec<u8>| encode_option_reply(option, REP_INFO, &payload);
    let flags = export_flags(structured);
    out.extend(info(encode_info_export(export.device.size(), flags)));
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
