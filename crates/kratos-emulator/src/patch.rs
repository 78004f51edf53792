//! The subset of RFC 6902 JSON Patch that Kratos' `PATCH /admin/identities/{id}` accepts
//! (`oryx/jsonx/patch.go`): only `add`, `remove` and `replace`, some denied paths, `replace` on a
//! non-array target acting as `add`, and missing parents created on `add`.

use serde_json::{Map, Value};

/// Why a patch could not be applied; the text becomes the 400 `reason`.
#[derive(Debug)]
pub(crate) struct PatchError(pub(crate) String);

/// Kratos denies these (case-insensitively) so that ids, state timestamps and federated
/// credentials cannot be forged through the admin API.
fn is_denied(path: &str) -> bool {
    let p = path.to_ascii_lowercase();
    matches!(p.as_str(), "/id" | "/statechangedat" | "/credentials")
        || ["/credentials/oidc", "/credentials/saml"]
            .iter()
            .any(|d| p == *d || p.starts_with(&format!("{d}/")))
}

enum Op {
    Add(Vec<String>, Value),
    Remove(Vec<String>),
    Replace(Vec<String>, Value),
}

fn parse_pointer(path: &str) -> Result<Vec<String>, PatchError> {
    if path.is_empty() {
        return Err(PatchError("the document root cannot be patched".into()));
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| PatchError(format!("invalid JSON pointer: {path}")))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// Validates every operation first so that a rejected patch never half-applies.
fn parse_ops(patch: &Value) -> Result<Vec<Op>, PatchError> {
    let items = patch
        .as_array()
        .ok_or_else(|| PatchError("the patch must be a JSON array".into()))?;
    let mut ops = Vec::with_capacity(items.len());
    for item in items {
        let kind = item.get("op").and_then(Value::as_str).unwrap_or_default();
        if !matches!(kind, "add" | "remove" | "replace") {
            return Err(PatchError(format!("unsupported operation: {kind}")));
        }
        let path = item
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| PatchError("error parsing patch operations: missing path".into()))?;
        if is_denied(path) {
            return Err(PatchError(format!("patch includes denied path: {path}")));
        }
        let tokens = parse_pointer(path)?;
        let value = item.get("value").cloned();
        ops.push(match kind {
            "remove" => Op::Remove(tokens),
            other => {
                let value = value.ok_or_else(|| {
                    PatchError(format!("missing value for {other} operation at {path}"))
                })?;
                if other == "add" {
                    Op::Add(tokens, value)
                } else {
                    Op::Replace(tokens, value)
                }
            }
        });
    }
    Ok(ops)
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, PatchError> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let idx: usize = token
        .parse()
        .map_err(|_| PatchError(format!("invalid array index: {token}")))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if idx > max || (!allow_end && len == 0) {
        return Err(PatchError(format!("array index out of bounds: {idx}")));
    }
    Ok(idx)
}

/// Walks to the parent of the target, turning missing or `null` members into objects
/// (`EnsurePathExistsOnAdd`).
fn parent_for_add<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for tok in tokens {
        if cur.is_null() {
            *cur = Value::Object(Map::new());
        }
        cur = match cur {
            Value::Object(m) => m.entry(tok.clone()).or_insert(Value::Null),
            Value::Array(a) => {
                let idx = array_index(tok, a.len(), false)?;
                &mut a[idx]
            }
            _ => {
                return Err(PatchError(format!(
                    "cannot traverse into a scalar at {tok}"
                )));
            }
        };
    }
    if cur.is_null() {
        *cur = Value::Object(Map::new());
    }
    Ok(cur)
}

fn existing_parent<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for tok in tokens {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(tok)
                .ok_or_else(|| PatchError(format!("path does not exist: {tok}")))?,
            Value::Array(a) => {
                let idx = array_index(tok, a.len(), false)?;
                &mut a[idx]
            }
            _ => return Err(PatchError(format!("path does not exist: {tok}"))),
        };
    }
    Ok(cur)
}

fn add(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), PatchError> {
    let (last, parents) = tokens
        .split_last()
        .ok_or_else(|| PatchError("empty path".into()))?;
    match parent_for_add(doc, parents)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            let idx = array_index(last, a.len(), true)?;
            a.insert(idx, value);
            Ok(())
        }
        _ => Err(PatchError(format!("cannot add member {last} to a scalar"))),
    }
}

fn remove(doc: &mut Value, tokens: &[String]) -> Result<(), PatchError> {
    let (last, parents) = tokens
        .split_last()
        .ok_or_else(|| PatchError("empty path".into()))?;
    match existing_parent(doc, parents)? {
        Value::Object(m) => m
            .remove(last)
            .map(drop)
            .ok_or_else(|| PatchError(format!("unable to remove nonexistent key: {last}"))),
        Value::Array(a) => {
            let idx = array_index(last, a.len(), false)?;
            a.remove(idx);
            Ok(())
        }
        _ => Err(PatchError(format!("unable to remove {last} from a scalar"))),
    }
}

fn replace(doc: &mut Value, tokens: &[String], value: Value) -> Result<(), PatchError> {
    let (last, parents) = tokens
        .split_last()
        .ok_or_else(|| PatchError("empty path".into()))?;
    // Only array elements keep strict replace semantics; Kratos turns every other replace into
    // an add, so replacing a missing key works.
    if let Ok(Value::Array(a)) = existing_parent(doc, parents) {
        let idx = array_index(last, a.len(), false)?;
        a[idx] = value;
        return Ok(());
    }
    add(doc, tokens, value)
}

/// Applies `patch` to `doc`, all or nothing.
pub(crate) fn apply(doc: &Value, patch: &Value) -> Result<Value, PatchError> {
    let ops = parse_ops(patch)?;
    let mut out = doc.clone();
    for op in ops {
        match op {
            Op::Add(t, v) => add(&mut out, &t, v)?,
            Op::Remove(t) => remove(&mut out, &t)?,
            Op::Replace(t, v) => replace(&mut out, &t, v)?,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn add_creates_parents_and_fills_null() {
        let doc = json!({"metadata_public": null, "traits": {}});
        let out = apply(
            &doc,
            &json!([{"op":"add","path":"/metadata_public/id","value":"x"},
                    {"op":"add","path":"/traits/a/b","value":1}]),
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata_public":{"id":"x"},"traits":{"a":{"b":1}}})
        );
    }

    #[test]
    fn replace_missing_key_is_add_but_array_replace_is_strict() {
        let doc = json!({"a": {}, "l": [1]});
        let out = apply(&doc, &json!([{"op":"replace","path":"/a/k","value":2}])).unwrap();
        assert_eq!(out["a"]["k"], 2);
        assert!(apply(&doc, &json!([{"op":"replace","path":"/l/3","value":2}])).is_err());
    }

    #[test]
    fn denied_and_unsupported() {
        let doc = json!({});
        for p in [
            "/id",
            "/ID",
            "/stateChangedAt",
            "/credentials",
            "/credentials/oidc/x",
        ] {
            let e = apply(&doc, &json!([{"op":"add","path":p,"value":1}])).unwrap_err();
            assert!(e.0.contains("denied"), "{p}: {}", e.0);
        }
        let e = apply(&doc, &json!([{"op":"move","from":"/a","path":"/b"}])).unwrap_err();
        assert!(e.0.contains("unsupported operation"));
        assert!(apply(&doc, &json!([{"op":"remove","path":"/nope"}])).is_err());
    }
}
