//! Who may connect and which exports each client may open.
//!
//! Two gates, both decided from facts the kernel or TLS established, never
//! from what the client says:
//! 1. The listener gate, before the greeting: a unix-socket peer's
//!    credentials (`SO_PEERCRED`) must belong to root, to the server's own
//!    user, or to an allowed user or group; a TCP peer's address must be in
//!    the allow-list when one is configured. A refused connection is closed
//!    without a byte sent.
//! 2. The export gate, during negotiation: with no rules every admitted
//!    client may open every export; with rules, a client may open an export
//!    only when some rule names the export (or `*`) and matches the client.
//!    `NBD_OPT_LIST` shows only the exports the client may open, and asking
//!    for any other export is answered exactly like asking for one that
//!    does not exist.
//!
//! Everything here is pure (identities are numbers and addresses already
//! resolved), so it is tested without sockets.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// What the server knows about a connected client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A unix-socket peer with its credentials and group memberships
    /// (primary and supplementary).
    Unix { uid: u32, groups: BTreeSet<u32> },
    /// A TCP peer; `cert_name` is the common name of its verified client
    /// certificate when the connection uses TLS.
    Tcp {
        addr: IpAddr,
        cert_name: Option<String>,
    },
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Unix { uid, .. } => write!(f, "unix uid {uid}"),
            Peer::Tcp {
                addr,
                cert_name: Some(cn),
            } => write!(f, "{addr} (certificate {cn:?})"),
            Peer::Tcp { addr, .. } => write!(f, "{addr}"),
        }
    }
}

/// An IP network such as `10.0.0.0/8` or `::1/128`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// A malformed access setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AccessError(pub String);

impl FromStr for Cidr {
    type Err = AccessError;

    /// `ADDR/PREFIX`, or a bare address meaning that one address.
    fn from_str(s: &str) -> Result<Cidr, AccessError> {
        let bad = |why: &str| AccessError(format!("{s:?} is not an IP network: {why}"));
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad("bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad(&format!("prefix must be 0..={max}")))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` is inside this network. An IPv4-mapped IPv6 address
    /// (`::ffff:a.b.c.d`) is compared as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rest = bits % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

/// One client pattern of an export rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMatch {
    /// A unix peer with this uid.
    Uid(u32),
    /// A unix peer in this group (primary or supplementary).
    Gid(u32),
    /// A TLS client whose certificate's common name is exactly this.
    CertName(String),
    /// A TCP client whose address is in this network.
    Addr(Cidr),
}

impl ClientMatch {
    fn matches(&self, peer: &Peer) -> bool {
        match (self, peer) {
            (ClientMatch::Uid(u), Peer::Unix { uid, .. }) => u == uid,
            (ClientMatch::Gid(g), Peer::Unix { groups, .. }) => groups.contains(g),
            (
                ClientMatch::CertName(want),
                Peer::Tcp {
                    cert_name: Some(cn),
                    ..
                },
            ) => want == cn,
            (ClientMatch::Addr(net), Peer::Tcp { addr, .. }) => net.contains(*addr),
            _ => false,
        }
    }
}

/// Exports (by name, or every export for `*`) and the clients that may
/// open them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRule {
    /// `None` means every export.
    pub exports: Option<BTreeSet<String>>,
    pub clients: Vec<ClientMatch>,
}

/// The listener and export gates of one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Unix peers with these uids are admitted (root and the server's own
    /// uid always are).
    pub unix_uids: BTreeSet<u32>,
    /// Unix peers in any of these groups are admitted.
    pub unix_gids: BTreeSet<u32>,
    /// TCP peers must be in one of these networks; empty admits any address.
    pub tcp_allow_from: Vec<Cidr>,
    /// Export rules; empty lets every admitted client open every export.
    pub rules: Vec<ExportRule>,
}

impl AccessPolicy {
    /// The listener gate. `server_uid` is the uid the server runs as.
    pub fn admits(&self, peer: &Peer, server_uid: u32) -> bool {
        match peer {
            Peer::Unix { uid, groups } => {
                *uid == 0
                    || *uid == server_uid
                    || self.unix_uids.contains(uid)
                    || groups.iter().any(|g| self.unix_gids.contains(g))
            }
            Peer::Tcp { addr, .. } => {
                self.tcp_allow_from.is_empty()
                    || self.tcp_allow_from.iter().any(|n| n.contains(*addr))
            }
        }
    }

    /// The export gate.
    pub fn may_open(&self, peer: &Peer, export: &str) -> bool {
        self.rules.is_empty()
            || self.rules.iter().any(|r| {
                r.exports.as_ref().is_none_or(|set| set.contains(export))
                    && r.clients.iter().any(|c| c.matches(peer))
            })
    }
}

/// A user or group as written in the configuration: a name or a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameOrId {
    Id(u32),
    Name(String),
}

impl NameOrId {
    /// A number if it parses as one, else a name.
    pub fn parse(s: &str) -> NameOrId {
        match s.parse() {
            Ok(id) => NameOrId::Id(id),
            Err(_) => NameOrId::Name(s.to_string()),
        }
    }

    /// The uid of a user name or number.
    pub fn uid(&self) -> Result<u32, AccessError> {
        match self {
            NameOrId::Id(id) => Ok(*id),
            NameOrId::Name(n) => match nix::unistd::User::from_name(n) {
                Ok(Some(u)) => Ok(u.uid.as_raw()),
                Ok(None) => Err(AccessError(format!("no user named {n:?}"))),
                Err(e) => Err(AccessError(format!("looking up user {n:?}: {e}"))),
            },
        }
    }

    /// The gid of a group name or number.
    pub fn gid(&self) -> Result<u32, AccessError> {
        match self {
            NameOrId::Id(id) => Ok(*id),
            NameOrId::Name(n) => match nix::unistd::Group::from_name(n) {
                Ok(Some(g)) => Ok(g.gid.as_raw()),
                Ok(None) => Err(AccessError(format!("no group named {n:?}"))),
                Err(e) => Err(AccessError(format!("looking up group {n:?}: {e}"))),
            },
        }
    }
}

/// A client pattern as written in the configuration:
/// `user:NAME|UID`, `group:NAME|GID`, `cert:COMMON-NAME` or `addr:CIDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientSpec {
    User(NameOrId),
    Group(NameOrId),
    Cert(String),
    Addr(Cidr),
}

impl FromStr for ClientSpec {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<ClientSpec, AccessError> {
        let bad = || {
            AccessError(format!(
                "{s:?}: expected user:NAME, group:NAME, cert:COMMON-NAME or addr:CIDR"
            ))
        };
        let (kind, value) = s.split_once(':').ok_or_else(bad)?;
        if value.is_empty() {
            return Err(bad());
        }
        Ok(match kind {
            "user" => ClientSpec::User(NameOrId::parse(value)),
            "group" => ClientSpec::Group(NameOrId::parse(value)),
            "cert" => ClientSpec::Cert(value.to_string()),
            "addr" => ClientSpec::Addr(value.parse()?),
            _ => return Err(bad()),
        })
    }
}

impl ClientSpec {
    /// Resolve names to numbers (a name that does not exist is an error).
    pub fn resolve(&self) -> Result<ClientMatch, AccessError> {
        Ok(match self {
            ClientSpec::User(u) => ClientMatch::Uid(u.uid()?),
            ClientSpec::Group(g) => ClientMatch::Gid(g.gid()?),
            ClientSpec::Cert(cn) => ClientMatch::CertName(cn.clone()),
            ClientSpec::Addr(net) => ClientMatch::Addr(*net),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(uid: u32, groups: &[u32]) -> Peer {
        Peer::Unix {
            uid,
            groups: groups.iter().copied().collect(),
        }
    }

    fn tcp(addr: &str, cn: Option<&str>) -> Peer {
        Peer::Tcp {
            addr: addr.parse().unwrap(),
            cert_name: cn.map(String::from),
        }
    }

    #[test]
    fn cidr_parsing_and_matching() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let odd: Cidr = "192.168.3.128/25".parse().unwrap();
        assert!(odd.contains("192.168.3.200".parse().unwrap()));
        assert!(!odd.contains("192.168.3.127".parse().unwrap()));
        let one: Cidr = "::1".parse().unwrap();
        assert_eq!(one.to_string(), "::1/128");
        assert!(one.contains("::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "x/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_specs() {
        assert_eq!(
            "user:0".parse::<ClientSpec>().unwrap().resolve().unwrap(),
            ClientMatch::Uid(0)
        );
        assert_eq!(
            "user:root"
                .parse::<ClientSpec>()
                .unwrap()
                .resolve()
                .unwrap(),
            ClientMatch::Uid(0)
        );
        assert_eq!(
            "group:root"
                .parse::<ClientSpec>()
                .unwrap()
                .resolve()
                .unwrap(),
            ClientMatch::Gid(0)
        );
        assert_eq!(
            "cert:a:b".parse::<ClientSpec>().unwrap(),
            ClientSpec::Cert("a:b".into())
        );
        assert!(matches!(
            "addr:10.0.0.0/8".parse::<ClientSpec>().unwrap(),
            ClientSpec::Addr(_)
        ));
        for bad in ["", "user", "user:", "host:x", "addr:10.0.0.0/40"] {
            assert!(bad.parse::<ClientSpec>().is_err(), "{bad:?}");
        }
        let ghost = "user:no-such-user-here".parse::<ClientSpec>().unwrap();
        assert!(ghost.resolve().unwrap_err().0.contains("no user named"));
    }

    #[test]
    fn listener_gate() {
        let policy = AccessPolicy {
            unix_uids: [1000].into(),
            unix_gids: [50].into(),
            tcp_allow_from: vec!["127.0.0.0/8".parse().unwrap()],
            rules: vec![],
        };
        assert!(policy.admits(&unix(0, &[0]), 999));
        assert!(policy.admits(&unix(999, &[999]), 999));
        assert!(policy.admits(&unix(1000, &[1000]), 999));
        assert!(policy.admits(&unix(1001, &[1001, 50]), 999));
        assert!(!policy.admits(&unix(65534, &[65534]), 999));
        assert!(policy.admits(&tcp("127.0.0.2", None), 999));
        assert!(!policy.admits(&tcp("10.0.0.1", None), 999));
        assert!(AccessPolicy::default().admits(&tcp("10.0.0.1", None), 999));
    }

    #[test]
    fn export_gate() {
        let open = AccessPolicy::default();
        assert!(open.may_open(&unix(5, &[]), "anything"));
        let policy = AccessPolicy {
            rules: vec![
                ExportRule {
                    exports: Some(["db".to_string()].into()),
                    clients: vec![
                        ClientMatch::Uid(1000),
                        ClientMatch::CertName("host-a".into()),
                    ],
                },
                ExportRule {
                    exports: None,
                    clients: vec![
                        ClientMatch::Gid(0),
                        ClientMatch::Addr("10.9.0.0/16".parse().unwrap()),
                    ],
                },
            ],
            ..AccessPolicy::default()
        };
        assert!(policy.may_open(&unix(1000, &[1000]), "db"));
        assert!(!policy.may_open(&unix(1000, &[1000]), "web"));
        assert!(policy.may_open(&unix(7, &[0]), "web"));
        assert!(policy.may_open(&tcp("127.0.0.1", Some("host-a")), "db"));
        assert!(!policy.may_open(&tcp("127.0.0.1", Some("host-b")), "db"));
        assert!(!policy.may_open(&tcp("127.0.0.1", None), "db"));
        assert!(policy.may_open(&tcp("10.9.1.1", None), "web"));
        // A uid rule never matches a TCP client, nor a name rule a unix one.
        assert!(!policy.may_open(&tcp("127.0.0.1", Some("1000")), "db"));
    }
}
