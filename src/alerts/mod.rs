//! Alerts for ops: detectors (pure functions over hourly spend series and pipeline
//! readings), an incident tracker that turns readings into one "firing" and one
//! "resolved" per incident, delivery by webhook and e-mail, and a backtest.

pub mod backtest;
pub mod deliver;
pub mod evaluator;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::config::SpikeConfig;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An institution's spend jumped.
    InstitutionSpike,
    /// An API key's spend jumped (a leaked key, a runaway script).
    KeySpike,
    /// Month-to-date spend crossed a share of the monthly budget.
    Budget,
    /// A limit (`tokentally limits`) was reached (mode `alert`) or refused requests
    /// (mode `block`): once per limit and period.
    Limit,
    /// Events of a model without a price arrived.
    UnpricedModel,
    /// Rejected messages above the configured rate.
    Rejections,
    /// The consumer group is behind.
    ConsumerLag,
    /// Messages wait and no ingest instance commits (reported by the instances).
    IngestStalled,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InstitutionSpike => "institution_spike",
            Kind::KeySpike => "key_spike",
            Kind::Budget => "budget",
            Kind::Limit => "limit",
            Kind::UnpricedModel => "unpriced_model",
            Kind::Rejections => "rejections",
            Kind::ConsumerLag => "consumer_lag",
            Kind::IngestStalled => "ingest_stalled",
        }
    }

    /// Kinds that fire once per entity (the entity names the period) and never resolve.
    pub fn is_once(self) -> bool {
        matches!(self, Kind::Budget | Kind::Limit)
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Kind::InstitutionSpike,
            Kind::KeySpike,
            Kind::Budget,
            Kind::Limit,
            Kind::UnpricedModel,
            Kind::Rejections,
            Kind::ConsumerLag,
            Kind::IngestStalled,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

pub use crate::domain::Severity;

/// One detector reading about one entity at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub kind: Kind,
    /// Institution id, `institution/key`, model name, partition…
    pub entity: String,
    /// The institution concerned, if any (for routing and the dashboard's scope).
    pub institution: String,
    pub firing: bool,
    pub severity: Severity,
    pub observed: Decimal,
    pub baseline: Decimal,
    pub threshold: Decimal,
    pub message: String,
}

/// Spend per hour of one entity, keyed by hour start.
pub type Series = BTreeMap<DateTime<Utc>, Decimal>;

/// The spike detector's verdict for one window.
#[derive(Debug, Clone, PartialEq)]
pub struct SpikeCheck {
    /// Spend in the current window.
    pub observed: Decimal,
    /// Mean spend of the same window at the same hour of the week in earlier weeks.
    pub baseline: Decimal,
    /// Spend above which the window counts as a spike.
    pub fire_above: Decimal,
    /// Spend at or below which an open spike counts as resolved.
    pub resolve_at_or_below: Decimal,
}

fn window_sum(s: &Series, end: DateTime<Utc>, hours: i64) -> Decimal {
    s.range(end - Duration::hours(hours)..end)
        .map(|(_, v)| *v)
        .sum()
}

/// Spike detection by **same hour-of-week baseline**.
///
/// The window `[end − window, end)` is compared with the same window shifted back by one
/// to `baseline_weeks` whole weeks. LLM spend follows the working week (office hours on
/// weekdays, quiet nights and weekends), so the same hour of the week is the comparison
/// that does not mistake Monday 10:00 for a spike after a quiet Sunday; a trailing mean
/// would fire every Monday morning and miss a spike on a Saturday night. The threshold
/// is the largest of `min_spend` (tiny entities never page), `factor` × the baseline
/// mean, and mean + `deviations` × the standard deviation of those weeks (noisy entities
/// need more to fire). An open spike resolves when the window is back at or below
/// `resolve_factor` × mean (or under `min_spend`): the gap between the two thresholds
/// keeps a spend level near the line from flapping.
///
/// Weeks before the entity's first spend are not counted: a brand-new entity compares
/// against zero and so fires once it passes `min_spend` (a new, leaked key should page).
pub fn spike(s: &Series, end: DateTime<Utc>, cfg: &SpikeConfig) -> SpikeCheck {
    let window = i64::from(cfg.window_hours.max(1));
    let observed = window_sum(s, end, window);
    let first = s.keys().next().copied();
    let mut weeks = Vec::new();
    for w in 1..=i64::from(cfg.baseline_weeks.max(1)) {
        let e = end - Duration::weeks(w);
        if first.is_some_and(|f| e - Duration::hours(window) >= f) {
            weeks.push(window_sum(s, e, window));
        }
    }
    let n = Decimal::from(weeks.len().max(1));
    let mean = weeks.iter().copied().sum::<Decimal>() / n;
    let var = weeks
        .iter()
        .map(|v| (*v - mean) * (*v - mean))
        .sum::<Decimal>()
        / n;
    let std = sqrt(var);
    let fire_above = cfg
        .min_spend_usd
        .max(mean * cfg.factor)
        .max(mean + std * cfg.deviations);
    let resolve_at_or_below = (mean * cfg.resolve_factor).max(cfg.min_spend_usd);
    SpikeCheck {
        observed,
        baseline: mean.round_dp(6),
        fire_above: fire_above.round_dp(6),
        resolve_at_or_below: resolve_at_or_below.round_dp(6),
    }
}

/// Square root by Newton's method (spend deviations need no more than 6 places).
fn sqrt(v: Decimal) -> Decimal {
    if v <= Decimal::ZERO {
        return Decimal::ZERO;
    }
    let mut x = if v > Decimal::ONE {
        v / Decimal::TWO
    } else {
        Decimal::ONE
    };
    for _ in 0..60 {
        let next = (x + v / x) / Decimal::TWO;
        if (next - x).abs() < Decimal::new(1, 9) {
            return next;
        }
        x = next;
    }
    x
}

/// Budget thresholds crossed by month-to-date `spent` (percentages of `budget`).
pub fn budget_crossed(spent: Decimal, budget: Decimal, thresholds: &[u32]) -> Vec<u32> {
    if budget <= Decimal::ZERO {
        return Vec::new();
    }
    thresholds
        .iter()
        .copied()
        .filter(|t| spent * Decimal::ONE_HUNDRED >= budget * Decimal::from(*t))
        .collect()
}

/// A state change the tracker decided on.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub alert_id: String,
    pub resolved: bool,
    pub at: DateTime<Utc>,
    pub reading: Reading,
}

#[derive(Debug, Clone)]
pub struct Open {
    pub alert_id: String,
    pub fired_at: DateTime<Utc>,
    pub reading: Reading,
}

/// Incidents: one per (kind, entity) while it fires; a "resolved" when it stops; no new
/// incident for the same (kind, entity) within `cooldown` of the last resolution.
/// Budget readings are one-shot: once fired for a key (which names the period and the
/// threshold) they never fire again and never resolve.
#[derive(Debug, Default)]
pub struct Tracker {
    pub open: HashMap<(Kind, String), Open>,
    resolved_at: HashMap<(Kind, String), DateTime<Utc>>,
    once: std::collections::HashSet<String>,
    pub cooldown: Duration,
}

impl Tracker {
    pub fn new(cooldown: Duration) -> Self {
        Self {
            cooldown,
            ..Default::default()
        }
    }

    /// Restores state (e.g. from the store after a restart).
    pub fn restore_open(&mut self, open: Open) {
        self.open
            .insert((open.reading.kind, open.reading.entity.clone()), open);
    }

    pub fn restore_resolved(&mut self, kind: Kind, entity: String, at: DateTime<Utc>) {
        let e = self.resolved_at.entry((kind, entity)).or_insert(at);
        *e = (*e).max(at);
    }

    pub fn restore_once(&mut self, entity: String) {
        self.once.insert(entity);
    }

    /// Undoes a one-shot announcement that could not be stored.
    pub fn forget_once(&mut self, entity: &str) {
        self.once.remove(entity);
    }

    /// Applies the readings taken at `now`. `seen` lists every (kind, entity) a
    /// detector looked at; open incidents it did not look at are left alone.
    pub fn step(&mut self, now: DateTime<Utc>, readings: Vec<Reading>) -> Vec<Transition> {
        let mut out = Vec::new();
        for r in readings {
            let key = (r.kind, r.entity.clone());
            if r.kind.is_once() {
                if r.firing && self.once.insert(r.entity.clone()) {
                    out.push(Transition {
                        alert_id: alert_id(&r, now),
                        resolved: false,
                        at: now,
                        reading: r,
                    });
                }
                continue;
            }
            match (self.open.get(&key), r.firing) {
                (None, true) => {
                    let cooling = self
                        .resolved_at
                        .get(&key)
                        .is_some_and(|t| now - *t < self.cooldown);
                    if cooling {
                        continue;
                    }
                    let id = alert_id(&r, now);
                    self.open.insert(
                        key,
                        Open {
                            alert_id: id.clone(),
                            fired_at: now,
                            reading: r.clone(),
                        },
                    );
                    out.push(Transition {
                        alert_id: id,
                        resolved: false,
                        at: now,
                        reading: r,
                    });
                }
                (Some(_), false) => {
                    let open = self.open.remove(&key).expect("present");
                    self.resolved_at.insert(key, now);
                    // Routed like the message that opened it.
                    let mut r = r;
                    r.severity = open.reading.severity;
                    out.push(Transition {
                        alert_id: open.alert_id,
                        resolved: true,
                        at: now,
                        reading: r,
                    });
                }
                _ => {}
            }
        }
        out
    }
}

/// Deterministic id of an incident: kind, entity and when it fired.
pub fn alert_id(r: &Reading, at: DateTime<Utc>) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!(
        "{}|{}|{}",
        r.kind.as_str(),
        r.entity,
        at.timestamp()
    ));
    hex::encode(&h[..8])
}

/// Readings for spike detectors over a set of series. `open` tells whether an incident
/// is open for an entity, which decides between the fire and the resolve threshold.
pub fn spike_readings(
    kind: Kind,
    series: &BTreeMap<(String, String), Series>,
    end: DateTime<Utc>,
    cfg: &SpikeConfig,
    is_open: impl Fn(&str) -> bool,
) -> Vec<Reading> {
    series
        .iter()
        .map(|((inst, entity), s)| {
            let c = spike(s, end, cfg);
            let firing = if is_open(entity) {
                c.observed > c.resolve_at_or_below
            } else {
                c.observed > c.fire_above
            };
            let what = match kind {
                Kind::KeySpike => format!("API key {entity}"),
                _ => format!("institution {entity}"),
            };
            Reading {
                kind,
                entity: entity.clone(),
                institution: inst.clone(),
                firing,
                severity: if c.observed > c.fire_above * Decimal::from(3) {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                observed: c.observed.round_dp(2),
                baseline: c.baseline.round_dp(2),
                threshold: c.fire_above.round_dp(2),
                message: format!(
                    "{what} spent ${} in the last {} h; usual for this hour of the week: ${}",
                    c.observed.round_dp(2),
                    cfg.window_hours,
                    c.baseline.round_dp(2)
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rust_decimal_macros::dec;

    fn cfg() -> SpikeConfig {
        SpikeConfig::default()
    }

    /// Four weeks of office-hours spend: $10/h on weekdays 8-18, $1/h otherwise.
    fn weekly(weeks: i64) -> (Series, DateTime<Utc>) {
        let start = Utc.with_ymd_and_hms(2026, 9, 7, 0, 0, 0).unwrap(); // a Monday
        let mut s = Series::new();
        for h in 0..weeks * 168 {
            let t = start + Duration::hours(h);
            let weekday = (h / 24) % 7 < 5;
            let office = (8..18).contains(&(h % 24));
            s.insert(t, if weekday && office { dec!(10) } else { dec!(1) });
        }
        (s, start + Duration::weeks(weeks))
    }

    #[test]
    fn weekly_seasonality_is_not_a_spike_but_a_jump_is() {
        let (mut s, next_monday) = weekly(4);
        // Monday 10:00, after a quiet weekend: usual, no spike.
        let monday_10 = next_monday + Duration::hours(10);
        for h in 0..11 {
            s.insert(
                next_monday + Duration::hours(h),
                if h >= 8 { dec!(10) } else { dec!(1) },
            );
        }
        let c = spike(&s, monday_10 + Duration::hours(1), &cfg());
        assert_eq!(c.baseline, dec!(10));
        assert!(c.observed <= c.fire_above, "{c:?}");
        // A runaway script at Monday 03:00: $40 against a usual $1.
        s.insert(next_monday + Duration::hours(3), dec!(40));
        let c = spike(&s, next_monday + Duration::hours(4), &cfg());
        assert!(c.observed > c.fire_above, "{c:?}");
    }

    #[test]
    fn tiny_entities_never_page() {
        let (mut s, next) = weekly(4);
        for v in s.values_mut() {
            *v /= dec!(100);
        }
        s.insert(next, dec!(1)); // 10x-100x the usual, but only $1
        let c = spike(&s, next + Duration::hours(1), &cfg());
        assert!(c.observed <= c.fire_above);
    }

    fn reading(firing: bool, kind: Kind, entity: &str) -> Reading {
        Reading {
            kind,
            entity: entity.into(),
            institution: "i".into(),
            firing,
            severity: Severity::Warning,
            observed: Decimal::ZERO,
            baseline: Decimal::ZERO,
            threshold: Decimal::ZERO,
            message: String::new(),
        }
    }

    #[test]
    fn an_incident_fires_once_resolves_once_and_cools_down() {
        let mut t = Tracker::new(Duration::hours(2));
        let t0 = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
        let k = Kind::InstitutionSpike;
        let fired = t.step(t0, vec![reading(true, k, "a")]);
        assert_eq!(fired.len(), 1);
        assert!(!fired[0].resolved);
        // Still firing: nothing new.
        assert!(t
            .step(t0 + Duration::minutes(1), vec![reading(true, k, "a")])
            .is_empty());
        let resolved = t.step(t0 + Duration::minutes(2), vec![reading(false, k, "a")]);
        assert_eq!(resolved.len(), 1);
        assert!(resolved[0].resolved);
        assert_eq!(resolved[0].alert_id, fired[0].alert_id);
        // Within the cooldown a new spike stays quiet; after it, it fires again.
        assert!(t
            .step(t0 + Duration::hours(1), vec![reading(true, k, "a")])
            .is_empty());
        assert_eq!(
            t.step(t0 + Duration::hours(3), vec![reading(true, k, "a")])
                .len(),
            1
        );
    }

    #[test]
    fn budget_thresholds_fire_once_each() {
        assert_eq!(
            budget_crossed(dec!(85), dec!(100), &[50, 80, 100]),
            vec![50, 80]
        );
        assert!(budget_crossed(dec!(49.99), dec!(100), &[50]).is_empty());
        let mut t = Tracker::new(Duration::hours(1));
        let now = Utc.with_ymd_and_hms(2026, 10, 20, 0, 0, 0).unwrap();
        let r = reading(true, Kind::Budget, "uni-a/2026-10/80");
        assert_eq!(t.step(now, vec![r.clone()]).len(), 1);
        assert!(t.step(now + Duration::days(1), vec![r.clone()]).is_empty());
        // After a restart the stored state says it fired.
        let mut t2 = Tracker::new(Duration::hours(1));
        t2.restore_once("uni-a/2026-10/80".into());
        assert!(t2.step(now, vec![r]).is_empty());
    }

    #[test]
    fn sqrt_is_close() {
        assert!((sqrt(dec!(2)) - dec!(1.41421356)).abs() < dec!(0.0000001));
        assert_eq!(sqrt(dec!(0)), dec!(0));
    }
}
