//! Leases: one writer per volume, fenced by epochs.
//!
//! The lease of volume `id` is the object `volumes/<id:016x>/lease`, holding
//! JSON `{"holder": ..., "epoch": ..., "expires_at_ms": ..., "owner": ...}`.
//!
//! # Protocol
//! 1. The first acquire creates the object with [`PutMode::Create`] at epoch 1
//!    (or just above a caller-given floor, [`AcquireOptions::min_epoch`]).
//! 2. Every later change is a compare-and-swap ([`PutMode::IfMatch`]) on the
//!    version last read or written, so of concurrent changers exactly one wins.
//! 3. A lease is live while `now < expires_at_ms` by the reader's wall
//!    clock. A live lease held by someone else refuses `acquire` with
//!    [`LeaseError::Held`], naming the holder and the expiry, with one
//!    exception: [`LocalTakeover`] (a crashed process of this host and of
//!    the same local directory, see rule 8).
//! 4. Taking over (acquire of an expired or released lease, a local
//!    takeover, or [`Lease::steal`]) writes `max(epoch, floor) + 1`; renewal
//!    keeps the epoch. So epochs strictly increase across all takeovers, and
//!    an epoch names one holding period.
//! 5. The lease object is never deleted (release writes an already expired
//!    record), so the epoch history cannot restart at 1.
//! 6. A holder whose write loses the compare-and-swap reads the lease back:
//!    if it still shows this holding period (same epoch, holder and owner),
//!    an earlier write of ours landed although its reply was lost, and the
//!    write is retried over it; otherwise the holder is fenced
//!    ([`LeaseError::Fenced`], naming the new holder) and must stop writing.
//! 7. Acknowledgement deadline. Every successful write (acquire or renew)
//!    notes the holder's monotonic clock *before* it was sent, `sent`. The
//!    record says `expires_at_ms = wall(sent) + ttl`, so no other host can
//!    take over before `sent + ttl − skew` (skew: how far its wall clock runs
//!    ahead of ours). Writes may be acknowledged only while the monotonic
//!    clock reads less than `sent + ttl − margin` ([`Lease::ack_gate`]),
//!    which is safe while the hosts' wall clocks agree within `margin`.
//!    Past that deadline an acknowledgement waits for a renewal; at
//!    `sent + ttl` (the lease's own expiry, [`Lease::check`]) it fails, and
//!    the renewer reports the lease lost.
//! 8. Local takeover. The record names its holder's host (machine id, boot
//!    id), process (pid and start time) and local directory (a random id
//!    kept in that directory). A live lease whose owner is on this machine,
//!    in the same local directory, and whose process is gone may be taken
//!    over at once (never when the machine id is `unknown`, i.e. could not
//!    be read). Callers allow it only while holding that local
//!    directory's lock (`catalog::local_dir`), which a live holder would
//!    hold: the lock is the proof, the process check a second opinion.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot as ack_oneshot;
use serde::{Deserialize, Serialize};

use crate::catalog::local_dir::LocalDirClaim;
use crate::clock::DynClock;
use crate::engine::format::layout::lease_key;
use crate::engine::volume::{AckGate, Admission};
use crate::host;
use crate::store::{DynStore, PutMode, StoreError, Version};

/// Longest holder name.
pub const MAX_HOLDER_LEN: usize = 256;
/// Compare-and-swap rounds before acquire or steal gives up under contention.
const CAS_ROUNDS: u32 = 64;
/// Compare-and-swap rounds of one renewal or release (rule 6).
const WRITE_ROUNDS: u32 = 4;

/// Where the holder of a lease runs (rule 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderId {
    /// The host's machine id.
    pub machine: String,
    /// The host's boot id when the lease was taken.
    pub boot: String,
    pub pid: u32,
    /// The process's start time (clock ticks after boot).
    pub start: u64,
    /// The id of the holder's local directory for the volume.
    pub dir: String,
}

impl HolderId {
    /// This process, serving from the local directory with id `dir`.
    pub fn this_process(dir: &str) -> HolderId {
        let host = host::this_host();
        let (pid, start) = host::this_process();
        HolderId {
            machine: host.machine,
            boot: host.boot,
            pid,
            start,
            dir: dir.to_string(),
        }
    }

    fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("machine", &self.machine),
            ("boot", &self.boot),
            ("dir", &self.dir),
        ] {
            if v.is_empty()
                || v.len() > host::MAX_ID_LEN
                || !v.chars().all(|c| c.is_ascii_graphic())
            {
                return Err(format!(
                    "owner.{name} must be 1 to {} printable characters",
                    host::MAX_ID_LEN
                ));
            }
        }
        Ok(())
    }
}

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
    /// Where the holder runs; absent in records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<HolderId>,
}

impl LeaseRecord {
    pub fn is_live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }

    /// Same holding period (rule 6): epoch, holder and owner all equal.
    fn same_period(&self, other: &LeaseRecord) -> bool {
        self.epoch == other.epoch && self.holder == other.holder && self.owner == other.owner
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

fn now_ms(clock: &DynClock) -> u64 {
    u64::try_from(clock.now().as_millis()).unwrap_or(u64::MAX)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
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
            let corrupt = |reason: String| LeaseError::Corrupt {
                key: key.clone(),
                reason,
            };
            let record: LeaseRecord =
                serde_json::from_slice(&obj.data).map_err(|e| corrupt(e.to_string()))?;
            if record.holder.len() > MAX_HOLDER_LEN {
                return Err(corrupt(format!(
                    "holder longer than {MAX_HOLDER_LEN} bytes"
                )));
            }
            if let Some(owner) = &record.owner {
                owner.check().map_err(corrupt)?;
            }
            Ok(Some((record, obj.version)))
        }
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Permission to take over a live lease left by a crashed process of this
/// host and local directory (rule 8). Give it only while holding the
/// directory's lock.
#[derive(Debug, Clone, Copy)]
pub struct LocalTakeover {
    /// Whether the process a record names is gone.
    pub holder_gone: fn(&HolderId) -> bool,
}

impl LocalTakeover {
    /// Judge by this host's process table ([`host::process_alive`]).
    pub fn this_host() -> LocalTakeover {
        LocalTakeover {
            holder_gone: |o| !host::process_alive(&o.boot, o.pid, o.start),
        }
    }

    /// Whether `current` may be taken over by `me`.
    fn allows(&self, current: &LeaseRecord, me: Option<&HolderId>) -> bool {
        let (Some(theirs), Some(me)) = (&current.owner, me) else {
            return false;
        };
        // A host whose machine id could not be read is nobody in particular.
        theirs.machine != "unknown"
            && theirs.machine == me.machine
            && theirs.dir == me.dir
            && (self.holder_gone)(theirs)
    }
}

/// How [`Lease::acquire_with`] takes a lease.
#[derive(Debug, Clone, Default)]
pub struct AcquireOptions {
    /// Take the lease even while someone else holds it live (a steal).
    pub steal: bool,
    /// The new epoch is above this value as well as above the stored one,
    /// for callers that handed out epochs before leases existed (e.g. the
    /// catalog's per-volume epoch). 0 = no floor.
    pub min_epoch: u64,
    /// Where this holder runs, recorded in the lease (rule 8).
    pub owner: Option<HolderId>,
    /// Allow a local takeover (rule 8); needs `owner`.
    pub local_takeover: Option<LocalTakeover>,
    /// How long before its expiry the lease stops admitting
    /// acknowledgements (rule 7). Default: a tenth of the ttl.
    pub margin: Option<Duration>,
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

/// The acknowledgement deadline (rule 7), shared with the volume through
/// [`Lease::ack_gate`]. Times are monotonic-clock nanoseconds.
#[derive(Debug)]
struct Deadline {
    clock: DynClock,
    volume_id: u64,
    /// Acknowledge while the monotonic clock reads less than this.
    ack_until: AtomicU64,
    /// The lease's own expiry (`ack_until + margin`).
    expires: AtomicU64,
    /// Set once the lease is lost for good; `waiters.lost` says why.
    lost: AtomicBool,
    /// Whether a renewer is running (otherwise nobody would wake waiters).
    renewing: AtomicBool,
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    lost: Option<String>,
    epoch: u64,
    list: Vec<ack_oneshot::Sender<()>>,
}

impl Deadline {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        nanos(self.clock.monotonic())
    }

    /// A write sent at monotonic time `sent` succeeded.
    fn extend(&self, sent: Duration, ttl: Duration, margin: Duration) {
        let sent = nanos(sent);
        self.ack_until
            .fetch_max(sent.saturating_add(nanos(ttl - margin)), Ordering::SeqCst);
        self.expires
            .fetch_max(sent.saturating_add(nanos(ttl)), Ordering::SeqCst);
        self.wake();
    }

    fn lose(&self, why: String) {
        let mut w = self.lock();
        if w.lost.is_none() {
            w.lost = Some(why);
        }
        self.lost.store(true, Ordering::SeqCst);
        for tx in w.list.drain(..) {
            let _ = tx.send(());
        }
    }

    fn wake(&self) {
        for tx in self.lock().list.drain(..) {
            let _ = tx.send(());
        }
    }

    fn expired(&self) -> bool {
        self.now() >= self.expires.load(Ordering::SeqCst)
    }
}

impl AckGate for Deadline {
    fn admit(&self) -> Admission {
        if !self.lost.load(Ordering::SeqCst) && self.now() < self.ack_until.load(Ordering::SeqCst) {
            return Admission::Now;
        }
        let mut w = self.lock();
        if let Some(why) = &w.lost {
            return Admission::Refused(why.clone());
        }
        let now = self.now();
        if now < self.ack_until.load(Ordering::SeqCst) {
            return Admission::Now;
        }
        if now >= self.expires.load(Ordering::SeqCst) || !self.renewing.load(Ordering::SeqCst) {
            return Admission::Refused(format!(
                "lease of volume {:016x} (epoch {}) was not renewed in time; \
                 acknowledgements stop before it can expire",
                self.volume_id, w.epoch
            ));
        }
        let (tx, rx) = ack_oneshot::channel();
        w.list.push(tx);
        Admission::Wait(rx)
    }
}

/// A lease this process holds. Dropping it does not release it.
#[derive(Debug)]
pub struct Lease {
    store: DynStore,
    clock: DynClock,
    volume_id: u64,
    ttl: Duration,
    margin: Duration,
    /// The record as last written by us; its state only moves away from
    /// `Active`, never back.
    held: Mutex<Held>,
    /// Serializes this process's renewals and release, so a compare-and-swap
    /// failure always means another writer or a lost reply (rule 6), never
    /// our own concurrent call.
    writer: tokio::sync::Mutex<()>,
    deadline: Arc<Deadline>,
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
            ..AcquireOptions::default()
        };
        Self::acquire_with(store, volume_id, holder, ttl, clock, opts).await
    }

    /// Take the lease as this process, serving from the local directory
    /// `local` (whose lock the claim holds: the proof rule 8 needs). The
    /// record names this host, process and directory, and a lease left by a
    /// crashed process of this host and directory is taken over at once;
    /// any other live holder refuses with [`LeaseError::Held`]. `margin`:
    /// see [`AcquireOptions::margin`].
    pub async fn acquire_local(
        store: DynStore,
        volume_id: u64,
        holder: &str,
        ttl: Duration,
        margin: Option<Duration>,
        clock: DynClock,
        local: &LocalDirClaim,
    ) -> Result<Lease, LeaseError> {
        let opts = AcquireOptions {
            owner: Some(HolderId::this_process(local.dir_id())),
            local_takeover: Some(LocalTakeover::this_host()),
            margin,
            ..AcquireOptions::default()
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
        let margin = opts.margin.unwrap_or(ttl / 10);
        validate(holder, ttl, margin, opts.owner.as_ref())?;
        let key = lease_key(volume_id);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..CAS_ROUNDS {
            let sent = clock.monotonic();
            let expires_at_ms = now_ms(&clock).saturating_add(ttl_ms);
            let new_record = |epoch| LeaseRecord {
                holder: holder.to_string(),
                epoch,
                expires_at_ms,
                owner: opts.owner.clone(),
            };
            let (record, result) = match read_lease(&store, volume_id).await? {
                None => {
                    let record = new_record(next_epoch(&key, 0, opts.min_epoch)?);
                    let r = store.put(&key, encode(&record), PutMode::Create).await;
                    (record, r)
                }
                Some((current, version)) => {
                    if !opts.steal && current.is_live(now_ms(&clock)) {
                        let local = opts
                            .local_takeover
                            .is_some_and(|t| t.allows(&current, opts.owner.as_ref()));
                        if !local {
                            return Err(LeaseError::Held {
                                volume_id,
                                holder: current.holder,
                                epoch: current.epoch,
                                expires_at_ms: current.expires_at_ms,
                            });
                        }
                        log::warn!(
                            "volume {volume_id:016x}: taking over the lease of {:?} (epoch {}) \
                             at once: a process of this host and local directory that is gone",
                            current.holder,
                            current.epoch
                        );
                    }
                    let record = new_record(next_epoch(&key, current.epoch, opts.min_epoch)?);
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
                    let deadline = Arc::new(Deadline {
                        clock: clock.clone(),
                        volume_id,
                        ack_until: AtomicU64::new(0),
                        expires: AtomicU64::new(0),
                        lost: AtomicBool::new(false),
                        renewing: AtomicBool::new(false),
                        waiters: Mutex::new(Waiters {
                            epoch: record.epoch,
                            ..Waiters::default()
                        }),
                    });
                    deadline.extend(sent, ttl, margin);
                    return Ok(Lease {
                        store,
                        clock,
                        volume_id,
                        ttl,
                        margin,
                        held: Mutex::new(Held {
                            record,
                            version,
                            state: State::Active,
                        }),
                        writer: tokio::sync::Mutex::new(()),
                        deadline,
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

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The gate a volume served under this lease must pass before each
    /// acknowledgement (rule 7). Install it with
    /// [`crate::engine::Volume::set_ack_gate`] and run a renewer
    /// ([`Lease::spawn_renewer_with`]); without a renewer the gate refuses
    /// once the deadline passes.
    pub fn ack_gate(&self) -> Arc<dyn AckGate> {
        self.deadline.clone()
    }

    /// Ok while this process may write: not fenced, not released, and not
    /// past its own expiry by the injected monotonic clock (rule 7).
    pub fn check(&self) -> Result<(), LeaseError> {
        let held = self.lock();
        self.usable(&held)?;
        if self.deadline.expired() {
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
        let sent = self.clock.monotonic();
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        record.expires_at_ms = now_ms(&self.clock).saturating_add(ttl_ms);
        self.write(record, version).await?;
        self.deadline.extend(sent, self.ttl, self.margin);
        Ok(())
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
        // No acknowledgement may count on the lease from here on.
        self.deadline.lose(format!(
            "lease of volume {:016x} was released",
            self.volume_id
        ));
        self.write(record, version).await?;
        self.lock().state = State::Released;
        Ok(())
    }

    /// Compare-and-swap `record` over `version`. On a lost race read the
    /// lease back (rule 6): our own earlier write is written over; anyone
    /// else's means we are fenced.
    async fn write(&self, record: LeaseRecord, mut version: Version) -> Result<(), LeaseError> {
        let key = lease_key(self.volume_id);
        for _ in 0..WRITE_ROUNDS {
            match self
                .store
                .put(&key, encode(&record), PutMode::IfMatch(version.clone()))
                .await
            {
                Ok(version) => {
                    let mut held = self.lock();
                    held.record = record;
                    held.version = version;
                    return Ok(());
                }
                Err(StoreError::PreconditionFailed { .. }) => {
                    // A read error is not a verdict: report it and let the
                    // caller retry; the deadline keeps acknowledgements safe.
                    let stored = read_lease(&self.store, self.volume_id).await?;
                    match stored {
                        Some((now, now_version)) if now.same_period(&record) => {
                            log::info!(
                                "lease of volume {:016x}: an earlier write of ours landed \
                                 although its reply was lost; writing over it",
                                self.volume_id
                            );
                            self.lock().version = now_version.clone();
                            version = now_version;
                        }
                        other => {
                            let (holder, epoch) = match other {
                                Some((now, _)) => (now.holder, now.epoch),
                                None => ("<no lease object>".to_string(), 0),
                            };
                            return Err(self.fenced(holder, epoch));
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::Contended {
            volume_id: self.volume_id,
        })
    }

    /// Record that `holder` took the lease over at `epoch`.
    fn fenced(&self, holder: String, epoch: u64) -> LeaseError {
        log::warn!(
            "lease of volume {:016x} lost to {holder:?} at epoch {epoch}",
            self.volume_id
        );
        self.lock().state = State::Fenced {
            holder: holder.clone(),
            epoch,
        };
        let err = LeaseError::Fenced {
            volume_id: self.volume_id,
            holder,
            epoch,
        };
        self.deadline.lose(err.to_string());
        err
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Renews a lease every period on its own thread (with its own small
/// runtime, so blocking work elsewhere cannot starve it) until it is
/// stopped, or the lease is fenced, released or expired. Store errors are
/// logged and retried sooner than the period. Dropping the handle stops
/// the renewals.
#[derive(Debug)]
pub struct Renewer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
    finished: Arc<AtomicBool>,
}

impl Renewer {
    /// Stop renewing and wait for the renewals to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }

    /// True once the renewals have ended (stopped, fenced, released or expired).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Called once when a renewing lease is lost (fenced by a takeover, or
/// past its own expiry before a renewal succeeded), with the reason.
pub type OnLost = Box<dyn FnOnce(LeaseError) + Send + 'static>;

impl Lease {
    /// Renew this lease every `period` (see [`Renewer`]). Pick a period
    /// well below `ttl − margin` so that failed renewals can be retried
    /// before acknowledgements must wait. A zero period is raised to one
    /// millisecond.
    pub fn spawn_renewer(self: &Arc<Self>, period: Duration) -> Renewer {
        self.spawn_renewer_with(period, Box::new(|_| {}))
    }

    /// [`Lease::spawn_renewer`] that calls `on_lost` as soon as the lease is
    /// lost: a renewal found it taken over ([`LeaseError::Fenced`]), or the
    /// monotonic clock reached its expiry before a renewal succeeded
    /// ([`LeaseError::Expired`]; someone may take it over from then on),
    /// even while a renewal is still stuck in the store. The renewals end
    /// after calling it.
    pub fn spawn_renewer_with(self: &Arc<Self>, period: Duration, on_lost: OnLost) -> Renewer {
        let period = period.max(Duration::from_millis(1));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        self.deadline.renewing.store(true, Ordering::SeqCst);
        let job = RenewJob {
            lease: Arc::clone(self),
            period,
            on_lost,
            stop: stop_rx,
            done: done_tx,
            finished: finished.clone(),
        };
        let slot = Arc::new(Mutex::new(Some(job)));
        let thread_slot = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("shale-lease".into())
            .spawn(move || {
                let job = thread_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(job) = job {
                    job.run_on_own_runtime();
                }
            });
        if let Err(e) = spawned {
            // No thread to spare: renew on the caller's runtime rather than
            // not at all.
            log::warn!(
                "cannot start the lease renewal thread ({e}); renewing on the caller's runtime"
            );
            let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(job) = job {
                tokio::spawn(job.run());
            }
        }
        Renewer {
            stop: Some(stop_tx),
            done: Some(done_rx),
            finished,
        }
    }
}

/// Everything one renewal loop owns.
struct RenewJob {
    lease: Arc<Lease>,
    period: Duration,
    on_lost: OnLost,
    stop: tokio::sync::oneshot::Receiver<()>,
    done: tokio::sync::oneshot::Sender<()>,
    finished: Arc<AtomicBool>,
}

impl RenewJob {
    fn run_on_own_runtime(self) {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(self.run()),
            Err(e) => {
                let lease = self.lease.clone();
                let why =
                    LeaseError::Invalid(format!("cannot start the lease renewal runtime: {e}"));
                log::error!("lease of volume {:016x}: {why}", lease.volume_id);
                lease.deadline.lose(why.to_string());
                self.finish(Some(why));
            }
        }
    }

    async fn run(mut self) {
        let lost = self.renew_until_lost().await;
        self.finish(lost);
    }

    /// Stop being a renewer: report a loss, wake acknowledgement waiters
    /// (they now see either the loss or that nobody renews), signal `done`.
    fn finish(self, lost: Option<LeaseError>) {
        let deadline = &self.lease.deadline;
        if let Some(e) = &lost {
            log::error!("lease lost: {e}");
            deadline.lose(e.to_string());
        }
        // The renewals have ended: say so before anyone hears of the loss.
        deadline.renewing.store(false, Ordering::SeqCst);
        self.finished.store(true, Ordering::SeqCst);
        if let Some(e) = lost {
            (self.on_lost)(e);
        }
        deadline.wake();
        let _ = self.done.send(());
    }

    /// The renewal loop; returns the loss that ended it, `None` if stopped
    /// or released. The schedule runs on real time (renew every period,
    /// retry sooner after a failure); expiry is judged by the lease's clock.
    async fn renew_until_lost(&mut self) -> Option<LeaseError> {
        let lease = self.lease.clone();
        let retry = (self.period / 6).max(Duration::from_millis(1));
        let mut wait = self.period;
        loop {
            let now = nanos(lease.clock.monotonic());
            let to_expiry = Duration::from_nanos(
                lease
                    .deadline
                    .expires
                    .load(Ordering::SeqCst)
                    .saturating_sub(now),
            );
            tokio::select! {
                _ = &mut self.stop => return None,
                _ = tokio::time::sleep(wait.min(to_expiry).max(Duration::from_millis(1))) => {}
            }
            if lease.deadline.expired() {
                return Some(self.expired());
            }
            let res = tokio::select! {
                _ = &mut self.stop => return None,
                r = lease.renew() => r,
                e = watch_expiry(&lease, self.period) => Err(e),
            };
            match res {
                Ok(()) => wait = self.period,
                Err(LeaseError::Released { .. }) => return None,
                Err(e @ (LeaseError::Fenced { .. } | LeaseError::Expired { .. })) => {
                    return Some(e)
                }
                Err(e) => {
                    log::warn!("lease renewal failed, will retry: {e}");
                    wait = retry;
                }
            }
        }
    }

    fn expired(&self) -> LeaseError {
        LeaseError::Expired {
            volume_id: self.lease.volume_id,
            epoch: self.lease.epoch(),
        }
    }
}

/// Resolves with [`LeaseError::Expired`] once the lease's monotonic expiry
/// passes, looking at the clock at least every `poll`.
async fn watch_expiry(lease: &Lease, poll: Duration) -> LeaseError {
    loop {
        let now = nanos(lease.clock.monotonic());
        let expires = lease.deadline.expires.load(Ordering::SeqCst);
        if now >= expires {
            return LeaseError::Expired {
                volume_id: lease.volume_id,
                epoch: lease.epoch(),
            };
        }
        let wait = Duration::from_nanos(expires - now).min(poll);
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
}

/// The epoch of a takeover: above both the stored epoch and the floor.
fn next_epoch(key: &str, stored: u64, floor: u64) -> Result<u64, LeaseError> {
    stored
        .max(floor)
        .checked_add(1)
        .ok_or_else(|| LeaseError::Invalid(format!("epoch overflow on {key}")))
}

fn validate(
    holder: &str,
    ttl: Duration,
    margin: Duration,
    owner: Option<&HolderId>,
) -> Result<(), LeaseError> {
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
    if margin >= ttl {
        return Err(LeaseError::Invalid(format!(
            "lease safety margin {margin:?} must be shorter than the ttl {ttl:?}"
        )));
    }
    if let Some(owner) = owner {
        owner.check().map_err(LeaseError::Invalid)?;
    }
    Ok(())
}
