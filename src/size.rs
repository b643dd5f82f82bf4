//! Byte sizes as people write them: `4096`, `4K`, `4KiB`, `1G`: whole numbers
//! with optional binary units. Used by the config file (through the serde helpers
//! below) and by CLI options such as `--size`.
//!
//! Rules: a whole number, optional spaces, then an optional unit. Units are
//! case-insensitive and always powers of 1024: `B`, `K`/`KB`/`KiB`,
//! `M`/`MB`/`MiB`, `G`/`GB`/`GiB`, `T`/`TB`/`TiB`, `P`/`PB`/`PiB`.
//! Results that overflow `u64` are errors, never wrapped.

use std::fmt;

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason}")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

const UNITS: [(&str, u32); 6] = [
    ("", 0),
    ("k", 10),
    ("m", 20),
    ("g", 30),
    ("t", 40),
    ("p", 50),
];

/// Parse a size such as `"4MiB"`, `"1G"` or `"4096"` into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(err(
            "expected a whole number of bytes, optionally with a unit such as KiB, MiB, GiB",
        ));
    }
    let number: u64 = s[..digits_end]
        .parse()
        .map_err(|_| err("number is too large"))?;
    let unit = s[digits_end..].trim_start().to_ascii_lowercase();
    let shift = unit_shift(&unit).ok_or_else(|| {
        err("unknown unit (use B, K, KiB, M, MiB, G, GiB, T, TiB, P or PiB; all are powers of 1024)")
    })?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| err("size does not fit in 64 bits"))
}

/// The power-of-two shift for a lower-cased unit, or `None` if unknown.
fn unit_shift(unit: &str) -> Option<u32> {
    let base = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(unit);
    // "b" alone means bytes; "ib" alone is not a unit.
    if unit == "ib" {
        return None;
    }
    UNITS
        .iter()
        .find(|(name, _)| *name == base)
        .map(|&(_, shift)| shift)
}

/// Render bytes exactly, with the largest binary unit that divides them
/// (`4194304` → `4MiB`, `1000` → `1000`). [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    ExactSize(bytes).to_string()
}

/// Display adapter for [`format_size`].
pub struct ExactSize(pub u64);

impl fmt::Display for ExactSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 6] = ["", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let v = self.0;
        if v == 0 {
            return write!(f, "0");
        }
        let mut i = NAMES.len() - 1;
        while i > 0 && !v.is_multiple_of(1u64 << (10 * i)) {
            i -= 1;
        }
        write!(f, "{}{}", v >> (10 * i), NAMES[i])
    }
}

/// Serde helper for a `u64` byte count: reads an integer or a size string,
/// writes the exact human form (e.g. `4MiB`). Use with `#[serde(with = "crate::size::serde_bytes")]`.
pub mod serde_bytes {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        if *v == 0 || !v.is_multiple_of(1024) {
            s.serialize_u64(*v)
        } else {
            s.serialize_str(&super::format_size(*v))
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    pub(super) struct SizeVisitor;

    impl de::Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte count: an integer or a string such as \"4MiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("size {v} is negative")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_size(v).map_err(E::custom)
        }
    }
}

/// Like [`serde_bytes`] for an `Option<u64>` (absent or `null` = `None`).
/// Pair with `#[serde(default)]`.
pub mod serde_opt_bytes {
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::serde_bytes::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_option(OptVisitor)
    }

    struct OptVisitor;

    impl<'de> de::Visitor<'de> for OptVisitor {
        type Value = Option<u64>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("null or a byte count: an integer or a string such as \"4MiB\"")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(super::serde_bytes::SizeVisitor).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4KB"), Ok(4096));
        assert_eq!(parse_size("4 MiB"), Ok(4 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("3T"), Ok(3 << 40));
        assert_eq!(parse_size("1PiB"), Ok(1 << 50));
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            "",
            " ",
            "G",
            "-1",
            "1.5G",
            "4X",
            "4 iB",
            "4ib",
            "4MiBs",
            "1e9",
            "0x10",
            "4 M B",
            "99999999999999999999",
            "16384P",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("invalid size"), "{e}");
        }
    }

    #[test]
    fn format_is_exact_and_round_trips() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(4096), "4KiB");
        assert_eq!(format_size(4 << 20), "4MiB");
        assert_eq!(format_size((1 << 30) + 4096), "1048580KiB");
        assert_eq!(format_size(u64::MAX), u64::MAX.to_string());
        for v in [
            0,
            1,
            511,
            4096,
            3 << 30,
            1 << 50,
            u64::MAX,
            (1 << 63) + 1024,
        ] {
            assert_eq!(parse_size(&format_size(v)), Ok(v), "{v}");
        }
    }

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Sized {
        #[serde(with = "serde_bytes")]
        a: u64,
        #[serde(with = "serde_opt_bytes", default)]
        b: Option<u64>,
    }

    #[test]
    fn serde_accepts_numbers_and_strings() {
        let s: Sized = serde_yaml_ng::from_str("a: 4MiB\nb: 8192\n").unwrap();
        assert_eq!(
            s,
            Sized {
                a: 4 << 20,
                b: Some(8192)
            }
        );
        let s: Sized = serde_yaml_ng::from_str("a: 10\n").unwrap();
        assert_eq!(s, Sized { a: 10, b: None });
        let s: Sized = serde_yaml_ng::from_str("a: 10\nb: null\n").unwrap();
        assert_eq!(s.b, None);
        let text = serde_yaml_ng::to_string(&Sized {
            a: 1 << 30,
            b: Some(5),
        })
        .unwrap();
        assert_eq!(text, "a: 1GiB\nb: 5\n");
        let back: Sized = serde_yaml_ng::from_str(&text).unwrap();
        assert_eq!(back.a, 1 << 30);
        assert_eq!(back.b, Some(5));
        let e = serde_yaml_ng::from_str::<Sized>("a: -5\n").unwrap_err();
        assert!(e.to_string().contains("negative"), "{e}");
        let e = serde_yaml_ng::from_str::<Sized>("a: 5 furlongs\n").unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
    }
}
