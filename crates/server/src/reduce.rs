//! Built-in reducers: fold the accepted shard values (in shard order) into the job's result.
//!
//! List values are flattened one level for the numeric reducers, `count`, `concat`, `sort` and
//! `histogram`, so a shard may return one value or a list of them.

use std::cmp::Ordering;

use fleetbox_proto::Reducer;
use serde_json::{Map, Number, Value};

/// Why a reducer could not fold the values; names the shard at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reducer}: {message}")]
pub struct ReduceError {
    pub reducer: &'static str,
    pub message: String,
}

/// A value with the shard it came from.
pub type ShardValue = (u64, Value);

/// What is wrong with the values a numeric step was given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum Fault {
    #[error("shard {shard} returned {value}, not a number")]
    NotANumber { shard: u64, value: String },
    #[error(
        "the integer sum passes -2^127..2^127-1, past what `sum` adds exactly; use the `python` reducer for larger integers"
    )]
    PastI128,
    #[error(
        "the exact integer sum {0}is outside what a result holds exactly (-2^63 to 2^64-1); use the `python` reducer for larger integers"
    )]
    PastValue(String),
    #[error("`{key}`: {fault}")]
    InKey { key: String, fault: Box<Fault> },
}

/// Fold `values` with a built-in reducer (`python` is run by the aggregator, not here), into
/// the result's JSON text. Text, not a [`Value`]: an integer `sum` is exact over i128, past
/// what a `Value` holds.
pub fn reduce(reducer: &Reducer, values: &[ShardValue]) -> Result<String, ReduceError> {
    let err = |message: String| ReduceError {
        reducer: reducer.name(),
        message,
    };
    if let Reducer::Sum = reducer {
        let nums = numbers(values).map_err(|f| err(f.to_string()))?;
        return exact_sum(&nums).map_err(|f| err(f.to_string()));
    }
    reduce_value(reducer, values).map(|v| v.to_string())
}

/// The reducers whose result is a [`Value`].
fn reduce_value(reducer: &Reducer, values: &[ShardValue]) -> Result<Value, ReduceError> {
    let err = |message: String| ReduceError {
        reducer: reducer.name(),
        message,
    };
    match reducer {
        Reducer::Collect => Ok(Value::Array(
            values.iter().map(|(_, v)| v.clone()).collect(),
        )),
        Reducer::Count => Ok(Value::from(flatten(values).count())),
        Reducer::Sum => unreachable!("`sum` is folded exactly by `reduce`"),
        Reducer::Min | Reducer::Max => {
            let nums = numbers(values).map_err(|f| err(f.to_string()))?;
            let pick = nums.into_iter().reduce(|a, b| {
                let less = a.1 < b.1;
                match (reducer, less) {
                    (Reducer::Min, true) | (Reducer::Max, false) => a,
                    _ => b,
                }
            });
            Ok(pick.map(|(n, _)| Value::Number(n)).unwrap_or(Value::Null))
        }
        Reducer::Mean => {
            let nums = numbers(values).map_err(|f| err(f.to_string()))?;
            if nums.is_empty() {
                return Ok(Value::Null);
            }
            let mean = nums.iter().map(|(_, f)| f).sum::<f64>() / nums.len() as f64;
            Ok(Number::from_f64(mean)
                .map(Value::Number)
                .unwrap_or(Value::Null))
        }
        Reducer::Concat => Ok(Value::Array(
            flatten(values).map(|(_, v)| v.clone()).collect(),
        )),
        Reducer::Sort { key, descending } => {
            let mut items: Vec<(u64, Value)> =
                flatten(values).map(|(s, v)| (s, v.clone())).collect();
            let mut keyed = Vec::with_capacity(items.len());
            for (shard, item) in items.drain(..) {
                let k = match key {
                    None => item.clone(),
                    Some(k) => item.get(k).cloned().ok_or_else(|| {
                        err(format!(
                            "a value from shard {shard} has no field `{k}`: {}",
                            short(&item)
                        ))
                    })?,
                };
                keyed.push((k, item, shard));
            }
            let mut failure = None;
            keyed.sort_by(|a, b| {
                compare(&a.0, &b.0).unwrap_or_else(|| {
                    failure.get_or_insert_with(|| {
                        format!(
                            "cannot order {} (shard {}) against {} (shard {})",
                            short(&a.0),
                            a.2,
                            short(&b.0),
                            b.2
                        )
                    });
                    Ordering::Equal
                })
            });
            if let Some(f) = failure {
                return Err(err(f));
            }
            if *descending {
                keyed.reverse();
            }
            Ok(Value::Array(keyed.into_iter().map(|(_, v, _)| v).collect()))
        }
        Reducer::Merge => {
            let mut out = Map::new();
            for (shard, v) in values {
                let Value::Object(obj) = v else {
                    return Err(err(format!(
                        "shard {shard} returned {}, not an object",
                        short(v)
                    )));
                };
                merge_into(&mut out, obj)
                    .map_err(|e| err(format!("merging shard {shard}: {e}")))?;
            }
            Ok(Value::Object(out))
        }
        Reducer::Histogram { bins } => histogram(values, *bins).map_err(|f| err(f.to_string())),
        Reducer::Python { .. } => Err(err("run by the aggregator in the sandbox".into())),
    }
}

fn flatten(values: &[ShardValue]) -> impl Iterator<Item = (u64, &Value)> {
    values.iter().flat_map(|(shard, v)| match v {
        Value::Array(items) => items.iter().map(|i| (*shard, i)).collect::<Vec<_>>(),
        Value::Null => Vec::new(),
        other => vec![(*shard, other)],
    })
}

fn numbers(values: &[ShardValue]) -> Result<Vec<(Number, f64)>, Fault> {
    flatten(values)
        .map(|(shard, v)| match v {
            Value::Number(n) => Ok((n.clone(), n.as_f64().unwrap_or(f64::NAN))),
            other => Err(Fault::NotANumber {
                shard,
                value: short(other),
            }),
        })
        .collect()
}

/// The `sum` reducer: integers add up exactly over i128 (a total past it is an error naming
/// that), written as JSON text with every digit; any float among the values makes it a float.
fn exact_sum(nums: &[(Number, f64)]) -> Result<String, Fault> {
    let mut exact: i128 = 0;
    let mut float = 0.0;
    let mut integers = true;
    for (n, f) in nums {
        float += f;
        let i = match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i128::from(i),
            (None, Some(u)) => i128::from(u),
            _ => {
                integers = false;
                continue;
            }
        };
        if integers {
            exact = exact.checked_add(i).ok_or(Fault::PastI128)?;
        }
    }
    if integers {
        return Ok(exact.to_string());
    }
    Ok(Number::from_f64(float)
        .map(Value::Number)
        .unwrap_or(Value::Null)
        .to_string())
}

/// A sum of integers for `merge` (a [`Value`]): exact, and a total that a `Value` cannot hold
/// (outside `-2^63..=2^64-1`) is an error, never a rounded float. Any float among the values
/// makes the sum a float.
fn sum(nums: &[(Number, f64)]) -> Result<Value, Fault> {
    let mut exact: Option<i128> = Some(0);
    let mut integers = true;
    let mut float = 0.0;
    for (n, f) in nums {
        float += f;
        exact = match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => exact.and_then(|acc| acc.checked_add(i128::from(i))),
            (None, Some(u)) => exact.and_then(|acc| acc.checked_add(i128::from(u))),
            _ => {
                integers = false;
                None
            }
        };
    }
    match exact {
        Some(i) if i64::try_from(i).is_ok() => Ok(Value::from(i as i64)),
        Some(i) if u64::try_from(i).is_ok() => Ok(Value::from(i as u64)),
        Some(i) => Err(Fault::PastValue(format!("`{i}` "))),
        None if integers => Err(Fault::PastValue(String::new())),
        None => Ok(Number::from_f64(float)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
    }
}

fn merge_into(out: &mut Map<String, Value>, obj: &Map<String, Value>) -> Result<(), Fault> {
    for (k, v) in obj {
        match (out.get_mut(k), v) {
            (Some(Value::Number(a)), Value::Number(b)) => {
                let total = sum(&[
                    (a.clone(), a.as_f64().unwrap_or(0.0)),
                    (b.clone(), b.as_f64().unwrap_or(0.0)),
                ])
                .map_err(|fault| Fault::InKey {
                    key: k.clone(),
                    fault: Box::new(fault),
                })?;
                out.insert(k.clone(), total);
            }
            (Some(Value::Object(a)), Value::Object(b)) => merge_into(a, b)?,
            (Some(Value::Array(a)), Value::Array(b)) => a.extend(b.iter().cloned()),
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

fn histogram(values: &[ShardValue], bins: Option<u32>) -> Result<Value, Fault> {
    let Some(bins) = bins else {
        // Categorical: count each distinct value (strings as themselves, others as JSON).
        let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
        for (_, v) in flatten(values) {
            let key = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            *counts.entry(key).or_default() += 1;
        }
        return Ok(serde_json::to_value(counts).unwrap_or(Value::Null));
    };
    let nums = numbers(values)?;
    if nums.is_empty() {
        return Ok(serde_json::json!({ "edges": [], "counts": [] }));
    }
    let lo = nums.iter().map(|n| n.1).fold(f64::INFINITY, f64::min);
    let hi = nums.iter().map(|n| n.1).fold(f64::NEG_INFINITY, f64::max);
    let bins = bins as usize;
    let width = if hi > lo {
        (hi - lo) / bins as f64
    } else {
        1.0
    };
    let mut counts = vec![0u64; bins];
    for (_, f) in &nums {
        let i = (((f - lo) / width) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let edges: Vec<f64> = (0..=bins).map(|i| lo + width * i as f64).collect();
    Ok(serde_json::json!({ "edges": edges, "counts": counts }))
}

/// Order numbers with numbers and strings with strings; anything else is not comparable.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => Some(i.cmp(&j)),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..s.floor_char_boundary(60)])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The result parsed back (every value here fits a `Value`).
    fn reduce(reducer: &Reducer, v: &[ShardValue]) -> Result<Value, ReduceError> {
        super::reduce(reducer, v).map(|text| serde_json::from_str(&text).unwrap())
    }

    fn vals(v: Value) -> Vec<ShardValue> {
        v.as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.clone()))
            .collect()
    }

    #[test]
    fn numeric_reducers() {
        let v = vals(json!([1, [2, 3], 4]));
        assert_eq!(reduce(&Reducer::Sum, &v).unwrap(), json!(10));
        assert_eq!(reduce(&Reducer::Min, &v).unwrap(), json!(1));
        assert_eq!(reduce(&Reducer::Max, &v).unwrap(), json!(4));
        assert_eq!(reduce(&Reducer::Mean, &v).unwrap(), json!(2.5));
        assert_eq!(reduce(&Reducer::Count, &v).unwrap(), json!(4));
        assert_eq!(
            reduce(&Reducer::Sum, &vals(json!([1.5, 2]))).unwrap(),
            json!(3.5)
        );
        // Exact beyond f64's 2^53.
        let big = vals(json!([9007199254740993i64, 2]));
        assert_eq!(
            reduce(&Reducer::Sum, &big).unwrap(),
            json!(9007199254740995i64)
        );
    }

    #[test]
    fn sum_is_exact_past_2_64_and_an_error_past_i128_never_a_rounded_float() {
        let max = vals(json!([u64::MAX, 0]));
        assert_eq!(reduce(&Reducer::Sum, &max).unwrap(), json!(u64::MAX));
        let past = vals(json!([u64::MAX, 1]));
        assert_eq!(
            super::reduce(&Reducer::Sum, &past).unwrap(),
            "18446744073709551616"
        );
        let low = vals(json!([i64::MIN, -1]));
        assert_eq!(
            super::reduce(&Reducer::Sum, &low).unwrap(),
            "-9223372036854775809"
        );
        // Far past 2^64, still every digit (passing i128 would take 2^63 such values).
        let huge: Vec<ShardValue> = (0..1u64 << 20).map(|i| (i, json!(u64::MAX))).collect();
        let total = super::reduce(&Reducer::Sum, &huge).unwrap();
        assert_eq!(total, (i128::from(u64::MAX) * (1 << 20)).to_string());
    }

    #[test]
    fn sum_names_the_bad_shard() {
        let e = reduce(&Reducer::Sum, &vals(json!([1, "x"]))).unwrap_err();
        assert!(e.message.contains("shard 1"), "{e}");
    }

    #[test]
    fn sort_with_and_without_key() {
        let v = vals(json!([[3, 1], [2]]));
        let sorted = reduce(
            &Reducer::Sort {
                key: None,
                descending: false,
            },
            &v,
        )
        .unwrap();
        assert_eq!(sorted, json!([1, 2, 3]));
        let v = vals(json!([[{"n": 2, "w": "b"}], [{"n": 1, "w": "a"}]]));
        let sorted = reduce(
            &Reducer::Sort {
                key: Some("n".into()),
                descending: true,
            },
            &v,
        )
        .unwrap();
        assert_eq!(sorted, json!([{"n": 2, "w": "b"}, {"n": 1, "w": "a"}]));
        let e = reduce(
            &Reducer::Sort {
                key: None,
                descending: false,
            },
            &vals(json!([1, "a"])),
        )
        .unwrap_err();
        assert!(e.message.contains("cannot order"), "{e}");
    }

    #[test]
    fn merge_sums_numbers_on_collision() {
        let v = vals(json!([{"a": 1, "b": {"x": 1}}, {"a": 2, "b": {"x": 2, "y": 1}, "c": 5}]));
        assert_eq!(
            reduce(&Reducer::Merge, &v).unwrap(),
            json!({"a": 3, "b": {"x": 3, "y": 1}, "c": 5})
        );
        assert!(reduce(&Reducer::Merge, &vals(json!([1]))).is_err());
    }

    #[test]
    fn histograms() {
        let v = vals(json!([["a", "b"], ["a"]]));
        assert_eq!(
            reduce(&Reducer::Histogram { bins: None }, &v).unwrap(),
            json!({"a": 2, "b": 1})
        );
        let v = vals(json!([[0, 1, 2], [3, 4]]));
        let h = reduce(&Reducer::Histogram { bins: Some(2) }, &v).unwrap();
        assert_eq!(h["counts"], json!([2, 3]));
    }

    #[test]
    fn concat_and_collect_keep_shard_order() {
        let v = vals(json!([[1], [2, 3], 4]));
        assert_eq!(reduce(&Reducer::Concat, &v).unwrap(), json!([1, 2, 3, 4]));
        assert_eq!(
            reduce(&Reducer::Collect, &v).unwrap(),
            json!([[1], [2, 3], 4])
        );
    }
}
