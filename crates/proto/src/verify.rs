//! A job's verification settings (`[verify]`) and how two results of one shard compare.
//!
//! ```toml
//! [verify]
//! replicas = 1             # distinct agents per shard (1..=10)
//! quorum = 1               # matching results needed (1..=replicas)
//! recheck = "adaptive"      # "none" | "all" | "adaptive" | "on_anomaly" | { sample = 0.05 }
//! compare = "exact"         # "exact" | "json" | "stdout" | { numeric = 1e-9 }
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::SpecError;

/// `[verify]`: every field optional; the defaults catch a lying agent without doubling the
/// work (new agents are re-checked until trusted, trusted ones by a small sample).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    /// Distinct agents that run each shard.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Matching results needed.
    #[serde(default = "one")]
    pub quorum: u32,
    #[serde(default)]
    pub recheck: Recheck,
    #[serde(default)]
    pub compare: Compare,
}

fn one() -> u32 {
    1
}

/// The most replicas a shard may ask for.
pub const MAX_REPLICAS: u32 = 10;

impl Default for VerifySpec {
    fn default() -> Self {
        VerifySpec {
            replicas: 1,
            quorum: 1,
            recheck: Recheck::default(),
            compare: Compare::default(),
        }
    }
}

/// When the coordinator re-runs a shard in its own sandbox to check an agent's result.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Recheck {
    None,
    All,
    /// This fraction of results, whoever reported them.
    Sample(f64),
    /// By the reporting agent's trust: every result until it is trusted, then rarely.
    #[default]
    Adaptive,
    /// Results are accepted on the agents' word; when the job's results are reviewed before
    /// its fold, the shards that stand out (outlying values or costs, an outlying agent's
    /// shards) are re-run by the server first.
    OnAnomaly,
}

/// How two results of one shard are compared.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Compare {
    /// The coordinator's hash of the output's canonical JSON.
    #[default]
    Exact,
    /// Canonical JSON equality (the same as `exact` on values; kept as its own name).
    Json,
    /// Numbers equal within this relative tolerance, anywhere in the JSON.
    Numeric(f64),
    /// The hash of stdout.
    Stdout,
}

impl VerifySpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(SpecError::new(
                "verify.replicas",
                format!("must be between 1 and {MAX_REPLICAS} (distinct agents per shard)"),
            ));
        }
        if !(1..=self.replicas).contains(&self.quorum) {
            return Err(SpecError::new(
                "verify.quorum",
                format!(
                    "must be between 1 and `replicas` ({}): the matching results needed",
                    self.replicas
                ),
            ));
        }
        if let Recheck::Sample(p) = self.recheck
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(SpecError::new(
                "verify.recheck.sample",
                "must be a fraction in (0, 1]",
            ));
        }
        if let Compare::Numeric(t) = self.compare
            && !(t.is_finite() && (0.0..1.0).contains(&t))
        {
            return Err(SpecError::new(
                "verify.compare.numeric",
                "must be a relative tolerance in [0, 1)",
            ));
        }
        Ok(())
    }
}

impl Compare {
    /// Whether two results agree. `a` and `b` are (output value, coordinator's output hash,
    /// stdout hash).
    pub fn agrees(&self, a: &Outcome<'_>, b: &Outcome<'_>) -> bool {
        match self {
            Compare::Exact | Compare::Json => a.output_sha256 == b.output_sha256,
            Compare::Stdout => a.stdout_sha256 == b.stdout_sha256,
            Compare::Numeric(t) => match (a.output, b.output) {
                (Some(x), Some(y)) => close(x, y, *t),
                (None, None) => true,
                _ => false,
            },
        }
    }

    pub fn name(&self) -> String {
        match self {
            Compare::Exact => "exact".into(),
            Compare::Json => "json".into(),
            Compare::Stdout => "stdout".into(),
            Compare::Numeric(t) => format!("numeric({t})"),
        }
    }
}

/// What [`Compare::agrees`] looks at of one result.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    pub output: Option<&'a Value>,
    pub output_sha256: Option<&'a str>,
    pub stdout_sha256: &'a str,
}

/// Whether `a` and `b` have one shape and equal leaves, except pairs of numbers that differ,
/// each of which `numbers` judges.
fn same_but_numbers(
    a: &Value,
    b: &Value,
    numbers: &mut impl FnMut(&serde_json::Number, &serde_json::Number) -> bool,
) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || numbers(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|(x, y)| same_but_numbers(x, y, numbers))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_but_numbers(v, w, numbers)))
        }
        _ => a == b,
    }
}

/// Equal JSON, numbers within relative tolerance `t` (`|x - y| <= t * max(|x|, |y|)`).
fn close(a: &Value, b: &Value, t: f64) -> bool {
    same_but_numbers(a, b, &mut |x, y| {
        // Two integers differ by an exact amount, whatever their size (as doubles, 2^60 and
        // 2^60 + 1 are one number).
        let int = |n: &serde_json::Number| {
            n.as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
        };
        if let (Some(i), Some(j)) = (int(x), int(y)) {
            let diff = (i - j).unsigned_abs() as f64;
            let scale = i.unsigned_abs().max(j.unsigned_abs()) as f64;
            return diff <= t * scale;
        }
        match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= t * x.abs().max(y.abs()),
            _ => false,
        }
    })
}

/// Relative difference below which two floats that differ are taken for rounding (BLAS kernels,
/// summation order, CPU features): a machine-dependent result, not a wrong one.
pub const ROUNDING: f64 = 1e-9;

/// When `a` and `b` differ only in floating-point rounding (every differing leaf is a pair of
/// non-integer numbers within [`ROUNDING`] of each other, the structure otherwise equal), the
/// largest relative difference; `None` when they are equal or differ in anything else (an
/// integer, a string, a shape).
pub fn rounding_only(a: &Value, b: &Value) -> Option<f64> {
    let mut worst: f64 = 0.0;
    let only_rounding = same_but_numbers(a, b, &mut |x, y| {
        let float = |n: &serde_json::Number| !(n.is_i64() || n.is_u64());
        let (Some(fx), Some(fy)) = (x.as_f64(), y.as_f64()) else {
            return false;
        };
        if !(float(x) && float(y)) {
            return false;
        }
        let rel = (fx - fy).abs() / fx.abs().max(fy.abs());
        worst = worst.max(rel);
        rel <= ROUNDING
    });
    (only_rounding && worst > 0.0).then_some(worst)
}

/// The two shapes each of `recheck` and `compare` take: a name, or a one-key table.
#[derive(Deserialize)]
#[serde(untagged)]
enum Form {
    Name(String),
    Table(std::collections::BTreeMap<String, f64>),
}

impl utoipa::PartialSchema for Recheck {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::schema::name_or_table(&["none", "all", "adaptive", "on_anomaly"], "sample")
    }
}

impl utoipa::ToSchema for Recheck {}

impl utoipa::PartialSchema for Compare {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::schema::name_or_table(&["exact", "json", "stdout"], "numeric")
    }
}

impl utoipa::ToSchema for Compare {}

impl<'de> Deserialize<'de> for Recheck {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Form::deserialize(d)? {
            Form::Name(n) => match n.as_str() {
                "none" => Ok(Recheck::None),
                "all" => Ok(Recheck::All),
                "adaptive" => Ok(Recheck::Adaptive),
                "on_anomaly" => Ok(Recheck::OnAnomaly),
                other => Err(D::Error::custom(format!(
                    "unknown recheck `{other}` (expected none, all, adaptive, on_anomaly or {{ sample = 0.05 }})"
                ))),
            },
            Form::Table(t) => match (t.len(), t.get("sample")) {
                (1, Some(p)) => Ok(Recheck::Sample(*p)),
                _ => Err(D::Error::custom("expected `{ sample = 0.05 }`")),
            },
        }
    }
}

impl Serialize for Recheck {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Recheck::None => s.serialize_str("none"),
            Recheck::All => s.serialize_str("all"),
            Recheck::Adaptive => s.serialize_str("adaptive"),
            Recheck::OnAnomaly => s.serialize_str("on_anomaly"),
            Recheck::Sample(p) => {
                let mut m = std::collections::BTreeMap::new();
                m.insert("sample", *p);
                m.serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Compare {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match Form::deserialize(d)? {
            Form::Name(n) => match n.as_str() {
                "exact" => Ok(Compare::Exact),
                "json" => Ok(Compare::Json),
                "stdout" => Ok(Compare::Stdout),
                other => Err(D::Error::custom(format!(
                    "unknown compare `{other}` (expected exact, json, stdout or {{ numeric = 1e-9 }})"
                ))),
            },
            Form::Table(t) => match (t.len(), t.get("numeric")) {
                (1, Some(tol)) => Ok(Compare::Numeric(*tol)),
                _ => Err(D::Error::custom("expected `{ numeric = 1e-9 }`")),
            },
        }
    }
}

impl Serialize for Compare {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Compare::Exact => s.serialize_str("exact"),
            Compare::Json => s.serialize_str("json"),
            Compare::Stdout => s.serialize_str("stdout"),
            Compare::Numeric(t) => {
                let mut m = std::collections::BTreeMap::new();
                m.insert("numeric", *t);
                m.serialize(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outcome(v: &Value) -> Outcome<'_> {
        Outcome {
            output: Some(v),
            output_sha256: None,
            stdout_sha256: "",
        }
    }

    #[test]
    fn rounding_is_told_from_a_difference() {
        let a = json!({"mean": 0.1 + 0.2, "n": 3, "v": [1.5, 2.25]});
        let b = json!({"mean": 0.3, "n": 3, "v": [1.5, 2.25 * (1.0 + 1e-13)]});
        assert!(rounding_only(&a, &b).is_some_and(|w| w > 0.0 && w < ROUNDING));
        assert_eq!(rounding_only(&a, &a), None);
        // An integer, a string, a larger difference or another shape is not rounding.
        assert_eq!(rounding_only(&json!({"n": 3}), &json!({"n": 4})), None);
        assert_eq!(rounding_only(&json!([0.5, "a"]), &json!([0.5, "b"])), None);
        assert_eq!(rounding_only(&json!(1.0000001), &json!(1.0)), None);
        assert_eq!(rounding_only(&json!([0.5]), &json!([0.5, 0.5])), None);
    }

    /// Integers are compared exactly at any size: with no tolerance 2^60 + 1 is not 2^60 (as
    /// doubles they are one number), and a tolerance is relative to the exact difference.
    #[test]
    fn big_integers_differ_by_their_exact_difference() {
        let big = json!(1u64 << 60);
        let plus_one = json!((1u64 << 60) + 1);
        assert!(!Compare::Numeric(0.0).agrees(&outcome(&big), &outcome(&plus_one)));
        assert!(Compare::Numeric(1e-9).agrees(&outcome(&big), &outcome(&plus_one)));
        let neg = json!(i64::MIN);
        let neg_plus = json!(i64::MIN + 1);
        assert!(!Compare::Numeric(0.0).agrees(&outcome(&neg), &outcome(&neg_plus)));
        assert!(!Compare::Numeric(0.5).agrees(&outcome(&json!(u64::MAX)), &outcome(&neg)));
    }

    #[test]
    fn numeric_tolerance_passes_noise_and_catches_differences() {
        let c = Compare::Numeric(1e-9);
        let a = json!({"x": [0.1, 1e6, 3], "s": "k"});
        let noise = json!({"x": [0.1 + 1e-17, 1e6 * (1.0 + 1e-12), 3], "s": "k"});
        let off = json!({"x": [0.1, 1e6 + 1.0, 3], "s": "k"});
        let other_text = json!({"x": [0.1, 1e6, 3], "s": "j"});
        assert!(c.agrees(&outcome(&a), &outcome(&noise)));
        assert!(!c.agrees(&outcome(&a), &outcome(&off)));
        assert!(!c.agrees(&outcome(&a), &outcome(&other_text)));
        assert!(!c.agrees(&outcome(&json!([1, 2])), &outcome(&json!([1, 2, 3]))));
    }

    #[test]
    fn forms_parse_and_bad_ones_say_why() {
        let spec: VerifySpec =
            toml::from_str("recheck = { sample = 0.05 }\ncompare = { numeric = 1e-9 }\n").unwrap();
        assert_eq!(spec.recheck, Recheck::Sample(0.05));
        assert_eq!(spec.compare, Compare::Numeric(1e-9));
        assert_eq!((spec.replicas, spec.quorum), (1, 1));
        spec.validate().unwrap();
        let d: VerifySpec = toml::from_str("").unwrap();
        assert_eq!((d.recheck, d.compare), (Recheck::Adaptive, Compare::Exact));
        let err = toml::from_str::<VerifySpec>("recheck = \"sometimes\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown recheck"), "{err}");
        let on: VerifySpec = toml::from_str("recheck = \"on_anomaly\"\n").unwrap();
        assert_eq!(on.recheck, Recheck::OnAnomaly);
        assert_eq!(serde_json::to_value(&on).unwrap()["recheck"], "on_anomaly");
        let bad: VerifySpec = toml::from_str("recheck = { sample = 1.5 }\n").unwrap();
        assert_eq!(bad.validate().unwrap_err().field, "verify.recheck.sample");
        let two: VerifySpec = toml::from_str("replicas = 2\nquorum = 2\n").unwrap();
        two.validate().unwrap();
        let over: VerifySpec = toml::from_str("replicas = 2\nquorum = 3\n").unwrap();
        assert_eq!(over.validate().unwrap_err().field, "verify.quorum");
        let none: VerifySpec = toml::from_str("replicas = 0\n").unwrap();
        assert_eq!(none.validate().unwrap_err().field, "verify.replicas");
        let many: VerifySpec = toml::from_str("replicas = 11\nquorum = 2\n").unwrap();
        assert_eq!(many.validate().unwrap_err().field, "verify.replicas");
        // Written back as read.
        let back: VerifySpec =
            serde_json::from_value(serde_json::to_value(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }
}
