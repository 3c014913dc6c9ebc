//! Text a guest hands the host (log lines, progress notes, failure messages,
//! `describe()` metadata) is cut to a bound before the host keeps, stores,
//! publishes or sends it, so that a plugin cannot reach the host's disk or
//! memory through its own contract. The cut is visible to readers.

/// Longest progress note kept; the rest is cut.
pub const MAX_PROGRESS_NOTE: usize = 256;
/// Longest `describe()` name and version.
pub const MAX_METADATA_NAME: usize = 64;
/// Longest `describe()` description.
pub const MAX_METADATA_DESCRIPTION: usize = 1024;

/// `text` if it fits in `max` bytes, else its first `max` bytes (at a
/// character boundary) and a marker saying how many bytes were cut.
pub fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let keep = text.floor_char_boundary(max);
    let dropped = text.len() - keep;
    text.truncate(keep);
    text.push_str(&format!("… [truncated {dropped} bytes]"));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_a_character_boundary_and_says_how_much() {
        assert_eq!(cut("short".into(), 5), "short");
        assert_eq!(cut("abcdef".into(), 4), "abcd… [truncated 2 bytes]");
        // `é` is two bytes: the cut never splits it.
        assert_eq!(cut("aéb".into(), 2), "a… [truncated 3 bytes]");
    }
}
