//! The ledger: one text line per event, `CC <event> #<crc32c>`.
//!
//! The writer prints these lines (on a VM's serial console, or into a file)
//! and the checker reads them back from wherever they survived. Lines may
//! come with other text before them (a console log), and a line damaged on
//! the way fails its checksum and is skipped: a lost FLUSHED line only makes
//! the check weaker, never wrong, because the plan of generations is known
//! from the seed alone (see `stamp`).

use std::fmt;

use anyhow::{bail, Context, Result};

/// One event of a test run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The run: its seed, number of blocks and block size.
    Run {
        seed: u64,
        blocks: u64,
        block_size: usize,
    },
    /// Generations `from..=to` may be written (announced by the harness
    /// before the writer runs, so the plan survives a lost writer line).
    /// It takes effect at the next `WRITER` or `CUT`, so a scan between
    /// the announcement and the writer does not count on it.
    Plan { from: u64, to: u64 },
    /// The crash (power cut, kill) ended the boot or run: a pending plan
    /// may have been written.
    Cut,
    /// A writer starts; it writes `from..=to` in order, one at a time.
    Writer { from: u64, to: u64 },
    /// Every generation of the current writer up to `gen` is acknowledged.
    Acked { gen: u64 },
    /// A FLUSH completed after the current writer's generation `gen` was
    /// acknowledged (and every earlier one).
    Flushed { gen: u64 },
    /// The writer stopped on an error after generation `last` (0: none).
    Broken { last: u64 },
    /// Observed generations of blocks `first..` (0 = zeros, `None` = damaged).
    Scan { first: u64, gens: Vec<Option<u64>> },
    /// Block `block` is damaged: why.
    Bad { block: u64, why: String },
    /// The scan of all `blocks` blocks is complete.
    Scanned { blocks: u64 },
    /// After the scan a FLUSH completed: what was read is now durable.
    ScanFlushed,
    /// Free text for people (cycle names, power cuts).
    Note(String),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Run {
                seed,
                blocks,
                block_size,
            } => write!(f, "RUN {seed} {blocks} {block_size}"),
            Event::Plan { from, to } => write!(f, "PLAN {from} {to}"),
            Event::Cut => write!(f, "CUT"),
            Event::Writer { from, to } => write!(f, "WRITER {from} {to}"),
            Event::Acked { gen } => write!(f, "ACKED {gen}"),
            Event::Flushed { gen } => write!(f, "FLUSHED {gen}"),
            Event::Broken { last } => write!(f, "BROKEN {last}"),
            Event::Scan { first, gens } => {
                write!(f, "SCAN {first}")?;
                for g in gens {
                    match g {
                        Some(g) => write!(f, " {g}")?,
                        None => write!(f, " x")?,
                    }
                }
                Ok(())
            }
            Event::Bad { block, why } => write!(f, "BAD {block} {why}"),
            Event::Scanned { blocks } => write!(f, "SCANNED {blocks}"),
            Event::ScanFlushed => write!(f, "SCAN-FLUSHED"),
            Event::Note(text) => write!(f, "NOTE {text}"),
        }
    }
}

fn num(word: Option<&str>, what: &str) -> Result<u64> {
    let w = word.with_context(|| format!("missing {what}"))?;
    w.parse()
        .with_context(|| format!("{what} {w:?} is not a number"))
}

impl Event {
    /// Parse an event body (the text between `CC ` and ` #crc`).
    pub fn parse(body: &str) -> Result<Event> {
        let mut words = body.split(' ');
        let kind = words.next().unwrap_or("");
        let event = match kind {
            "RUN" => Event::Run {
                seed: num(words.next(), "seed")?,
                blocks: num(words.next(), "blocks")?,
                block_size: usize::try_from(num(words.next(), "block size")?)?,
            },
            "PLAN" => Event::Plan {
                from: num(words.next(), "from")?,
                to: num(words.next(), "to")?,
            },
            "CUT" => Event::Cut,
            "WRITER" => Event::Writer {
                from: num(words.next(), "from")?,
                to: num(words.next(), "to")?,
            },
            "ACKED" => Event::Acked {
                gen: num(words.next(), "generation")?,
            },
            "FLUSHED" => Event::Flushed {
                gen: num(words.next(), "generation")?,
            },
            "BROKEN" => Event::Broken {
                last: num(words.next(), "generation")?,
            },
            "SCAN" => {
                let first = num(words.next(), "first block")?;
                let gens = words
                    .by_ref()
                    .map(|w| match w {
                        "x" => Ok(None),
                        w => num(Some(w), "generation").map(Some),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Event::Scan { first, gens }
            }
            "BAD" => Event::Bad {
                block: num(words.next(), "block")?,
                why: words.by_ref().collect::<Vec<_>>().join(" "),
            },
            "SCANNED" => Event::Scanned {
                blocks: num(words.next(), "blocks")?,
            },
            "SCAN-FLUSHED" => Event::ScanFlushed,
            "NOTE" => Event::Note(words.by_ref().collect::<Vec<_>>().join(" ")),
            other => bail!("unknown event {other:?}"),
        };
        if words.next().is_some() {
            bail!("trailing words in {body:?}");
        }
        Ok(event)
    }

    /// The ledger line for this event (no newline).
    pub fn line(&self) -> String {
        let body = self.to_string();
        format!("CC {body} #{:08x}", crc32c::crc32c(body.as_bytes()))
    }
}

/// What reading a ledger gave: the events in order and how many lines
/// looked like ledger lines but were damaged.
#[derive(Debug, Default)]
pub struct Read {
    pub events: Vec<Event>,
    pub damaged: Vec<String>,
}

/// Pull the events out of `text` (a ledger file or a console log).
pub fn read(text: &str) -> Read {
    let mut out = Read::default();
    for line in text.lines() {
        let Some(at) = line.find("CC ") else {
            continue;
        };
        let rest = line[at + 3..].trim_end_matches('\r');
        let parsed = rest.rsplit_once(" #").and_then(|(body, crc)| {
            let ok = u32::from_str_radix(crc, 16).ok() == Some(crc32c::crc32c(body.as_bytes()));
            ok.then(|| Event::parse(body).ok()).flatten()
        });
        match parsed {
            Some(e) => out.events.push(e),
            None => out.damaged.push(line.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_damage_is_skipped() {
        let events = vec![
            Event::Run {
                seed: 5,
                blocks: 64,
                block_size: 4096,
            },
            Event::Plan { from: 1, to: 100 },
            Event::Cut,
            Event::Writer { from: 1, to: 50 },
            Event::Flushed { gen: 7 },
            Event::Scan {
                first: 0,
                gens: vec![Some(0), None, Some(12)],
            },
            Event::Bad {
                block: 1,
                why: "checksum mismatch".into(),
            },
            Event::Scanned { blocks: 3 },
            Event::ScanFlushed,
            Event::Note("cycle 1 ublk-crash".into()),
        ];
        let mut text = String::from("[    1.0] kernel noise\n");
        for e in &events {
            text.push_str("guest: ");
            text.push_str(&e.line());
            text.push('\n');
        }
        text.push_str(&Event::Flushed { gen: 9 }.line().replace('9', "8"));
        text.push('\n');
        let r = read(&text);
        assert_eq!(r.events, events);
        assert_eq!(r.damaged.len(), 1);
    }
}
