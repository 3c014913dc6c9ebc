//! JSON values as text.

use serde_json::Value;

/// `value` as compact JSON text, as `value.to_string()` would give it, but
/// written straight into one buffer: `Value`'s `Display` goes through the
/// formatter a fragment at a time, three times slower (about 320 against
/// 100 ns for an event's data). The storage writer, the queue's serial
/// resource, renders every event, payload and phase config it stores.
pub fn text(value: &Value) -> String {
    serde_json::to_string(value).expect("a JSON value always serializes: its keys are strings")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn the_same_text_as_display() {
        let value = json!({"phase": "p0", "index": 1, "usage": {"fuel": null}, "note": "a\n\"b\""});
        assert_eq!(super::text(&value), value.to_string());
    }
}
