//! RFC 8785 canonical JSON: the bytes the audit log hashes and agents sign.

use serde_json::Value;

/// RFC 8785 canonical JSON of `v`, written to `out`: objects with their keys sorted, integers
/// as digits, strings escaped as RFC 8785 escapes them. A value holding a non-integer number
/// goes through `serde_json_canonicalizer` (ES6 number formatting).
pub fn canonical_into(v: &Value, out: &mut Vec<u8>) {
    fn has_float(v: &Value) -> bool {
        match v {
            Value::Number(n) => !(n.is_i64() || n.is_u64()),
            Value::Array(a) => a.iter().any(has_float),
            Value::Object(m) => m.values().any(has_float),
            _ => false,
        }
    }
    fn write(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Value::String(s) => {
                serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail")
            }
            Value::Array(a) => {
                out.push(b'[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(x, out);
                }
                out.push(b']');
            }
            Value::Object(m) => {
                // RFC 8785 orders keys by their UTF-16 code units.
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, k).expect("writing to a Vec cannot fail");
                    out.push(b':');
                    write(&m[k], out);
                }
                out.push(b'}');
            }
        }
    }
    if has_float(v) {
        // Canonicalization of a value built from JSON cannot fail (no NaN, no odd keys).
        out.extend(serde_json_canonicalizer::to_vec(v).unwrap_or_default());
    } else {
        write(v, out);
    }
}

/// [`canonical_into`] as text.
pub fn canonical(v: &Value) -> String {
    let mut out = Vec::new();
    canonical_into(v, &mut out);
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// The canonical form results are compared by (`compare = "exact"`, replica quorums): RFC 8785's
/// layout, but every integer written exactly, whatever its size. RFC 8785 writes numbers as
/// doubles, so two integers past 2^53 that differ (2^60 and 2^60 + 1) would read the same and a
/// liar could change one unseen. Non-integers are written as RFC 8785 writes them (ECMAScript
/// number formatting); for values without integers past 2^53 this is exactly [`canonical`].
pub fn exact(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) if n.is_i64() || n.is_u64() => out.push_str(&n.to_string()),
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                if f == 0.0 {
                    out.push('0');
                } else {
                    out.push_str(ryu_js::Buffer::new().format_finite(f));
                }
            }
            Value::String(s) => {
                out.push_str(&serde_json::to_string(s).expect("a string serializes"))
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).expect("a string serializes"));
                    out.push(':');
                    write(&m[k], out);
                }
                out.push('}');
            }
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

#[cfg(test)]
mod exact_tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn integers_past_two_to_the_53_stay_distinct() {
        let a = json!({"sum": 1u64 << 60, "ratio": 0.5});
        let b = json!({"sum": (1u64 << 60) + 1, "ratio": 0.5});
        assert_ne!(exact(&a), exact(&b));
        // RFC 8785 (doubles) cannot tell them apart: the hole this closes.
        assert_eq!(
            serde_json_canonicalizer::to_string(&a).unwrap(),
            serde_json_canonicalizer::to_string(&b).unwrap()
        );
        assert_eq!(exact(&a), r#"{"ratio":0.5,"sum":1152921504606846976}"#);
    }

    #[test]
    fn without_big_integers_it_is_rfc_8785() {
        for v in [
            json!({"b": [1, 2.5, -0.0, 1e21, 1e-7, 123456789012.25], "a": "é\u{1}\"", "c": null}),
            json!([true, false, {"z": 1, "y": {"x": -3}}, 9007199254740991i64]),
            json!(3.0),
        ] {
            assert_eq!(
                exact(&v),
                serde_json_canonicalizer::to_string(&v).unwrap(),
                "{v}"
            );
        }
    }
}
