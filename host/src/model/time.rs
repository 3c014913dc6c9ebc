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

/// Parses RFC 3339 (e.g. `2026-11-30T12:00:00Z`, `2026-11-30t13:00:00+01:00`)
/// into Unix milliseconds; times before 1970 are 0.
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let invalid = |e: &dyn std::fmt::Display| format!("`{text}` is not an RFC 3339 time: {e}");
    let (utc, offset_ms) = split_offset(text);
    let mut utc = utc.replacen('t', "T", 1).replace('z', "Z");
    // humantime refuses years before 1970; they are all 0 here anyway.
    let before_1970 = utc
        .get(..4)
        .and_then(|year| year.parse::<u32>().ok())
        .is_some_and(|year| year < 1970);
    if before_1970 {
        utc.replace_range(..4, "1970");
    }
    let time = humantime::parse_rfc3339_weak(&utc).map_err(|e| invalid(&e))?;
    if before_1970 {
        return Ok(0);
    }
    let ms = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Ok((ms - offset_ms).max(0))
}

/// The time without its numeric offset (`+01:00`), and the offset in ms.
fn split_offset(text: &str) -> (&str, i64) {
    let bytes = text.as_bytes();
    let Some(at) = text.len().checked_sub(6) else {
        return (text, 0);
    };
    let digits = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_digit);
    let sign = match bytes[at] {
        b'+' => 1,
        b'-' => -1,
        _ => return (text, 0),
    };
    if bytes[at + 3] != b':' || !digits(at + 1..at + 3) || !digits(at + 4..at + 6) {
        return (text, 0);
    }
    let hours: i64 = text[at + 1..at + 3].parse().unwrap_or(0);
    let minutes: i64 = text[at + 4..at + 6].parse().unwrap_or(0);
    (&text[..at], sign * (hours * 60 + minutes) * 60_000)
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
        assert_eq!(
            parse_rfc3339("2025-11-30t13:30:00.123+01:30"),
            Ok(1_764_504_000_123)
        );
        assert_eq!(
            parse_rfc3339("2025-11-30T10:00:00.123-02:00"),
            Ok(1_764_504_000_123)
        );
        assert_eq!(
            parse_rfc3339("2025-11-30T12:00:00.123z"),
            Ok(1_764_504_000_123)
        );
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
