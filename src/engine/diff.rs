//! Changed ranges between two views, from their maps alone (no data reads).
//!
//! Redirect-on-write makes this exact in one direction: chunks are
//! immutable, so two views whose [`Source`] for a byte is the same
//! [`Source::Data`] hold the same byte there, and two zero sources
//! (unmapped or zeroed) both read as zeros.
//!
//! Invariants of [`diff_sources`]:
//! 1. Every byte outside the returned ranges reads the same in both views
//!    (over the common size).
//! 2. Ranges are sorted, non-overlapping, sector aligned, and adjacent ranges
//!    of the same kind are merged.
//! 3. A range may still hold equal bytes (data rewritten with the same
//!    content, or views of unrelated volumes, whose chunks never match): the
//!    diff is a superset of the bytes that differ, never a subset.
//! 4. When the newer view is larger, its tail beyond the older size is
//!    reported whole (every byte of it is in a range); when it is smaller,
//!    nothing beyond its size is reported (it has no bytes there).

use serde::Serialize;

use super::view::{SnapshotView, Source, SourceRange};

/// What the newer view holds in a changed range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// Data that must be read from the newer view.
    Data,
    /// Zeros (unmapped or zeroed in the newer view).
    Zero,
}

/// One changed byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiffRange {
    pub offset: u64,
    pub len: u64,
    pub kind: DiffKind,
}

/// The changed ranges from an older to a newer view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    pub old_size: u64,
    pub new_size: u64,
    pub ranges: Vec<DiffRange>,
}

impl Diff {
    /// Bytes covered by ranges of `kind`.
    pub fn bytes(&self, kind: DiffKind) -> u64 {
        self.ranges
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.len)
            .sum()
    }
}

/// The diff between two snapshot views (see the module docs).
pub fn diff_views(old: &SnapshotView, new: &SnapshotView) -> Diff {
    use super::BlockDevice;
    diff_sources(&old.sources(), old.size(), &new.sources(), new.size())
}

/// Walks a sorted list of source ranges; positions not covered read as
/// [`Source::Unmapped`].
struct Cursor<'a> {
    ranges: &'a [SourceRange],
    i: usize,
}

impl Cursor<'_> {
    /// The source at `pos` and the end of the run it starts (at most `limit`).
    fn at(&mut self, pos: u64, limit: u64) -> (Source, u64) {
        while self
            .ranges
            .get(self.i)
            .is_some_and(|r| r.offset + r.len <= pos)
        {
            self.i += 1;
        }
        match self.ranges.get(self.i) {
            Some(r) if r.offset <= pos => (
                r.source.advance(pos - r.offset),
                (r.offset + r.len).min(limit),
            ),
            Some(r) => (Source::Unmapped, r.offset.min(limit)),
            None => (Source::Unmapped, limit),
        }
    }
}

/// Same bytes for certain, from the sources alone.
fn same_content(a: &Source, b: &Source) -> bool {
    (a.is_zero() && b.is_zero()) || a == b
}

fn push(out: &mut Vec<DiffRange>, offset: u64, len: u64, kind: DiffKind) {
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.offset + last.len == offset {
            last.len += len;
            return;
        }
    }
    out.push(DiffRange { offset, len, kind });
}

fn kind_of(s: &Source) -> DiffKind {
    if s.is_zero() {
        DiffKind::Zero
    } else {
        DiffKind::Data
    }
}

/// The diff of two views given their [`SnapshotView::sources`] and sizes.
pub fn diff_sources(
    old: &[SourceRange],
    old_size: u64,
    new: &[SourceRange],
    new_size: u64,
) -> Diff {
    let common = old_size.min(new_size);
    let mut a = Cursor { ranges: old, i: 0 };
    let mut b = Cursor { ranges: new, i: 0 };
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < common {
        let (sa, ea) = a.at(pos, common);
        let (sb, eb) = b.at(pos, common);
        let end = ea.min(eb);
        if !same_content(&sa, &sb) {
            push(&mut ranges, pos, end - pos, kind_of(&sb));
        }
        pos = end;
    }
    while pos < new_size {
        let (sb, end) = b.at(pos, new_size);
        push(&mut ranges, pos, end - pos, kind_of(&sb));
        pos = end;
    }
    Diff {
        old_size,
        new_size,
        ranges,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(chunk: u64, offset: u64) -> Source {
        Source::Data {
            volume: 1,
            chunk,
            epoch: 1,
            offset,
        }
    }

    fn r(offset: u64, len: u64, source: Source) -> SourceRange {
        SourceRange {
            offset,
            len,
            source,
        }
    }

    fn d(offset: u64, len: u64, kind: DiffKind) -> DiffRange {
        DiffRange { offset, len, kind }
    }

    #[test]
    fn equal_sources_make_no_ranges() {
        let a = vec![r(0, 1024, data(1, 0)), r(1024, 3072, Source::Unmapped)];
        let b = vec![
            r(0, 512, data(1, 0)),
            r(512, 512, data(1, 512)),
            r(1024, 1024, Source::Zero),
            r(2048, 2048, Source::Unmapped),
        ];
        assert_eq!(diff_sources(&a, 4096, &b, 4096).ranges, vec![]);
    }

    #[test]
    fn changed_and_shifted_sources() {
        let a = vec![r(0, 4096, data(1, 0))];
        // Same chunk but shifted offsets differ; a new chunk differs; a
        // zeroed range differs as zeros.
        let b = vec![
            r(0, 1024, data(1, 0)),
            r(1024, 1024, data(1, 4096)),
            r(2048, 1024, data(2, 0)),
            r(3072, 1024, Source::Zero),
        ];
        assert_eq!(
            diff_sources(&a, 4096, &b, 4096).ranges,
            vec![d(1024, 2048, DiffKind::Data), d(3072, 1024, DiffKind::Zero)]
        );
    }

    #[test]
    fn sizes_differ() {
        let a = vec![r(0, 2048, Source::Unmapped)];
        let b = vec![
            r(0, 1024, Source::Unmapped),
            r(1024, 2048, data(3, 0)),
            r(3072, 1024, Source::Unmapped),
        ];
        let grown = diff_sources(&a, 2048, &b, 4096);
        assert_eq!(
            grown.ranges,
            vec![d(1024, 2048, DiffKind::Data), d(3072, 1024, DiffKind::Zero)]
        );
        let shrunk = diff_sources(&b, 4096, &a, 2048);
        assert_eq!(shrunk.ranges, vec![d(1024, 1024, DiffKind::Zero)]);
        assert_eq!(shrunk.bytes(DiffKind::Zero), 1024);
    }

    #[test]
    fn gaps_in_sources_read_as_unmapped() {
        let a = vec![r(1024, 512, data(1, 0))];
        let b = vec![];
        assert_eq!(
            diff_sources(&a, 4096, &b, 4096).ranges,
            vec![d(1024, 512, DiffKind::Zero)]
        );
    }
}
