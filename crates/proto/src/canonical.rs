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
