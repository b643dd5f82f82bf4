//! Readiness reporting: to a parent `shale add` through the detached
//! server's stdout, and to systemd through `$NOTIFY_SOCKET` (sd_notify
//! protocol: one datagram of `KEY=value` lines).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

/// Line a detached server prints on stdout once its device is live.
pub const READY_PREFIX: &str = "READY ";

/// Send `msg` to systemd if this process runs under a notify-type unit.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, msg) {
        log::warn!("sd_notify to {path:?} failed: {e}");
    }
}

fn send(path: &std::ffi::OsStr, msg: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        sock.send_to(msg.as_bytes(), std::path::Path::new(path))?;
    }
    Ok(())
}

/// Tell whoever waits that device `dev_id` is live.
pub fn ready(dev_id: u32, detached: bool) {
    let dev = format!("/dev/ublkb{dev_id}");
    if detached {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{READY_PREFIX}{dev_id}");
        let _ = out.flush();
        drop(out);
        detach_stdout();
    } else {
        println!("{dev}");
    }
    sd_notify(&format!(
        "READY=1\nSTATUS=serving {dev}\nMAINPID={}",
        std::process::id()
    ));
}

/// Point stdout at /dev/null so the parent's pipe closes.
fn detach_stdout() {
    match std::fs::OpenOptions::new().write(true).open("/dev/null") {
        Ok(null) => {
            // SAFETY: dup2 onto fd 1 with a valid open descriptor; the old
            // stdout pipe is closed atomically by dup2.
            unsafe { libc::dup2(null.as_raw_fd(), 1) };
        }
        Err(e) => log::warn!("cannot open /dev/null: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
