//! URL filters → a validated `Selection` (the scope from `auth::Scoped` is always part of
//! it). Parsing only: what the selection reads is `store::usage`'s business.

use chrono::{Datelike, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use super::error::AppError;
use crate::domain::{Scope, Selection};

/// Query parameters every page accepts (empty values mean "not set").
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Filters {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub institution: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub user: String,
    /// `name=value`
    #[serde(default)]
    pub tag: String,
    /// `csv` to download one table (with `table`).
    #[serde(default, skip_serializing)]
    pub format: String,
    #[serde(default, skip_serializing)]
    pub table: String,
}

fn opt(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// A day as `YYYY-MM-DD`, years 2000–2199: exactly what a date picker sends. (chrono
/// alone accepts `+262142-12-31`, whose next day overflows.)
fn date(s: &str, name: &str) -> Result<Option<NaiveDate>, AppError> {
    let bad = || {
        AppError::BadRequest(format!(
            "`{name}` must be a date YYYY-MM-DD between 2000 and 2199"
        ))
    };
    opt(s)
        .map(|d| {
            let shape = d.len() == 10
                && d.bytes().enumerate().all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                });
            if !shape {
                return Err(bad());
            }
            let day = NaiveDate::parse_from_str(&d, "%Y-%m-%d").map_err(|_| bad())?;
            if !(2000..=2199).contains(&day.year()) {
                return Err(bad());
            }
            Ok(day)
        })
        .transpose()
}

/// The longest range a page accepts unless configured otherwise (`web.max_range_days`).
pub const DEFAULT_MAX_RANGE_DAYS: i64 = 400;

/// The selection a page's filters ask for: defaults to this calendar month (UTC) so far;
/// refuses ranges longer than `max_days`.
pub fn selection(f: &Filters, scope: Scope, max_days: i64) -> Result<Selection, AppError> {
    let today = Utc::now().date_naive();
    let to = date(&f.to, "to")?.unwrap_or(today);
    let from = date(&f.from, "from")?.unwrap_or_else(|| to.with_day(1).expect("day 1"));
    if from > to {
        return Err(AppError::BadRequest("`from` is after `to`".into()));
    }
    if (to - from).num_days() + 1 > max_days {
        return Err(AppError::BadRequest(format!(
            "the range {from} – {to} is {} days; pages show at most {max_days} days (narrow the range)",
            (to - from).num_days() + 1
        )));
    }
    for (name, v) in [
        ("model", &f.model),
        ("key", &f.key),
        ("user", &f.user),
        ("tag", &f.tag),
        ("institution", &f.institution),
    ] {
        if v.len() > crate::domain::MAX_ID_LEN * 2 {
            return Err(AppError::BadRequest(format!("`{name}` is too long")));
        }
    }
    let tag = match opt(&f.tag) {
        None => None,
        Some(t) => Some(
            t.split_once(['=', ':'])
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| AppError::BadRequest("`tag` must be name=value".into()))?,
        ),
    };
    Ok(Selection {
        from,
        to,
        scope,
        model: opt(&f.model),
        key: opt(&f.key),
        user: opt(&f.user),
        tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(f: Filters) -> Result<Selection, AppError> {
        selection(&f, Scope::All, DEFAULT_MAX_RANGE_DAYS)
    }

    #[test]
    fn filters_become_a_selection() {
        let f = Filters {
            from: "2026-10-01".into(),
            to: "2026-10-31".into(),
            model: "gpt-4o".into(),
            user: "a'b".into(),
            tag: "project=x".into(),
            ..Default::default()
        };
        let s = selection(&f, Scope::One("uni-oslo".into()), 400).unwrap();
        assert_eq!(s.scope, Scope::One("uni-oslo".into()));
        assert_eq!(s.model.as_deref(), Some("gpt-4o"));
        assert_eq!(s.user.as_deref(), Some("a'b"));
        assert_eq!(s.tag, Some(("project".into(), "x".into())));
        assert_eq!(s.days().len(), 31);
        assert_eq!(s.end_ts() - s.start_ts(), 31 * 86400);
    }

    #[test]
    fn what_does_not_parse_is_refused() {
        let with = |from: &str, to: &str| Filters {
            from: from.into(),
            to: to.into(),
            ..Default::default()
        };
        for (from, to) in [
            ("2026-10-05", "2026-10-01"),
            ("yesterday", ""),
            ("", "+262142-12-31"),
            ("2026-1-1", ""),
            ("", "1999-12-31"),
            ("2016-01-01", "2026-01-01"),
        ] {
            assert!(parse(with(from, to)).is_err(), "{from} {to}");
        }
        assert!(parse(Filters {
            tag: "no-equals".into(),
            ..Default::default()
        })
        .is_err());
        assert!(parse(Filters {
            model: "m".repeat(600),
            ..Default::default()
        })
        .is_err());
        assert!(parse(with("2026-01-01", "2027-02-04")).is_ok(), "400 days");
        assert!(parse(with("2026-01-01", "2027-02-05")).is_err(), "401 days");
    }
}
