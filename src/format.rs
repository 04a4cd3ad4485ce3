//! Shared renderings, one of each: money for people, CSV fields for spreadsheets, HTML and
//! URL escaping, and untrusted input in logs. Used by reports, the dashboard, invoices
//! and charts alike (this module imports nothing of theirs).

use rust_decimal::{Decimal, RoundingStrategy};

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

/// `1234567` → `1,234,567` (a leading `-` is kept).
pub fn group_thousands(digits: &str) -> String {
    let (sign, d) = digits.strip_prefix('-').map_or(("", digits), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in d.chars().enumerate() {
        if i > 0 && (d.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// `d`, with zero always unsigned: a decimal keeps its sign through negation, rounding
/// and subtraction, and a negated $0.00 would print as "-0.00" in every format.
pub fn unsigned_zero(mut d: Decimal) -> Decimal {
    if d.is_zero() {
        d.set_sign_positive(true);
    }
    d
}

/// Money for people: dollars and cents, half away from zero, thousands grouped
/// (`-$1,234.57`). Exact values go to CSV and JSON, never this.
pub fn money(d: Decimal) -> String {
    let r = d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    let s = format!("{:.2}", r.abs());
    let (int, frac) = s.split_once('.').unwrap_or((&s, "00"));
    format!(
        "{}${}.{frac}",
        if r.is_sign_negative() && !r.is_zero() {
            "-"
        } else {
            ""
        },
        group_thousands(int)
    )
}

/// Money on a page: as `money`, except an amount that rounds to zero cents but is not
/// zero, which reads "< $0.01" (or "> -$0.01"): "$0.00" there would say nothing was spent.
/// The exact amount stays in CSV, JSON and the cell's tooltip.
/// `show(d)` with a `+` before a positive amount (`+$1.00`); never before a sign the
/// text has of its own making ("< $0.01").
pub fn signed(d: Decimal, show: impl Fn(Decimal) -> String) -> String {
    let text = show(d);
    if d.is_sign_positive() && !d.is_zero() && !text.starts_with('<') {
        format!("+{text}")
    } else {
        text
    }
}

pub fn money_on_page(d: Decimal) -> String {
    let cent = Decimal::new(5, 3);
    if !d.is_zero() && d.abs() < cent {
        if d.is_sign_negative() {
            "> -$0.01".into()
        } else {
            "< $0.01".into()
        }
    } else {
        money(d)
    }
}

/// Money on a chart's axis or in its tooltips: cents from one cent up; below that, two
/// significant digits ("$0.0042"), so a chart of sub-cent spend has a scale.
pub fn money_on_chart(d: Decimal) -> String {
    if d.is_zero() || d.abs() >= Decimal::new(1, 2) {
        money(d)
    } else {
        let r = d
            .round_sf_with_strategy(2, RoundingStrategy::MidpointAwayFromZero)
            .unwrap_or(d)
            .normalize();
        format!(
            "{}${}",
            if r.is_sign_negative() { "-" } else { "" },
            r.abs()
        )
    }
}

/// One CSV field: quoted when it holds a separator, quote or line break, and defused
/// when a spreadsheet would read it as a formula (a leading `=`, `@`, TAB or CR, or a
/// `+`/`-` that does not start a number) by a leading `'`.
pub fn csv_field(s: &str) -> String {
    let numeric = s.parse::<Decimal>().is_ok();
    let formula = s.starts_with(['=', '@', '\t', '\r']) || (s.starts_with(['+', '-']) && !numeric);
    let s = if formula {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// A CSV line (without the line break) of `fields`.
pub fn csv_row<S: AsRef<str>>(fields: &[S]) -> String {
    fields
        .iter()
        .map(|f| csv_field(f.as_ref()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Text for HTML content and attribute values (SVG too).
pub fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A URL query value or path segment: everything but unreserved characters escaped.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn sub_cent_amounts_are_never_shown_as_zero() {
        assert_eq!(money_on_page(dec!(0.004999)), "< $0.01");
        assert_eq!(money_on_page(dec!(0.000000001)), "< $0.01");
        assert_eq!(money_on_page(dec!(-0.0001)), "> -$0.01");
        assert_eq!(money_on_page(dec!(0.005)), "$0.01");
        assert_eq!(money_on_page(Decimal::ZERO), "$0.00");
        assert_eq!(money_on_page(dec!(1234.5)), "$1,234.50");
        assert_eq!(money_on_chart(dec!(0.0042137)), "$0.0042");
        assert_eq!(money_on_chart(dec!(0.000375)), "$0.00038");
        assert_eq!(money_on_chart(dec!(108.931851185)), "$108.93");
        assert_eq!(money_on_chart(Decimal::ZERO), "$0.00");
    }

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

    #[test]
    fn money_rounds_half_away_from_zero_for_display() {
        assert_eq!(money(dec!(1234.565)), "$1,234.57");
        assert_eq!(money(dec!(0.004)), "$0.00");
        assert_eq!(money(dec!(-2.005)), "-$2.01");
        assert_eq!(group_thousands("-1234567"), "-1,234,567");
    }

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        for (input, want) in [
            ("=cmd", "'=cmd"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("+cmd", "'+cmd"),
            ("-cmd", "'-cmd"),
            ("\tcmd", "'\tcmd"),
            ("\rcmd", "\"'\rcmd\""),
            ("-12.50", "-12.50"),
            ("+3", "+3"),
        ] {
            assert_eq!(csv_field(input), want, "{input:?}");
        }
        assert_eq!(csv_row(&["a", "=1,2", "-1"]), "a,\"'=1,2\",-1");
    }

    #[test]
    fn html_and_urls_are_escaped() {
        assert_eq!(
            html("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(urlencode("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
    }
}
