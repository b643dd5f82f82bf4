//! `shale pool status`, the pool checks of `volume create`, and the space
//! part of `volume info`. Definitions: [`shale::pool`].
use std::path::Path;

use clap::Subcommand;
use shale::catalog::{Catalog, VolumeRecord};
use shale::config::{Config, PoolConfig};
use shale::engine::usage::{compute_detached, read};
use shale::error::Bytes;
use shale::pool::PoolStatus;

use super::volume::{format_utc_ms, render_table};

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Capacity, used, reserved, allocated, available and provisioned space
    /// (with the over-provisioning ratio), and each volume's part.
    Status {
        /// Print JSON (exact byte counts) instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(config: Option<&Path>, cmd: PoolCmd) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    super::runtime(false)?.block_on(async move {
        let catalog = Catalog::new(super::open_store(&cfg).await?);
        match cmd {
            PoolCmd::Status { json } => status(&catalog, &cfg.pool, json).await,
        }
    })
}

fn opt(v: Option<u64>) -> String {
    v.map_or("unlimited".to_string(), |b| Bytes(b).to_string())
}

async fn status(catalog: &Catalog, cfg: &PoolConfig, json: bool) -> anyhow::Result<()> {
    let st = shale::pool::status(catalog, cfg).await?;
    let warning = st.warning_message();
    if json {
        let value = serde_json::json!({
            "capacity": st.capacity,
            "warn_percent": st.warn_percent,
            "used": st.used,
            "reserved": st.reserved,
            "allocated": st.allocated,
            "available": st.available(),
            "provisioned": st.provisioned,
            "allocated_percent": st.percent(),
            "overprovisioning_ratio": st.overprovisioning(),
            "warning": warning,
            "volumes": st.volumes,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print_status(&st, warning.as_deref());
    }
    if let Some(w) = warning {
        eprintln!("shale: warning: {w}");
    }
    Ok(())
}

fn print_status(st: &PoolStatus, warning: Option<&str>) {
    let pct = st
        .percent()
        .map(|p| format!(" = {p:.1}% of capacity"))
        .unwrap_or_default();
    let ratio = st
        .overprovisioning()
        .map(|r| format!(" (over-provisioning ratio {r:.2})"))
        .unwrap_or_default();
    println!(
        "capacity:     {} (warning at {}%)",
        opt(st.capacity),
        st.warn_percent
    );
    println!(
        "used:         {} (data of the volumes and their snapshots)",
        Bytes(st.used)
    );
    println!(
        "reserved:     {} (sizes of thick volumes)",
        Bytes(st.reserved)
    );
    println!(
        "allocated:    {}{pct} (thin: used; thick: max(used, size))",
        Bytes(st.allocated)
    );
    println!("available:    {}", opt(st.available()));
    println!("provisioned:  {}{ratio}", Bytes(st.provisioned));
    println!(
        "state:        {}",
        warning.map_or("ok".to_string(), |w| format!("WARNING: {w}"))
    );
    if st.volumes.is_empty() {
        return;
    }
    println!();
    let mut rows = vec![[
        "NAME".to_string(),
        "SIZE".to_string(),
        "TYPE".to_string(),
        "USED".to_string(),
        "ALLOCATED".to_string(),
        "AS OF".to_string(),
    ]];
    for v in &st.volumes {
        rows.push([
            v.name.clone(),
            Bytes(v.size).to_string(),
            if v.thick { "thick" } else { "thin" }.to_string(),
            match &v.error {
                Some(e) => format!("unknown ({e})"),
                None => Bytes(v.used).to_string(),
            },
            Bytes(v.allocated).to_string(),
            v.updated_ms
                .map_or("now (computed)".to_string(), format_utc_ms),
        ]);
    }
    print!("{}", render_table(&rows));
}

/// Before `volume create`: refuse a thick volume the pool cannot reserve.
/// Returns the pool as it was (`None` when the capacity is unlimited).
pub async fn check_create(
    cfg: &Config,
    catalog: &Catalog,
    size: u64,
    thick: bool,
) -> anyhow::Result<Option<PoolStatus>> {
    if cfg.pool.capacity.is_none() {
        return Ok(None);
    }
    let st = shale::pool::status(catalog, &cfg.pool).await?;
    if thick {
        st.check_thick(size)?;
    }
    Ok(Some(st))
}

/// After `volume create`: warn on stderr about over-provisioning and a
/// reached warning threshold.
pub fn warn_created(before: Option<PoolStatus>, size: u64, thick: bool) {
    let Some(mut st) = before else { return };
    st.provisioned += size;
    if thick {
        st.allocated += size;
        st.reserved += size;
    }
    if let (Some(cap), Some(ratio)) = (st.capacity, st.overprovisioning()) {
        if st.provisioned > cap {
            eprintln!(
                "shale: warning: the pool is over-provisioned: volumes total {} for a capacity of {} (ratio {ratio:.2}); writes fail with ENOSPC once it is full",
                Bytes(st.provisioned),
                Bytes(cap)
            );
        }
    }
    if let Some(w) = st.warning_message() {
        eprintln!("shale: warning: {w}");
    }
}

/// The space part of `volume info`.
pub async fn volume_space(catalog: &Catalog, rec: &VolumeRecord) -> serde_json::Value {
    let store = catalog.store();
    let published = read(store, rec.id).await;
    let computed = compute_detached(store, rec.id, rec.size).await;
    let mut v = serde_json::json!({});
    match &published {
        Ok(Some(u)) => {
            v["used"] = u.used.into();
            v["live"] = u.live.into();
            v["snapshot_only"] = u.snapshot_only.into();
            v["updated_ms"] = u.updated_ms.into();
        }
        Ok(None) => {}
        Err(e) => v["error"] = e.to_string().into(),
    }
    match computed {
        Ok(d) => {
            if !matches!(published, Ok(Some(_))) {
                v["used"] = d.usage.used.into();
                v["live"] = d.usage.live.into();
                v["snapshot_only"] = d.usage.snapshot_only.into();
            }
            v["snapshots_as_of_last_checkpoint"] = (!d.complete).into();
            v["snapshots"] = d
                .snapshots
                .iter()
                .zip(&d.usage.snapshot_unique)
                .map(|(s, u)| serde_json::json!({"name": s.name, "id": s.id, "unique": u}))
                .collect::<Vec<_>>()
                .into();
        }
        Err(e) => v["snapshots_error"] = e.to_string().into(),
    }
    v
}

/// Print what [`volume_space`] returned.
pub fn print_volume_space(v: &serde_json::Value) {
    let n = |k: &str| v[k].as_u64().map(Bytes);
    if let (Some(used), Some(live), Some(snap)) = (n("used"), n("live"), n("snapshot_only")) {
        let at = v["updated_ms"]
            .as_u64()
            .map_or("computed now".to_string(), |ms| {
                format!("published {}", format_utc_ms(ms))
            });
        println!("used:           {used} (live data {live}, held only by snapshots {snap}; {at})");
    }
    if let Some(e) = v["error"].as_str() {
        println!("usage error:    {e}");
    }
    if let Some(e) = v["snapshots_error"].as_str() {
        println!("snapshots:      cannot compute ({e})");
    }
    let Some(snaps) = v["snapshots"].as_array().filter(|s| !s.is_empty()) else {
        return;
    };
    let note = if v["snapshots_as_of_last_checkpoint"].as_bool() == Some(true) {
        " (as of the volume's last checkpoint)"
    } else {
        ""
    };
    println!("snapshots:      unique space of each{note}");
    let mut rows = vec![["  NAME".to_string(), "ID".to_string(), "UNIQUE".to_string()]];
    for s in snaps {
        rows.push([
            format!("  {}", s["name"].as_str().unwrap_or("?")),
            s["id"].as_u64().unwrap_or(0).to_string(),
            Bytes(s["unique"].as_u64().unwrap_or(0)).to_string(),
        ]);
    }
    print!("{}", render_table(&rows));
}
