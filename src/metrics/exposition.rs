//! The Prometheus text format (0.0.4) of many volumes' reports, written by
//! `prometheus-client`: families of the same name from different volumes
//! become one family whose samples carry `volume="<name>"`.
//!
//! Invariants:
//! 1. Each family name appears once, with the help, unit and kind of the
//!    first report that has it; a later report whose family of that name
//!    has another kind or unit is left out of that family (and logged).
//! 2. Host-wide families (`host`) carry no `volume` label.

use std::collections::HashMap;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit as PromUnit};

use super::report::{Family, Kind, Sample, Unit, VolumeReport};

/// The HTTP content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug)]
struct Merged {
    /// Per family: its first description and `(volume, sample)` pairs
    /// (`volume` empty for host-wide families).
    families: Vec<(Family, Vec<(String, Sample)>)>,
}

impl Merged {
    fn build(reports: &[VolumeReport], host: Vec<Family>) -> Merged {
        let mut families: Vec<(Family, Vec<(String, Sample)>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut add = |volume: &str, f: &Family| {
            let i = *index.entry(f.name.clone()).or_insert_with(|| {
                let mut desc = f.clone();
                desc.samples.clear();
                families.push((desc, Vec::new()));
                families.len() - 1
            });
            let (desc, samples) = &mut families[i];
            if desc.kind != f.kind || desc.unit != f.unit {
                log::warn!(
                    "volume {volume:?}: family {} differs in kind or unit from another volume's; left out",
                    f.name
                );
                return;
            }
            samples.extend(f.samples.iter().map(|s| (volume.to_string(), s.clone())));
        };
        for f in &host {
            add("", f);
        }
        for r in reports {
            for f in &r.families {
                add(&r.volume, f);
            }
        }
        Merged { families }
    }
}

fn prom_unit(u: Option<Unit>) -> Option<PromUnit> {
    u.map(|u| match u {
        Unit::Bytes => PromUnit::Bytes,
        Unit::Seconds => PromUnit::Seconds,
    })
}

impl prometheus_client::collector::Collector for Merged {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (desc, samples) in &self.families {
            let unit = prom_unit(desc.unit);
            let kind = match desc.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric =
                encoder.encode_descriptor(&desc.name, &desc.help, unit.as_ref(), kind)?;
            for (volume, s) in samples {
                let mut labels: Vec<(&str, &str)> = Vec::with_capacity(s.labels.len() + 1);
                if !volume.is_empty() {
                    labels.push(("volume", volume));
                }
                labels.extend(s.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                let mut m = metric.encode_family(&labels)?;
                match desc.kind {
                    Kind::Counter => m.encode_counter::<NoLabelSet, f64, f64>(&s.value, None)?,
                    Kind::Gauge => m.encode_gauge(&s.value)?,
                    Kind::Histogram => {
                        let Some(h) = &s.histogram else { continue };
                        let mut buckets: Vec<(f64, u64)> = h
                            .bounds
                            .iter()
                            .copied()
                            .zip(h.counts.iter().copied())
                            .collect();
                        buckets.push((f64::INFINITY, h.counts.last().copied().unwrap_or(0)));
                        m.encode_histogram::<NoLabelSet>(h.sum, h.count(), &buckets, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The exposition of `reports` plus the host-wide families `host`.
pub fn encode(reports: &[VolumeReport], host: Vec<Family>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("shale");
    registry.register_collector(Box::new(Merged::build(reports, host)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::histogram::HistogramSnapshot;
    use crate::metrics::report::LeaseInfo;

    fn report(volume: &str, families: Vec<Family>) -> VolumeReport {
        VolumeReport {
            volume: volume.into(),
            id: 1,
            now_ms: 0,
            attached_ms: 0,
            frontends: vec![],
            lease: LeaseInfo {
                holder: String::new(),
                epoch: 1,
                expires_at_ms: 0,
                fenced: None,
            },
            families,
        }
    }

    #[test]
    fn volumes_share_families_and_carry_their_label() {
        let req = |n| {
            Family::new("requests", Kind::Counter, None, "Requests")
                .with(Sample::value(&[("op", "read")], n))
        };
        let lat = Family::new(
            "request_duration",
            Kind::Histogram,
            Some(Unit::Seconds),
            "Latency",
        )
        .with(Sample::histogram(
            &[("op", "read")],
            HistogramSnapshot {
                bounds: vec![0.001, 0.01],
                counts: vec![2, 1, 1],
                sum: 1.5,
            },
        ));
        let host = vec![
            Family::new("exporter_volumes", Kind::Gauge, None, "Volumes")
                .with(Sample::value(&[], 2.0)),
        ];
        let text = encode(
            &[
                report("a", vec![req(3.0), lat]),
                report("b \"q\"", vec![req(4.0)]),
            ],
            host,
        )
        .unwrap();
        assert_eq!(
            text.matches("# TYPE shale_requests_total counter").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("shale_requests_total{volume=\"a\",op=\"read\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("shale_requests_total{volume=\"b \\\"q\\\"\",op=\"read\"} 4"),
            "{text}"
        );
        assert!(text.contains("shale_exporter_volumes 2"), "{text}");
        assert!(
            text.contains("# TYPE shale_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(
                "shale_request_duration_seconds_bucket{volume=\"a\",op=\"read\",le=\"0.01\"} 3"
            ),
            "cumulative buckets: {text}"
        );
        assert!(
            text.contains(
                "shale_request_duration_seconds_bucket{volume=\"a\",op=\"read\",le=\"+Inf\"} 4"
            ),
            "{text}"
        );
        assert!(text.contains("shale_request_duration_seconds_count{volume=\"a\",op=\"read\"} 4"));
    }

    #[test]
    fn a_family_of_another_kind_is_left_out() {
        let a = Family::new("x", Kind::Counter, None, "h").with(Sample::value(&[], 1.0));
        let b = Family::new("x", Kind::Gauge, None, "h").with(Sample::value(&[], 2.0));
        let text = encode(&[report("a", vec![a]), report("b", vec![b])], vec![]).unwrap();
        assert!(text.contains("shale_x_total{volume=\"a\"} 1"), "{text}");
        assert!(!text.contains("volume=\"b\""), "{text}");
    }
}
