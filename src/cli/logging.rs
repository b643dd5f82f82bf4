//! Logging of the `shale` command: `RUST_LOG` filters as usual (default
//! `warn`); every line of a server names its volume; under systemd (stderr
//! connected to the journal, as `JOURNAL_STREAM` says) lines go to the
//! journal with the volume as the field `VOLUME`.
//!
//! Which volume a line is about: the `volume` key of the record if the call
//! site gave one (`log::warn!(volume = name; "...")`), else the process's
//! volume set with [`set_volume`] (servers of one volume set it once).

use std::io::Write;
use std::sync::RwLock;

use log::{Log, Metadata, Record};

static VOLUME: RwLock<Option<String>> = RwLock::new(None);

/// Name `volume` on every later line that does not name another one.
pub fn set_volume(volume: &str) {
    if let Ok(mut v) = VOLUME.write() {
        *v = Some(volume.to_string());
    }
}

/// The volume a record is about (see the module docs).
fn volume_of(record: &Record) -> Option<String> {
    if let Some(v) = record.key_values().get(log::kv::Key::from_str("volume")) {
        return Some(v.to_string());
    }
    VOLUME.read().ok().and_then(|v| v.clone())
}

/// `volume NAME: message`, or the message alone.
fn text_of(record: &Record, volume: Option<&str>) -> String {
    match volume {
        Some(v) => format!("volume {v}: {}", record.args()),
        None => record.args().to_string(),
    }
}

enum Sink {
    Stderr,
    Journal(systemd_journal_logger::JournalLog),
}

struct Logger {
    filter: env_filter::Filter,
    sink: Sink,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        let volume = volume_of(record);
        let text = text_of(record, volume.as_deref());
        match &self.sink {
            Sink::Stderr => {
                let now = jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ");
                let line = format!("[{now} {:<5} {}] {text}\n", record.level(), record.target());
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Sink::Journal(journal) => {
                let none: [(&str, &str); 0] = [];
                let kv = volume.as_deref().map(|v| [("volume", v)]);
                let sent = journal.journal_send(
                    &Record::builder()
                        .args(format_args!("{text}"))
                        .level(record.level())
                        .target(record.target())
                        .module_path(record.module_path())
                        .file(record.file())
                        .line(record.line())
                        .key_values(match &kv {
                            Some(kv) => kv as &dyn log::kv::Source,
                            None => &none,
                        })
                        .build(),
                );
                if sent.is_err() {
                    let _ = writeln!(std::io::stderr(), "{text}");
                }
            }
        }
    }

    fn flush(&self) {}
}

/// Install the logger (once, at start-up).
pub fn init() {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_string());
    let filter = env_filter::Builder::new().parse(&spec).build();
    let sink = if systemd_journal_logger::connected_to_journal() {
        match systemd_journal_logger::JournalLog::new() {
            Ok(j) => Sink::Journal(j),
            Err(_) => Sink::Stderr,
        }
    } else {
        Sink::Stderr
    };
    log::set_max_level(filter.filter());
    let _ = log::set_boxed_logger(Box::new(Logger { filter, sink }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_record_volume_before_the_process_one() {
        let kv = [("volume", "from-record")];
        let check = |rec: &Record| {
            assert_eq!(volume_of(rec).as_deref(), Some("from-record"));
            assert_eq!(text_of(rec, Some("v1")), "volume v1: hello");
        };
        check(
            &Record::builder()
                .args(format_args!("hello"))
                .key_values(&kv)
                .build(),
        );
        let plain = |rec: &Record| {
            assert_eq!(text_of(rec, None), "x");
            set_volume("proc");
            assert_eq!(volume_of(rec).as_deref(), Some("proc"));
        };
        plain(&Record::builder().args(format_args!("x")).build());
        check(
            &Record::builder()
                .args(format_args!("hello"))
                .key_values(&kv)
                .build(),
        );
    }
}
