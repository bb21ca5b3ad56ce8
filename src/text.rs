//! Text that came from a guest or a tenant, made safe for a log line or an error message:
//! control characters (newlines, escape sequences, NUL) written out as escapes, so they can
//! neither forge log lines nor drive a terminal, and the length bounded.

/// `text` on one line, control characters escaped (`\n`, `\u{1b}`), at most `max` characters
/// of it (then `…`).
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_bounded() {
        assert_eq!(printable("plain text", 100), "plain text");
        assert_eq!(
            printable("a\nFAKE log line\r\u{1b}[31mred\0", 100),
            "a\\nFAKE log line\\r\\u{1b}[31mred\\u{0}"
        );
        assert_eq!(printable("abcdef", 3), "abc…");
        assert_eq!(printable("ünïcode", 100), "ünïcode");
    }
}
