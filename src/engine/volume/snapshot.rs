//! The snapshot API of an open volume: taking a snapshot, deleting one,
//! collecting the chunks nothing names any more. Snapshots and GC are
//! asked of the destage task by a command on its channel
//! ([`DestageCommand`]). The protocol and its invariants are in
//! `live_snapshot.rs`, whose functions the destage and meta tasks run to
//! serve these requests.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::channel::oneshot;

use super::Volume;
use crate::engine::error::EngineError;
use crate::engine::format::layout::snapshot_key;
use crate::engine::format::snapshot::SnapshotObject;
use crate::engine::snapshot::set_deleting;
use crate::engine::snapshot::store::{find_snapshot, SnapshotError};
use crate::engine::state::State;
use crate::engine::task_request::{DestageCommand, SnapshotRequest};
use crate::engine::volume_core::Inner;
use crate::store::StoreError;

impl Volume {
    /// Take snapshot `name` of this open volume, crash-consistent at a flush
    /// point: every write acknowledged before the call is in it, and it is a
    /// prefix of the write history. New writes wait (they do not fail) until
    /// it is done; reads go on. On error no snapshot exists and writes resume.
    pub async fn snapshot(
        &self,
        name: &str,
        created_ms: u64,
    ) -> Result<SnapshotObject, SnapshotError> {
        let inner = &self.inner;
        {
            let mut st = inner.shared.lock();
            claim(inner, &mut st)?;
            st.writes_paused = true;
        }
        let pause = Pause {
            inner,
            name,
            started: inner.clock.now(),
        };
        inner.wal.sync().await.map_err(EngineError::from)?;
        let target = inner.wal.last_seq();
        // Declared after `pause`, so dropped before it: a dropped call's
        // request is seen withdrawn (`live_snapshot.rs` invariant 4)
        // before the slot is free for the next.
        let (tx, rx) = oneshot::channel();
        self.send_request(DestageCommand::Snapshot(SnapshotRequest {
            target,
            name: name.to_string(),
            created_ms,
            reply: tx,
        }))?;
        let res = match rx.await {
            Ok(res) => res,
            Err(_) => Err(stopped_error(inner)),
        };
        if res.is_ok() {
            inner
                .counters
                .snapshots_taken
                .fetch_add(1, Ordering::Relaxed);
        }
        drop(pause);
        if res.is_ok() {
            self.account_snapshots().await;
        }
        res
    }

    /// Space accounting follows the snapshot set at once (the pool task
    /// would otherwise notice the change only at its next refresh).
    async fn account_snapshots(&self) {
        if let Err(e) = self.reload_snapshots().await {
            log::warn!(
                "volume {:x}: cannot re-read its snapshots for space accounting: {e}",
                self.inner.id
            );
        }
    }

    /// Mark snapshot `name` of this open volume as being deleted and return
    /// it (marked). It keeps every chunk it names, whatever checkpoints and
    /// compaction run meanwhile, until the caller removes its object
    /// ([`crate::engine::snapshot::remove_snapshot`]) once nothing needs it, or
    /// clears the mark ([`crate::engine::snapshot::set_deleting`]) to undo.
    pub async fn begin_snapshot_delete(&self, name: &str) -> Result<SnapshotObject, SnapshotError> {
        let inner = &self.inner;
        let _busy = Busy::take(inner)?;
        let snap = find_snapshot(&inner.store, inner.id, name).await?;
        set_deleting(&inner.store, inner.id, snap.id, true).await
    }

    /// Delete the object of snapshot `name` of this open volume (the
    /// commit point of the delete, which cannot be undone) and return it.
    /// Its chunks stay until [`Volume::collect_garbage`].
    pub async fn delete_snapshot(&self, name: &str) -> Result<SnapshotObject, SnapshotError> {
        let inner = &self.inner;
        let _busy = Busy::take(inner)?;
        let snap = find_snapshot(&inner.store, inner.id, name).await?;
        match inner.store.delete(&snapshot_key(inner.id, snap.id)).await {
            Ok(()) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.account_snapshots().await;
        Ok(snap)
    }

    /// Delete every chunk of this open volume that neither its committed
    /// checkpoint nor any snapshot names (after a snapshot delete). Returns
    /// how many were deleted. Runs in the meta task ([`crate::engine::meta::task`]),
    /// between its checkpoints and snapshot creations.
    pub async fn collect_garbage(&self) -> Result<u64, SnapshotError> {
        let inner = &self.inner;
        let _busy = Busy::take(inner)?;
        let not_freed = |why: String| SnapshotError::State {
            volume: inner.id,
            reason: format!(
                "freeing unreferenced chunks failed ({why}); a later attempt frees them"
            ),
        };
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.send_request(DestageCommand::CollectGarbage(tx)) {
            return Err(not_freed(e.to_string()));
        }
        let res = rx.await;
        // Snapshot objects a caller removed since are no longer counted.
        self.account_snapshots().await;
        match res {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(why)) => Err(not_freed(why)),
            Err(_) => Err(not_freed(stopped_error(inner).to_string())),
        }
    }
}

impl Volume {
    /// Send `cmd` to the destage task, unless the volume is fenced or
    /// closing or the task has ended. Sent under the state lock, so a
    /// request sent before the close began reaches the destage task before
    /// it sees the close (`live_snapshot.rs` invariant 3).
    fn send_request(&self, cmd: DestageCommand) -> Result<(), SnapshotError> {
        let sent = {
            let st = self.inner.shared.lock();
            refuse_unless_running(&st)?;
            self.to_destage.send(cmd)
        };
        if sent {
            Ok(())
        } else {
            Err(stopped_error(&self.inner))
        }
    }
}

/// Take the volume's one snapshot-operation slot.
fn claim(inner: &Inner, st: &mut State) -> Result<(), SnapshotError> {
    refuse_unless_running(st)?;
    if st.snapshot_busy {
        return Err(SnapshotError::State {
            volume: inner.id,
            reason: "another snapshot create or delete of this volume is in progress".into(),
        });
    }
    st.snapshot_busy = true;
    Ok(())
}

/// Gives the slot back on drop. A GC request not yet answered is then
/// withdrawn: its reply receiver, a local of the call, is dropped first.
struct Busy<'a>(&'a Inner);

impl<'a> Busy<'a> {
    /// Take the slot ([`claim`]); it is held until the guard drops.
    fn take(inner: &'a Inner) -> Result<Busy<'a>, SnapshotError> {
        claim(inner, &mut inner.shared.lock())?;
        Ok(Busy(inner))
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.shared.lock().snapshot_busy = false;
    }
}

/// Fenced or closing: no snapshot can be taken (without a destage task
/// neither, which [`Volume::send_request`] finds when its send fails).
fn refuse_unless_running(st: &State) -> Result<(), SnapshotError> {
    if let Some(why) = &st.fenced {
        return Err(EngineError::Fenced(why.clone()).into());
    }
    if st.closing {
        return Err(SnapshotError::Engine(EngineError::Closed));
    }
    Ok(())
}

/// Why the destage task went away without answering.
fn stopped_error(inner: &Inner) -> SnapshotError {
    match inner.shared.lock().fenced.clone() {
        Some(why) => EngineError::Fenced(why).into(),
        None => EngineError::Closed.into(),
    }
}

/// Holds writes back while alive; on drop (success, error or a dropped
/// future) frees the slot, lets writes go and logs the pause. An unserved
/// request is withdrawn by then: its reply receiver was dropped first.
struct Pause<'a> {
    inner: &'a Inner,
    name: &'a str,
    started: Duration,
}

impl Drop for Pause<'_> {
    fn drop(&mut self) {
        {
            let mut st = self.inner.shared.lock();
            st.writes_paused = false;
            st.snapshot_busy = false;
            st.wake_all();
        }
        let paused = self.inner.clock.now().saturating_sub(self.started);
        self.inner
            .counters
            .last_snapshot_pause_us
            .store(paused.as_micros() as u64, Ordering::Relaxed);
        log::info!(
            "volume {:x}: snapshot {:?} held writes back for {:.3} ms",
            self.inner.id,
            self.name,
            paused.as_secs_f64() * 1000.0
        );
    }
}
