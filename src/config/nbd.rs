//! The `nbd` section: where the NBD server listens, who may connect and
//! open which export, TLS, and the limits that keep clients from
//! exhausting the server.
//!
//! Defaults are the safe ones: a unix socket only (mode 0660), no TCP, and
//! finite limits. Every field is checked by [`NbdConfig::validate`]; names
//! of users and groups are resolved only when a server starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::frontend::nbd::access::{AccessError, AccessPolicy, ClientSpec, ExportRule, NameOrId};
use crate::frontend::nbd::protocol::MAX_PAYLOAD;
use crate::frontend::nbd::tls::TlsFiles;
use crate::frontend::nbd::{Cidr, Limits};

/// Default for [`NbdConfig::socket`].
pub const DEFAULT_NBD_SOCKET: &str = "/run/shale/nbd.sock";
/// The port `--listen` and `nbd.listen` use when none is given.
pub const DEFAULT_NBD_PORT: u16 = 10809;

/// NBD server settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// Unix socket the server listens on. Default `/run/shale/nbd.sock`;
    /// `null` for none (then `listen` must be set).
    pub socket: Option<PathBuf>,
    /// Permissions of the socket file, as an octal string. Default `"0660"`:
    /// the server's user and the socket's group may connect. At most 0777.
    #[serde(
        serialize_with = "serialize_mode",
        deserialize_with = "deserialize_mode"
    )]
    pub socket_mode: u32,
    /// Group (name or gid) given to the socket file and admitted on it.
    /// Default: the server's own group.
    pub socket_group: Option<String>,
    /// Further users (names or uids) admitted on the unix socket; root and
    /// the server's own user always are. Default none.
    pub allow_users: Vec<String>,
    /// Further groups (names or gids) whose members are admitted on the
    /// unix socket. Default none.
    pub allow_groups: Vec<String>,
    /// TCP address (`IP:port`) to listen on as well. Default `null`: no TCP
    /// listener. A plain (non-TLS) listener on a non-loopback address is
    /// logged as a warning at start.
    pub listen: Option<SocketAddr>,
    /// TCP clients must come from one of these networks (`10.0.0.0/8`,
    /// `::1`). Default: any address.
    pub allow_from: Vec<String>,
    /// TLS for TCP connections; when set, plaintext TCP clients are refused.
    pub tls: Option<NbdTlsConfig>,
    /// Which clients may open which exports. Default (empty): every client
    /// that may connect may open every export.
    pub access: Vec<NbdAccessRule>,
    /// Connections served at once; more are closed at once. Default 64;
    /// 1..=65536.
    pub max_connections: usize,
    /// Requests one connection may have in flight. Default 128; 1..=65536.
    pub max_requests_per_connection: usize,
    /// Request bytes (write payloads and read buffers) one connection may
    /// hold. Default 64 MiB; 32 MiB..=4 GiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub max_connection_bytes: u64,
    /// Request bytes all connections together may hold. Default 512 MiB;
    /// at least `max_connection_bytes`, at most 64 GiB.
    #[serde(with = "crate::size::serde_bytes")]
    pub max_buffered_bytes: u64,
    /// Time from connect to the end of negotiation (TLS included).
    /// Default 10000; 100..=600000.
    pub handshake_timeout_ms: u64,
    /// Time for the rest of a started request to arrive and for replies to
    /// be written. Default 30000; 100..=3600000.
    pub request_timeout_ms: u64,
    /// Close connections idle (no request in flight) this long; 0 = never.
    /// Default 0; at most 86400000.
    pub idle_timeout_ms: u64,
    /// On SIGTERM, how long connections may finish before they are dropped
    /// (then the volumes are flushed and released). Default 30000;
    /// 0..=3600000.
    pub shutdown_timeout_ms: u64,
}

/// PEM files for TLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdTlsConfig {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key (keep it mode 0600).
    pub key: PathBuf,
    /// CA certificate(s) that client certificates must be signed by.
    pub client_ca: PathBuf,
}

/// One access rule: these exports may be opened by these clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdAccessRule {
    /// Export (volume) names, or `"*"` for every export.
    pub exports: Vec<String>,
    /// `user:NAME|UID`, `group:NAME|GID` (unix socket clients),
    /// `cert:COMMON-NAME` (TLS clients), `addr:CIDR` (TCP clients).
    pub clients: Vec<String>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            socket: Some(DEFAULT_NBD_SOCKET.into()),
            socket_mode: 0o660,
            socket_group: None,
            allow_users: Vec::new(),
            allow_groups: Vec::new(),
            listen: None,
            allow_from: Vec::new(),
            tls: None,
            access: Vec::new(),
            max_connections: 64,
            max_requests_per_connection: 128,
            max_connection_bytes: 64 << 20,
            max_buffered_bytes: 512 << 20,
            handshake_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            idle_timeout_ms: 0,
            shutdown_timeout_ms: 30_000,
        }
    }
}

fn serialize_mode<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

fn deserialize_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    parse_mode(&text).map_err(serde::de::Error::custom)
}

/// An octal permission string such as `0660` or `660`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!(
            "socket_mode {text:?} must be an octal permission string such as \"0660\""
        )),
    }
}

/// A bad value: (field below `nbd.`, reason).
type Invalid = (&'static str, String);

fn range(field: &'static str, v: u64, lo: u64, hi: u64) -> Result<(), Invalid> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err((field, format!("{v} must be in {lo}..={hi}")))
    }
}

impl NbdConfig {
    /// Resolve relative paths against `base` (the config file's directory).
    pub(crate) fn resolve_paths(&mut self, resolve: impl Fn(PathBuf) -> PathBuf) {
        self.socket = self.socket.take().map(&resolve);
        if let Some(tls) = &mut self.tls {
            tls.cert = resolve(std::mem::take(&mut tls.cert));
            tls.key = resolve(std::mem::take(&mut tls.key));
            tls.client_ca = resolve(std::mem::take(&mut tls.client_ca));
        }
    }

    /// Check every bound and the syntax of every pattern.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.socket.is_none() && self.listen.is_none() {
            return Err((
                "socket",
                "no listener: set nbd.socket, nbd.listen or both".into(),
            ));
        }
        if let Some(s) = &self.socket {
            if s.as_os_str().is_empty() {
                return Err(("socket", "must not be empty (use null for none)".into()));
            }
        }
        if self.socket_mode > 0o777 {
            return Err(("socket_mode", "must be at most 0777".into()));
        }
        if let Some(addr) = self.listen {
            if addr.port() == 0 {
                return Err((
                    "listen",
                    "port 0 is not allowed: clients need a fixed port".into(),
                ));
            }
        }
        for net in &self.allow_from {
            net.parse::<Cidr>()
                .map_err(|e| ("allow_from", e.to_string()))?;
        }
        for (i, rule) in self.access.iter().enumerate() {
            if rule.exports.is_empty() || rule.clients.is_empty() {
                return Err((
                    "access",
                    format!("rule {} needs at least one export and one client", i + 1),
                ));
            }
            for c in &rule.clients {
                c.parse::<ClientSpec>()
                    .map_err(|e| ("access", format!("rule {}: {e}", i + 1)))?;
            }
        }
        range("max_connections", self.max_connections as u64, 1, 65536)?;
        range(
            "max_requests_per_connection",
            self.max_requests_per_connection as u64,
            1,
            65536,
        )?;
        range(
            "max_connection_bytes",
            self.max_connection_bytes,
            u64::from(MAX_PAYLOAD),
            4 << 30,
        )?;
        range(
            "max_buffered_bytes",
            self.max_buffered_bytes,
            self.max_connection_bytes,
            64 << 30,
        )?;
        range(
            "handshake_timeout_ms",
            self.handshake_timeout_ms,
            100,
            600_000,
        )?;
        range(
            "request_timeout_ms",
            self.request_timeout_ms,
            100,
            3_600_000,
        )?;
        range("idle_timeout_ms", self.idle_timeout_ms, 0, 86_400_000)?;
        range(
            "shutdown_timeout_ms",
            self.shutdown_timeout_ms,
            0,
            3_600_000,
        )?;
        Ok(())
    }

    /// The server limits these settings describe.
    pub fn limits(&self) -> Limits {
        let ms = Duration::from_millis;
        Limits {
            max_requests: self.max_requests_per_connection,
            max_bytes: usize::try_from(self.max_connection_bytes).unwrap_or(usize::MAX),
            max_connections: self.max_connections,
            max_buffered_bytes: usize::try_from(self.max_buffered_bytes).unwrap_or(usize::MAX),
            handshake_timeout: ms(self.handshake_timeout_ms),
            request_timeout: ms(self.request_timeout_ms),
            idle_timeout: (self.idle_timeout_ms > 0).then(|| ms(self.idle_timeout_ms)),
            shutdown_timeout: ms(self.shutdown_timeout_ms),
        }
    }

    /// The socket's group as a gid, if one is configured.
    pub fn socket_gid(&self) -> Result<Option<u32>, AccessError> {
        self.socket_group
            .as_deref()
            .map(|g| NameOrId::parse(g).gid())
            .transpose()
    }

    /// The access policy, with user and group names resolved. The socket's
    /// group (or, without one, the server's own group `own_gid`) is
    /// admitted on the unix socket, matching the socket file's mode.
    pub fn policy(&self, own_gid: u32) -> Result<AccessPolicy, AccessError> {
        let mut policy = AccessPolicy::default();
        for u in &self.allow_users {
            policy.unix_uids.insert(NameOrId::parse(u).uid()?);
        }
        for g in &self.allow_groups {
            policy.unix_gids.insert(NameOrId::parse(g).gid()?);
        }
        if self.socket_mode & 0o070 != 0 {
            policy
                .unix_gids
                .insert(self.socket_gid()?.unwrap_or(own_gid));
        }
        for net in &self.allow_from {
            policy.tcp_allow_from.push(net.parse()?);
        }
        for rule in &self.access {
            let exports = if rule.exports.iter().any(|e| e == "*") {
                None
            } else {
                Some(rule.exports.iter().cloned().collect())
            };
            let clients = rule
                .clients
                .iter()
                .map(|c| c.parse::<ClientSpec>()?.resolve())
                .collect::<Result<_, _>>()?;
            policy.rules.push(ExportRule { exports, clients });
        }
        Ok(policy)
    }

    /// The TLS files, if TLS is configured.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        self.tls.as_ref().map(|t| TlsFiles {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
        })
    }
}

/// Parse a `--listen` value: `IP:PORT`, or a bare IP for port 10809.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_NBD_PORT));
    }
    Err(format!(
        "{text:?} is not IP:PORT (for example 127.0.0.1:10809)"
    ))
}

/// Whether a plain TCP listener on `addr` is reachable only from this host.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        for bad in ["", "0999", "1777", "rw", "-1"] {
            assert!(parse_mode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_are_valid_and_private() {
        let d = NbdConfig::default();
        d.validate().unwrap();
        assert_eq!(d.listen, None, "no TCP by default");
        assert_eq!(d.socket.as_deref(), Some(Path::new(DEFAULT_NBD_SOCKET)));
        assert_eq!(d.socket_mode & 0o007, 0, "others may not connect");
        let p = d.policy(1234).unwrap();
        assert!(p.unix_gids.contains(&1234));
        assert!(p.rules.is_empty());
    }

    #[test]
    fn bounds() {
        let bad = |f: fn(&mut NbdConfig), field: &str| {
            let mut c = NbdConfig::default();
            f(&mut c);
            assert_eq!(c.validate().unwrap_err().0, field);
        };
        bad(|c| c.socket = None, "socket");
        bad(|c| c.max_connections = 0, "max_connections");
        bad(|c| c.max_connection_bytes = 1 << 20, "max_connection_bytes");
        bad(|c| c.max_buffered_bytes = 32 << 20, "max_buffered_bytes");
        bad(|c| c.handshake_timeout_ms = 1, "handshake_timeout_ms");
        bad(|c| c.allow_from = vec!["10.0.0.0/99".into()], "allow_from");
        bad(
            |c| {
                c.access = vec![NbdAccessRule {
                    exports: vec!["a".into()],
                    clients: vec!["who:me".into()],
                }]
            },
            "access",
        );
        bad(
            |c| {
                c.listen = Some("127.0.0.1:0".parse().unwrap());
            },
            "listen",
        );
    }

    #[test]
    fn listen_values() {
        assert_eq!(
            parse_listen("0.0.0.0").unwrap().to_string(),
            "0.0.0.0:10809"
        );
        assert_eq!(parse_listen("[::1]:7").unwrap().to_string(), "[::1]:7");
        assert!(parse_listen("localhost").is_err());
        assert!(is_loopback(&"127.0.0.1:1".parse().unwrap()));
        assert!(!is_loopback(&"0.0.0.0:1".parse().unwrap()));
    }
}
