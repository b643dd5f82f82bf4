//! Checking scans against the ledger.
//!
//! The model keeps, for each block, its *floor* (the newest generation
//! that must have survived: written before an acknowledged FLUSH, or read
//! back by a scan that was then flushed; 0 = zeros) and the generations
//! newer than the floor that may be there (planned for it, maybe written).
//!
//! A scanned block passes when it holds its floor or one of those newer
//! generations. It fails when it is damaged (torn, garbage, misdirected),
//! older than its floor (a flushed write was lost), or a generation never
//! planned for it (data from nowhere, or resurrected after it was lost).
//!
//! Rules:
//! 1. Generations only grow through a run; plans are announced before
//!    anything is written, so every generation on disk was planned.
//! 2. A writer writes its range in order, one request at a time, so
//!    `FLUSHED g` covers every generation of that writer up to `g`, and
//!    also every generation earlier writers of the same boot had
//!    acknowledged (`ACKED`, or the writer's end).
//! 3. With `durable_on_ack` (process crashes only: the host keeps its page
//!    cache) an acknowledgement alone raises the floor.

use crate::ledger::Event;
use crate::stamp::block_of;

/// One failed block of a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub block: u64,
    pub found: String,
    pub floor: u64,
    pub newer: Vec<u64>,
    pub what: &'static str,
}

/// A scan whose blocks did not all pass.
#[derive(Debug, Clone)]
pub struct Failure {
    /// 1-based number of the scan in the ledger.
    pub scan: usize,
    /// The last note before the scan (which cycle it checks).
    pub context: String,
    pub violations: Vec<Violation>,
}

/// What a ledger amounted to.
#[derive(Debug, Default)]
pub struct Outcome {
    pub scans: usize,
    pub failure: Option<Failure>,
    /// Problems with the ledger itself (a harness bug, not a data error).
    pub ledger_errors: Vec<String>,
    pub writes_planned: u64,
    pub flushes: u64,
}

/// A writer's range and how far it got.
#[derive(Debug, Clone, Copy)]
struct Writer {
    start: u64,
    end: u64,
    /// Highest acknowledged generation (`start - 1`: none yet).
    acked: u64,
    /// Highest generation whose floor was raised.
    floored: u64,
}

struct Model {
    seed: u64,
    blocks: u64,
    floor: Vec<u64>,
    /// Per block: planned generations newer than the floor, ascending.
    newer: Vec<Vec<u64>>,
    planned_upto: u64,
    /// Announced plans not in effect yet (until a writer starts or a cut).
    announced: Vec<(u64, u64)>,
    /// The running writer.
    writer: Option<Writer>,
    /// Acknowledged, not yet floored ranges of earlier writers.
    pending: Vec<(u64, u64)>,
    durable_on_ack: bool,
    /// Observations of the scan in progress.
    seen: Vec<Option<u64>>,
    bad: Vec<(u64, String)>,
    note: String,
}

impl Model {
    fn new(seed: u64, blocks: u64, durable_on_ack: bool) -> Model {
        Model {
            seed,
            blocks,
            floor: vec![0; blocks as usize],
            newer: vec![Vec::new(); blocks as usize],
            planned_upto: 0,
            announced: Vec::new(),
            writer: None,
            pending: Vec::new(),
            durable_on_ack,
            seen: Vec::new(),
            bad: Vec::new(),
            note: String::new(),
        }
    }

    fn plan(&mut self, from: u64, to: u64, out: &mut Outcome) {
        if from == 0 || to < from {
            out.ledger_errors
                .push(format!("plan {from}..={to} is empty or starts at 0"));
            return;
        }
        if to <= self.planned_upto {
            return;
        }
        let start = from.max(self.planned_upto + 1);
        for g in start..=to {
            let b = block_of(self.seed, g, self.blocks) as usize;
            self.newer[b].push(g);
        }
        out.writes_planned += to - start + 1;
        self.planned_upto = to;
    }

    fn apply_announced(&mut self, out: &mut Outcome) {
        for (from, to) in std::mem::take(&mut self.announced) {
            self.plan(from, to, out);
        }
    }

    /// Raise floors for every generation in `from..=to`.
    fn floor_range(&mut self, from: u64, to: u64) {
        for g in from..=to {
            let b = block_of(self.seed, g, self.blocks) as usize;
            if g > self.floor[b] {
                self.floor[b] = g;
                self.newer[b].retain(|&n| n > g);
            }
        }
    }

    /// A writer starts; what the previous one acknowledged stays pending.
    fn start_writer(&mut self, start: u64, end: u64) {
        self.end_writer();
        self.writer = Some(Writer {
            start,
            end,
            acked: start - 1,
            floored: start - 1,
        });
    }

    fn end_writer(&mut self) {
        if let Some(w) = self.writer.take() {
            if w.acked > w.floored {
                self.pending.push((w.floored + 1, w.acked));
            }
        }
    }

    fn ack(&mut self, gen: u64, flushed: bool, out: &mut Outcome) {
        let Some(w) = self.writer.as_mut() else {
            out.ledger_errors
                .push(format!("acknowledgement of {gen} with no writer running"));
            return;
        };
        if gen < w.start || gen > w.end {
            out.ledger_errors.push(format!(
                "generation {gen} is outside the writer's {}..={}",
                w.start, w.end
            ));
            return;
        }
        w.acked = w.acked.max(gen);
        if flushed || self.durable_on_ack {
            let w = *w;
            for (f, t) in std::mem::take(&mut self.pending) {
                self.floor_range(f, t);
            }
            if w.acked > w.floored {
                self.floor_range(w.floored + 1, w.acked);
            }
            if let Some(cur) = self.writer.as_mut() {
                cur.floored = w.acked;
            }
        }
    }

    fn scan_end(&mut self, scans: usize) -> Option<Failure> {
        let mut violations = Vec::new();
        let seen = std::mem::take(&mut self.seen);
        let bad = std::mem::take(&mut self.bad);
        for b in 0..self.blocks as usize {
            let floor = self.floor[b];
            let newer = &self.newer[b];
            let v = |found: String, what| Violation {
                block: b as u64,
                found,
                floor,
                newer: newer.iter().copied().take(8).collect(),
                what,
            };
            match seen.get(b).copied().flatten() {
                None => {
                    let why = bad
                        .iter()
                        .find(|(blk, _)| *blk == b as u64)
                        .map_or("damaged", |(_, w)| w.as_str());
                    violations.push(v(format!("damaged: {why}"), "damaged block"));
                }
                Some(g) if g == floor || newer.binary_search(&g).is_ok() => {}
                Some(g) if g < floor => {
                    let found = if g == 0 {
                        "zeros (never written)".to_string()
                    } else {
                        format!("generation {g}")
                    };
                    violations.push(v(found, "older than its last flushed generation"));
                }
                Some(g) => violations.push(v(
                    format!("generation {g}"),
                    "a generation never written to this block",
                )),
            }
        }
        self.seen = seen;
        (!violations.is_empty()).then(|| Failure {
            scan: scans,
            context: self.note.clone(),
            violations,
        })
    }

    /// What was read is durable now: it is the new floor of every block.
    fn scan_flushed(&mut self) {
        for b in 0..self.blocks as usize {
            if let Some(Some(g)) = self.seen.get(b) {
                self.floor[b] = *g;
                self.newer[b].clear();
            }
        }
        self.seen.clear();
        self.pending.clear();
        self.writer = None;
    }
}

/// Check every scan in `events`; stops at the first failed scan.
pub fn verify(events: &[Event], durable_on_ack: bool) -> Outcome {
    let mut out = Outcome::default();
    let mut model: Option<Model> = None;
    for event in events {
        if let Event::Run {
            seed,
            blocks,
            block_size: _,
        } = event
        {
            match &model {
                None if *blocks > 0 => model = Some(Model::new(*seed, *blocks, durable_on_ack)),
                None => out.ledger_errors.push("run with 0 blocks".into()),
                Some(m) if m.seed == *seed && m.blocks == *blocks => {}
                Some(_) => out
                    .ledger_errors
                    .push("a second, different RUN line".into()),
            }
            continue;
        }
        let Some(m) = model.as_mut() else {
            out.ledger_errors
                .push(format!("event before the RUN line: {event}"));
            continue;
        };
        match event {
            Event::Run { .. } => {}
            Event::Plan { from, to } => m.announced.push((*from, *to)),
            Event::Cut => m.apply_announced(&mut out),
            Event::Writer { from, to } => {
                m.apply_announced(&mut out);
                if *from <= m.planned_upto && *to > m.planned_upto {
                    out.ledger_errors
                        .push(format!("writer {from}..={to} overlaps the plan's end"));
                }
                if *from == 0 || to < from {
                    out.ledger_errors
                        .push(format!("writer {from}..={to} is empty or starts at 0"));
                    continue;
                }
                m.plan(*from, *to, &mut out);
                m.start_writer(*from, *to);
            }
            Event::Acked { gen } => m.ack(*gen, false, &mut out),
            Event::Flushed { gen } => {
                out.flushes += 1;
                m.ack(*gen, true, &mut out)
            }
            Event::Broken { .. } => m.end_writer(),
            Event::Scan { first, gens } => {
                let end = first + gens.len() as u64;
                if end > m.blocks {
                    out.ledger_errors
                        .push(format!("scan line past block {}", m.blocks));
                    continue;
                }
                if m.seen.len() < end as usize {
                    m.seen.resize(end as usize, None);
                }
                for (i, g) in gens.iter().enumerate() {
                    m.seen[*first as usize + i] = *g;
                }
            }
            Event::Bad { block, why } => m.bad.push((*block, why.clone())),
            Event::Scanned { blocks } => {
                out.scans += 1;
                if *blocks != m.blocks || m.seen.len() != m.blocks as usize {
                    out.ledger_errors.push(format!(
                        "scan {} is incomplete ({} of {} blocks)",
                        out.scans,
                        m.seen.len(),
                        m.blocks
                    ));
                    m.seen.clear();
                    m.bad.clear();
                    continue;
                }
                if let Some(f) = m.scan_end(out.scans) {
                    out.failure = Some(f);
                    return out;
                }
            }
            Event::ScanFlushed => m.scan_flushed(),
            Event::Note(text) => m.note = text.clone(),
        }
    }
    out
}

/// A report of `f` for people: one line per lost block (up to `max`).
pub fn describe(f: &Failure, max: usize) -> String {
    let mut s = format!(
        "scan {} ({}): {} block(s) failed\n",
        f.scan,
        if f.context.is_empty() {
            "no note"
        } else {
            &f.context
        },
        f.violations.len()
    );
    for v in f.violations.iter().take(max) {
        let newer = if v.newer.is_empty() {
            "none".to_string()
        } else {
            v.newer
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        s.push_str(&format!(
            "  block {}: {} — found {}; expected generation {} (last flushed) or a later one written after it ({})\n",
            v.block, v.what, v.found, v.floor, newer
        ));
    }
    if f.violations.len() > max {
        s.push_str(&format!("  ... and {} more\n", f.violations.len() - max));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(blocks: u64) -> Event {
        Event::Run {
            seed: 11,
            blocks,
            block_size: 4096,
        }
    }

    /// Observations that show `gens` as the latest generation of each block.
    fn scan_of(blocks: u64, upto: u64) -> Vec<Event> {
        let mut gens = vec![Some(0); blocks as usize];
        for g in 1..=upto {
            gens[block_of(11, g, blocks) as usize] = Some(g);
        }
        vec![Event::Scan { first: 0, gens }, Event::Scanned { blocks }]
    }

    #[test]
    fn flushed_writes_must_survive() {
        let mut ev = vec![
            run(8),
            Event::Plan { from: 1, to: 40 },
            Event::Writer { from: 1, to: 40 },
            Event::Flushed { gen: 20 },
        ];
        // Everything up to 30 present: passes.
        let mut ok = ev.clone();
        ok.extend(scan_of(8, 30));
        let out = verify(&ok, false);
        assert!(
            out.failure.is_none() && out.ledger_errors.is_empty(),
            "{out:?}"
        );
        assert_eq!(out.scans, 1);
        // Only up to 10 present: writes 11..=20 were flushed and are lost.
        ev.extend(scan_of(8, 10));
        let out = verify(&ev, false);
        let f = out.failure.expect("lost flushed writes must fail");
        assert!(f
            .violations
            .iter()
            .all(|v| v.what == "older than its last flushed generation"));
    }

    #[test]
    fn earlier_acked_writer_is_covered_by_a_later_flush() {
        // The scenario: 10 writes, no flush; then a second writer
        // whose flush covers the first one's writes too.
        let mut ev = vec![
            run(4),
            Event::Plan { from: 1, to: 20 },
            Event::Writer { from: 1, to: 10 },
            Event::Acked { gen: 10 },
            Event::Writer { from: 11, to: 20 },
            Event::Flushed { gen: 11 },
        ];
        ev.extend(scan_of(4, 0));
        let f = verify(&ev, false).failure.expect("all zeros must fail");
        assert!(!f.violations.is_empty());
    }

    #[test]
    fn unplanned_and_damaged_blocks_fail() {
        let mut ev = vec![run(2), Event::Plan { from: 1, to: 4 }, Event::Cut];
        let mut gens = vec![Some(0), Some(0)];
        // A generation never planned for block 0.
        gens[0] = Some(999);
        gens[1] = None;
        ev.push(Event::Scan { first: 0, gens });
        ev.push(Event::Bad {
            block: 1,
            why: "checksum mismatch".into(),
        });
        ev.push(Event::Scanned { blocks: 2 });
        let f = verify(&ev, false).failure.unwrap();
        assert_eq!(f.violations.len(), 2);
        assert!(f.violations[1].found.contains("checksum"));
    }

    #[test]
    fn scan_flush_sets_the_floor_and_forgets_lost_generations() {
        let mut ev = vec![
            run(1),
            Event::Plan { from: 1, to: 3 },
            Event::Writer { from: 1, to: 3 },
            Event::Flushed { gen: 1 },
        ];
        // Block holds 1 (2 and 3 lost: never flushed, fine), then flushed.
        ev.push(Event::Scan {
            first: 0,
            gens: vec![Some(1)],
        });
        ev.push(Event::Scanned { blocks: 1 });
        ev.push(Event::ScanFlushed);
        // Generation 3 reappearing later is resurrected data.
        ev.push(Event::Scan {
            first: 0,
            gens: vec![Some(3)],
        });
        ev.push(Event::Scanned { blocks: 1 });
        let out = verify(&ev, false);
        assert_eq!(out.failure.unwrap().scan, 2);
    }

    #[test]
    fn a_plan_counts_only_from_its_writer_or_cut_on() {
        // Block 0 holds generation 1 before the writer of plan 1..=1 ran.
        let early = vec![
            run(1),
            Event::Plan { from: 1, to: 1 },
            Event::Scan {
                first: 0,
                gens: vec![Some(1)],
            },
            Event::Scanned { blocks: 1 },
        ];
        assert!(verify(&early, false).failure.is_some());
        let mut late = early.clone();
        late.insert(2, Event::Cut);
        assert!(verify(&late, false).failure.is_none());
    }

    #[test]
    fn acked_is_durable_only_when_asked() {
        let mut ev = vec![
            run(1),
            Event::Writer { from: 1, to: 2 },
            Event::Acked { gen: 2 },
        ];
        ev.extend(scan_of(1, 0));
        assert!(verify(&ev, false).failure.is_none());
        assert!(verify(&ev, true).failure.is_some());
    }
}
