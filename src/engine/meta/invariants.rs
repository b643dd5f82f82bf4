//! Predicates every manifest write must pass, checked before the write
//! is sent ([`super::manifest`]). A refusal is a bug in the engine, never
//! a user's mistake: it is reported as an error naming the manifest and
//! nothing is written.
//!
//! Invariants of a manifest written for `volume`:
//! 1. It passes [`Manifest::validate`]: it names `volume`, its numbers are
//!    in bounds, its checkpoint chunk is at most its last chunk, its history
//!    epoch at most its epoch, and its checkpoint keys are the volume's.
//! 2. A replacement names the same volume as the manifest it replaces.
//! 3. A replacement never lowers the epoch: a writer can only hand the
//!    volume to itself or a newer epoch.

use crate::engine::format::manifest::Manifest;

/// Why `m` may not be created as the first manifest of `volume`.
pub fn check_create(volume: u64, m: &Manifest) -> Result<(), String> {
    m.validate(volume)
}

/// Why `new` may not replace `old` (the manifest as last read or
/// committed) as the manifest of `old.volume`.
pub fn check_swap(old: &Manifest, new: &Manifest) -> Result<(), String> {
    new.validate(old.volume)?;
    if new.epoch < old.epoch {
        return Err(format!(
            "would lower the epoch from {} to {}",
            old.epoch, new.epoch
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::format::layout::checkpoint_key;

    fn manifest(volume: u64, epoch: u64) -> Manifest {
        super::super::prepare::fresh(volume, epoch, None)
    }

    #[test]
    fn a_valid_manifest_may_be_created() {
        assert_eq!(check_create(7, &manifest(7, 1)), Ok(()));
        assert!(check_create(8, &manifest(7, 1)).is_err());
        let behind = Manifest {
            checkpoint_chunk: 3,
            ..manifest(7, 1)
        };
        assert!(check_create(7, &behind).is_err());
    }

    #[test]
    fn a_swap_keeps_the_volume_and_never_lowers_the_epoch() {
        let old = manifest(7, 2);
        assert_eq!(check_swap(&old, &manifest(7, 2)), Ok(()));
        assert_eq!(check_swap(&old, &manifest(7, 3)), Ok(()));
        assert!(check_swap(&old, &manifest(7, 1))
            .unwrap_err()
            .contains("epoch"));
        assert!(check_swap(&old, &manifest(8, 2)).is_err());
        let foreign = Manifest {
            checkpoint: Some(checkpoint_key(8, 1, 2)),
            last_chunk: 1,
            checkpoint_chunk: 1,
            ..manifest(7, 2)
        };
        assert!(check_swap(&old, &foreign).is_err());
    }
}
