//! Where `shale nbd serve` listens and whom it lets in: the unix socket
//! (mode, group, the directory it lives in), the optional TCP listener,
//! TLS, the access policy and the limits, all from the `nbd` config
//! section and the `--socket`/`--listen` flags.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use shale::config::{is_loopback, parse_listen, NbdConfig};
use shale::frontend::nbd::tls;
use shale::frontend::nbd::{Listener, NbdServer};

/// Bind the listeners: exactly those named by `--socket`/`--listen` when
/// either is given, else `nbd.socket` and `nbd.listen` from the config.
pub async fn bind(
    cfg: &NbdConfig,
    listen_flag: Option<&str>,
    socket_flag: Option<&Path>,
) -> anyhow::Result<Vec<Listener>> {
    let (socket, listen) = if listen_flag.is_some() || socket_flag.is_some() {
        let listen = listen_flag
            .map(parse_listen)
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--listen")?;
        (socket_flag.map(Path::to_path_buf), listen)
    } else {
        (cfg.socket.clone(), cfg.listen)
    };
    let mut listeners = Vec::new();
    if let Some(path) = &socket {
        listeners.push(
            bind_socket(cfg, path).with_context(|| format!("listening on {}", path.display()))?,
        );
    }
    if let Some(addr) = listen {
        if cfg.tls.is_none() && !is_loopback(&addr) {
            log::warn!(
                "plain TCP listener on {addr}: anyone who can reach it can read and write the \
                 exports; configure nbd.tls (and nbd.allow_from) or listen on a loopback address"
            );
        }
        listeners.push(
            Listener::bind_tcp(&addr.to_string())
                .await
                .with_context(|| format!("listening on {addr}"))?,
        );
    }
    if listeners.is_empty() {
        bail!("no listener configured: set nbd.socket or nbd.listen, or pass --socket/--listen");
    }
    Ok(listeners)
}

/// Bind the unix socket with the configured mode and group. A missing
/// parent directory is created private (0700), plus search permission for
/// whoever the socket's mode lets in (group: 0710, others: 0711), so that
/// the socket's own mode decides who can connect.
fn bind_socket(cfg: &NbdConfig, path: &Path) -> anyhow::Result<Listener> {
    let gid = cfg.socket_gid()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            shale::private::create_dir_all(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            let mut mode = 0o700;
            if cfg.socket_mode & 0o070 != 0 {
                mode |= 0o010;
            }
            if cfg.socket_mode & 0o007 != 0 {
                mode |= 0o001;
            }
            if let Some(gid) = gid {
                std::os::unix::fs::chown(dir, None, Some(gid))
                    .with_context(|| format!("giving {} to gid {gid}", dir.display()))?;
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", dir.display()))?;
        }
    }
    Ok(Listener::bind_unix_with(path, cfg.socket_mode, gid)?)
}

/// Apply the access policy, TLS and limits of the config to a server.
pub fn configure(server: NbdServer, cfg: &NbdConfig) -> anyhow::Result<NbdServer> {
    let own_gid = nix::unistd::getegid().as_raw();
    let policy = cfg.policy(own_gid).context("nbd access settings")?;
    let mut server = server.with_policy(policy).with_limits(cfg.limits());
    if let Some(files) = cfg.tls_files() {
        server = server.with_tls(tls::acceptor(&files).context("nbd.tls")?);
    }
    Ok(server)
}
