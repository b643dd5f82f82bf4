//! Who and where this process is, as recorded in a lease so that a server
//! restarted on the same host can tell a crashed predecessor from a live one
//! (see [`crate::catalog::lease::LocalTakeover`]).
//!
//! Invariants:
//! 1. The host identity is the machine id (`/etc/machine-id`, else
//!    `/var/lib/dbus/machine-id`, else `hostname:<name>`) plus the boot id
//!    (`/proc/sys/kernel/random/boot_id`); a reboot changes the boot id,
//!    so every process recorded under the old one is gone.
//! 2. A process is named by its pid and its start time (clock ticks after
//!    boot, field 22 of `/proc/<pid>/stat`), so a pid reused by another
//!    process is not mistaken for the one recorded.
//! 3. Every value is printable and at most [`MAX_ID_LEN`] bytes; whatever
//!    a file holds beyond that is cut or replaced, never trusted as is.

use std::path::Path;

/// Longest machine id, boot id or directory id kept.
pub const MAX_ID_LEN: usize = 64;

/// The identity of this host: machine id and boot id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub machine: String,
    pub boot: String,
}

/// Read this host's identity (see the module invariants).
pub fn this_host() -> HostIdentity {
    let machine = read_id(Path::new("/etc/machine-id"))
        .or_else(|| read_id(Path::new("/var/lib/dbus/machine-id")))
        .or_else(|| {
            read_id(Path::new("/proc/sys/kernel/hostname")).map(|h| format!("hostname:{h}"))
        })
        .unwrap_or_else(|| "unknown".to_string());
    let boot = read_id(Path::new("/proc/sys/kernel/random/boot_id"))
        .unwrap_or_else(|| "unknown".to_string());
    HostIdentity {
        machine: clean(&machine),
        boot,
    }
}

/// This process: its pid and start time.
pub fn this_process() -> (u32, u64) {
    let pid = std::process::id();
    (pid, process_start(pid).unwrap_or(0))
}

/// The start time of live process `pid` (clock ticks after boot), or
/// `None` if there is no such process (or only its zombie).
pub fn process_start(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_start(&stat)
}

/// Whether the process recorded as (`pid`, `start`) under boot `boot` is
/// still running on this host.
pub fn process_alive(boot: &str, pid: u32, start: u64) -> bool {
    if boot != this_host().boot {
        // Recorded before the last reboot: that process is gone.
        return false;
    }
    process_start(pid) == Some(start)
}

/// Field 22 (starttime) of a `/proc/<pid>/stat` line; `None` for a zombie
/// or dead process or an unparsable line. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat_start(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Field 3 is the state; starttime is field 22, i.e. 19 fields later.
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The first line of `path`, cleaned; `None` if unreadable or empty.
fn read_id(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let id = clean(text.lines().next().unwrap_or("").trim());
    (!id.is_empty()).then_some(id)
}

/// Keep printable ASCII without spaces, at most [`MAX_ID_LEN`] bytes.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_ID_LEN)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_start_time_skips_odd_command_names() {
        let line =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat_start(line), Some(987_654));
        let zombie =
            "4242 (x) Z 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat_start(zombie), None);
        assert_eq!(parse_stat_start("garbage"), None);
        assert_eq!(parse_stat_start("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_finished_child_is_not() {
        let host = this_host();
        assert!(!host.machine.is_empty() && host.machine.len() <= MAX_ID_LEN);
        let (pid, start) = this_process();
        assert!(start > 0, "our own start time is readable");
        assert!(process_alive(&host.boot, pid, start));
        assert!(!process_alive(&host.boot, pid, start + 1), "pid reused");
        assert!(!process_alive("another-boot", pid, start));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let child_pid = child.id();
        child.wait().expect("wait");
        assert_eq!(process_start(child_pid), None);
    }

    #[test]
    fn ids_are_cleaned_and_bounded() {
        assert_eq!(clean("ab c\td\u{7}é"), "abcd");
        assert_eq!(clean(&"x".repeat(500)).len(), MAX_ID_LEN);
    }
}
