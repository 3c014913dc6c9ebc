//! Wall-clock time as stored: Unix milliseconds, shown as RFC 3339.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The last millisecond RFC 3339 can write: 9999-12-31T23:59:59.999Z.
const LAST_WRITABLE_MS: i64 = 253_402_300_799_999;

/// Unix milliseconds as RFC 3339 with milliseconds, UTC. Never panics: times
/// outside 1970..=9999 are shown at the nearest end of that range.
pub fn rfc3339(ms: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(ms.clamp(0, LAST_WRITABLE_MS) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Parses RFC 3339 (e.g. `2026-11-30T12:00:00Z`) into Unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("`{text}` is not an RFC 3339 time: {e}"))?;
    Ok(time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_rfc3339() {
        assert_eq!(rfc3339(1_764_504_000_123), "2025-11-30T12:00:00.123Z");
        assert_eq!(
            parse_rfc3339("2025-11-30T12:00:00.123Z"),
            Ok(1_764_504_000_123)
        );
        assert!(parse_rfc3339("next tuesday").is_err());
    }

    #[test]
    fn formatting_never_panics_at_the_ends() {
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(i64::MIN), "1970-01-01T00:00:00.000Z");
    }
}

/// Serde helpers: Unix-ms fields shown as RFC 3339 in JSON.
pub mod as_rfc3339 {
    use serde::Serializer;

    pub fn serialize<S: Serializer>(ms: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::rfc3339(*ms))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        super::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use serde::Serializer;

        pub fn serialize<S: Serializer>(
            ms: &Option<i64>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match ms {
                Some(ms) => serializer.serialize_str(&super::super::rfc3339(*ms)),
                None => serializer.serialize_none(),
            }
        }
    }
}
