//! What a view asks for: which institutions (scope), which days, which filters. Parsed
//! from URLs by the dashboard, built directly by reports; turned into SQL by `store`.

use chrono::{Duration, NaiveDate};

/// Which institutions a request may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    One(String),
}

impl Scope {
    pub fn institution(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::One(i) => Some(i),
        }
    }
}

/// A validated selection: date range (UTC days, both inclusive), scope and filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub scope: Scope,
    pub model: Option<String>,
    pub key: Option<String>,
    pub user: Option<String>,
    pub tag: Option<(String, String)>,
}

impl Selection {
    /// All usage of `scope` from `from` to `to` (both inclusive), no filters.
    pub fn whole(from: NaiveDate, to: NaiveDate, scope: Scope) -> Self {
        Self {
            from,
            to,
            scope,
            model: None,
            key: None,
            user: None,
            tag: None,
        }
    }

    pub fn start_ts(&self) -> i64 {
        self.from
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp()
    }

    pub fn end_ts(&self) -> i64 {
        (self.to + Duration::days(1))
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp()
    }

    /// Days in the range (for time series).
    pub fn days(&self) -> Vec<NaiveDate> {
        self.from
            .iter_days()
            .take_while(|d| *d <= self.to)
            .collect()
    }
}
