//! Limits: how much an institution, a user or an API key may spend (USD), request or use
//! (tokens) per day, week or month of the institution's calendar, and whether reaching
//! the limit blocks requests at the gateway or only alerts.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::Period;

/// Whose usage a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    Institution,
    /// One user of the institution (every key of theirs).
    User,
    /// One API key.
    Key,
    /// Every member of a group together (a budget the group shares).
    Group,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Cost at the price book's list prices, in USD.
    Usd,
    /// Requests the provider served (refused ones do not count).
    Requests,
    /// Prompt plus output tokens.
    Tokens,
}

/// The calendar period a limit applies to, in the institution's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitPeriod {
    /// Midnight to midnight.
    Day,
    /// Monday 00:00 to Monday 00:00 (ISO weeks).
    Week,
    /// The 1st 00:00 to the next 1st.
    Month,
}

/// What happens at the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitMode {
    /// The gateway refuses what would pass it (429 `insufficient_quota`); one alert.
    Block,
    /// Nothing is refused; one alert when it is reached.
    Alert,
}

macro_rules! names {
    ($t:ty, $what:literal, $($v:ident => $s:literal),+) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(Self::$v),)+
                    other => Err(format!(
                        "{} is not a {}; use one of: {}",
                        crate::format::log_safe(other, 40),
                        $what,
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
    };
}

names!(LimitScope, "limit scope", Institution => "institution", User => "user", Key => "key", Group => "group");
names!(Metric, "limit metric", Usd => "usd", Requests => "requests", Tokens => "tokens");
names!(LimitPeriod, "limit period", Day => "day", Week => "week", Month => "month");
names!(LimitMode, "limit mode", Block => "block", Alert => "alert");

/// What a limit counts: USD, requests and tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    pub usd: Decimal,
    pub requests: u64,
    pub tokens: u64,
}

impl Amounts {
    pub fn of(&self, m: Metric) -> Decimal {
        match m {
            Metric::Usd => self.usd,
            Metric::Requests => Decimal::from(self.requests),
            Metric::Tokens => Decimal::from(self.tokens),
        }
    }

    pub fn add(&mut self, o: &Amounts) {
        self.usd += o.usd;
        self.requests += o.requests;
        self.tokens += o.tokens;
    }

    pub fn sub(&mut self, o: &Amounts) {
        self.usd -= o.usd;
        self.requests = self.requests.saturating_sub(o.requests);
        self.tokens = self.tokens.saturating_sub(o.tokens);
    }

    pub fn is_zero(&self) -> bool {
        self.usd.is_zero() && self.requests == 0 && self.tokens == 0
    }

    /// The larger of each amount.
    pub fn max_each(&mut self, o: &Amounts) {
        self.usd = self.usd.max(o.usd);
        self.requests = self.requests.max(o.requests);
        self.tokens = self.tokens.max(o.tokens);
    }
}

/// An institution's usage in one period: in total, by user and by key, so that every
/// limit's share is a lookup.
#[derive(Debug, Default)]
pub struct UsageIndex {
    total: Amounts,
    users: std::collections::HashMap<String, Amounts>,
    keys: std::collections::HashMap<String, Amounts>,
    groups: std::collections::HashMap<String, Amounts>,
}

impl UsageIndex {
    /// From (user, key, usage) rows, with each user's group (`group_of`): a group's usage
    /// is its current members' (a member who moves takes their usage of the period along).
    pub fn of_rows_in_groups<'a, 'g>(
        rows: impl IntoIterator<Item = (&'a String, &'a String, Amounts)>,
        group_of: impl Fn(&str) -> Option<&'g str>,
    ) -> Self {
        let mut ix = Self::default();
        for (user, key, a) in rows {
            ix.total.add(&a);
            ix.users.entry(user.clone()).or_default().add(&a);
            ix.keys.entry(key.clone()).or_default().add(&a);
            if let Some(g) = group_of(user) {
                ix.groups.entry(g.to_owned()).or_default().add(&a);
            }
        }
        ix
    }

    /// The same, with the institution's total given (when the rows are a few people's).
    pub fn with_total(mut self, total: Amounts) -> Self {
        self.total = total;
        self
    }

    /// What `l` counts of it.
    pub fn of(&self, l: &Limit) -> Amounts {
        match l.scope {
            LimitScope::Institution => Some(&self.total),
            LimitScope::User => self.users.get(&l.subject),
            LimitScope::Key => self.keys.get(&l.subject),
            LimitScope::Group => self.groups.get(&l.subject),
        }
        .copied()
        .unwrap_or_default()
    }
}

/// Limits that come with people rather than from the limits table or the config: each
/// member's group defaults and each group's shared budget (`people::directory`), and who
/// belongs to which group ((institution, user) → group).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Derived {
    pub limits: Vec<Limit>,
    pub groups: std::collections::HashMap<(String, String), String>,
}

impl Derived {
    pub fn group_of(&self, institution: &str, user: &str) -> Option<&str> {
        self.groups
            .get(&(institution.to_owned(), user.to_owned()))
            .map(String::as_str)
    }
}

/// Where `Derived` comes from (people, read from the store): asked at every refresh,
/// answering the same `Arc` while nothing changed.
pub trait DerivedSource: Send + Sync {
    fn derived(&self) -> futures::future::BoxFuture<'_, anyhow::Result<std::sync::Arc<Derived>>>;
}

/// Usage of one (user, key) of an institution in a period, as limits count it; with
/// those of the pending event ids asked about that are stored (read in one query, so an
/// event is either in the sums and listed, or in neither).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SubjectUsage {
    pub user_id: String,
    pub api_key_id: String,
    pub amounts: Amounts,
    pub stored: Vec<String>,
}

/// How a gateway instance decides its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecisionMode {
    /// No shared store is configured: each instance admits its share of the headroom.
    #[default]
    Shares,
    /// Through the shared store: exact across instances.
    Exact,
    /// A shared store is configured but unreachable: shares until it is back.
    Fallback,
}

names!(DecisionMode, "decision mode", Shares => "shares", Exact => "exact", Fallback => "fallback");

/// What one gateway instance holds against one limit beyond what ClickHouse has stored,
/// as it last reported (`limit_id` empty: only that the instance is live).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Hold {
    pub instance: String,
    pub limit_id: String,
    pub period_start: i64,
    pub reserved: Amounts,
    pub open: u64,
    pub pending: Amounts,
    /// Requests the limit refused on that instance this period (cumulative).
    pub refused: u64,
    pub reported_at: i64,
    /// It admitted requests under this limit since its previous report: it takes a share
    /// of the headroom (an idle instance does not shrink the others' shares).
    pub active: bool,
    /// The largest worst case it was asked for since its previous report.
    pub unit: Amounts,
    /// What it may admit under the limit until its next refresh (the share rule), in
    /// the limit's metric.
    pub cap: Decimal,
    pub mode: DecisionMode,
}

/// One limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub institution_id: String,
    pub scope: LimitScope,
    /// The user id (scope `user`) or key id (scope `key`); empty for the institution.
    #[serde(default)]
    pub subject: String,
    pub metric: Metric,
    pub period: LimitPeriod,
    /// USD for `usd` (exact decimal), a whole number for `requests` and `tokens`.
    #[serde(
        deserialize_with = "amount",
        serialize_with = "rust_decimal::serde::str::serialize"
    )]
    pub amount: Decimal,
    pub mode: LimitMode,
}

impl Limit {
    /// Stable id: one limit per institution, subject, metric and period.
    pub fn id(&self) -> String {
        limit_id(
            &self.institution_id,
            self.scope,
            &self.subject,
            self.metric,
            self.period,
        )
    }

    /// Checks the fields; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        use crate::domain::MAX_ID_LEN;
        if self.institution_id.is_empty() || self.institution_id.len() > MAX_ID_LEN {
            return Err(format!("institution must be 1-{MAX_ID_LEN} bytes"));
        }
        match (self.scope, self.subject.is_empty()) {
            (LimitScope::Institution, false) => {
                return Err("an institution's limit names no user or key".into())
            }
            (LimitScope::User, true) => return Err("a user's limit needs the user id".into()),
            (LimitScope::Key, true) => return Err("a key's limit needs the key id".into()),
            (LimitScope::Group, true) => return Err("a group's limit needs the group id".into()),
            _ => {}
        }
        if self.subject.len() > MAX_ID_LEN || self.subject.contains('\n') {
            return Err(format!(
                "user or key id must be at most {MAX_ID_LEN} bytes, one line"
            ));
        }
        if self.amount.is_sign_negative() {
            return Err("a limit cannot be negative".into());
        }
        if self.metric != Metric::Usd && !self.amount.fract().is_zero() {
            return Err(format!("a {} limit is a whole number", self.metric));
        }
        if self.amount > Decimal::from(1_000_000_000_000u64) {
            return Err("a limit must be below 10^12".into());
        }
        Ok(())
    }

    /// Who the limit applies to, for people: `uni-a`, `uni-a user alice`, `uni-a key tk_…`.
    pub fn subject_label(&self) -> String {
        match self.scope {
            LimitScope::Institution => self.institution_id.clone(),
            s => format!("{} {} {}", self.institution_id, s, self.subject),
        }
    }

    /// `$5.00 per month`, `15 requests per day`.
    pub fn amount_label(&self) -> String {
        match self.metric {
            Metric::Usd if self.amount.fract().is_zero() || self.amount.scale() <= 2 => {
                format!("${:.2} per {}", self.amount, self.period)
            }
            Metric::Usd => format!("${} per {}", self.amount.normalize(), self.period),
            m => format!("{} {m} per {}", self.amount, self.period),
        }
    }
}

/// An amount as a decimal string (`"12.50"`) or a whole number (`15`); a float is
/// refused (serde's "invalid type: floating point" with the expectation below), since it
/// could not be exact.
fn amount<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    struct Amount;
    impl serde::de::Visitor<'_> for Amount {
        type Value = Decimal;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number or a decimal string such as \"12.50\" (never a float: it could not be exact)")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Decimal, E> {
            Ok(Decimal::from(n))
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Decimal, E> {
            Ok(Decimal::from(n))
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Decimal, E> {
            s.trim()
                .parse()
                .map_err(|_| E::custom(format!("amount {s:?} is not a number")))
        }
    }
    d.deserialize_any(Amount)
}

pub fn limit_id(
    institution: &str,
    scope: LimitScope,
    subject: &str,
    metric: Metric,
    period: LimitPeriod,
) -> String {
    match scope {
        LimitScope::Institution => format!("{institution}:{metric}:{period}"),
        s => format!("{institution}:{s}:{subject}:{metric}:{period}"),
    }
}

/// Local midnight of `d` in `tz` as UTC (a zone that skips midnight: the earliest instant).
fn local_midnight(tz: chrono_tz::Tz, d: NaiveDate) -> DateTime<Utc> {
    let naive = d.and_hms_opt(0, 0, 0).expect("midnight");
    tz.from_local_datetime(&naive)
        .earliest()
        .unwrap_or_else(|| tz.from_utc_datetime(&(naive + Duration::hours(1))))
        .with_timezone(&Utc)
}

impl LimitPeriod {
    /// `[start, end)` in UTC of the period that holds `at`, in `tz`.
    pub fn bounds(self, at: DateTime<Utc>, tz: chrono_tz::Tz) -> (DateTime<Utc>, DateTime<Utc>) {
        let day = at.with_timezone(&tz).date_naive();
        match self {
            LimitPeriod::Day => (
                local_midnight(tz, day),
                local_midnight(tz, day + Duration::days(1)),
            ),
            LimitPeriod::Week => {
                let monday = day - Duration::days(i64::from(day.weekday().num_days_from_monday()));
                (
                    local_midnight(tz, monday),
                    local_midnight(tz, monday + Duration::days(7)),
                )
            }
            LimitPeriod::Month => Period::of(day).bounds(tz),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn periods_follow_the_institutions_calendar() {
        let oslo: chrono_tz::Tz = "Europe/Oslo".parse().unwrap();
        // 2026-10-31 23:30 UTC is already November 1st 00:30 in Oslo (UTC+1 after DST).
        let at = utc("2026-10-31T23:30:00Z");
        assert_eq!(
            LimitPeriod::Month.bounds(at, oslo),
            (utc("2026-10-31T23:00:00Z"), utc("2026-11-30T23:00:00Z"))
        );
        assert_eq!(
            LimitPeriod::Month.bounds(at, chrono_tz::UTC),
            (utc("2026-10-01T00:00:00Z"), utc("2026-11-01T00:00:00Z"))
        );
        // The day of the DST change in Oslo (2026-10-25) has 25 hours.
        let (s, e) = LimitPeriod::Day.bounds(utc("2026-10-25T12:00:00Z"), oslo);
        assert_eq!(
            (s, e),
            (utc("2026-10-24T22:00:00Z"), utc("2026-10-25T23:00:00Z"))
        );
        // Weeks start on Monday: 2026-12-03 is a Thursday.
        let (s, e) = LimitPeriod::Week.bounds(utc("2026-12-03T10:00:00Z"), oslo);
        assert_eq!(
            (s, e),
            (utc("2026-11-29T23:00:00Z"), utc("2026-12-06T23:00:00Z"))
        );
        // A half-hour zone.
        let adelaide: chrono_tz::Tz = "Australia/Adelaide".parse().unwrap();
        let (s, _) = LimitPeriod::Day.bounds(utc("2026-07-01T00:00:00Z"), adelaide);
        assert_eq!(s, utc("2026-06-30T14:30:00Z"));
    }

    #[test]
    fn ids_and_validation() {
        let mut l = Limit {
            institution_id: "uni-a".into(),
            scope: LimitScope::User,
            subject: "alice".into(),
            metric: Metric::Requests,
            period: LimitPeriod::Day,
            amount: Decimal::from(15),
            mode: LimitMode::Block,
        };
        assert_eq!(l.id(), "uni-a:user:alice:requests:day");
        assert_eq!(l.validate(), Ok(()));
        assert_eq!(l.amount_label(), "15 requests per day");
        l.amount = "1.5".parse().unwrap();
        assert!(l.validate().unwrap_err().contains("whole number"));
        l.metric = Metric::Usd;
        assert_eq!(l.validate(), Ok(()));
        l.subject.clear();
        assert!(l.validate().is_err());
        assert_eq!(
            "weekly".parse::<LimitPeriod>().unwrap_err(),
            "weekly is not a limit period; use one of: day, week, month"
        );
    }

    #[test]
    fn amounts_in_config_are_exact_or_refused() {
        let parse = |v: &str| {
            toml::from_str::<Limit>(&format!(
                "institution_id = \"u\"\nscope = \"institution\"\nmetric = \"usd\"\nperiod = \"month\"\nmode = \"block\"\namount = {v}"
            ))
        };
        assert_eq!(parse("\"12.50\"").unwrap().amount, Decimal::new(1250, 2));
        assert_eq!(parse("15").unwrap().amount, Decimal::from(15));
        assert!(parse("12.5")
            .unwrap_err()
            .to_string()
            .contains("never a float"));
        assert!(parse("\"lots\"")
            .unwrap_err()
            .to_string()
            .contains("not a number"));
    }

    proptest! {
        /// Every instant lies in its period, periods tile time (the next one starts
        /// where this ends), in every zone.
        #[test]
        fn periods_tile_time(secs in 1_600_000_000i64..1_900_000_000, z in 0usize..5, p in 0usize..3) {
            let zones = ["UTC", "Europe/Oslo", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"];
            let tz: chrono_tz::Tz = zones[z].parse().unwrap();
            let period = [LimitPeriod::Day, LimitPeriod::Week, LimitPeriod::Month][p];
            let at = Utc.timestamp_opt(secs, 0).unwrap();
            let (s, e) = period.bounds(at, tz);
            prop_assert!(s <= at && at < e);
            prop_assert_eq!(period.bounds(e, tz).0, e);
            prop_assert_eq!(period.bounds(s - Duration::seconds(1), tz).1, s);
        }
    }
}
