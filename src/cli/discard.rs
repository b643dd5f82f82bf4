//! `shale volume discard-wal NAME --after SEQ`: the operator's way past a
//! damaged local WAL. Says exactly what it throws away before doing it.
use std::io::{IsTerminal, Write};

use shale::catalog::lease::read_lease;
use shale::catalog::Catalog;
use shale::clock::{Clock, SystemClock};
use shale::config::Config;
use shale::engine::meta::manifest::read_manifest_if_any;
use shale::engine::wal::{discard, fs};
use shale::engine::EngineError;

pub async fn discard_wal(
    cfg: &Config,
    catalog: &Catalog,
    name: &str,
    after: u64,
    yes: bool,
) -> anyhow::Result<()> {
    let rec = catalog.get(name).await?;
    let store = catalog.store().clone();
    let now = SystemClock.now();
    let now_ms = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    if let Some((lease, _)) = read_lease(&store, rec.id)
        .await?
        .filter(|(l, _)| l.is_live(now_ms))
    {
        anyhow::bail!(
            "volume {name:?} is in use by {:?} (epoch {}); stop it before discarding its WAL",
            lease.holder,
            lease.epoch
        );
    }
    let stored = match read_manifest_if_any(&store, rec.id).await {
        Ok(found) => found.map(|(m, _)| m.last_seq),
        Err(e @ EngineError::Manifest { .. }) => {
            return Err(anyhow::Error::new(e)
                .context(format!("manifest of volume {name:?} does not parse")))
        }
        Err(EngineError::Store(e)) => return Err(e.into()),
        Err(e) => return Err(e.into()),
    };
    let local_dir = cfg.volume_dir(rec.id);
    let dir = local_dir.join("wal");
    let fs = fs::real();
    let plan = discard::plan(&fs, &dir, rec.id, after)?;
    if plan.is_empty() {
        println!(
            "volume {name:?}: the WAL in {} holds nothing after seq {after}; nothing discarded",
            dir.display()
        );
        return Ok(());
    }
    println!(
        "volume {name:?}: discarding from the WAL in {}: {plan}",
        dir.display()
    );
    for c in &plan.cuts {
        println!("  {}: keep {} of {} bytes", c.path.display(), c.keep, c.len);
    }
    if let Some(stored) = stored {
        println!("the object store holds the writes up to seq {stored}; later writes discarded here are lost");
    }
    if !yes && !confirm(name)? {
        anyhow::bail!("nothing was discarded");
    }
    let aside = local_dir.join(format!("wal.discarded-{}", now.as_secs()));
    plan.apply(&fs, &dir, &aside)?;
    println!(
        "discarded {plan}; the changed segments were copied to {} first (delete it when no longer needed)",
        aside.display()
    );
    Ok(())
}

/// Ask on the terminal; without one, refuse (the caller must pass --yes).
fn confirm(name: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "refusing to discard WAL records of volume {name:?} without --yes (stdin is not a terminal)"
        );
    }
    eprint!("Discard these WAL records of volume {name}? Type the name to confirm: ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == name)
}
