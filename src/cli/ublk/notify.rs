//! Readiness reporting: to a parent `shale add` through the detached
//! server's stdout, and to systemd through `$NOTIFY_SOCKET` (the
//! `sd-notify` crate speaks the protocol).

use std::io::Write;
use std::os::fd::AsRawFd;

use sd_notify::NotifyState;

/// Line a detached server prints on stdout once its device is live.
pub const READY_PREFIX: &str = "READY ";

/// Tell systemd `states` if this process runs under a notify-type unit.
pub fn sd_notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("sd_notify failed: {e}");
    }
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
    let status = format!("serving {dev}");
    sd_notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status),
        NotifyState::MainPid(std::process::id()),
    ]);
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
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn readiness_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        // No other test of this binary reads NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        sd_notify(&[NotifyState::Ready, NotifyState::Status("serving x")]);
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving x\n");
    }
}
