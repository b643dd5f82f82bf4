//! Everything measured about one attached volume, put together into a
//! [`VolumeReport`] on request: the engine's counters, the store requests
//! ([`StoreMetrics`]), each frontend's requests ([`RequestMetrics`]), the
//! lease, the pool figures, and the idle time behind the cost figures.
//!
//! Idle: the volume is idle from [`IDLE_AFTER`] after its last block
//! request on, while nothing is waiting to be stored. An [`IdleTracker`]
//! decides this on every tick (the task [`VolumeMetrics::spawn_ticker`]
//! starts ticks every [`IDLE_TICK`]) from the request count and the
//! unstored bytes, adds the time between two idle ticks to the idle time,
//! and tells the store decorator, which counts requests made while idle.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::cost::Cost;
use super::report::{Family, FrontendInfo, Kind, LeaseInfo, Sample, Unit, VolumeReport};
use super::requests::{request_families, RequestMetrics};
use crate::catalog::lease::Lease;
use crate::clock::DynClock;
use crate::engine::{BlockDevice, Volume};
use crate::store::metered::StoreMetrics;

/// Quiet time after the last block request before the volume counts as idle.
pub const IDLE_AFTER: Duration = Duration::from_secs(10);
/// How often idleness is decided.
pub const IDLE_TICK: Duration = Duration::from_secs(1);

/// Decides idleness from successive observations (see the module docs).
#[derive(Debug, Default)]
pub struct IdleTracker {
    last_tick: Option<Duration>,
    last_requests: u64,
    last_activity: Duration,
    idle: bool,
    idle_time: Duration,
}

impl IdleTracker {
    /// Observe at `now` the total block requests so far and the unstored
    /// bytes; returns whether the volume is idle now.
    pub fn tick(&mut self, now: Duration, requests: u64, unstored: u64) -> bool {
        if self.last_tick.is_none() || requests != self.last_requests || unstored > 0 {
            self.last_activity = now;
        }
        let idle = now.saturating_sub(self.last_activity) >= IDLE_AFTER;
        if let (true, true, Some(last)) = (idle, self.idle, self.last_tick) {
            self.idle_time += now.saturating_sub(last);
        }
        self.last_tick = Some(now);
        self.last_requests = requests;
        self.idle = idle;
        idle
    }

    /// Total idle time observed.
    pub fn idle_time(&self) -> Duration {
        self.idle_time
    }
}

/// The metrics of one attached volume.
#[derive(Debug)]
pub struct VolumeMetrics {
    name: String,
    id: u64,
    clock: DynClock,
    attached_ms: u64,
    volume: Weak<Volume>,
    store: Arc<StoreMetrics>,
    lease: Weak<Lease>,
    pool_capacity: Option<u64>,
    frontends: Mutex<Vec<(FrontendInfo, Arc<RequestMetrics>)>>,
    idle: Mutex<IdleTracker>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl VolumeMetrics {
    pub fn new(
        name: &str,
        id: u64,
        volume: &Arc<Volume>,
        store: Arc<StoreMetrics>,
        lease: &Arc<Lease>,
        pool_capacity: Option<u64>,
        clock: DynClock,
    ) -> VolumeMetrics {
        VolumeMetrics {
            name: name.to_string(),
            id,
            attached_ms: ms(clock.now()),
            clock,
            volume: Arc::downgrade(volume),
            store,
            lease: Arc::downgrade(lease),
            pool_capacity,
            frontends: Mutex::new(Vec::new()),
            idle: Mutex::new(IdleTracker::default()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Register a frontend serving the volume (`kind` is `nbd` or `ublk`,
    /// `device` where clients find it); returns the metrics its requests
    /// go to (wrap the device in a [`super::requests::MeteredDevice`]).
    /// A second registration of the same kind shares the first's metrics.
    pub fn frontend(&self, kind: &str, device: &str) -> Arc<RequestMetrics> {
        let mut fes = self.frontends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((info, m)) = fes.iter_mut().find(|(i, _)| i.kind == kind) {
            info.device = device.to_string();
            return m.clone();
        }
        let m = Arc::new(RequestMetrics::new(kind));
        fes.push((
            FrontendInfo {
                kind: kind.to_string(),
                device: device.to_string(),
            },
            m.clone(),
        ));
        m
    }

    /// Change where frontend `kind` is found (a ublk device number is known
    /// only once the device is live).
    pub fn set_device(&self, kind: &str, device: &str) {
        let mut fes = self.frontends.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((info, _)) = fes.iter_mut().find(|(i, _)| i.kind == kind) {
            info.device = device.to_string();
        }
    }

    fn requests_total(&self) -> u64 {
        let fes = self.frontends.lock().unwrap_or_else(|e| e.into_inner());
        fes.iter().map(|(_, m)| m.total_requests()).sum()
    }

    /// Decide idleness now (see the module docs).
    pub fn tick(&self) {
        let unstored = self
            .volume
            .upgrade()
            .map_or(0, |v| v.stats().unstored_bytes);
        let requests = self.requests_total();
        let now = self.clock.now();
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tick(now, requests, unstored);
        self.store.set_idle(idle);
    }

    /// Tick every [`IDLE_TICK`] on the current tokio runtime until the
    /// returned task is aborted or the metrics are dropped.
    pub fn spawn_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(IDLE_TICK);
            loop {
                every.tick().await;
                match weak.upgrade() {
                    Some(m) => m.tick(),
                    None => return,
                }
            }
        })
    }

    /// The report of the volume now; `None` once the volume is closed.
    pub fn report(&self) -> Option<VolumeReport> {
        let vol = self.volume.upgrade()?;
        let now = self.clock.now();
        let mut families = Vec::new();
        let mut req = request_families();
        let mut info = Family::new(
            "frontend_info",
            Kind::Gauge,
            None,
            "Frontends serving the volume (value 1), with where clients find them",
        );
        let frontends: Vec<FrontendInfo> = {
            let fes = self.frontends.lock().unwrap_or_else(|e| e.into_inner());
            for (i, m) in fes.iter() {
                m.add_samples(&mut req);
                info.samples.push(Sample::value(
                    &[("frontend", &i.kind), ("device", &i.device)],
                    1.0,
                ));
            }
            fes.iter().map(|(i, _)| i.clone()).collect()
        };
        families.extend(req);
        families.push(info);
        families.extend(engine_families(&vol));
        families.extend(self.store.families());
        let lease = self.lease_info(&vol);
        families.extend(lease_families(&lease, ms(now)));
        families.extend(self.space_families(&vol));
        let idle_time = self
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .idle_time();
        families.push(gauge_or_counter(
            "idle",
            Kind::Counter,
            Some(Unit::Seconds),
            "Time the volume was idle (no block request for 10 s and nothing unstored)",
            idle_time.as_secs_f64(),
        ));
        let mut report = VolumeReport {
            volume: self.name.clone(),
            id: self.id,
            now_ms: ms(now),
            attached_ms: self.attached_ms,
            frontends,
            lease,
            families,
        };
        report
            .families
            .extend(Cost::from_report(&report).families());
        Some(report)
    }

    fn lease_info(&self, vol: &Volume) -> LeaseInfo {
        let fenced = vol.fenced();
        match self.lease.upgrade() {
            Some(l) => LeaseInfo {
                holder: l.holder(),
                epoch: l.epoch(),
                expires_at_ms: l.expires_at_ms(),
                fenced,
            },
            None => LeaseInfo {
                holder: String::new(),
                epoch: 0,
                expires_at_ms: 0,
                fenced: fenced.or_else(|| Some("the lease was dropped".into())),
            },
        }
    }

    fn space_families(&self, vol: &Volume) -> Vec<Family> {
        let s = vol.space_usage();
        let bytes = |name, help, v: u64| {
            gauge_or_counter(name, Kind::Gauge, Some(Unit::Bytes), help, v as f64)
        };
        let mut out = vec![
            bytes("volume_size", "Size of the volume", vol.size()),
            bytes(
                "space_used",
                "Space the volume uses: live data plus data only its snapshots hold",
                s.used,
            ),
            bytes(
                "space_live",
                "Data the volume's live map references",
                s.live,
            ),
            bytes(
                "space_snapshot_only",
                "Data only the volume's snapshots reference",
                s.snapshot_only,
            ),
            bytes(
                "space_reserved",
                "Space reserved for the volume (its size if thick)",
                s.reserve,
            ),
        ];
        if let Some(limit) = s.limit {
            out.push(bytes(
                "space_limit",
                "Most space the volume may use: the pool capacity less the other volumes' allocation",
                limit,
            ));
        }
        if let Some(cap) = self.pool_capacity {
            out.push(bytes(
                "pool_capacity",
                "Capacity of the pool (pool.capacity)",
                cap,
            ));
        }
        out
    }
}

fn gauge_or_counter(name: &str, kind: Kind, unit: Option<Unit>, help: &str, v: f64) -> Family {
    Family::new(name, kind, unit, help).with(Sample::value(&[], v))
}

fn lease_families(l: &LeaseInfo, now_ms: u64) -> Vec<Family> {
    let to_expiry = (l.expires_at_ms as f64 - now_ms as f64) / 1e3;
    vec![
        gauge_or_counter(
            "lease_held",
            Kind::Gauge,
            None,
            "1 while this server holds the volume's lease and is not fenced",
            if l.fenced.is_none() && to_expiry > 0.0 {
                1.0
            } else {
                0.0
            },
        ),
        gauge_or_counter(
            "lease_epoch",
            Kind::Gauge,
            None,
            "Epoch of the lease held (the writer epoch)",
            l.epoch as f64,
        ),
        gauge_or_counter(
            "lease_expiry",
            Kind::Gauge,
            Some(Unit::Seconds),
            "Time until the lease expires unless renewed (negative: expired)",
            to_expiry,
        ),
    ]
}

fn engine_families(vol: &Volume) -> Vec<Family> {
    let s = vol.stats();
    let f = |name, kind, unit, help, v: f64| gauge_or_counter(name, kind, unit, help, v);
    let secs = |us: u64| us as f64 / 1e6;
    use Kind::{Counter, Gauge};
    let b = Some(Unit::Bytes);
    let t = Some(Unit::Seconds);
    vec![
        f(
            "unstored",
            Gauge,
            b,
            "Acknowledged bytes not yet in the object store",
            s.unstored_bytes as f64,
        ),
        f(
            "unstored_limit",
            Gauge,
            b,
            "Bound on unstored bytes in force (engine.max_unstored_bytes, or less when destage cannot use that much)",
            s.max_unstored_bytes as f64,
        ),
        f(
            "unstored_age",
            Gauge,
            t,
            "Age of the oldest acknowledged write not yet in the object store",
            s.oldest_unstored_ms as f64 / 1e3,
        ),
        f(
            "unstored_age_limit",
            Gauge,
            t,
            "Bound on the age of unstored writes (engine.max_unstored_seconds)",
            s.max_unstored_seconds as f64,
        ),
        f(
            "wal",
            Gauge,
            b,
            "Bytes in local WAL segment files",
            s.wal_bytes as f64,
        ),
        f(
            "wal_last_sequence",
            Gauge,
            None,
            "Last operation sequence number written to the WAL",
            s.last_seq as f64,
        ),
        f(
            "stored_sequence",
            Gauge,
            None,
            "Last operation sequence number in the object store",
            s.stored_seq as f64,
        ),
        f(
            "backpressure",
            Counter,
            t,
            "Time writes waited for room (unstored bounds) or for a snapshot",
            secs(s.backpressure_us),
        ),
        f(
            "destage_chunks",
            Counter,
            None,
            "Chunk objects written by destage",
            s.chunks_written as f64,
        ),
        f(
            "destage",
            Counter,
            b,
            "Bytes of chunk objects written by destage",
            s.chunk_bytes_written as f64,
        ),
        f(
            "destage_duration",
            Counter,
            t,
            "Time chunk puts took",
            secs(s.destage_us),
        ),
        f(
            "destage_errors",
            Counter,
            None,
            "Destage attempts that failed (and were retried)",
            s.destage_errors as f64,
        ),
        f(
            "checkpoints",
            Counter,
            None,
            "Checkpoints written and committed",
            s.checkpoints_written as f64,
        ),
        f(
            "checkpoint_duration",
            Counter,
            t,
            "Time checkpoints took (compaction, put, commit)",
            secs(s.checkpoint_us),
        ),
        f(
            "chunks_deleted",
            Counter,
            None,
            "Chunk objects deleted after nothing referenced them",
            s.chunks_deleted as f64,
        ),
        f(
            "compacted_chunks",
            Counter,
            None,
            "Sparse chunks whose live data compaction moved",
            s.chunks_compacted as f64,
        ),
        f(
            "compaction_written",
            Counter,
            b,
            "Bytes of compaction objects written",
            s.compacted_bytes_written as f64,
        ),
        f(
            "cache_hits",
            Counter,
            None,
            "Reads of store data served by the local read cache",
            s.cache_hits as f64,
        ),
        f(
            "cache_misses",
            Counter,
            None,
            "Reads of store data the local read cache could not serve",
            s.cache_misses as f64,
        ),
        f(
            "cache_hit",
            Counter,
            b,
            "Bytes served by the local read cache",
            s.cache_hit_bytes as f64,
        ),
        f(
            "cache_evictions",
            Counter,
            None,
            "Read cache windows evicted for others",
            s.cache_evictions as f64,
        ),
        f(
            "cache_corrupt",
            Counter,
            None,
            "Read cache entries that failed their CRC check (damaged or stale) and were refetched",
            s.cache_corrupt as f64,
        ),
        f(
            "cache_restored",
            Gauge,
            None,
            "Read cache windows kept from the previous run when the volume was opened",
            s.cache_restored as f64,
        ),
        f(
            "cache_capacity",
            Gauge,
            b,
            "Size of the local read cache (engine.cache_size)",
            s.cache_capacity_bytes as f64,
        ),
        f(
            "prefetch",
            Counter,
            b,
            "Bytes readahead of sequential reads fetched from the store into the read cache",
            s.prefetch_bytes as f64,
        ),
        f(
            "prefetch_hit",
            Counter,
            b,
            "Bytes reads took from readahead data still in memory (part of the cache hit bytes)",
            s.prefetch_hit_bytes as f64,
        ),
        f(
            "prefetch_errors",
            Counter,
            None,
            "Readahead GETs that failed (logged; reads fetch the data themselves)",
            s.prefetch_errors as f64,
        ),
        f(
            "fetch_shared",
            Counter,
            None,
            "Read cache windows a read took from a store GET already in flight instead of sending its own",
            s.fetch_shared as f64,
        ),
        f(
            "map_extents",
            Gauge,
            None,
            "Entries in the live extent map",
            s.map_extents as f64,
        ),
        f(
            "snapshots_taken",
            Counter,
            None,
            "Snapshots taken while attached",
            s.snapshots_taken as f64,
        ),
        f(
            "fenced",
            Gauge,
            None,
            "1 once the volume is fenced (its lease was lost)",
            if vol.fenced().is_some() { 1.0 } else { 0.0 },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_starts_after_quiet_time_and_counts_only_idle_intervals() {
        let mut t = IdleTracker::default();
        let s = Duration::from_secs;
        assert!(!t.tick(s(0), 0, 0));
        assert!(!t.tick(s(5), 3, 0), "requests are activity");
        assert!(!t.tick(s(14), 3, 0));
        assert!(t.tick(s(15), 3, 0), "10 s after the last activity");
        assert_eq!(t.idle_time(), Duration::ZERO);
        assert!(t.tick(s(20), 3, 0));
        assert_eq!(t.idle_time(), s(5));
        assert!(!t.tick(s(21), 3, 4096), "unstored data is activity");
        assert!(!t.tick(s(25), 3, 0));
        assert_eq!(t.idle_time(), s(5));
        assert!(t.tick(s(31), 3, 0));
        assert!(t.tick(s(40), 3, 0));
        assert_eq!(t.idle_time(), s(14));
    }
}
