//! The manifests the engine writes, built in one place from the one they
//! replace. Pure functions: [`super::manifest`] checks and writes them.

use crate::engine::format::manifest::{Manifest, ParentRef};

/// The first manifest of `volume`: no checkpoint, no chunks. A volume
/// opened for the first time is created at its writer's epoch; a clone is
/// created at epoch 0 and names the snapshot it reads through to.
pub fn fresh(volume: u64, epoch: u64, parent: Option<ParentRef>) -> Manifest {
    Manifest {
        volume,
        epoch,
        checkpoint: None,
        checkpoint_base: None,
        checkpoint_chunk: 0,
        last_chunk: 0,
        last_seq: 0,
        history_epoch: epoch,
        parent,
    }
}

/// `m` taken over by a writer at `epoch` (the history it names is not yet
/// the writer's: [`at_position`] commits that once recovery checked it).
pub fn taken_over(m: &Manifest, epoch: u64) -> Manifest {
    Manifest { epoch, ..m.clone() }
}

/// `m` with the store position of the writer at `epoch`: every chunk up
/// to `last_chunk` and op up to `last_seq` is stored, and the history
/// after them is the writer's.
pub fn at_position(m: &Manifest, epoch: u64, last_chunk: u64, last_seq: u64) -> Manifest {
    Manifest {
        last_chunk,
        last_seq,
        epoch,
        history_epoch: epoch,
        ..m.clone()
    }
}

/// `m` naming the checkpoint `key`, written by the writer at `epoch`,
/// that covers every chunk up to `chunk` (op `last_seq`): a delta of the
/// chain based at `base`, or a new full base (`base` is `None`).
pub fn with_checkpoint(
    m: &Manifest,
    epoch: u64,
    key: String,
    base: Option<String>,
    chunk: u64,
    last_seq: u64,
) -> Manifest {
    Manifest {
        volume: m.volume,
        epoch,
        checkpoint: Some(key),
        checkpoint_base: base,
        checkpoint_chunk: chunk,
        last_chunk: chunk,
        last_seq,
        history_epoch: epoch,
        parent: m.parent,
    }
}

/// Detached `m` rolled back: it names the lone full checkpoint `key`,
/// which covers every chunk up to `m.last_chunk`.
pub fn rolled_back(m: &Manifest, key: String) -> Manifest {
    Manifest {
        checkpoint: Some(key),
        checkpoint_base: None,
        checkpoint_chunk: m.last_chunk,
        ..m.clone()
    }
}

/// Detached clone `m` flattened: it names the lone full checkpoint `key`
/// (at the same chunk) and no longer reads through a parent.
pub fn flattened(m: &Manifest, key: String) -> Manifest {
    Manifest {
        checkpoint: Some(key),
        checkpoint_base: None,
        parent: None,
        ..m.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_manifest_keeps_what_it_does_not_change() {
        let parent = ParentRef {
            volume: 1,
            snapshot: 2,
        };
        let m = Manifest {
            checkpoint: Some("a".into()),
            checkpoint_base: Some("b".into()),
            checkpoint_chunk: 4,
            last_chunk: 6,
            last_seq: 60,
            history_epoch: 2,
            ..fresh(9, 3, Some(parent))
        };
        let t = taken_over(&m, 5);
        assert_eq!((t.epoch, t.history_epoch, t.last_chunk), (5, 2, 6));
        let p = at_position(&t, 5, 8, 80);
        assert_eq!((p.last_chunk, p.last_seq, p.history_epoch), (8, 80, 5));
        assert_eq!(p.checkpoint_base.as_deref(), Some("b"));
        let c = with_checkpoint(&p, 5, "c".into(), None, 8, 80);
        assert_eq!((c.checkpoint_chunk, c.parent), (8, Some(parent)));
        assert_eq!(c.checkpoint_base, None);
        let r = rolled_back(&p, "r".into());
        assert_eq!((r.checkpoint_chunk, r.last_chunk, r.epoch), (8, 8, 5));
        let f = flattened(&m, "f".into());
        assert_eq!((f.parent, f.checkpoint_chunk), (None, 4));
        assert_eq!(fresh(9, 3, None).history_epoch, 3);
    }
}
