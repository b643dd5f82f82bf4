//! Leases: one writer per volume, fenced by epochs.
//!
//! The lease of volume `id` is the object `volumes/<id:016x>/lease`, holding
//! JSON `{"holder": ..., "epoch": ..., "expires_at_ms": ...}`.
//!
//! # Protocol
//! 1. The first acquire creates the object with [`PutMode::Create`] at epoch 1
//!    (or just above a caller-given floor, [`AcquireOptions::min_epoch`]).
//! 2. Every later change is a compare-and-swap ([`PutMode::IfMatch`]) on the
//!    version last read or written, so of concurrent changers exactly one wins.
//! 3. A lease is live while `now < expires_at_ms` by the injected clock. A
//!    live lease held by someone else refuses `acquire` with
//!    [`LeaseError::Held`], naming the holder and the expiry.
//! 4. Taking over (acquire of an expired or released lease, or [`Lease::steal`])
//!    writes `max(epoch, floor) + 1`; renewal keeps the epoch. So epochs strictly increase
//!    across all takeovers, and an epoch names one holding period.
//! 5. The lease object is never deleted (release writes an already expired
//!    record), so the epoch history cannot restart at 1.
//! 6. A holder whose renewal loses the compare-and-swap is fenced: it gets
//!    [`LeaseError::Fenced`] naming the new holder and must stop writing.
//!    A holder that cannot reach the store must stop writing once its own
//!    expiry passes ([`Lease::check`]), since a takeover may follow.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::catalog::volume_prefix;
use crate::clock::DynClock;
use crate::store::{DynStore, PutMode, StoreError, Version};

/// Longest holder name.
pub const MAX_HOLDER_LEN: usize = 256;
/// Compare-and-swap rounds before acquire or steal gives up under contention.
const CAS_ROUNDS: u32 = 64;

/// The stored lease object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds (or last held) the lease, e.g. `host:pid`.
    pub holder: String,
    /// Holding period number; strictly increases on every takeover.
    pub epoch: u64,
    /// The lease is live while the clock reads less than this (ms since the
    /// Unix epoch). 0 after release.
    pub expires_at_ms: u64,
}

impl LeaseRecord {
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }
}

/// Errors of lease operations.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "volume {volume_id:016x} is in use: lease held by {holder:?} (epoch {epoch}) \
         until {expires_at_ms} ms since the Unix epoch; wait for it to expire or steal it"
    )]
    Held {
        volume_id: u64,
        holder: String,
        epoch: u64,
        expires_at_ms: u64,
    },
    #[error(
        "lease of volume {volume_id:016x} lost: taken over by {holder:?} at epoch {epoch}; \
         this server must stop writing"
    )]
    Fenced {
        volume_id: u64,
        holder: String,
        epoch: u64,
    },
    #[error("lease of volume {volume_id:016x} (epoch {epoch}) expired before it was renewed")]
    Expired { volume_id: u64, epoch: u64 },
    #[error("lease of volume {volume_id:016x} was released")]
    Released { volume_id: u64 },
    #[error("lease object {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("invalid lease request: {0}")]
    Invalid(String),
    #[error("lease of volume {volume_id:016x}: too much contention, gave up")]
    Contended { volume_id: u64 },
    #[error("lease store error: {0}")]
    Store(#[from] StoreError),
}

/// The store key of volume `volume_id`'s lease.
pub fn lease_key(volume_id: u64) -> String {
    format!("{}lease", volume_prefix(volume_id))
}

fn now_ms(clock: &DynClock) -> u64 {
    u64::try_from(clock.now().as_millis()).unwrap_or(u64::MAX)
}

fn encode(record: &LeaseRecord) -> Bytes {
    // A struct of strings and integers always serializes.
    Bytes::from(serde_json::to_vec(record).unwrap_or_default())
}

/// Read the lease of `volume_id`: `None` if it was never taken.
pub async fn read_lease(
    store: &DynStore,
    volume_id: u64,
) -> Result<Option<(LeaseRecord, Version)>, LeaseError> {
    let key = lease_key(volume_id);
    match store.get(&key).await {
        Ok(obj) => {
            let record = serde_json::from_slice(&obj.data).map_err(|e| LeaseError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            Ok(Some((record, obj.version)))
        }
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// How [`Lease::acquire_with`] takes a lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AcquireOptions {
    /// Take the lease even while someone else holds it live (a steal).
    pub steal: bool,
    /// The new epoch is above this value as well as above the stored one,
    /// for callers that handed out epochs before leases existed (e.g. the
    /// catalog's per-volume epoch). 0 = no floor.
    pub min_epoch: u64,
}

/// Whether this process may still use the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Active,
    Fenced { holder: String, epoch: u64 },
    Released,
}

#[derive(Debug)]
struct Held {
    record: LeaseRecord,
    version: Version,
    state: State,
}

/// A lease this process holds. Dropping it does not release it.
#[derive(Debug)]
pub struct Lease {
    store: DynStore,
    clock: DynClock,
    volume_id: u64,
    ttl: Duration,
    /// The record as last written by us; its state only moves away from
    /// `Active`, never back.
    held: Mutex<Held>,
    /// Serializes this process's renewals and release, so a compare-and-swap
    /// failure always means another writer, never our own concurrent call.
    writer: tokio::sync::Mutex<()>,
}

impl Lease {
    /// Take the lease of `volume_id` for `holder`, valid for `ttl`: create it,
    /// or take over an expired or released one at the next epoch. Fails with
    /// [`LeaseError::Held`] while someone else's lease is live.
    pub async fn acquire(
        store: DynStore,
        volume_id: u64,
        holder: &str,
        ttl: Duration,
        clock: DynClock,
    ) -> Result<Lease, LeaseError> {
        let opts = AcquireOptions::default();
        Self::acquire_with(store, volume_id, holder, ttl, clock, opts).await
    }

    /// Take the lease even if someone else holds it live, at the next epoch.
    /// The old holder is fenced at its next renewal.
    pub async fn steal(
        store: DynStore,
        volume_id: u64,
        holder: &str,
        ttl: Duration,
        clock: DynClock,
    ) -> Result<Lease, LeaseError> {
        let opts = AcquireOptions {
            steal: true,
            min_epoch: 0,
        };
        Self::acquire_with(store, volume_id, holder, ttl, clock, opts).await
    }

    /// [`Lease::acquire`] or [`Lease::steal`] with explicit options.
    pub async fn acquire_with(
        store: DynStore,
        volume_id: u64,
        holder: &str,
        ttl: Duration,
        clock: DynClock,
        opts: AcquireOptions,
    ) -> Result<Lease, LeaseError> {
        validate(holder, ttl)?;
        let key = lease_key(volume_id);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..CAS_ROUNDS {
            let expires_at_ms = now_ms(&clock).saturating_add(ttl_ms);
            let (record, result) = match read_lease(&store, volume_id).await? {
                None => {
                    let record = LeaseRecord {
                        holder: holder.to_string(),
                        epoch: next_epoch(&key, 0, opts.min_epoch)?,
                        expires_at_ms,
                    };
                    let r = store.put(&key, encode(&record), PutMode::Create).await;
                    (record, r)
                }
                Some((current, version)) => {
                    if !opts.steal && current.is_live(now_ms(&clock)) {
                        return Err(LeaseError::Held {
                            volume_id,
                            holder: current.holder,
                            epoch: current.epoch,
                            expires_at_ms: current.expires_at_ms,
                        });
                    }
                    let record = LeaseRecord {
                        holder: holder.to_string(),
                        epoch: next_epoch(&key, current.epoch, opts.min_epoch)?,
                        expires_at_ms,
                    };
                    let r = store
                        .put(&key, encode(&record), PutMode::IfMatch(version))
                        .await;
                    (record, r)
                }
            };
            match result {
                Ok(version) => {
                    log::info!(
                        "lease of volume {volume_id:016x} taken by {holder:?} at epoch {}",
                        record.epoch
                    );
                    return Ok(Lease {
                        store,
                        clock,
                        volume_id,
                        ttl,
                        held: Mutex::new(Held {
                            record,
                            version,
                            state: State::Active,
                        }),
                        writer: tokio::sync::Mutex::new(()),
                    });
                }
                // Someone changed the lease between our read and write:
                // read it again and decide anew.
                Err(StoreError::AlreadyExists { .. } | StoreError::PreconditionFailed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::Contended { volume_id })
    }

    pub fn volume_id(&self) -> u64 {
        self.volume_id
    }

    /// The epoch of this holding period; chunk keys and commits carry it.
    pub fn epoch(&self) -> u64 {
        self.lock().record.epoch
    }

    pub fn holder(&self) -> String {
        self.lock().record.holder.clone()
    }

    /// When the lease expires unless renewed (ms since the Unix epoch).
    pub fn expires_at_ms(&self) -> u64 {
        self.lock().record.expires_at_ms
    }

    /// Ok while this process may write: not fenced, not released, and not
    /// past its own expiry by the injected clock.
    pub fn check(&self) -> Result<(), LeaseError> {
        let held = self.lock();
        self.usable(&held)?;
        if !held.record.is_live(now_ms(&self.clock)) {
            return Err(LeaseError::Expired {
                volume_id: self.volume_id,
                epoch: held.record.epoch,
            });
        }
        Ok(())
    }

    /// Err if the lease was fenced or released.
    fn usable(&self, held: &Held) -> Result<(), LeaseError> {
        match &held.state {
            State::Active => Ok(()),
            State::Fenced { holder, epoch } => Err(LeaseError::Fenced {
                volume_id: self.volume_id,
                holder: holder.clone(),
                epoch: *epoch,
            }),
            State::Released => Err(LeaseError::Released {
                volume_id: self.volume_id,
            }),
        }
    }

    /// Extend the lease to `now + ttl` by compare-and-swap, keeping the
    /// epoch. Fails with [`LeaseError::Fenced`] if someone took it over;
    /// the lease then stays lost.
    pub async fn renew(&self) -> Result<(), LeaseError> {
        let _writer = self.writer.lock().await;
        let (mut record, version) = {
            let held = self.lock();
            self.usable(&held)?;
            (held.record.clone(), held.version.clone())
        };
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        record.expires_at_ms = now_ms(&self.clock).saturating_add(ttl_ms);
        self.write(record, version).await
    }

    /// Give the lease up: write it back already expired (same epoch), so the
    /// next acquire succeeds at once. The lease is unusable afterwards.
    pub async fn release(&self) -> Result<(), LeaseError> {
        let _writer = self.writer.lock().await;
        let (mut record, version) = {
            let held = self.lock();
            match held.state {
                State::Active => {}
                State::Released => return Ok(()),
                State::Fenced { .. } => return self.usable(&held),
            }
            (held.record.clone(), held.version.clone())
        };
        record.expires_at_ms = 0;
        self.write(record, version).await?;
        self.lock().state = State::Released;
        Ok(())
    }

    /// Compare-and-swap `record` over `version`; on a lost race, find out who
    /// holds the lease now and report that as fencing.
    async fn write(&self, record: LeaseRecord, version: Version) -> Result<(), LeaseError> {
        let key = lease_key(self.volume_id);
        match self
            .store
            .put(&key, encode(&record), PutMode::IfMatch(version))
            .await
        {
            Ok(version) => {
                let mut held = self.lock();
                held.record = record;
                held.version = version;
                Ok(())
            }
            Err(StoreError::PreconditionFailed { .. }) => {
                let (holder, epoch) = match read_lease(&self.store, self.volume_id).await {
                    Ok(Some((now, _))) => (now.holder, now.epoch),
                    _ => ("<unknown>".to_string(), 0),
                };
                log::warn!(
                    "lease of volume {:016x} lost to {holder:?} at epoch {epoch}",
                    self.volume_id
                );
                self.lock().state = State::Fenced {
                    holder: holder.clone(),
                    epoch,
                };
                Err(LeaseError::Fenced {
                    volume_id: self.volume_id,
                    holder,
                    epoch,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A background task renewing a lease every `period` until it is stopped,
/// or the lease is fenced or released. Store errors are logged and retried
/// at the next period; if they last past the expiry, [`Lease::check`] fails.
/// Dropping the handle stops the task.
#[derive(Debug)]
pub struct Renewer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Renewer {
    /// Stop renewing and wait for the task to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// True once the task has ended (stopped, fenced or released).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Lease {
    /// Renew this lease every `period` on the current tokio runtime. Pick a
    /// period well below the ttl (a third is usual) so a slow store does not
    /// let it lapse. A zero period is raised to one millisecond.
    pub fn spawn_renewer(self: &Arc<Self>, period: Duration) -> Renewer {
        let period = period.max(Duration::from_millis(1));
        let lease = Arc::clone(self);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(period) => {}
                }
                match lease.renew().await {
                    Ok(()) => {}
                    Err(e @ (LeaseError::Fenced { .. } | LeaseError::Released { .. })) => {
                        log::warn!("lease renewal stopped: {e}");
                        return;
                    }
                    Err(e) => log::warn!("lease renewal failed, will retry: {e}"),
                }
            }
        });
        Renewer {
            stop: Some(stop),
            task,
        }
    }
}

/// The epoch of a takeover: above both the stored epoch and the floor.
fn next_epoch(key: &str, stored: u64, floor: u64) -> Result<u64, LeaseError> {
    stored
        .max(floor)
        .checked_add(1)
        .ok_or_else(|| LeaseError::Invalid(format!("epoch overflow on {key}")))
}

fn validate(holder: &str, ttl: Duration) -> Result<(), LeaseError> {
    if holder.is_empty() || holder.len() > MAX_HOLDER_LEN {
        return Err(LeaseError::Invalid(format!(
            "holder name must be 1 to {MAX_HOLDER_LEN} bytes"
        )));
    }
    if holder.chars().any(char::is_control) {
        return Err(LeaseError::Invalid(format!(
            "holder name {holder:?} contains a control character"
        )));
    }
    if ttl.is_zero() {
        return Err(LeaseError::Invalid("lease ttl must be positive".into()));
    }
    Ok(())
}
