//! JSON as text.

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// `value` as compact JSON text, as `value.to_string()` would give it, but
/// written straight into one buffer: `Value`'s `Display` goes through the
/// formatter a fragment at a time, three times slower (about 320 against
/// 100 ns for an event's data). The storage writer, the queue's serial
/// resource, renders every event, payload and phase config it stores.
pub fn text(value: &Value) -> String {
    serde_json::to_string(value).expect("a JSON value always serializes: its keys are strings")
}

/// A JSON document kept as its text, checked once to be valid. A job's
/// payload (and each phase's output) goes from the request to storage, to
/// each phase's guest and out in API responses as this: never parsed into
/// a tree, rendered again or deep-copied. Parsing, copying and dropping a 14 KB payload as a
/// [`Value`] cost the storage writer about 0.6 ms per job. Clones share
/// the text. Equal when the texts are.
#[derive(Clone)]
pub struct Json(Arc<RawValue>);

impl Json {
    /// Checks that `text` is one JSON document (without building it).
    pub fn parse(text: String) -> serde_json::Result<Json> {
        RawValue::from_string(text).map(|raw| Json(raw.into()))
    }

    pub fn from_value(value: &Value) -> Json {
        Json::parse(text(value)).expect("a rendered value is JSON")
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The document as a tree, for callers that look inside it.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.as_str()).expect("checked JSON parses")
    }
}

impl Default for Json {
    fn default() -> Self {
        Json::parse("null".into()).expect("null is JSON")
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl std::fmt::Debug for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(deserializer).map(|raw| Json(raw.into()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_same_text_as_display() {
        let value = json!({"phase": "p0", "index": 1, "usage": {"fuel": null}, "note": "a\n\"b\""});
        assert_eq!(text(&value), value.to_string());
    }

    #[test]
    fn a_document_goes_in_and_out_as_it_came() {
        let sent = r#"{"rows": [1, 2.50, "\u00e9"]}"#;
        let payload: Json = serde_json::from_str(sent).unwrap();
        assert_eq!(payload.as_str(), sent);
        assert_eq!(payload.to_value(), json!({"rows": [1, 2.5, "é"]}));
        // Inside another document, its text is written as it came.
        let wrapped = serde_json::to_string(&Wrapped { payload }).unwrap();
        assert_eq!(wrapped, format!(r#"{{"payload":{sent}}}"#));
        assert_eq!(Json::default().as_str(), "null");
        assert!(Json::parse("{\"a\": 1".into()).is_err());
        assert!(Json::parse("1 2".into()).is_err());
    }

    #[derive(Serialize)]
    struct Wrapped {
        payload: Json,
    }
}
