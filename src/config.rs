//! The service configuration: plain serde data read from YAML.
//!
//! Invariants:
//! 1. Unknown keys are rejected at every level, naming the key.
//! 2. Every field has a default, so an empty file (or no file) is a valid
//!    configuration; each field's doc comment states its default and bounds.
//! 3. [`Config::validate`] enforces every bound; [`Config::load`] always
//!    validates, so a `Config` obtained from it is usable as is.
//! 4. Relative paths in a file are resolved against the directory holding the
//!    file, so a config works the same from any working directory.
//! 5. Errors name the file and the field.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::config::EngineConfig;
use crate::engine::warm_start::WarmStartConfig;
use crate::store::StoreConfig;

/// Where [`Config::load`] looks when no path is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/shale/shale.yaml";
/// Default for [`Config::data_dir`].
pub const DEFAULT_DATA_DIR: &str = "/var/lib/shale";
/// A commented reference configuration listing every field with its default
/// and bounds (what `shale config example` prints). A test checks that it
/// parses to exactly [`Config::default`].
pub const EXAMPLE_CONFIG: &str = include_str!("config/example.yaml");
/// Default for [`MetricsConfig::listen`].
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9810";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Local state: each volume's WAL and read cache live in
    /// `<data_dir>/volumes/<id as 16 hex digits>/`. Put it on fast local
    /// storage (NVMe). Default `/var/lib/shale`; must not be empty.
    pub data_dir: PathBuf,
    /// The object store holding chunk objects, checkpoints and the catalog.
    /// Default: `{type: fs, path: <data_dir>/store}` (a local directory).
    pub store: StoreConfig,
    /// Volume engine tuning (WAL, destage, checkpoints, cache).
    pub engine: EngineConfig,
    /// Capacity accounting for the pool of volumes in this store.
    pub pool: PoolConfig,
    /// The NBD server.
    pub nbd: NbdConfig,
    /// Volume leases: failover time against store requests.
    pub lease: LeaseConfig,
    /// The metrics exporter (`shale exporter`).
    pub metrics: MetricsConfig,
    /// Warm start of served volumes: what the first seconds after an
    /// attach read is read back at the next attach.
    pub warm_start: WarmStartConfig,
}

/// Lease timing (see README, "Leases"). With the defaults an idle volume
/// renews its lease once a minute, another host can take a volume over at
/// most two minutes after its server's host died, and writes stop being
/// acknowledged ten seconds before the lease could expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How long a lease stays live without renewal: the longest a volume
    /// stays unavailable after its server's host dies (a crashed server is
    /// restarted on the same host at once). Default 120; 5..=3600.
    pub ttl_seconds: u64,
    /// How often the holder renews (one store request each). Default 60;
    /// at least 1, and `renew_seconds + safety_margin_seconds < ttl_seconds`
    /// (the difference is the time left to retry a failed renewal before
    /// acknowledgements wait).
    pub renew_seconds: u64,
    /// Writes are acknowledged only until this long before the lease could
    /// expire; it must exceed the difference between the clocks of any two
    /// hosts sharing the store. Default 10; at least 1.
    pub safety_margin_seconds: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl_seconds: 120,
            renew_seconds: 60,
            safety_margin_seconds: 10,
        }
    }
}

impl LeaseConfig {
    pub fn ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ttl_seconds)
    }

    pub fn renew_period(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.renew_seconds)
    }

    pub fn margin(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.safety_margin_seconds)
    }

    /// Check the documented bounds; on failure (field, reason).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(5..=3600).contains(&self.ttl_seconds) {
            return Err((
                "lease.ttl_seconds",
                format!("{} must be in 5..=3600", self.ttl_seconds),
            ));
        }
        if self.renew_seconds == 0 {
            return Err(("lease.renew_seconds", "must be at least 1".into()));
        }
        if self.safety_margin_seconds == 0 {
            return Err(("lease.safety_margin_seconds", "must be at least 1".into()));
        }
        if self
            .renew_seconds
            .saturating_add(self.safety_margin_seconds)
            >= self.ttl_seconds
        {
            return Err((
                "lease.renew_seconds",
                format!(
                    "renew_seconds ({}) + safety_margin_seconds ({}) must be less than \
                     ttl_seconds ({}), or a single late renewal stops acknowledgements",
                    self.renew_seconds, self.safety_margin_seconds, self.ttl_seconds
                ),
            ));
        }
        Ok(())
    }
}

/// Metrics exporter settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address and port `shale exporter` serves `GET /metrics` on
    /// (`IP:port`). Default `127.0.0.1:9810`.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN
                .parse()
                .expect("constant address parses"),
        }
    }
}

/// Pool capacity settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Bytes the volumes of this store may allocate (thin: data used, thick:
    /// their size; see [`crate::pool`]); writes needing more fail with
    /// ENOSPC. Absent = unlimited. Sizes may be written as `500GiB`.
    /// Default unlimited; if set, at least 1 MiB.
    #[serde(with = "crate::size::serde_opt_bytes")]
    pub capacity: Option<u64>,
    /// Warn when the allocated space reaches this percentage of `capacity`.
    /// Default 80; 1..=100.
    pub warn_percent: u8,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            capacity: None,
            warn_percent: 80,
        }
    }
}

mod nbd;
pub use nbd::{
    is_loopback, parse_listen, parse_mode, NbdAccessRule, NbdConfig, NbdTlsConfig,
    DEFAULT_NBD_PORT, DEFAULT_NBD_SOCKET,
};

/// The file format: like [`Config`] but with the store optional, because its
/// default depends on `data_dir`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    store: Option<StoreConfig>,
    engine: EngineConfig,
    pool: PoolConfig,
    nbd: NbdConfig,
    lease: LeaseConfig,
    metrics: MetricsConfig,
    warm_start: WarmStartConfig,
}

/// Where a configuration came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Built-in defaults (no file).
    Defaults,
    /// A file.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Defaults => write!(f, "built-in defaults"),
            Origin::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file given explicitly does not exist.
    #[error("config file {} does not exist", .path.display())]
    Missing { path: PathBuf },
    /// The file exists but could not be read.
    #[error("cannot read config file {}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown key or a value of the wrong type.
    #[error("{origin}: {message}")]
    Parse { origin: Origin, message: String },
    /// A value is outside its documented bounds.
    #[error("{origin}: {field}: {reason}")]
    Invalid {
        origin: Origin,
        field: String,
        reason: String,
    },
}

/// The read cache's size when the configuration does not set one: none
/// for the local-directory store (its chunk files are already on local
/// disk, read through the page cache: a second local copy would only cost
/// disk writes and space), [`EngineConfig`]'s default for an object store
/// across a network.
pub fn default_cache_size(store: &StoreConfig) -> u64 {
    match store {
        StoreConfig::Fs { .. } => 0,
        _ => EngineConfig::default().cache_size,
    }
}

/// Whether YAML `text` sets `engine.cache_size` (unparsable text: no; the
/// real parse reports it).
fn cache_size_given(text: &str) -> bool {
    let Ok(doc) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) else {
        return false;
    };
    doc.get("engine")
        .and_then(|e| e.get("cache_size"))
        .is_some()
}

impl Default for Config {
    fn default() -> Self {
        Config::from_file(ConfigFile::default(), None, false)
    }
}

impl Config {
    /// Load the configuration: from `path` if given (it must exist), else
    /// from [`DEFAULT_CONFIG_PATH`] if that file exists, else the defaults.
    /// The result is validated.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Self::load_file(p),
            None => {
                let default = Path::new(DEFAULT_CONFIG_PATH);
                if default.exists() {
                    Self::load_file(default)
                } else {
                    let cfg = Config::default();
                    cfg.validate(&Origin::Defaults)?;
                    Ok(cfg)
                }
            }
        }
    }

    /// Read, parse and validate one file.
    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let base = path.parent().map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        });
        Self::parse(&text, Origin::File(path.to_path_buf()), base)
    }

    /// Parse and validate YAML text. Relative paths are resolved against
    /// `base` when given.
    pub fn parse(text: &str, origin: Origin, base: Option<&Path>) -> Result<Config, ConfigError> {
        // An empty document (blank, only comments, `---` or `null`) means
        // "all defaults".
        let file: Option<ConfigFile> = if text.trim().is_empty() {
            None
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.clone(),
                message: e.to_string(),
            })?
        };
        let file = file.unwrap_or_default();
        let cfg = Config::from_file(file, base, cache_size_given(text));
        cfg.validate(&origin)?;
        Ok(cfg)
    }

    /// Fill in defaults that depend on other fields and resolve paths.
    /// `cache_size_given`: the file sets `engine.cache_size` (else the
    /// default depends on the store, see [`default_cache_size`]).
    fn from_file(file: ConfigFile, base: Option<&Path>, cache_size_given: bool) -> Config {
        let resolve = |p: PathBuf| match base {
            // `components()` drops `.` segments, so `data_dir: .` gives a clean path.
            Some(b) if p.is_relative() && !p.as_os_str().is_empty() => {
                b.join(p).components().collect()
            }
            _ => p,
        };
        let data_dir = resolve(file.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()));
        let store = match file.store {
            None => StoreConfig::Fs {
                path: data_dir.join("store"),
            },
            Some(StoreConfig::Fs { path }) => StoreConfig::Fs {
                path: resolve(path),
            },
            Some(other) => other,
        };
        let mut nbd = file.nbd;
        nbd.resolve_paths(resolve);
        let mut engine = file.engine;
        engine.cache_dir = engine.cache_dir.map(resolve);
        if !cache_size_given {
            engine.cache_size = default_cache_size(&store);
        }
        Config {
            data_dir,
            store,
            engine,
            pool: file.pool,
            nbd,
            lease: file.lease,
            metrics: file.metrics,
            warm_start: file.warm_start,
        }
    }

    /// Check every bound documented on the fields.
    pub fn validate(&self, origin: &Origin) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            origin: origin.clone(),
            field: field.to_string(),
            reason,
        };
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        validate_store(&self.store).map_err(|(field, reason)| invalid(field, reason))?;
        self.engine
            .validate()
            .map_err(|e| invalid(&format!("engine.{}", e.field), e.reason))?;
        if let Some(cap) = self.pool.capacity {
            if cap < 1 << 20 {
                return Err(invalid(
                    "pool.capacity",
                    format!("{cap} bytes is below the minimum of 1 MiB"),
                ));
            }
        }
        if !(1..=100).contains(&self.pool.warn_percent) {
            return Err(invalid(
                "pool.warn_percent",
                format!("{} must be in 1..=100", self.pool.warn_percent),
            ));
        }
        self.nbd
            .validate()
            .map_err(|(field, reason)| invalid(&format!("nbd.{field}"), reason))?;
        self.lease
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        self.warm_start
            .validate()
            .map_err(|e| invalid(&format!("warm_start.{}", e.field), e.reason))?;
        Ok(())
    }

    /// The effective configuration as YAML (what `shale config show` prints).
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Local directory for one volume's WAL and cache.
    pub fn volume_dir(&self, id: u64) -> PathBuf {
        self.data_dir.join("volumes").join(format!("{id:016x}"))
    }

    /// One volume's read cache directory when `engine.cache_dir` puts it
    /// outside [`Config::volume_dir`] (the engine's rule, see
    /// `engine::volume`).
    pub fn external_cache_dir(&self, id: u64) -> Option<PathBuf> {
        self.engine
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{id:016x}")))
    }
}

/// Check the store section; on failure return (field, reason).
fn validate_store(store: &StoreConfig) -> Result<(), (&'static str, String)> {
    match store {
        StoreConfig::Fs { path } => {
            if path.as_os_str().is_empty() {
                return Err(("store.path", "must not be empty".into()));
            }
        }
        StoreConfig::Memory => {}
        StoreConfig::S3 {
            bucket,
            prefix,
            endpoint,
            region,
            request_timeout_ms,
            min_upload_rate,
            ..
        } => {
            if !(100..=600_000).contains(request_timeout_ms) {
                return Err((
                    "store.request_timeout_ms",
                    format!("{request_timeout_ms} must be in 100..=600000"),
                ));
            }
            if *min_upload_rate < 1024 {
                return Err((
                    "store.min_upload_rate",
                    format!("{min_upload_rate} must be at least 1KiB"),
                ));
            }
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !bucket_ok {
                return Err((
                    "store.bucket",
                    format!("{bucket:?} must be 3..=63 characters of a-z, 0-9, '-' and '.'"),
                ));
            }
            let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
            if !trimmed.is_empty() {
                if let Err(e) = crate::store::validate_key(trimmed) {
                    return Err(("store.prefix", e.to_string()));
                }
            }
            if let Some(ep) = endpoint {
                if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                    return Err((
                        "store.endpoint",
                        format!("{ep:?} must start with http:// or https://"),
                    ));
                }
            }
            if region.is_empty() {
                return Err(("store.region", "must not be empty".into()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
