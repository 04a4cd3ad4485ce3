//! The live evaluator: every `alerts.interval_secs` it reads the rollups and the
//! pipeline, runs the detectors, records state changes in ClickHouse and hands them to
//! delivery. Its memory (open incidents, cooldowns, budget thresholds already announced)
//! is rebuilt from the `alerts` table at start, so a restart announces nothing twice.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, DurationRound, TimeZone, Utc};
use rust_decimal::Decimal;

use super::deliver::Notifier;
use super::rate::{self, RateWindow};
use super::{
    budget_crossed, spike_readings, Kind, Open, Reading, Series, Severity, SpikeCheck, Tracker,
    Transition,
};
use crate::config::{Config, OnSpike};
use crate::domain::Period;
use crate::shutdown::Shutdown;
use crate::store::alerts::{micros, AlertRow, HourSpend, Incident, SpendBy};
use crate::store::{Store, StoreError};

/// Hourly spend per institution and per (institution, key) in `[from, to)`.
pub struct SpendSeries {
    pub institutions: BTreeMap<(String, String), Series>,
    pub keys: BTreeMap<(String, String), Series>,
}

pub async fn load_series(
    store: &Store,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<SpendSeries, StoreError> {
    let rows = store.hourly_spend(from.timestamp(), to.timestamp()).await?;
    let mut out = SpendSeries {
        institutions: BTreeMap::new(),
        keys: BTreeMap::new(),
    };
    for r in rows {
        out.add_institution(&r);
        if !r.api_key_id.is_empty() {
            *out.keys
                .entry(key_entity(&r))
                .or_default()
                .entry(hour_at(r.hour))
                .or_default() += r.cost;
        }
    }
    Ok(out)
}

impl SpendSeries {
    /// Adds a row's spend to its institution's hour.
    fn add_institution(&mut self, r: &HourSpend) {
        *self
            .institutions
            .entry((r.institution_id.clone(), r.institution_id.clone()))
            .or_default()
            .entry(hour_at(r.hour))
            .or_default() += r.cost;
    }
}

/// (institution, `institution/key`): how key series are named.
fn key_entity(r: &HourSpend) -> (String, String) {
    (
        r.institution_id.clone(),
        format!("{}/{}", r.institution_id, r.api_key_id),
    )
}

fn hour_at(hour: u32) -> DateTime<Utc> {
    Utc.timestamp_opt(i64::from(hour), 0)
        .single()
        .unwrap_or_default()
}

/// What the live evaluator reads at `end`: every hour of every institution since `from`
/// (budgets sum the month), but for keys only the hours the spike windows look at (the
/// window before `end` and the same window 1–6 days and 1–`baseline_weeks` weeks
/// earlier, in every configured zone) plus each key's first hour with spend (a key's
/// weeks before it do not count). At 100M events the whole month of every key was
/// 5M rows and held serve at 600 MiB–1 GiB; these are a few thousand per window.
pub async fn load_live_series(
    cfg: &Config,
    store: &Store,
    from: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<SpendSeries, StoreError> {
    let window = Duration::hours(i64::from(cfg.alerts.spike.window_hours.max(1)));
    let mut zones: Vec<chrono_tz::Tz> = cfg
        .institutions
        .iter()
        .filter_map(|i| i.time_zone.parse().ok())
        .collect();
    zones.push(chrono_tz::UTC);
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    let weeks = i64::from(cfg.alerts.spike.baseline_weeks.max(1));
    for tz in zones {
        for days in (0..=6).chain((1..=weeks).map(|w| 7 * w)) {
            let e = super::local_shift(end, -days, tz);
            ranges.push(((e - window).timestamp(), e.timestamp()));
        }
    }
    ranges.sort_unstable();
    ranges.dedup();
    let (institutions, keys, firsts) = tokio::try_join!(
        store.hourly_spend_by_institution(from.timestamp(), end.timestamp()),
        store.key_spend_in(&ranges),
        store.key_first_spend(from.timestamp(), end.timestamp()),
    )?;
    let mut out = SpendSeries {
        institutions: BTreeMap::new(),
        keys: BTreeMap::new(),
    };
    for r in &institutions {
        out.add_institution(r);
    }
    // Each row is the whole spend of its (key, hour): an hour in both lists is one hour.
    for r in firsts.into_iter().chain(keys) {
        out.keys
            .entry(key_entity(&r))
            .or_default()
            .insert(hour_at(r.hour), r.cost);
    }
    Ok(out)
}

/// Budget readings at `now`: month-to-date spend (in the institution's time zone) against
/// each configured threshold. The entity names the month and the threshold, so each
/// fires once per period.
pub fn budget_readings(cfg: &Config, series: &SpendSeries, now: DateTime<Utc>) -> Vec<Reading> {
    let mut out = Vec::new();
    for inst in &cfg.institutions {
        let Some(budget) = inst.monthly_budget_usd else {
            continue;
        };
        let tz = cfg.institution_tz(&inst.id);
        let period = Period::of(now.with_timezone(&tz).date_naive());
        let (start, _) = period.bounds(tz);
        let spent: Decimal = series
            .institutions
            .get(&(inst.id.clone(), inst.id.clone()))
            .map(|s| s.range(start..=now).map(|(_, v)| *v).sum())
            .unwrap_or_default();
        for t in budget_crossed(spent, budget, &cfg.alerts.budget_thresholds) {
            out.push(Reading {
                kind: Kind::Budget,
                entity: format!("{}/{period}/{t}", inst.id),
                institution: inst.id.clone(),
                firing: true,
                severity: if t >= 100 {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                observed: spent.round_dp(2),
                baseline: budget,
                threshold: (budget * Decimal::from(t) / Decimal::ONE_HUNDRED).round_dp(2),
                message: format!(
                    "{} has spent ${} of its ${budget} budget for {period} ({t}% threshold)",
                    inst.id,
                    spent.round_dp(2)
                ),
            });
        }
    }
    out
}

/// Limit readings: a limit in mode `alert` that is reached, a limit in mode `block` that
/// refused requests. The entity names the limit and its period (the day it starts, in
/// the institution's zone `zone`), so each fires once.
pub fn limit_readings(
    standings: &[crate::limits::Standing],
    zone: &dyn Fn(&str) -> chrono_tz::Tz,
) -> Vec<Reading> {
    let mut out = Vec::new();
    for s in standings {
        let label = match s.scope {
            crate::limits::LimitScope::Institution => s.institution_id.clone(),
            sc => format!("{sc} {} of {}", s.subject, s.institution_id),
        };
        let amount = |d: Decimal| match s.metric {
            crate::limits::Metric::Usd => crate::format::money(d),
            m => format!("{} {m}", d.normalize()),
        };
        // Oslo's day starts at 23:00 UTC the day before: the date is Oslo's.
        let period = s
            .period_start
            .with_timezone(&zone(&s.institution_id))
            .format("%Y-%m-%d")
            .to_string();
        let (firing, what, message) = if s.mode == "alert" {
            (
                s.used >= s.limit,
                "reached",
                format!(
                    "{label} has used {} of its {} limit (alert only; nothing was refused)",
                    amount(s.used),
                    s.label
                ),
            )
        } else {
            (
                s.blocked > 0,
                "blocked",
                format!(
                    "{label} reached its {} limit: {} request(s) refused so far this period",
                    s.label, s.blocked
                ),
            )
        };
        if firing {
            out.push(Reading {
                kind: Kind::Limit,
                entity: format!("{}/{period}/{what}", s.limit_id),
                institution: s.institution_id.clone(),
                firing: true,
                severity: Severity::Warning,
                observed: s.used,
                baseline: s.limit,
                threshold: s.limit,
                message,
            });
        }
    }
    out
}

/// The spike and budget readings at `end` (an hour boundary).
pub fn spend_readings(
    cfg: &Config,
    series: &SpendSeries,
    end: DateTime<Utc>,
    tracker: &Tracker,
) -> Vec<Reading> {
    let tz = |inst: &str| {
        cfg.institution(inst)
            .and_then(|i| i.time_zone.parse::<chrono_tz::Tz>().ok())
    };
    let mut r = spike_readings(
        Kind::InstitutionSpike,
        &series.institutions,
        end,
        &cfg.alerts.spike,
        tz,
        tracker,
    );
    r.extend(spike_readings(
        Kind::KeySpike,
        &series.keys,
        end,
        &cfg.alerts.spike,
        tz,
        tracker,
    ));
    r.extend(budget_readings(cfg, series, end - Duration::seconds(1)));
    r
}

/// Spend-rate verdicts, and whose keys are whose.
#[derive(Debug, Clone, Default)]
pub struct RateChecks {
    /// Keyed by (kind, institution, entity).
    pub checks: BTreeMap<(Kind, String, String), Vec<(RateWindow, SpikeCheck)>>,
    /// `institution/key` → `institution/user:id`, for the keys that spent in the
    /// longest window.
    pub owners: BTreeMap<String, String>,
}

/// Whose spend rate is watched, and the kind of its page.
const RATE_SUBJECTS: [(SpendBy, Kind); 3] = [
    (SpendBy::Key, Kind::KeySpike),
    (SpendBy::User, Kind::UserSpike),
    (SpendBy::Institution, Kind::InstitutionSpike),
];

/// How a rate subject's incidents are named: `institution/key` (as key spikes are),
/// `institution/user:id`, or the institution's id (as institution spikes are).
pub fn rate_entity(by: SpendBy, institution: &str, subject: &str) -> String {
    match by {
        SpendBy::Key => format!("{institution}/{subject}"),
        SpendBy::User => format!("{institution}/user:{subject}"),
        SpendBy::Institution => institution.to_owned(),
    }
}

/// Issue 36: the spend rate of each key, user and institution over the last minutes
/// (`rate::default_windows`) against its seasonal baseline, for those that spent more
/// than a window's floor in it (nothing else can page, so nothing else's history is
/// read).
pub async fn rate_checks(
    cfg: &Config,
    store: &Store,
    series: &SpendSeries,
    now: DateTime<Utc>,
    tracker: &Tracker,
) -> Result<RateChecks, StoreError> {
    let windows = rate::default_windows();
    let spike = &cfg.alerts.spike;
    let longest = windows.iter().map(|w| w.minutes).max().unwrap_or(15);
    let recent_range = [(
        (now - Duration::minutes(longest)).timestamp(),
        now.timestamp(),
    )];
    let weeks = i64::from(spike.baseline_weeks.max(1));
    let mut out = RateChecks::default();
    for (by, kind) in RATE_SUBJECTS {
        let recent = store.minute_spend(by, &recent_range, None).await?;
        let mut spent: BTreeMap<(&str, &str), Vec<(i64, Decimal)>> = BTreeMap::new();
        for r in &recent {
            spent
                .entry((r.institution_id.as_str(), r.subject.as_str()))
                .or_default()
                .push((i64::from(r.minute), r.cost));
        }
        let candidates: Vec<(String, String)> = spent
            .iter()
            .filter(|(_, minutes)| {
                windows.iter().any(|w| {
                    let since = (now - Duration::minutes(w.minutes)).timestamp();
                    let sum: Decimal = minutes
                        .iter()
                        .filter(|(m, _)| *m >= since)
                        .map(|(_, c)| *c)
                        .sum();
                    sum > spike.min_spend_usd * Decimal::from(w.minutes) / Decimal::from(60)
                })
            })
            .map(|((inst, subject), _)| ((*inst).to_owned(), (*subject).to_owned()))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        // When each began to spend: keys and institutions from the hourly series, users
        // from the hourly rollup.
        let users: BTreeMap<String, DateTime<Utc>> = if by == SpendBy::User {
            let from = now - Duration::weeks(weeks) - Duration::days(1);
            store
                .first_spend(by, from.timestamp(), now.timestamp(), &candidates)
                .await?
                .into_iter()
                .map(|f| {
                    (
                        rate_entity(by, &f.institution_id, &f.subject),
                        hour_at(f.hour),
                    )
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        let first = |inst: &str, entity: &str| {
            let key = (inst.to_owned(), entity.to_owned());
            let s = match by {
                SpendBy::Key => series.keys.get(&key),
                SpendBy::Institution => series.institutions.get(&key),
                SpendBy::User => return users.get(entity).copied(),
            };
            s.and_then(|s| s.iter().find(|(_, v)| !v.is_zero()).map(|(t, _)| *t))
        };
        let verdicts = rate_verdicts(cfg, store, by, &candidates, now, first, |entity| {
            tracker.spans(kind, entity, now)
        })
        .await?;
        for ((inst, entity), checks) in verdicts {
            out.checks.insert((kind, inst, entity), checks);
        }
    }
    if out
        .checks
        .keys()
        .any(|(kind, _, _)| *kind != Kind::KeySpike)
    {
        let (from, to) = recent_range[0];
        for (inst, key, user) in store.key_users(from, to).await? {
            out.owners.insert(
                rate_entity(SpendBy::Key, &inst, &key),
                rate_entity(SpendBy::User, &inst, &user),
            );
        }
    }
    Ok(out)
}

/// Spend at the minutes it happened.
type Minutes = Vec<(DateTime<Utc>, Decimal)>;

/// The spend-rate verdicts at `now` of `subjects` ((institution, subject) as `by`
/// names them), each window (`rate::default_windows`) against the subject's seasonal
/// baseline from its stored minutes; keyed by (institution, `rate_entity`), one entry
/// per subject (one with no stored history is new). `first`: when the entity first
/// spent; `spans`: its earlier incidents (kept out of the baseline). Shared by the
/// evaluator and the gateway's spend watch (`gateway::spend_watch`), which compares the
/// thresholds with the spend it settled itself.
pub async fn rate_verdicts(
    cfg: &Config,
    store: &Store,
    by: SpendBy,
    subjects: &[(String, String)],
    now: DateTime<Utc>,
    first: impl Fn(&str, &str) -> Option<DateTime<Utc>>,
    spans: impl Fn(&str) -> Vec<(DateTime<Utc>, DateTime<Utc>)>,
) -> Result<BTreeMap<(String, String), Vec<(RateWindow, SpikeCheck)>>, StoreError> {
    let mut out = BTreeMap::new();
    if subjects.is_empty() {
        return Ok(out);
    }
    let windows = rate::default_windows();
    let spike = &cfg.alerts.spike;
    let tz = |inst: &str| cfg.institution_tz(inst);
    let weeks = i64::from(spike.baseline_weeks.max(1));
    let mut ranges: Vec<(i64, i64)> = subjects
        .iter()
        .flat_map(|(inst, _)| rate::ranges(now, &windows, weeks, tz(inst)))
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    let rows = store.minute_spend(by, &ranges, Some(subjects)).await?;
    let mut history: BTreeMap<(String, String), Minutes> = subjects
        .iter()
        .map(|(inst, s)| ((inst.clone(), rate_entity(by, inst, s)), Vec::new()))
        .collect();
    for r in rows {
        history
            .entry((
                r.institution_id.clone(),
                rate_entity(by, &r.institution_id, &r.subject),
            ))
            .or_default()
            .push((hour_at(r.minute), r.cost));
    }
    for ((inst, entity), spend) in history {
        let s = rate::Sparse::new(spend, first(&inst, &entity));
        let excluded = spans(&entity);
        let checks = windows
            .iter()
            .map(|w| (*w, rate::check(&s, now, *w, spike, tz(&inst), &excluded)))
            .collect();
        out.insert((inst, entity), checks);
    }
    Ok(out)
}

/// Whether a narrower page explains a user's or an institution's jump: a key of the
/// user's (or a key or user of the institution's) firing in `readings` or open.
fn explained(
    kind: Kind,
    institution: &str,
    entity: &str,
    readings: &[Reading],
    rates: &RateChecks,
    tracker: &Tracker,
) -> bool {
    let narrower = |k: Kind, e: &str, inst: &str| match kind {
        Kind::UserSpike => {
            k == Kind::KeySpike && rates.owners.get(e).is_some_and(|owner| owner == entity)
        }
        Kind::InstitutionSpike => {
            matches!(k, Kind::KeySpike | Kind::UserSpike) && inst == institution
        }
        _ => false,
    };
    readings
        .iter()
        .any(|r| r.firing && narrower(r.kind, &r.entity, &r.institution))
        || tracker
            .open
            .iter()
            .any(|((k, e), o)| narrower(*k, e, &o.reading.institution))
}

/// The page of a subject whose spend rate fired in window `w` (`how` says by whom).
pub fn rate_reading(
    kind: Kind,
    institution: &str,
    entity: &str,
    w: RateWindow,
    c: &SpikeCheck,
    how: &str,
) -> Reading {
    Reading {
        kind,
        entity: entity.to_owned(),
        institution: institution.to_owned(),
        firing: true,
        severity: super::severity(c),
        observed: c.observed.round_dp(2),
        baseline: c.baseline.round_dp(2),
        threshold: c.fire_above.round_dp(2),
        message: rate::message(&rate_subject(kind, entity), w, c, how),
    }
}

/// Who a spend-rate page is about, in its message.
fn rate_subject(kind: Kind, entity: &str) -> String {
    match kind {
        Kind::KeySpike => format!("API key {entity}"),
        Kind::UserSpike => match entity.split_once("/user:") {
            Some((inst, user)) => format!("user {user} of {inst}"),
            None => format!("user {entity}"),
        },
        _ => format!("institution {entity}"),
    }
}

/// A subject whose spend rate fires (or, while its incident is open, is still above its
/// recovery level) pages as a spike of its kind even where the hourly window does not
/// yet: the message names the window. Subjects the hourly detector already pages keep
/// its reading.
///
/// One leak, one page: a user's spend-rate page is left out while a key of theirs pages
/// (or its incident is open), an institution's while a key or user of it does — the
/// narrower page already explains the jump. The hourly detector's pages are unchanged.
pub fn merge_rate_readings(readings: &mut Vec<Reading>, rates: &RateChecks, tracker: &Tracker) {
    let ordered = [Kind::KeySpike, Kind::UserSpike, Kind::InstitutionSpike]
        .into_iter()
        .flat_map(|k| {
            rates
                .checks
                .iter()
                .filter(move |((kind, _, _), _)| *kind == k)
        });
    for ((kind, inst, entity), checks) in ordered {
        if explained(*kind, inst, entity, readings, rates, tracker) {
            continue;
        }
        let open = tracker.open.contains_key(&(*kind, entity.clone()));
        let hit = checks.iter().find(|(_, c)| {
            if open {
                c.observed > c.resolve_at_or_below
            } else {
                c.observed > c.fire_above
            }
        });
        let Some((w, c)) = hit else { continue };
        let existing = readings
            .iter()
            .position(|r| r.kind == *kind && r.entity == *entity);
        if existing.is_some_and(|i| readings[i].firing) {
            continue;
        }
        let reading = rate_reading(*kind, inst, entity, *w, c, "spend rate");
        match existing {
            Some(i) => readings[i] = reading,
            None => readings.push(reading),
        }
    }
    // User spikes have no hourly reading: an open one whose rate no longer holds it
    // open is read as recovered (it resolves after `recover_hours`, as spikes do).
    let open_users: Vec<(String, Reading)> = tracker
        .open
        .iter()
        .filter(|((kind, _), _)| *kind == Kind::UserSpike)
        .map(|((_, entity), o)| (entity.clone(), o.reading.clone()))
        .collect();
    for (entity, opened) in open_users {
        if readings
            .iter()
            .any(|r| r.kind == Kind::UserSpike && r.entity == entity)
        {
            continue;
        }
        let observed = rates
            .checks
            .get(&(Kind::UserSpike, opened.institution.clone(), entity.clone()))
            .and_then(|c| c.first())
            .map(|(_, c)| c.observed.round_dp(2))
            .unwrap_or_default();
        readings.push(Reading {
            firing: false,
            observed,
            message: format!(
                "{} spends at its usual rate again",
                rate_subject(Kind::UserSpike, &entity)
            ),
            entity,
            ..opened
        });
    }
}

/// Pipeline readings: unpriced models in the last hour, rejections per hour, lag.
async fn pipeline_readings(
    cfg: &Config,
    store: &Store,
    now: DateTime<Utc>,
    tracker: &Tracker,
) -> Result<Vec<Reading>, StoreError> {
    let hour_ago = (now - Duration::hours(1)).timestamp();
    let unpriced = store.unpriced_since(hour_ago).await?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for u in unpriced {
        seen.insert(u.name.clone());
        out.push(Reading {
            kind: Kind::UnpricedModel,
            entity: u.name.clone(),
            institution: String::new(),
            firing: true,
            severity: Severity::Warning,
            observed: Decimal::from(u.n),
            baseline: Decimal::ZERO,
            threshold: Decimal::ZERO,
            message: format!(
                "{} events of model `{}` have no price: add it to the price book and run `tokentally reprice`",
                u.n, u.name
            ),
        });
    }
    for (kind, entity) in tracker.open.keys() {
        if *kind == Kind::UnpricedModel && !seen.contains(entity) {
            out.push(Reading {
                kind: Kind::UnpricedModel,
                entity: entity.clone(),
                institution: String::new(),
                firing: false,
                severity: Severity::Warning,
                observed: Decimal::ZERO,
                baseline: Decimal::ZERO,
                threshold: Decimal::ZERO,
                message: format!("no unpriced events of `{entity}` in the last hour"),
            });
        }
    }
    let rejected = store.rejected_since(hour_ago).await?;
    let limit = cfg.alerts.rejected_per_hour;
    out.push(Reading {
        kind: Kind::Rejections,
        entity: "rejected_events".into(),
        institution: String::new(),
        firing: rejected > limit,
        severity: Severity::Warning,
        observed: Decimal::from(rejected),
        baseline: Decimal::ZERO,
        threshold: Decimal::from(limit),
        message: format!("{rejected} messages rejected in the last hour (alert above {limit})"),
    });
    // Gateways report how they decide limits every second (`limit_holds`).
    let fallback: Vec<String> = store
        .live_holds((now - Duration::seconds(30)).timestamp())
        .await?
        .into_iter()
        .filter(|h| h.limit_id.is_empty() && h.mode == "fallback")
        .map(|h| h.instance)
        .collect();
    out.push(Reading {
        kind: Kind::LimitsFallback,
        entity: "gateway.shared_limits".into(),
        institution: String::new(),
        firing: !fallback.is_empty(),
        severity: Severity::Warning,
        observed: Decimal::from(fallback.len()),
        baseline: Decimal::ZERO,
        threshold: Decimal::ZERO,
        message: if fallback.is_empty() {
            "every gateway decides limits through the shared store again".into()
        } else {
            format!(
                "{} gateway instance(s) cannot reach the shared limit store ({}): they decide by shares of each limit's headroom, which can leave up to one share unused and, while an instance starts serving a subject, pass a limit by up to one share",
                fallback.len(),
                fallback.join(", ")
            )
        },
    });
    // Instances report themselves stalled (see ingest::watch); heard from in 2 minutes.
    let instances = store
        .ingest_instances(
            &cfg.kafka.topic,
            &cfg.kafka.group,
            (now - Duration::minutes(2)).timestamp(),
        )
        .await?;
    let stalled: Vec<String> = instances
        .iter()
        .filter(|i| i.state == "stalled")
        .map(|i| format!("{}@{} ({})", i.instance_id, i.host, i.detail))
        .collect();
    out.push(Reading {
        kind: Kind::IngestStalled,
        entity: cfg.kafka.group.clone(),
        institution: String::new(),
        firing: !stalled.is_empty(),
        severity: Severity::Critical,
        observed: Decimal::from(stalled.len()),
        baseline: Decimal::ZERO,
        threshold: Decimal::ZERO,
        message: if stalled.is_empty() {
            format!(
                "ingest group `{}` is making progress again",
                cfg.kafka.group
            )
        } else {
            format!(
                "ingest stalled: messages wait and group `{}` commits nothing; {}",
                cfg.kafka.group,
                stalled.join("; ")
            )
        },
    });
    match crate::kafka::consumer_lag(&cfg.kafka, &cfg.kafka.topic, &cfg.kafka.group).await {
        Ok(parts) => {
            let lag: i64 = parts.iter().map(|p| p.lag).sum();
            let limit = cfg.alerts.max_consumer_lag;
            out.push(Reading {
                kind: Kind::ConsumerLag,
                entity: cfg.kafka.group.clone(),
                institution: String::new(),
                firing: lag > limit,
                severity: Severity::Critical,
                observed: Decimal::from(lag),
                baseline: Decimal::ZERO,
                threshold: Decimal::from(limit),
                message: format!(
                    "consumer group `{}` is {lag} messages behind (alert above {limit})",
                    cfg.kafka.group
                ),
            });
        }
        Err(e) => tracing::warn!("alerts: cannot read consumer lag: {e}"),
    }
    Ok(out)
}

/// Records state changes (one insert).
pub async fn record(store: &Store, changes: &[Transition]) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let rows: Vec<AlertRow> = changes
        .iter()
        .enumerate()
        .map(|(i, t)| AlertRow {
            alert_id: t.alert_id.clone(),
            at: t.at.timestamp() as u32,
            seq: t.at.timestamp_millis() as u64 * 1000 + i as u64,
            state: if t.resolved { "resolved" } else { "firing" }.into(),
            kind: t.reading.kind.as_str().into(),
            entity: t.reading.entity.clone(),
            institution_id: t.reading.institution.clone(),
            severity: t.reading.severity.as_str().into(),
            observed: micros(t.reading.observed),
            baseline: micros(t.reading.baseline),
            threshold: micros(t.reading.threshold),
            message: t.reading.message.clone(),
            actor: String::new(),
        })
        .collect();
    store.record_alerts(&rows).await
}

/// Marks an incident acknowledged.
/// Acknowledges an alert; keys its spend-spike brake paused work again (within a key
/// refresh on every gateway), each restoration in the key log.
pub async fn acknowledge(store: &Store, alert_id: &str, actor: &str) -> Result<(), StoreError> {
    acknowledged(store, alert_id, actor).await?;
    match crate::keys::release(store, alert_id, actor).await {
        Ok(keys) => {
            for k in keys {
                tracing::info!(key_id = %k.key_id, alert = alert_id, "key restored: its spend alert was acknowledged");
            }
            Ok(())
        }
        Err(crate::keys::KeyError::Store(e)) => Err(e),
        Err(e) => {
            tracing::error!(alert = alert_id, error = %e, "cannot restore the keys the alert paused");
            Ok(())
        }
    }
}

async fn acknowledged(store: &Store, alert_id: &str, actor: &str) -> Result<(), StoreError> {
    let now = Utc::now();
    store
        .record_alerts(&[AlertRow {
            alert_id: alert_id.into(),
            at: now.timestamp() as u32,
            seq: now.timestamp_millis() as u64 * 1000,
            state: "acknowledged".into(),
            kind: String::new(),
            entity: String::new(),
            institution_id: String::new(),
            severity: String::new(),
            observed: 0,
            baseline: 0,
            threshold: 0,
            message: String::new(),
            actor: actor.into(),
        }])
        .await
}

/// Incidents, open ones first, then by latest change; resolved ones only if they changed
/// since `since`. Optionally of one institution.
pub async fn incidents(
    store: &Store,
    institution: Option<&str>,
    since: DateTime<Utc>,
) -> Result<Vec<Incident>, StoreError> {
    let since = since.timestamp() as u32;
    Ok(store
        .incidents(institution)
        .await?
        .into_iter()
        .filter(|i| i.state == "firing" || i.changed_at >= since)
        .collect())
}

/// Rebuilds the tracker from the stored incidents.
pub async fn restore(store: &Store, tracker: &mut Tracker) -> Result<(), StoreError> {
    for i in incidents(
        store,
        None,
        Utc.timestamp_opt(0, 0).single().unwrap_or_default(),
    )
    .await?
    {
        let Some(kind) = Kind::parse(&i.kind) else {
            continue;
        };
        let at = Utc
            .timestamp_opt(i64::from(i.changed_at), 0)
            .single()
            .unwrap_or_default();
        if kind.is_once() {
            tracker.restore_once(i.entity);
            continue;
        }
        let firing = i.state == "firing";
        let (alert_id, fired_at, reading) = stored(kind, i);
        if firing {
            tracker.restore_open(Open {
                alert_id,
                fired_at,
                reading,
                recovering_since: None,
            });
        } else {
            tracker.restore_closed(alert_id, fired_at, at, reading);
        }
    }
    Ok(())
}

/// A stored incident as the tracker holds it: its id, when it fired, its last reading
/// (the threshold is not stored).
fn stored(kind: Kind, i: Incident) -> (String, DateTime<Utc>, Reading) {
    let reading = Reading {
        kind,
        entity: i.entity,
        institution: i.institution_id,
        firing: i.state == "firing",
        severity: match i.severity.as_str() {
            "critical" => Severity::Critical,
            "info" => Severity::Info,
            _ => Severity::Warning,
        },
        observed: i.observed,
        baseline: i.baseline,
        threshold: Decimal::ZERO,
        message: i.message,
    };
    (i.alert_id, hour_at(i.fired_at), reading)
}

/// Takes over the key-spike incidents a gateway raised (`gateway::spend_watch`) since the
/// tracker last looked: they are this evaluator's to resolve, and no second page is sent
/// for them. Read just before the readings are applied, so a gateway's page and this
/// round's coincide only if both land within that query.
async fn adopt(store: &Store, tracker: &mut Tracker) -> Result<(), StoreError> {
    for i in store.open_key_spikes().await? {
        let key = (Kind::KeySpike, i.entity.clone());
        if tracker.open.contains_key(&key) {
            continue;
        }
        let (alert_id, fired_at, reading) = stored(Kind::KeySpike, i);
        tracker.restore_open(Open {
            alert_id,
            fired_at,
            reading,
            recovering_since: None,
        });
    }
    Ok(())
}

/// Runs until `shutdown`: evaluate, record, deliver, sleep.
pub async fn run(cfg: Config, store: Store, mut shutdown: Shutdown) {
    let notifier = Notifier::start(&cfg);
    let mut tracker = Tracker::from_config(&cfg.alerts);
    loop {
        match restore(&store, &mut tracker).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!("alerts: cannot read stored alerts yet: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    _ = shutdown.wait() => return,
                }
            }
        }
    }
    tracing::info!(open = tracker.open.len(), "alert evaluator started");
    loop {
        if let Err(e) = evaluate_once(&cfg, &store, &mut tracker, &notifier, Utc::now()).await {
            tracing::warn!("alerts: evaluation failed (will retry): {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(cfg.alerts.interval_secs.max(1))) => {}
            _ = shutdown.wait() => return,
        }
    }
}

pub async fn evaluate_once(
    cfg: &Config,
    store: &Store,
    tracker: &mut Tracker,
    notifier: &Notifier,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    // The window ends at the end of the current hour: the partial hour counts.
    let end = now.duration_trunc(Duration::hours(1)).unwrap_or(now) + Duration::hours(1);
    let weeks = i64::from(cfg.alerts.spike.baseline_weeks.max(1));
    let window = i64::from(cfg.alerts.spike.window_hours.max(1));
    let from =
        (end - Duration::weeks(weeks) - Duration::hours(window)).min(end - Duration::days(32));
    let series = load_live_series(cfg, store, from, end).await?;
    // The spend-rate checks read the stored events; if they cannot (the table is being
    // repaired, a query cut off), the round goes on without them: the pipeline's own
    // alerts (an ingest that stalls on that very table) must not wait for them.
    let rates = match rate_checks(cfg, store, &series, now, tracker).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "spend-rate checks skipped this round");
            RateChecks::default()
        }
    };
    let mut readings = spend_readings(cfg, &series, end, tracker);
    merge_rate_readings(&mut readings, &rates, tracker);
    readings.extend(pipeline_readings(cfg, store, now, tracker).await?);
    let standings = async {
        let configured = crate::limits::configured(&cfg.limits)?;
        let groups = crate::people::groups::configured(&cfg.groups)?;
        let derived = crate::people::directory::Directory::load(store, &groups)
            .await?
            .derived();
        crate::limits::standings(
            store,
            &configured,
            &derived,
            &|i| cfg.institution_tz(i),
            None,
            now,
        )
        .await
    };
    match standings.await {
        Ok(standings) => readings.extend(limit_readings(&standings, &|i| cfg.institution_tz(i))),
        Err(e) => tracing::warn!(error = %e, "cannot read limits for alerts"),
    }
    adopt(store, tracker).await?;
    let changes = tracker.step(now, readings);
    if changes.is_empty() {
        return Ok(());
    }
    // Stored before sent: a crash in between never sends twice; delivery retries.
    if let Err(e) = record(store, &changes).await {
        // Forget the changes so the next round decides them again.
        for c in &changes {
            let key = (c.reading.kind, c.reading.entity.clone());
            if c.reading.kind.is_once() {
                tracker.forget_once(&c.reading.entity);
            } else if c.resolved {
                tracker.restore_open(Open {
                    alert_id: c.alert_id.clone(),
                    fired_at: c.at,
                    reading: c.reading.clone(),
                    recovering_since: None,
                });
            } else {
                tracker.open.remove(&key);
            }
        }
        return Err(e);
    }
    brake(cfg, store, &changes).await;
    for c in changes {
        tracing::info!(kind = c.reading.kind.as_str(), entity = %c.reading.entity, resolved = c.resolved, "alert");
        notifier.send(c);
    }
    Ok(())
}

/// The spend-spike brake (issue 36): a key spike that fires (or fires again) at an
/// institution with `on_spike = "suspend_key"` pauses the key on every gateway until its
/// alert is acknowledged (`acknowledge`); each pause is in the key log. A failure is
/// logged; the alert stands and is delivered either way. Returns the keys it paused.
pub async fn brake(cfg: &Config, store: &Store, changes: &[Transition]) -> Vec<String> {
    let mut paused = Vec::new();
    for c in changes
        .iter()
        .filter(|c| c.reading.kind == Kind::KeySpike && !c.resolved)
    {
        let inst = c.reading.institution.as_str();
        if cfg.institution(inst).map(|i| i.on_spike) != Some(OnSpike::SuspendKey) {
            continue;
        }
        let Some((_, key_id)) = c.reading.entity.split_once('/') else {
            continue;
        };
        match crate::keys::hold(store, key_id, inst, &c.alert_id, "alerts").await {
            Ok(Some(_)) => {
                tracing::warn!(key_id, alert = %c.alert_id, "key paused by the spend-spike brake");
                paused.push(key_id.to_owned());
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(key_id, alert = %c.alert_id, error = %e, "cannot pause the key")
            }
        }
    }
    paused
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use rust_decimal_macros::dec;

    #[test]
    fn a_limit_alert_names_its_period_by_the_institutions_own_date() {
        // Oslo's 8 December starts at 23:00 UTC on the 7th.
        let start = Utc.with_ymd_and_hms(2026, 12, 7, 23, 0, 0).unwrap();
        let standing = crate::limits::Standing {
            limit_id: "uni:user:ola:usd:day".into(),
            label: "$1.00 per day".into(),
            institution_id: "uni".into(),
            scope: crate::limits::LimitScope::User,
            subject: "ola".into(),
            metric: crate::limits::Metric::Usd,
            period: "day".into(),
            mode: "alert".into(),
            period_start: start,
            period_end: start + chrono::Duration::days(1),
            limit: dec!(1),
            used: dec!(1.5),
            reserved: dec!(0),
            remaining: dec!(0),
            blocked: 0,
        };
        let r = limit_readings(&[standing], &|_| chrono_tz::Europe::Oslo);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].entity, "uni:user:ola:usd:day/2026-12-08/reached");
        assert!(
            r[0].message
                .contains("has used $1.50 of its $1.00 per day limit"),
            "{}",
            r[0].message
        );
    }

    #[test]
    fn users_and_institutions_page_by_their_rate_once_per_leak_and_a_user_spike_recovers() {
        let check = |observed: Decimal| SpikeCheck {
            observed,
            baseline: dec!(0.5),
            fire_above: dec!(2),
            resolve_at_or_below: dec!(0.75),
            basis: crate::alerts::Basis::Weekly,
        };
        let w15 = rate::default_windows()[1];
        assert_eq!(w15.minutes, 15);
        let hourly_institution = || Reading {
            kind: Kind::InstitutionSpike,
            entity: "uni".into(),
            institution: "uni".into(),
            firing: false,
            severity: Severity::Warning,
            observed: dec!(1),
            baseline: dec!(1),
            threshold: dec!(5),
            message: "hourly".into(),
        };
        let entry = |kind: Kind, entity: &str, observed: Decimal| {
            (
                (kind, "uni".to_owned(), entity.to_owned()),
                vec![(w15, check(observed))],
            )
        };
        let by = |rs: &[Reading], kind: Kind| rs.iter().find(|r| r.kind == kind).cloned();

        // An institution's spend jumps with no key or user to explain it: its page.
        let tracker = Tracker::new(Duration::hours(1));
        let mut readings = vec![hourly_institution()];
        let rates = RateChecks {
            checks: BTreeMap::from([entry(Kind::InstitutionSpike, "uni", dec!(5))]),
            owners: BTreeMap::new(),
        };
        merge_rate_readings(&mut readings, &rates, &tracker);
        let inst = by(&readings, Kind::InstitutionSpike).unwrap();
        assert!(inst.firing);
        assert_eq!(
            inst.message,
            "institution uni spent $5.00 in the last 15 min; usual for this time of the week: $0.50 (spend rate)"
        );

        // A user's spend over several keys (none of which pages) jumps: the user's page;
        // the institution's jump is that user's, so no second page.
        let mut tracker = Tracker::new(Duration::hours(1));
        let mut readings = vec![hourly_institution()];
        let rates = RateChecks {
            checks: BTreeMap::from([
                entry(Kind::UserSpike, "uni/user:ola", dec!(3)),
                entry(Kind::InstitutionSpike, "uni", dec!(5)),
            ]),
            owners: BTreeMap::new(),
        };
        merge_rate_readings(&mut readings, &rates, &tracker);
        let user = by(&readings, Kind::UserSpike).unwrap();
        assert!(user.firing);
        assert_eq!(
            user.message,
            "user ola of uni spent $3.00 in the last 15 min; usual for this time of the week: $0.50 (spend rate)"
        );
        assert_eq!(
            by(&readings, Kind::InstitutionSpike).unwrap().message,
            "hourly"
        );
        assert!(!by(&readings, Kind::InstitutionSpike).unwrap().firing);

        // One leaked key of that user: the key's page only.
        let mut leak = vec![hourly_institution()];
        let rates_leak = RateChecks {
            checks: BTreeMap::from([
                entry(Kind::KeySpike, "uni/k1", dec!(3)),
                entry(Kind::UserSpike, "uni/user:ola", dec!(3)),
                entry(Kind::InstitutionSpike, "uni", dec!(5)),
            ]),
            owners: BTreeMap::from([("uni/k1".to_owned(), "uni/user:ola".to_owned())]),
        };
        merge_rate_readings(&mut leak, &rates_leak, &Tracker::new(Duration::hours(1)));
        let firing: Vec<&str> = leak
            .iter()
            .filter(|r| r.firing)
            .map(|r| r.entity.as_str())
            .collect();
        assert_eq!(firing, vec!["uni/k1"]);

        // The user's incident opens; later the user is under every floor (no check at
        // all): read as recovered, and it resolves.
        let t0 = Utc.with_ymd_and_hms(2026, 12, 7, 12, 0, 0).unwrap();
        assert_eq!(tracker.step(t0, readings).len(), 1);
        let mut later = Vec::new();
        merge_rate_readings(&mut later, &RateChecks::default(), &tracker);
        assert_eq!(later.len(), 1);
        assert!(!later[0].firing);
        assert_eq!(later[0].entity, "uni/user:ola");
        assert_eq!(
            later[0].message,
            "user ola of uni spends at its usual rate again"
        );
        let changes = tracker.step(t0 + Duration::minutes(1), later);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].resolved);
        assert_eq!(changes[0].reading.kind, Kind::UserSpike);
    }

    #[test]
    fn a_firing_spend_rate_pages_a_key_the_hourly_window_does_not_yet() {
        let tracker = Tracker::new(Duration::hours(1));
        let hourly = |entity: &str, firing: bool| Reading {
            kind: Kind::KeySpike,
            entity: entity.into(),
            institution: "uni".into(),
            firing,
            severity: Severity::Warning,
            observed: dec!(3),
            baseline: dec!(1),
            threshold: dec!(5),
            message: "hourly".into(),
        };
        let check = |observed: Decimal| SpikeCheck {
            observed,
            baseline: dec!(0.06),
            fire_above: dec!(1.25),
            resolve_at_or_below: dec!(0.3),
            basis: crate::alerts::Basis::Weekly,
        };
        let [_, w15, w360] = rate::default_windows();
        assert_eq!((w15.minutes, w360.minutes), (15, 360));
        let mut readings = vec![
            hourly("uni/leaked", false),
            hourly("uni/calm", false),
            hourly("uni/hourly", true),
        ];
        let rates = RateChecks {
            owners: BTreeMap::new(),
            checks: BTreeMap::from([
                (
                    (Kind::KeySpike, "uni".to_owned(), "uni/leaked".to_owned()),
                    vec![(w15, check(dec!(3))), (w360, check(dec!(3)))],
                ),
                (
                    (Kind::KeySpike, "uni".to_owned(), "uni/calm".to_owned()),
                    vec![(w15, check(dec!(1.25))), (w360, check(dec!(1)))],
                ),
                (
                    (Kind::KeySpike, "uni".to_owned(), "uni/hourly".to_owned()),
                    vec![(w15, check(dec!(9)))],
                ),
                (
                    (Kind::KeySpike, "uni".to_owned(), "uni/new".to_owned()),
                    vec![(w15, check(dec!(4)))],
                ),
            ]),
        };
        merge_rate_readings(&mut readings, &rates, &tracker);
        let by = |e: &str| readings.iter().find(|r| r.entity == e).unwrap();
        assert!(by("uni/leaked").firing);
        assert_eq!(
            by("uni/leaked").message,
            "API key uni/leaked spent $3.00 in the last 15 min; usual for this time of the week: $0.06 (spend rate)"
        );
        assert!(!by("uni/calm").firing, "at the threshold is not over it");
        assert_eq!(by("uni/hourly").message, "hourly", "the hourly page stays");
        assert!(by("uni/new").firing, "a key without an hourly reading yet");
        assert_eq!(
            by("uni/new").severity,
            Severity::Critical,
            "over 3x its threshold"
        );
    }
}
