//! Human-readable durations (`500ms`, `2s`, `1m30s`) and sizes (`64KiB`, `256MiB`, `1G`).
//!
//! Both parse from strings and from bare numbers (bytes / milliseconds) and serialize back to the
//! canonical string, so a JSON or TOML document can use either form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a duration or size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value")]
    Empty,
    #[error("`{0}` is not a number followed by a unit")]
    Malformed(String),
    #[error("unknown unit `{unit}` in `{input}` (expected one of {expected})")]
    UnknownUnit {
        input: String,
        unit: String,
        expected: &'static str,
    },
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Split `"12.5MiB"` into `(12.5, "MiB")`; accepts several `<number><unit>` groups for durations.
fn split_groups(input: &str) -> Result<Vec<(f64, &str)>, UnitError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(UnitError::Empty);
    }
    let mut groups = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(rest.len());
        if num_end == 0 {
            return Err(UnitError::Malformed(input.to_string()));
        }
        let number: f64 = rest[..num_end]
            .replace('_', "")
            .parse()
            .map_err(|_| UnitError::Malformed(input.to_string()))?;
        rest = rest[num_end..].trim_start();
        let unit_end = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        groups.push((number, &rest[..unit_end]));
        rest = rest[unit_end..].trim_start();
    }
    Ok(groups)
}

/// A duration in whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    pub fn from_secs(secs: u64) -> Self {
        Millis(secs.saturating_mul(1000))
    }
    pub fn as_duration(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

impl FromStr for Millis {
    type Err = UnitError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        const EXPECTED: &str = "`ms`, `s`, `m`, `h`, `d`";
        let groups = split_groups(input)?;
        if groups.len() > 1 && groups.iter().any(|(_, u)| u.is_empty()) {
            return Err(UnitError::Malformed(input.to_string()));
        }
        let mut total = 0f64;
        for (n, unit) in groups {
            let factor = match unit {
                // A bare number means seconds, like `timeout(1)` and the seed's `SANDBOX_TIMEOUT_SEC`.
                "" | "s" | "sec" | "secs" => 1000.0,
                "ms" => 1.0,
                "m" | "min" => 60_000.0,
                "h" => 3_600_000.0,
                "d" => 86_400_000.0,
                "us" | "µs" => 0.001,
                _ => {
                    return Err(UnitError::UnknownUnit {
                        input: input.to_string(),
                        unit: unit.to_string(),
                        expected: EXPECTED,
                    });
                }
            };
            total += n * factor;
        }
        if !total.is_finite() || total > u64::MAX as f64 / 2.0 {
            return Err(UnitError::Overflow(input.to_string()));
        }
        Ok(Millis(total.round() as u64))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms != 0 && ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms != 0 && ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;

    pub fn kib(n: u64) -> Self {
        ByteSize(n.saturating_mul(Self::KIB))
    }
    pub fn mib(n: u64) -> Self {
        ByteSize(n.saturating_mul(Self::MIB))
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        const EXPECTED: &str = "`B`, `KiB`, `MiB`, `GiB`, `KB`, `MB`, `GB`";
        let groups = split_groups(input)?;
        let [(n, unit)] = groups[..] else {
            return Err(UnitError::Malformed(input.to_string()));
        };
        // Sizes are for memory and buffers, where everyone means powers of two; `KB`/`K` are
        // accepted as the same thing rather than surprising people by a factor of 1.024.
        let factor: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "m" | "mb" | "mib" => Self::MIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::GIB * 1024,
            _ => {
                return Err(UnitError::UnknownUnit {
                    input: input.to_string(),
                    unit: unit.to_string(),
                    expected: EXPECTED,
                });
            }
        };
        let bytes = n * factor as f64;
        if !bytes.is_finite() || bytes > u64::MAX as f64 / 2.0 {
            return Err(UnitError::Overflow(input.to_string()));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b.is_multiple_of(Self::GIB) {
            write!(f, "{}GiB", b / Self::GIB)
        } else if b != 0 && b.is_multiple_of(Self::MIB) {
            write!(f, "{}MiB", b / Self::MIB)
        } else if b != 0 && b.is_multiple_of(Self::KIB) {
            write!(f, "{}KiB", b / Self::KIB)
        } else {
            write!(f, "{b}B")
        }
    }
}

macro_rules! serde_via_str {
    ($ty:ty, $what:literal, $example:literal) => {
        impl utoipa::PartialSchema for $ty {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                crate::schema::number_or_text($what, $example)
            }
        }

        impl utoipa::ToSchema for $ty {}

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Number(u64),
                    Text(String),
                }
                match Raw::deserialize(d).map_err(|_| {
                    serde::de::Error::custom(concat!("expected a ", $what, " string or a number"))
                })? {
                    Raw::Number(n) => Ok(Self(n)),
                    Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
                }
            }
        }
    };
}

serde_via_str!(Millis, "duration", "2s");
serde_via_str!(ByteSize, "size", "256MiB");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!("500ms".parse::<Millis>().unwrap(), Millis(500));
        assert_eq!("2s".parse::<Millis>().unwrap(), Millis(2000));
        assert_eq!("2".parse::<Millis>().unwrap(), Millis(2000));
        assert_eq!("1.5s".parse::<Millis>().unwrap(), Millis(1500));
        assert_eq!("1m30s".parse::<Millis>().unwrap(), Millis(90_000));
        assert_eq!(Millis(90_000).to_string(), "90s");
        assert_eq!(Millis(120_000).to_string(), "2m");
        assert_eq!(Millis(250).to_string(), "250ms");
        assert!(matches!(
            "5 parsecs".parse::<Millis>(),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "s".parse::<Millis>(),
            Err(UnitError::Malformed(_))
        ));
        assert!(matches!("".parse::<Millis>(), Err(UnitError::Empty)));
        assert!("1e999".parse::<Millis>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("256MiB".parse::<ByteSize>().unwrap(), ByteSize::mib(256));
        assert_eq!("64KiB".parse::<ByteSize>().unwrap(), ByteSize::kib(64));
        assert_eq!("64k".parse::<ByteSize>().unwrap(), ByteSize::kib(64));
        assert_eq!("1G".parse::<ByteSize>().unwrap(), ByteSize(ByteSize::GIB));
        assert_eq!("100".parse::<ByteSize>().unwrap(), ByteSize(100));
        assert_eq!("1.5KiB".parse::<ByteSize>().unwrap(), ByteSize(1536));
        assert_eq!(ByteSize::mib(256).to_string(), "256MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert!("12 apples".parse::<ByteSize>().is_err());
        assert!("1MiB2KiB".parse::<ByteSize>().is_err());
        assert!("-5MiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn serde_accepts_numbers_and_strings() {
        let v: ByteSize = serde_json::from_str("\"2MiB\"").unwrap();
        assert_eq!(v, ByteSize::mib(2));
        let v: ByteSize = serde_json::from_str("42").unwrap();
        assert_eq!(v, ByteSize(42));
        let v: Millis = serde_json::from_str("\"1s\"").unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"1s\"");
        let err = serde_json::from_str::<Millis>("\"soon\"").unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
    }
}
