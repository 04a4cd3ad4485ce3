//! Small shared renderings: how untrusted text is shown in logs. (Money display, CSV and
//! HTML escaping join this module as the dashboard is reorganised.)

/// Untrusted input as it may appear in a log line: at most `max` characters, control
/// characters (newlines included) escaped, so a value can neither forge a log line nor
/// flood the log.
pub fn log_safe(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push_str(&format!("…({} bytes)", s.len()));
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
    fn logged_input_cannot_forge_lines_or_flood() {
        assert_eq!(log_safe("alice", 64), "alice");
        assert_eq!(
            log_safe("bob\n2026-01-01 INFO login user=admin", 64),
            "bob\\n2026-01-01 INFO login user=admin"
        );
        let long = log_safe(&"x".repeat(1_000_000), 64);
        assert!(
            long.len() < 100 && long.ends_with("(1000000 bytes)"),
            "{long}"
        );
        assert!(!log_safe("\u{0}\r\t", 64).chars().any(char::is_control));
    }
}
