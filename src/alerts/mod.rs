//! Alerts for ops: detectors (pure functions over hourly spend series and pipeline
//! readings), an incident tracker that turns readings into one "firing" and one
//! "resolved" per incident, delivery by webhook and e-mail, and a backtest.

pub mod backtest;
pub mod deliver;
pub mod evaluator;
pub mod labelled;
pub mod rate;
pub mod score;

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
    /// A user's spend (every key of theirs) jumped within the last minutes or hours
    /// (the spend-rate check; the hourly window watches institutions and keys).
    UserSpike,
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
    /// A gateway cannot reach its shared limit store and decides by shares.
    LimitsFallback,
    /// A provider's usage or cost report differs from what was recorded by more than
    /// `provider_bills.threshold_usd` (raised by `tokentally providers reconcile`, once
    /// per provider and day range).
    ProviderBill,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::InstitutionSpike => "institution_spike",
            Kind::KeySpike => "key_spike",
            Kind::UserSpike => "user_spike",
            Kind::Budget => "budget",
            Kind::Limit => "limit",
            Kind::UnpricedModel => "unpriced_model",
            Kind::Rejections => "rejections",
            Kind::ConsumerLag => "consumer_lag",
            Kind::IngestStalled => "ingest_stalled",
            Kind::LimitsFallback => "limits_fallback",
            Kind::ProviderBill => "provider_bill",
        }
    }

    /// Kinds that fire once per entity (the entity names the period) and never resolve.
    pub fn is_once(self) -> bool {
        matches!(self, Kind::Budget | Kind::Limit | Kind::ProviderBill)
    }

    /// Spend spikes: the kinds the recovery hold-off and reopening apply to.
    pub fn is_spike(self) -> bool {
        matches!(
            self,
            Kind::InstitutionSpike | Kind::KeySpike | Kind::UserSpike
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Kind::InstitutionSpike,
            Kind::KeySpike,
            Kind::UserSpike,
            Kind::Budget,
            Kind::Limit,
            Kind::UnpricedModel,
            Kind::Rejections,
            Kind::ConsumerLag,
            Kind::IngestStalled,
            Kind::LimitsFallback,
            Kind::ProviderBill,
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
    /// What the window usually comes to (see `spike`).
    pub baseline: Decimal,
    /// Spend above which the window counts as a spike.
    pub fire_above: Decimal,
    /// Spend at or below which an open spike counts as recovered.
    pub resolve_at_or_below: Decimal,
    /// Where the baseline came from.
    pub basis: Basis,
}

/// Where a baseline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// The same local hour of the week in earlier weeks.
    Weekly,
    /// A young entity (less than a week of history): the same local hour on earlier days
    /// of the same kind (working day or weekend).
    Daily,
    /// An entity on its first day: its peers, and `new_entity_min_usd`.
    New,
}

/// What the detector knows about an entity besides its series.
#[derive(Debug, Clone, Default)]
pub struct SpikeContext<'a> {
    /// The institution's time zone: weeks and days are shifted in local time, so a job at
    /// 06:00 local stays at 06:00 across a DST change.
    pub tz: Option<chrono_tz::Tz>,
    /// Spans of earlier incidents of this entity: windows inside them are not part of
    /// the baseline (one incident must not hide the next).
    pub excluded: &'a [(DateTime<Utc>, DateTime<Utc>)],
    /// For an entity without history: the usual level of its peers in this window.
    pub peers: Option<Decimal>,
}

fn window_sum(s: &Series, end: DateTime<Utc>, hours: i64) -> Decimal {
    s.range(end - Duration::hours(hours)..end)
        .map(|(_, v)| *v)
        .sum()
}

/// `t` moved by `days` whole days in local time (a week back from 06:00 local is 06:00
/// local, whatever DST did in between).
pub fn local_shift(t: DateTime<Utc>, days: i64, tz: chrono_tz::Tz) -> DateTime<Utc> {
    use chrono::{LocalResult, TimeZone};
    let local = t.with_timezone(&tz).naive_local() + Duration::days(days);
    match tz.from_local_datetime(&local) {
        LocalResult::Single(x) => x.with_timezone(&Utc),
        LocalResult::Ambiguous(a, _) => a.with_timezone(&Utc),
        // In a DST gap: the hour after it.
        LocalResult::None => tz
            .from_local_datetime(&(local + Duration::hours(1)))
            .earliest()
            .map_or(t + Duration::days(days), |x| x.with_timezone(&Utc)),
    }
}

/// Median of a non-empty list.
pub fn median(v: &[Decimal]) -> Decimal {
    let mut v = v.to_vec();
    v.sort();
    let n = v.len();
    if n == 0 {
        return Decimal::ZERO;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / Decimal::TWO
    }
}

/// Spike detection against a **robust, seasonal baseline**.
///
/// The window `[end − window, end)` is compared with the same window one to
/// `baseline_weeks` weeks earlier, shifted in the institution's local time (LLM spend
/// follows the local working week). The baseline is the **median** of those windows and
/// the spread the median absolute deviation, so one past incident cannot lift the
/// threshold over the next one; windows inside an earlier incident of the entity are left
/// out as well. The threshold is the largest of `min_spend` (tiny entities never page),
/// `factor` × the median, and the median + `deviations` × 1.4826 × MAD.
///
/// Weeks before the entity's first spend do not count (they are not zero, they are
/// unknown). An entity younger than a week compares against earlier days of the same
/// kind (working day / weekend), and one on its first day against its peers with a floor
/// of `new_entity_min_usd`: a new key with ordinary use stays quiet, a new leaked key
/// pages. An open spike counts as recovered at or below `resolve_factor` × the baseline
/// (or the baseline plus a fifth of `min_spend`): a level change that persists through a
/// quiet night stays one incident.
pub fn spike(
    s: &Series,
    end: DateTime<Utc>,
    cfg: &SpikeConfig,
    ctx: &SpikeContext<'_>,
) -> SpikeCheck {
    let window = i64::from(cfg.window_hours.max(1));
    let observed = window_sum(s, end, window);
    let first = s.iter().find(|(_, v)| !v.is_zero()).map(|(t, _)| *t);
    let tz = ctx.tz.unwrap_or(chrono_tz::UTC);
    let inside_incident = |e: DateTime<Utc>| {
        let start = e - Duration::hours(window);
        ctx.excluded.iter().any(|(a, b)| start < *b && e > *a)
    };
    let existed = |e: DateTime<Utc>| first.is_some_and(|f| e - Duration::hours(window) >= f);
    let mut weeks = Vec::new();
    for w in 1..=i64::from(cfg.baseline_weeks.max(1)) {
        let e = local_shift(end, -7 * w, tz);
        if existed(e) && !inside_incident(e) {
            weeks.push(window_sum(s, e, window));
        }
    }
    let (values, basis) = if !weeks.is_empty() {
        (weeks, Basis::Weekly)
    } else {
        let weekend = |t: DateTime<Utc>| {
            use chrono::Datelike;
            let d = (t - Duration::seconds(1)).with_timezone(&tz).weekday();
            matches!(d, chrono::Weekday::Sat | chrono::Weekday::Sun)
        };
        let mut same = Vec::new();
        let mut any = Vec::new();
        for d in 1..=6 {
            let e = local_shift(end, -d, tz);
            if existed(e) && !inside_incident(e) {
                let v = window_sum(s, e, window);
                any.push(v);
                if weekend(e) == weekend(end) {
                    same.push(v);
                }
            }
        }
        match (same.is_empty(), any.is_empty()) {
            (false, _) => (same, Basis::Daily),
            (true, false) => (any, Basis::Daily),
            (true, true) => (vec![ctx.peers.unwrap_or(Decimal::ZERO)], Basis::New),
        }
    };
    judge(observed, &values, basis, cfg.factor, Decimal::ONE, cfg)
}

/// The verdict on `observed` against the windows `values` a baseline came from: the
/// median and the spread (1.4826 × the median absolute deviation), fire above the largest
/// of the floor, `factor` × the median and the median + `deviations` × the spread. The
/// floors (`min_spend_usd`, `new_entity_min_usd` for a new entity) are multiplied by
/// `floor_scale` (1 for the hourly window; the window in hours for a spend-rate window).
pub(crate) fn judge(
    observed: Decimal,
    values: &[Decimal],
    basis: Basis,
    factor: Decimal,
    floor_scale: Decimal,
    cfg: &SpikeConfig,
) -> SpikeCheck {
    let med = median(values);
    let deviations: Vec<Decimal> = values.iter().map(|v| (*v - med).abs()).collect();
    let mad = median(&deviations) * Decimal::new(14826, 4);
    let floor = if basis == Basis::New {
        cfg.min_spend_usd.max(cfg.new_entity_min_usd)
    } else {
        cfg.min_spend_usd
    } * floor_scale;
    let fire_above = floor.max(med * factor).max(med + mad * cfg.deviations);
    let resolve_at_or_below =
        (med * cfg.resolve_factor).max(med + cfg.min_spend_usd * floor_scale / Decimal::from(5));
    SpikeCheck {
        observed,
        baseline: med.round_dp(6),
        fire_above: fire_above.round_dp(6),
        resolve_at_or_below: resolve_at_or_below.round_dp(6),
        basis,
    }
}

/// How loud a firing spike is: critical above three times its threshold.
pub(crate) fn severity(c: &SpikeCheck) -> Severity {
    if c.observed > c.fire_above * Decimal::from(3) {
        Severity::Critical
    } else {
        Severity::Warning
    }
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
    /// A resolved incident firing again within `renotify` (same id): announced as firing
    /// again, not as a new incident.
    pub reopened: bool,
    pub at: DateTime<Utc>,
    pub reading: Reading,
}

#[derive(Debug, Clone)]
pub struct Open {
    pub alert_id: String,
    pub fired_at: DateTime<Utc>,
    pub reading: Reading,
    /// Since when its readings say "recovered" (it resolves after `recover`).
    pub recovering_since: Option<DateTime<Utc>>,
}

/// A resolved incident, remembered for reopening and for baselines.
#[derive(Debug, Clone)]
struct Closed {
    alert_id: String,
    fired_at: DateTime<Utc>,
    resolved_at: DateTime<Utc>,
}

/// Incidents: one per (kind, entity) while it fires. A spike incident resolves once its
/// readings have said "recovered" for `recover` (a short dip does not end it), and a
/// spike within `renotify` of the resolution reopens the same incident; pipeline
/// incidents resolve at the first reading that says so; after that, no new
/// incident within `cooldown` of the last resolution. Budget and limit readings are
/// one-shot: once fired for a key (which names the period and the threshold) they never
/// fire again and never resolve.
#[derive(Debug, Default)]
pub struct Tracker {
    pub open: HashMap<(Kind, String), Open>,
    closed: HashMap<(Kind, String), Vec<Closed>>,
    once: std::collections::HashSet<String>,
    pub cooldown: Duration,
    pub recover: Duration,
    pub renotify: Duration,
}

impl Tracker {
    /// A tracker that resolves at the first recovered reading and never reopens.
    pub fn new(cooldown: Duration) -> Self {
        Self {
            cooldown,
            ..Default::default()
        }
    }

    /// The tracker the configuration asks for.
    pub fn from_config(cfg: &crate::config::AlertsConfig) -> Self {
        Self {
            cooldown: Duration::seconds(cfg.cooldown_secs),
            recover: Duration::hours(i64::from(cfg.spike.recover_hours)),
            renotify: Duration::hours(i64::from(cfg.spike.renotify_hours)),
            ..Default::default()
        }
    }

    /// Restores state (e.g. from the store after a restart).
    pub fn restore_open(&mut self, open: Open) {
        self.open
            .insert((open.reading.kind, open.reading.entity.clone()), open);
    }

    /// Restores a resolved incident.
    pub fn restore_closed(
        &mut self,
        alert_id: String,
        fired_at: DateTime<Utc>,
        resolved_at: DateTime<Utc>,
        reading: Reading,
    ) {
        let list = self
            .closed
            .entry((reading.kind, reading.entity))
            .or_default();
        list.push(Closed {
            alert_id,
            fired_at,
            resolved_at,
        });
        list.sort_by_key(|c| c.resolved_at);
    }

    pub fn restore_once(&mut self, entity: String) {
        self.once.insert(entity);
    }

    /// Undoes a one-shot announcement that could not be stored.
    pub fn forget_once(&mut self, entity: &str) {
        self.once.remove(entity);
    }

    /// The spans of an entity's incidents (resolved ones, and the open one up to `now`),
    /// for keeping them out of its baseline.
    pub fn spans(
        &self,
        kind: Kind,
        entity: &str,
        now: DateTime<Utc>,
    ) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let key = (kind, entity.to_owned());
        let mut out: Vec<_> = self
            .closed
            .get(&key)
            .map(|v| v.iter().map(|c| (c.fired_at, c.resolved_at)).collect())
            .unwrap_or_default();
        if let Some(o) = self.open.get(&key) {
            out.push((o.fired_at, now));
        }
        out
    }

    /// Applies the readings taken at `now`. Open incidents a detector did not look at
    /// are left alone.
    pub fn step(&mut self, now: DateTime<Utc>, readings: Vec<Reading>) -> Vec<Transition> {
        let mut out = Vec::new();
        for r in readings {
            let key = (r.kind, r.entity.clone());
            if r.kind.is_once() {
                if r.firing && self.once.insert(r.entity.clone()) {
                    out.push(Transition {
                        alert_id: alert_id(&r, now),
                        resolved: false,
                        reopened: false,
                        at: now,
                        reading: r,
                    });
                }
                continue;
            }
            match (self.open.get_mut(&key), r.firing) {
                (None, true) => {
                    let last = self.closed.get(&key).and_then(|v| v.last());
                    if r.kind.is_spike()
                        && last.is_some_and(|c| now - c.resolved_at < self.renotify)
                    {
                        // The same episode: reopen it.
                        let c = self
                            .closed
                            .get_mut(&key)
                            .and_then(Vec::pop)
                            .expect("present");
                        self.open.insert(
                            key,
                            Open {
                                alert_id: c.alert_id.clone(),
                                fired_at: c.fired_at,
                                reading: r.clone(),
                                recovering_since: None,
                            },
                        );
                        out.push(Transition {
                            alert_id: c.alert_id,
                            resolved: false,
                            reopened: true,
                            at: now,
                            reading: r,
                        });
                        continue;
                    }
                    if last.is_some_and(|c| now - c.resolved_at < self.cooldown) {
                        continue;
                    }
                    let id = alert_id(&r, now);
                    self.open.insert(
                        key,
                        Open {
                            alert_id: id.clone(),
                            fired_at: now,
                            reading: r.clone(),
                            recovering_since: None,
                        },
                    );
                    out.push(Transition {
                        alert_id: id,
                        resolved: false,
                        reopened: false,
                        at: now,
                        reading: r,
                    });
                }
                (Some(open), true) => open.recovering_since = None,
                (Some(open), false) => {
                    // Spikes wait out a dip; pipeline alerts resolve when the reading does.
                    let since = *open.recovering_since.get_or_insert(now);
                    if r.kind.is_spike() && now - since < self.recover {
                        continue;
                    }
                    let open = self.open.remove(&key).expect("present");
                    // Routed like the message that opened it.
                    let mut r = r;
                    r.severity = open.reading.severity;
                    self.closed.entry(key).or_default().push(Closed {
                        alert_id: open.alert_id.clone(),
                        fired_at: open.fired_at,
                        resolved_at: now,
                    });
                    out.push(Transition {
                        alert_id: open.alert_id,
                        resolved: true,
                        reopened: false,
                        at: now,
                        reading: r,
                    });
                }
                (None, false) => {}
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

/// Readings for spike detectors over a set of series: each entity against its own
/// baseline in its institution's time zone (`tz`), leaving its earlier incidents out;
/// an entity on its first day against the usual level of its institution's other
/// entities of the same kind (for keys: the busiest established key).
pub fn spike_readings(
    kind: Kind,
    series: &BTreeMap<(String, String), Series>,
    end: DateTime<Utc>,
    cfg: &SpikeConfig,
    tz: impl Fn(&str) -> Option<chrono_tz::Tz>,
    tracker: &Tracker,
) -> Vec<Reading> {
    let check = |inst: &str, entity: &str, s: &Series, peers: Option<Decimal>| {
        let spans = tracker.spans(kind, entity, end);
        spike(
            s,
            end,
            cfg,
            &SpikeContext {
                tz: tz(inst),
                excluded: &spans,
                peers,
            },
        )
    };
    let mut checks: Vec<(&String, &String, SpikeCheck)> = series
        .iter()
        .map(|((inst, entity), s)| (inst, entity, check(inst, entity, s, None)))
        .collect();
    let mut peers: HashMap<&str, Decimal> = HashMap::new();
    for (inst, _, c) in &checks {
        if c.basis != Basis::New {
            let p = peers.entry(inst.as_str()).or_default();
            *p = (*p).max(c.baseline);
        }
    }
    for (inst, entity, c) in &mut checks {
        if c.basis == Basis::New {
            if let Some(p) = peers.get(inst.as_str()) {
                *c = check(
                    inst,
                    entity,
                    &series[&((*inst).clone(), (*entity).clone())],
                    Some(*p),
                );
            }
        }
    }
    checks
        .into_iter()
        .map(|(inst, entity, c)| {
            let open = tracker.open.contains_key(&(kind, entity.clone()));
            let firing = if open {
                c.observed > c.resolve_at_or_below
            } else {
                c.observed > c.fire_above
            };
            let what = match kind {
                Kind::KeySpike => format!("API key {entity}"),
                _ => format!("institution {entity}"),
            };
            let usual = match c.basis {
                Basis::Weekly => "usual for this hour of the week",
                Basis::Daily => "usual for this hour on its first days",
                Basis::New => "new, compared with its peers",
            };
            Reading {
                kind,
                entity: entity.clone(),
                institution: inst.clone(),
                firing,
                severity: severity(&c),
                observed: c.observed.round_dp(2),
                baseline: c.baseline.round_dp(2),
                threshold: c.fire_above.round_dp(2),
                message: format!(
                    "{what} spent ${} in the last {} h; {usual}: ${}",
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
    use chrono::{TimeZone, Timelike};
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
        let c = spike(
            &s,
            monday_10 + Duration::hours(1),
            &cfg(),
            &SpikeContext::default(),
        );
        assert_eq!(c.baseline, dec!(10));
        assert!(c.observed <= c.fire_above, "{c:?}");
        // A runaway script at Monday 03:00: $40 against a usual $1.
        s.insert(next_monday + Duration::hours(3), dec!(40));
        let c = spike(
            &s,
            next_monday + Duration::hours(4),
            &cfg(),
            &SpikeContext::default(),
        );
        assert!(c.observed > c.fire_above, "{c:?}");
    }

    #[test]
    fn tiny_entities_never_page() {
        let (mut s, next) = weekly(4);
        for v in s.values_mut() {
            *v /= dec!(100);
        }
        s.insert(next, dec!(1)); // 10x-100x the usual, but only $1
        let c = spike(
            &s,
            next + Duration::hours(1),
            &cfg(),
            &SpikeContext::default(),
        );
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
    fn one_incident_does_not_hide_the_next_at_the_same_hour() {
        // $0.6/h everywhere; last week's abuse at one hour: $15.9.
        let start = Utc.with_ymd_and_hms(2026, 9, 7, 0, 0, 0).unwrap();
        let mut s = Series::new();
        for h in 0..5 * 168 {
            s.insert(start + Duration::hours(h), dec!(0.6));
        }
        let abuse = start + Duration::weeks(3) + Duration::hours(30);
        s.insert(abuse, dec!(15.9));
        // The repeat a week later: the median of the four weeks is $0.6, so $15.9 fires
        // (the mean + 4σ of the old detector was $30.9).
        let again = abuse + Duration::weeks(1);
        s.insert(again, dec!(15.9));
        let c = spike(
            &s,
            again + Duration::hours(1),
            &cfg(),
            &SpikeContext::default(),
        );
        assert_eq!(c.baseline, dec!(0.6));
        assert!(c.observed > c.fire_above, "{c:?}");
        // Even two incidents in four weeks: the weeks inside an earlier incident are out.
        let two_before = abuse - Duration::weeks(2);
        s.insert(two_before, dec!(15.9));
        let spans = [
            (two_before, two_before + Duration::hours(1)),
            (abuse, abuse + Duration::hours(1)),
        ];
        let ctx = SpikeContext {
            excluded: &spans,
            ..Default::default()
        };
        let c = spike(&s, again + Duration::hours(1), &cfg(), &ctx);
        assert_eq!(c.baseline, dec!(0.6));
        assert!(c.observed > c.fire_above, "{c:?}");
    }

    #[test]
    fn a_new_series_is_quiet_with_ordinary_use_and_loud_when_leaked() {
        let start = Utc.with_ymd_and_hms(2026, 9, 7, 9, 0, 0).unwrap();
        // First day of a new key: $7/h is ordinary (peers spend $8/h), $60/h is not.
        let mut s = Series::new();
        s.insert(start, dec!(7));
        let peers = SpikeContext {
            peers: Some(dec!(8)),
            ..Default::default()
        };
        let c = spike(&s, start + Duration::hours(1), &cfg(), &peers);
        assert_eq!(c.basis, Basis::New);
        assert!(c.observed <= c.fire_above, "{c:?}");
        s.insert(start, dec!(60));
        assert!(spike(&s, start + Duration::hours(1), &cfg(), &peers).observed > dec!(24));
        // Its second morning compares with its first: $7 again is no spike (the old
        // detector counted the weeks before it existed as $0 and paged every morning).
        s.insert(start, dec!(7));
        let next = start + Duration::days(1);
        s.insert(next, dec!(7.5));
        let c = spike(
            &s,
            next + Duration::hours(1),
            &cfg(),
            &SpikeContext::default(),
        );
        assert_eq!((c.basis, c.baseline), (Basis::Daily, dec!(7)));
        assert!(c.observed <= c.fire_above, "{c:?}");
    }

    #[test]
    fn a_local_time_job_stays_at_its_hour_across_dst() {
        // Mondays 06:00 in Berlin: 04:00 UTC in summer, 05:00 UTC after 2026-10-25.
        let berlin = chrono_tz::Europe::Berlin;
        let mut s = Series::new();
        let first = Utc.with_ymd_and_hms(2026, 9, 28, 0, 0, 0).unwrap();
        for h in 0..6 * 168 {
            s.insert(first + Duration::hours(h), dec!(1));
        }
        let mut monday = chrono::NaiveDate::from_ymd_opt(2026, 9, 28).unwrap();
        for _ in 0..6 {
            let t = local_shift(
                berlin
                    .from_local_datetime(&monday.and_hms_opt(6, 0, 0).unwrap())
                    .unwrap()
                    .with_timezone(&Utc),
                0,
                berlin,
            );
            s.insert(t, dec!(25));
            monday += Duration::days(7);
        }
        let after_dst = berlin
            .from_local_datetime(
                &chrono::NaiveDate::from_ymd_opt(2026, 11, 2)
                    .unwrap()
                    .and_hms_opt(6, 0, 0)
                    .unwrap(),
            )
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(after_dst.hour(), 5);
        let ctx = SpikeContext {
            tz: Some(berlin),
            ..Default::default()
        };
        let c = spike(&s, after_dst + Duration::hours(1), &cfg(), &ctx);
        assert_eq!(c.baseline, dec!(25));
        assert!(c.observed <= c.fire_above, "{c:?}");
        // In UTC, the week before had the job an hour earlier: a false spike.
        let c = spike(
            &s,
            after_dst + Duration::hours(1),
            &cfg(),
            &SpikeContext::default(),
        );
        assert!(c.observed > c.fire_above, "{c:?}");
    }

    #[test]
    fn an_incident_survives_a_short_dip_and_reopens_within_the_renotify_time() {
        let mut t = Tracker {
            recover: Duration::hours(2),
            renotify: Duration::hours(18),
            cooldown: Duration::hours(1),
            ..Default::default()
        };
        let t0 = Utc.with_ymd_and_hms(2026, 10, 1, 9, 0, 0).unwrap();
        let k = Kind::KeySpike;
        let h = |n| t0 + Duration::hours(n);
        let fired = t.step(h(0), vec![reading(true, k, "a")]);
        assert_eq!(fired.len(), 1);
        // One recovered hour, then firing again: still the same open incident, no news.
        assert!(t.step(h(1), vec![reading(false, k, "a")]).is_empty());
        assert!(t.step(h(2), vec![reading(true, k, "a")]).is_empty());
        // Recovered for two hours: resolved.
        assert!(t.step(h(3), vec![reading(false, k, "a")]).is_empty());
        let resolved = t.step(h(5), vec![reading(false, k, "a")]);
        assert!(resolved[0].resolved);
        // The next morning, the same level again: the same incident, reopened.
        let again = t.step(h(22), vec![reading(true, k, "a")]);
        assert_eq!(again.len(), 1);
        assert!(again[0].reopened && !again[0].resolved);
        assert_eq!(again[0].alert_id, fired[0].alert_id);
        // Its span (and the first one's) are what baselines leave out.
        assert_eq!(t.spans(k, "a", h(23)).len(), 1);
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
}
