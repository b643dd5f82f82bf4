//! What a volume server reports about one attached volume (the reply to a
//! `metrics` request on its control socket): identity and state for
//! `shale status`, and metric families for the exporter.
//!
//! Families are plain data so that one exporter can merge the reports of
//! every server on the host into one exposition (`volume` label added
//! there); servers never write the text format themselves.
//!
//! Invariants (checked by [`VolumeReport::validate`] on the receiving side):
//! 1. Family names and label names are `[a-z_][a-z0-9_]*`, family names
//!    unique within a report; no sample carries a `volume` label.
//! 2. Counter and gauge samples have a finite value; histogram samples have
//!    a well-formed [`HistogramSnapshot`].
//! 3. Names are given without the `shale_` prefix, the unit suffix and
//!    `_total`, which the exposition adds.

use serde::{Deserialize, Serialize};

use super::histogram::HistogramSnapshot;

/// Kinds of metric families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Units (Prometheus base units only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Bytes,
    Seconds,
}

/// One sample of a family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Label pairs, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<(String, String)>,
    /// Counter or gauge value.
    #[serde(default)]
    pub value: f64,
    /// Histogram counts (histogram families only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<HistogramSnapshot>,
}

impl Sample {
    /// A counter or gauge sample.
    pub fn value(labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            labels: owned(labels),
            value,
            histogram: None,
        }
    }

    /// A histogram sample.
    pub fn histogram(labels: &[(&str, &str)], h: HistogramSnapshot) -> Sample {
        Sample {
            labels: owned(labels),
            value: 0.0,
            histogram: Some(h),
        }
    }

    /// The value of label `key`, if it has one.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn owned(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A metric family of one volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Family {
    pub name: String,
    pub help: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<Unit>,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

impl Family {
    pub fn new(name: &str, kind: Kind, unit: Option<Unit>, help: &str) -> Family {
        Family {
            name: name.to_string(),
            help: help.to_string(),
            unit,
            kind,
            samples: Vec::new(),
        }
    }

    /// Add a sample (builder style).
    pub fn with(mut self, sample: Sample) -> Family {
        self.samples.push(sample);
        self
    }

    /// The name as exposed: `shale_<name>[_<unit>][_total]`.
    pub fn exposed_name(&self) -> String {
        let mut n = format!("shale_{}", self.name);
        match self.unit {
            Some(Unit::Bytes) => n.push_str("_bytes"),
            Some(Unit::Seconds) => n.push_str("_seconds"),
            None => {}
        }
        if self.kind == Kind::Counter {
            n.push_str("_total");
        }
        n
    }
}

/// A frontend serving the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendInfo {
    /// `nbd` or `ublk`.
    pub kind: String,
    /// Where clients find it (`/dev/ublkb0`, `nbd export vol`).
    pub device: String,
}

/// The lease as the server holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub holder: String,
    pub epoch: u64,
    /// When it expires unless renewed, ms since the Unix epoch.
    pub expires_at_ms: u64,
    /// Why the volume is fenced, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
}

/// One attached volume as its server reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeReport {
    pub volume: String,
    pub id: u64,
    /// Server time of the report and of the attach, ms since the Unix epoch.
    pub now_ms: u64,
    pub attached_ms: u64,
    #[serde(default)]
    pub frontends: Vec<FrontendInfo>,
    pub lease: LeaseInfo,
    pub families: Vec<Family>,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("volume {volume:?}: invalid metrics report: {reason}")]
pub struct ReportError {
    pub volume: String,
    pub reason: String,
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

impl VolumeReport {
    /// Check the invariants in the module docs.
    pub fn validate(&self) -> Result<(), ReportError> {
        let bad = |reason: String| ReportError {
            volume: self.volume.clone(),
            reason,
        };
        let mut seen = std::collections::HashSet::new();
        for f in &self.families {
            if !valid_name(&f.name) || f.name.starts_with("__") {
                return Err(bad(format!("bad family name {:?}", f.name)));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(bad(format!("family {:?} twice", f.name)));
            }
            for s in &f.samples {
                for (k, _) in &s.labels {
                    if !valid_name(k) || k == "volume" || k == "le" || k.starts_with("__") {
                        return Err(bad(format!("family {:?}: bad label {k:?}", f.name)));
                    }
                }
                let ok = match f.kind {
                    Kind::Histogram => s.histogram.as_ref().is_some_and(|h| h.is_well_formed()),
                    Kind::Counter => s.value.is_finite() && s.value >= 0.0,
                    Kind::Gauge => s.value.is_finite(),
                };
                if !ok {
                    return Err(bad(format!("family {:?}: bad sample", f.name)));
                }
            }
        }
        Ok(())
    }

    /// The family named `name`.
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// Sum of the values of `name`'s samples whose labels include every
    /// pair of `filter` (0 when there are none).
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples(name, filter).map(|s| s.value).sum()
    }

    /// The samples of `name` matching `filter` (see [`VolumeReport::sum`]).
    pub fn samples<'a>(
        &'a self,
        name: &str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.family(name)
            .into_iter()
            .flat_map(|f| f.samples.iter())
            .filter(move |s| filter.iter().all(|(k, v)| s.label(k) == Some(v)))
    }

    /// All histogram samples of `name` matching `filter`, added up.
    pub fn histogram(&self, name: &str, filter: &[(&str, &str)]) -> Option<HistogramSnapshot> {
        let mut total: Option<HistogramSnapshot> = None;
        for h in self
            .samples(name, filter)
            .filter_map(|s| s.histogram.as_ref())
        {
            match &mut total {
                None => total = Some(h.clone()),
                Some(t) if t.bounds == h.bounds => {
                    for (a, b) in t.counts.iter_mut().zip(&h.counts) {
                        *a += b;
                    }
                    t.sum += h.sum;
                }
                Some(_) => {}
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(families: Vec<Family>) -> VolumeReport {
        VolumeReport {
            volume: "v".into(),
            id: 1,
            now_ms: 0,
            attached_ms: 0,
            frontends: Vec::new(),
            lease: LeaseInfo {
                holder: "h:1".into(),
                epoch: 1,
                expires_at_ms: 0,
                fenced: None,
            },
            families,
        }
    }

    #[test]
    fn names_units_and_totals() {
        let f = Family::new("frontend_read", Kind::Counter, Some(Unit::Bytes), "x");
        assert_eq!(f.exposed_name(), "shale_frontend_read_bytes_total");
        let g = Family::new("lease_epoch", Kind::Gauge, None, "x");
        assert_eq!(g.exposed_name(), "shale_lease_epoch");
    }

    #[test]
    fn validation_refuses_bad_names_labels_and_values() {
        let ok = Family::new("a_b", Kind::Counter, None, "h")
            .with(Sample::value(&[("op", "read")], 1.0));
        assert!(report(vec![ok.clone()]).validate().is_ok());
        let cases = vec![
            vec![Family::new("A", Kind::Gauge, None, "h")],
            vec![Family::new("a-b", Kind::Gauge, None, "h")],
            vec![ok.clone(), ok.clone()],
            vec![Family::new("x", Kind::Gauge, None, "h")
                .with(Sample::value(&[("volume", "w")], 1.0))],
            vec![Family::new("x", Kind::Gauge, None, "h").with(Sample::value(&[], f64::NAN))],
            vec![Family::new("x", Kind::Counter, None, "h").with(Sample::value(&[], -1.0))],
            vec![Family::new("x", Kind::Histogram, None, "h").with(Sample::value(&[], 1.0))],
        ];
        for fams in cases {
            assert!(report(fams.clone()).validate().is_err(), "{fams:?}");
        }
    }

    #[test]
    fn sums_filter_by_labels() {
        let f = Family::new("req", Kind::Counter, None, "h")
            .with(Sample::value(&[("op", "read"), ("frontend", "nbd")], 2.0))
            .with(Sample::value(&[("op", "write"), ("frontend", "nbd")], 3.0));
        let r = report(vec![f]);
        assert_eq!(r.sum("req", &[]), 5.0);
        assert_eq!(r.sum("req", &[("op", "write")]), 3.0);
        assert_eq!(r.sum("missing", &[]), 0.0);
    }
}
