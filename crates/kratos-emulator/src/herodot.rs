//! Error bodies in the shape Ory's `herodot` library writes them.

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

/// The `message` herodot's predefined errors carry; clients sometimes log it, so keep Ory's wording.
pub(crate) fn default_message(code: u16) -> String {
    match code {
        400 => "The request was malformed or contained invalid parameters".into(),
        401 => "The request could not be authorized".into(),
        403 => "The requested action was forbidden".into(),
        404 => "The requested resource could not be found".into(),
        409 => "The resource could not be created due to a conflict".into(),
        429 => "The request was rejected because of too many requests".into(),
        500 => "An internal server error occurred, please contact the system administrator".into(),
        _ => status_text(code),
    }
}

/// The canonical reason phrase, which herodot puts in `error.status`.
pub(crate) fn status_text(code: u16) -> String {
    StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
        .to_string()
}

/// `{"error":{"id"?,"code","status","reason"?,"message"}}`; herodot omits empty fields except `message`.
pub(crate) fn error_body(
    code: u16,
    id: Option<&str>,
    reason: Option<&str>,
    message: &str,
) -> Value {
    let mut e = Map::new();
    if let Some(id) = id {
        e.insert("id".into(), json!(id));
    }
    e.insert("code".into(), json!(code));
    e.insert("status".into(), json!(status_text(code)));
    if let Some(reason) = reason {
        e.insert("reason".into(), json!(reason));
    }
    e.insert("message".into(), json!(message));
    json!({ "error": e })
}

/// A herodot error with the default message for `code`.
pub(crate) fn generic(code: u16, reason: Option<&str>) -> Value {
    error_body(code, None, reason, &default_message(code))
}

/// herodot's field order (`id, code, status, request, reason, debug, details, message`).
const FIELD_ORDER: [&str; 8] = [
    "id", "code", "status", "request", "reason", "debug", "details", "message",
];

fn push_member(out: &mut String, key: &str, value: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    out.push_str(&Value::String(key.to_string()).to_string());
    out.push(':');
    out.push_str(value);
}

/// Serialises a response body, keeping Go's field order for error envelopes so that clients
/// comparing bytes see what Kratos sends. Other bodies serialise normally.
pub(crate) fn to_string(body: &Value) -> String {
    let (Some(top), Some(Value::Object(err))) = (body.as_object(), body.get("error")) else {
        return body.to_string();
    };
    let mut inner = String::from("{");
    for key in FIELD_ORDER {
        if let Some(v) = err.get(key) {
            push_member(&mut inner, key, &v.to_string());
        }
    }
    for (k, v) in err
        .iter()
        .filter(|(k, _)| !FIELD_ORDER.contains(&k.as_str()))
    {
        push_member(&mut inner, k, &v.to_string());
    }
    inner.push('}');
    let mut out = String::from("{");
    push_member(&mut out, "error", &inner);
    for (k, v) in top.iter().filter(|(k, _)| k.as_str() != "error") {
        push_member(&mut out, k, &v.to_string());
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_keeps_go_field_order() {
        let mut body = error_body(403, Some("x"), Some("r"), "m");
        body["error"]["details"] = json!({"a": 1});
        body["redirect_browser_to"] = json!("u");
        assert_eq!(
            to_string(&body),
            r#"{"error":{"id":"x","code":403,"status":"Forbidden","reason":"r","details":{"a":1},"message":"m"},"redirect_browser_to":"u"}"#
        );
        let parsed: Value = serde_json::from_str(&to_string(&body)).unwrap();
        assert_eq!(parsed, body);
        assert_eq!(to_string(&json!([1])), "[1]");
    }
}
