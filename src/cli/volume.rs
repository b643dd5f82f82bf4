//! `shale volume create|list|info|delete|...`: the catalog, from the command line.
use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use shale::catalog::{Catalog, VolumeRecord, VolumeState};
use shale::clock::{Clock, SystemClock};
use shale::config::Config;
use shale::error::Bytes;
use shale::size::{format_size, parse_size};

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a volume (thin unless --thick).
    Create {
        /// Volume name: 1 to 64 characters of A-Z a-z 0-9 . _ -
        name: String,
        /// Size, e.g. 10G, 512MiB or a byte count; a multiple of 4 KiB.
        /// With --from it may be left out (it must equal the parent's).
        #[arg(long, short, value_parser = parse_size_arg, required_unless_present = "from")]
        size: Option<u64>,
        /// Reserve the whole size in the pool's capacity.
        #[arg(long)]
        thick: bool,
        /// Create a clone of this snapshot (VOLUME@SNAPSHOT), like `shale clone`.
        #[arg(long, value_name = "VOLUME@SNAPSHOT", conflicts_with = "thick")]
        from: Option<String>,
    },
    /// List volumes.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one volume and the bytes it holds in the store.
    Info {
        /// Volume name.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy a raw image file into the start of a volume (through the engine).
    Import {
        /// Volume name.
        name: String,
        /// Raw image file; at most the volume's size.
        file: std::path::PathBuf,
    },
    /// Copy a whole volume into a raw image file (sparse where it reads zeros).
    Export {
        /// Volume name.
        name: String,
        /// Output file (created or truncated).
        file: std::path::PathBuf,
    },
    /// Show who holds a volume's lease; with --force, steal it (bumping the
    /// epoch) and release it, so the volume can be attached elsewhere at once.
    /// The old holder is fenced: its next renewal fails and it stops writing.
    Unlock {
        /// Volume name.
        name: String,
        /// Steal a lease that a live process holds.
        #[arg(long)]
        force: bool,
    },
    /// Drop every record after SEQ from this host's WAL of a volume, the
    /// way past a damaged WAL that stops the volume from opening (the open
    /// error names the segment, the offset and the SEQ to give). Prints
    /// exactly what goes (records, sequence range, bytes, segments) before
    /// doing it and copies the changed segments aside first. Refused while
    /// the volume is in use.
    DiscardWal {
        /// Volume name.
        name: String,
        /// Keep records up to this sequence number, drop every later one.
        #[arg(long, value_name = "SEQ")]
        after: u64,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
    /// Delete a volume and all its data.
    Delete {
        /// Volume name.
        name: String,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

/// `volume unlock`: report a free lease; refuse a live one naming its
/// holder unless `force`, then steal and release it at a new epoch.
async fn unlock(cfg: &Config, catalog: &Catalog, name: &str, force: bool) -> anyhow::Result<()> {
    use shale::catalog::lease::{read_lease, Lease};
    let rec = catalog.get(name).await?;
    let store = catalog.store().clone();
    let clock: shale::clock::DynClock = std::sync::Arc::new(SystemClock);
    let now_ms = u64::try_from(clock.now().as_millis()).unwrap_or(u64::MAX);
    let current = read_lease(&store, rec.id).await?;
    let Some((lease, _)) = current.filter(|(l, _)| l.is_live(now_ms)) else {
        println!("volume {name:?} is not locked");
        return Ok(());
    };
    if !force {
        anyhow::bail!(
            "volume {name:?} is locked by {:?} (epoch {}) until {}; \
             use --force to steal the lease (the holder is fenced)",
            lease.holder,
            lease.epoch,
            format_utc_ms(lease.expires_at_ms)
        );
    }
    let holder = format!("unlock:{}", shale::daemon::holder_name());
    let stolen = Lease::steal(store, rec.id, &holder, cfg.lease.ttl(), clock).await?;
    stolen.release().await?;
    println!(
        "volume {name:?}: lease taken from {:?} at epoch {} and released; the old holder is fenced",
        lease.holder,
        stolen.epoch()
    );
    Ok(())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

pub fn run(config: Option<&Path>, cmd: VolumeCmd) -> anyhow::Result<()> {
    if let VolumeCmd::Create {
        name,
        size,
        from: Some(spec),
        ..
    } = cmd
    {
        return super::snapshot::create_from(config, &spec, &name, size);
    }
    let cfg = Config::load(config)?;
    // Import and export open the volume, whose background work (destage,
    // lease renewal) needs worker threads; catalog commands do not.
    let opens_volume = matches!(cmd, VolumeCmd::Import { .. } | VolumeCmd::Export { .. });
    super::runtime(opens_volume)?.block_on(async move {
        let catalog = || async { anyhow::Ok(Catalog::new(super::open_store(&cfg).await?)) };
        match cmd {
            VolumeCmd::Create {
                name, size, thick, ..
            } => {
                let size = size.context("--size is required without --from")?;
                create(&cfg, &catalog().await?, &name, size, thick).await
            }
            VolumeCmd::List { json } => list(&catalog().await?, json).await,
            VolumeCmd::Info { name, json } => info(&cfg, &catalog().await?, &name, json).await,
            VolumeCmd::Unlock { name, force } => {
                unlock(&cfg, &catalog().await?, &name, force).await
            }
            VolumeCmd::Delete { name, yes } => delete(&cfg, &catalog().await?, &name, yes).await,
            VolumeCmd::DiscardWal { name, after, yes } => {
                super::discard::discard_wal(&cfg, &catalog().await?, &name, after, yes).await
            }
            VolumeCmd::Import { name, file } => super::image::import(&cfg, &name, &file).await,
            VolumeCmd::Export { name, file } => super::image::export(&cfg, &name, &file).await,
        }
    })
}

async fn create(
    cfg: &Config,
    catalog: &Catalog,
    name: &str,
    size: u64,
    thick: bool,
) -> anyhow::Result<()> {
    let pool = super::pool::check_create(cfg, catalog, size, thick).await?;
    let now_ms = SystemClock.now().as_millis() as u64;
    let rec = catalog.create(name, size, thick, now_ms).await?;
    println!(
        "created volume {} (id {}, size {}, {})",
        rec.name,
        rec.id,
        format_size(rec.size),
        if rec.thick { "thick" } else { "thin" }
    );
    super::pool::warn_created(pool, size, thick);
    Ok(())
}

async fn list(catalog: &Catalog, json: bool) -> anyhow::Result<()> {
    let records = catalog.list().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    let mut rows = vec![[
        "NAME".to_string(),
        "ID".to_string(),
        "SIZE".to_string(),
        "THICK".to_string(),
        "CREATED".to_string(),
        "STATE".to_string(),
    ]];
    for r in &records {
        rows.push([
            r.name.clone(),
            r.id.to_string(),
            format_size(r.size),
            if r.thick { "yes" } else { "no" }.to_string(),
            format_utc_ms(r.created_ms),
            state_name(r.state).to_string(),
        ]);
    }
    print!("{}", render_table(&rows));
    Ok(())
}

async fn info(cfg: &Config, catalog: &Catalog, name: &str, json: bool) -> anyhow::Result<()> {
    let rec = catalog.get(name).await?;
    let usage = catalog.usage(&rec).await?;
    let prefix = shale::engine::format::layout::volume_prefix(rec.id);
    let local_dir = cfg.volume_dir(rec.id);
    let space = super::pool::volume_space(catalog, &rec).await;
    if json {
        let value = serde_json::json!({
            "record": rec,
            "store_prefix": prefix,
            "stored_objects": usage.objects,
            "stored_bytes": usage.bytes,
            "local_dir": local_dir,
            "space": space,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    print_record(&rec);
    println!("store prefix:   {prefix}");
    println!(
        "stored:         {} in {} objects",
        Bytes(usage.bytes),
        usage.objects
    );
    println!("local dir:      {}", local_dir.display());
    super::pool::print_volume_space(&space);
    Ok(())
}

fn print_record(rec: &VolumeRecord) {
    println!("name:           {}", rec.name);
    println!("id:             {}", rec.id);
    println!(
        "size:           {} ({} bytes)",
        format_size(rec.size),
        rec.size
    );
    println!(
        "provisioning:   {}",
        if rec.thick { "thick" } else { "thin" }
    );
    println!("created:        {}", format_utc_ms(rec.created_ms));
    println!("state:          {}", state_name(rec.state));
    if let Some(parent) = &rec.parent {
        println!("parent:         {parent}");
    }
}

async fn delete(cfg: &Config, catalog: &Catalog, name: &str, yes: bool) -> anyhow::Result<()> {
    // Look it up first so a typo is reported before any question is asked.
    let rec = catalog.get(name).await?;
    if !yes && !confirm(&rec)? {
        anyhow::bail!("volume {name:?} was not deleted");
    }
    let now_ms = SystemClock.now().as_millis() as u64;
    let (_, removed) = catalog.delete(name, now_ms).await?;
    // This host's WAL and cache for the volume (ids are never reused, so
    // nothing else can be using the directory).
    if let Some(cache) = cfg.external_cache_dir(rec.id) {
        if let Err(e) = std::fs::remove_dir_all(&cache) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!(
                    "warning: the read cache {} of deleted volume {name:?} was not removed: {e}",
                    cache.display()
                );
            }
        }
    }
    let local_dir = cfg.volume_dir(rec.id);
    match std::fs::remove_dir_all(&local_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "volume {name:?} was deleted from the store, but its local directory {} was not removed",
                    local_dir.display()
                )
            })
        }
    }
    println!(
        "deleted volume {} (id {}; removed {} objects, {})",
        rec.name,
        rec.id,
        removed.objects,
        Bytes(removed.bytes)
    );
    Ok(())
}

/// Ask on the terminal; without one, refuse (the caller must pass --yes).
fn confirm(rec: &VolumeRecord) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "refusing to delete volume {:?} without --yes (stdin is not a terminal)",
            rec.name
        );
    }
    eprint!(
        "Delete volume {} ({}) and all its data? Type the name to confirm: ",
        rec.name,
        format_size(rec.size)
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == rec.name)
}

fn state_name(s: VolumeState) -> &'static str {
    match s {
        VolumeState::Ready => "ready",
        VolumeState::Deleting => "deleting",
    }
}

/// Left-aligned columns separated by two spaces, no borders (comfy-table),
/// the first row as the header.
pub fn render_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    for row in rows {
        table.add_row(row.to_vec());
    }
    for col in table.column_iter_mut() {
        col.set_padding((0, 2));
    }
    let mut out = table.trim_fmt();
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// `YYYY-MM-DD HH:MM:SSZ` for milliseconds since the Unix epoch (UTC);
/// out-of-range values print as the raw number.
pub fn format_utc_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc_ms(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(format_utc_ms(1_795_312_496_789), "2026-11-22 01:54:56Z");
        assert_eq!(format_utc_ms(u64::MAX), format!("{} ms", u64::MAX));
    }

    #[test]
    fn table_aligns_columns() {
        let rows = [
            ["A".to_string(), "BB".to_string()],
            ["ccc".to_string(), "d".to_string()],
        ];
        assert_eq!(render_table(&rows), "A    BB\nccc  d\n");
        assert_eq!(render_table::<2>(&[]), "");
    }
}
