//! The gateway's own spend-rate watch (issue 36, the fast path). Every request this
//! instance settles adds its priced cost to its key's spend per minute, kept here in
//! memory for the longest rate window (6 hours). A key whose spend in a window passes
//! that window's floor is judged against its thresholds — the evaluator's rule
//! (`alerts::rate::check`: the busiest same local window of earlier weeks, the spread,
//! the floors scaled to the window) — and pages through the existing machinery (the
//! `alerts` table, webhooks and e-mail, the spend-spike brake) as soon as it passes them:
//! the spend is the gateway's own, not what ClickHouse holds a pipeline later.
//!
//! Thresholds come from the key's history (weeks old, so they change slowly): they are
//! read from ClickHouse in the background when a key first passes a floor and re-read
//! once a minute while it does; the request path never waits for them. If ClickHouse
//! cannot be read, a key with no thresholds yet is judged as a new key (the floors of
//! `new_entity_min_usd`), so the watch still pages a runaway key when the store is down.
//!
//! Several gateways: with the shared limit store configured, each gateway adds what it
//! settled to every gateway's spend per key and minute there once a second (one script
//! call for all its keys) and reads the sums back, so a key spread over several gateways
//! is judged on its whole rate; without it (or while it is unreachable) each judges what
//! it settled itself, about 1/N of a key spread over N gateways, and the evaluator (which
//! reads every gateway's events) is the detector for such keys. An incident is raised
//! once — a gateway first looks for an open incident of the key in the `alerts` table
//! (one the evaluator or another gateway raised), then claims the incident in the shared
//! store (`SET NX`); the evaluator adopts incidents the gateways raised and resolves them
//! by its own readings.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Duration as Span, DurationRound, TimeZone, Utc};
use rust_decimal::Decimal;

use crate::alerts::rate::{self, RateWindow};
use crate::alerts::{Basis, Kind, Reading, SpikeCheck, Transition};
use crate::config::{Config, SpikeConfig};
use crate::limits::shared::SharedStore;
use crate::shutdown::Shutdown;
use crate::store::alerts::SpendBy;
use crate::store::Store;

/// How long thresholds read for a key stay in use (the window they were computed for
/// moves on; the busiest-within-30-minutes baseline changes little in a minute).
const BARS_FRESH: Span = Span::seconds(60);
/// How long every gateway's spend, as last read from the shared store, stands for the
/// key's (it is read every second while the key spends here).
const EVERYONE_FRESH: Span = Span::seconds(5);
/// After a key was judged over its threshold (raised, or found already raised), how long
/// before it is looked at again.
const QUIET: Span = Span::seconds(60);

/// A key's thresholds, per window (in `windows` order).
#[derive(Debug, Clone, PartialEq)]
struct Bars {
    at: DateTime<Utc>,
    checks: Vec<SpikeCheck>,
}

#[derive(Debug, Default)]
struct KeySpend {
    institution: String,
    /// (minute start, unix seconds; micro-dollars) settled here, oldest first.
    minutes: VecDeque<(i64, i64)>,
    bars: Option<Bars>,
    /// Asked for thresholds (the background task reads them).
    wanted: bool,
    quiet_until: Option<DateTime<Utc>>,
    /// Settled here and not yet added to the shared store: (minute, micro-dollars).
    unshared: Vec<(i64, i64)>,
    /// Every gateway's spend per minute as the shared store last returned it (minute,
    /// micro-dollars), and when.
    everyone: Option<(DateTime<Utc>, Minutes)>,
}

/// (minute start in unix seconds, micro-dollars), oldest first.
type Minutes = Vec<(i64, i64)>;

/// Micro-dollars of `minutes` at or after `since`.
fn since(minutes: impl Iterator<Item = (i64, i64)>, since: i64) -> i64 {
    minutes.filter(|(m, _)| *m >= since).map(|(_, v)| v).sum()
}

impl KeySpend {
    fn add(&mut self, micros: i64, now: DateTime<Utc>, longest: i64) {
        let minute = now.timestamp().div_euclid(60) * 60;
        match self.minutes.back_mut() {
            Some((m, v)) if *m == minute => *v += micros,
            _ => self.minutes.push_back((minute, micros)),
        }
        match self.unshared.last_mut() {
            Some((m, v)) if *m == minute => *v += micros,
            _ => self.unshared.push((minute, micros)),
        }
        let oldest = minute - (longest - 1) * 60;
        while self.minutes.front().is_some_and(|(m, _)| *m < oldest) {
            self.minutes.pop_front();
        }
    }

    /// Spend in the last `minutes` minutes up to `now` (the current minute included):
    /// every gateway's (as the shared store last said, within `EVERYONE_FRESH`, plus what
    /// this one settled since), else this gateway's own.
    fn sum(&self, minutes: i64, now: DateTime<Utc>) -> Decimal {
        let from = now.timestamp().div_euclid(60) * 60 - (minutes - 1) * 60;
        let own = since(self.minutes.iter().copied(), from);
        let everyone = match &self.everyone {
            Some((at, all)) if now - *at < EVERYONE_FRESH => {
                since(all.iter().copied(), from) + since(self.unshared.iter().copied(), from)
            }
            _ => 0,
        };
        Decimal::new(own.max(everyone), 6)
    }
}

/// What a key's spend came to against its thresholds.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Under every window's floor, or quiet after a page.
    Calm,
    /// Over a floor; its thresholds are to be read.
    NeedsBars,
    /// Over a threshold: page.
    Over(Over),
}

/// A key over its threshold in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Over {
    pub institution: String,
    pub key_id: String,
    pub window: RateWindow,
    pub check: SpikeCheck,
}

/// Per-key spend rates of what this instance settled (see the module's text).
pub struct SpendWatch {
    windows: Vec<RateWindow>,
    spike: SpikeConfig,
    keys: Mutex<HashMap<String, KeySpend>>,
    wake: tokio::sync::Notify,
}

impl SpendWatch {
    pub fn new(spike: SpikeConfig) -> Self {
        Self {
            windows: rate::default_windows().to_vec(),
            spike,
            keys: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn longest(&self) -> i64 {
        self.windows.iter().map(|w| w.minutes).max().unwrap_or(15)
    }

    /// The floor of a window: `min_spend_usd` is per hour.
    fn floor(&self, w: RateWindow) -> Decimal {
        self.spike.min_spend_usd * Decimal::from(w.minutes) / Decimal::from(60)
    }

    /// Adds a settled request's cost (on the request path: memory only).
    pub fn add(&self, institution: &str, key_id: &str, cost: Decimal, now: DateTime<Utc>) {
        if cost <= Decimal::ZERO || key_id.is_empty() {
            return;
        }
        let micros = crate::limits::shared::micros_up(cost);
        let wake = {
            let mut keys = self.keys.lock().expect("spend watch lock");
            let k = keys.entry(key_id.to_owned()).or_default();
            if k.institution.is_empty() {
                k.institution = institution.to_owned();
            }
            k.add(micros, now, self.longest());
            let asked = k.wanted;
            match self.judge(key_id, k, now) {
                Verdict::Calm => false,
                Verdict::NeedsBars => !asked,
                Verdict::Over(_) => true,
            }
        };
        if wake {
            self.wake.notify_one();
        }
    }

    fn judge(&self, key_id: &str, k: &mut KeySpend, now: DateTime<Utc>) -> Verdict {
        if k.quiet_until.is_some_and(|q| now < q) {
            return Verdict::Calm;
        }
        let sums: Vec<Decimal> = self.windows.iter().map(|w| k.sum(w.minutes, now)).collect();
        if !self
            .windows
            .iter()
            .zip(&sums)
            .any(|(w, s)| *s > self.floor(*w))
        {
            return Verdict::Calm;
        }
        let Some(bars) = k.bars.as_ref().filter(|b| now - b.at < BARS_FRESH) else {
            k.wanted = true;
            return Verdict::NeedsBars;
        };
        for ((w, observed), c) in self.windows.iter().zip(&sums).zip(&bars.checks) {
            if *observed > c.fire_above {
                return Verdict::Over(Over {
                    institution: k.institution.clone(),
                    key_id: key_id.to_owned(),
                    window: *w,
                    check: SpikeCheck {
                        observed: *observed,
                        ..c.clone()
                    },
                });
            }
        }
        Verdict::Calm
    }

    /// Keys waiting for thresholds: (institution, key id).
    fn wanted(&self) -> Vec<(String, String)> {
        let mut keys = self.keys.lock().expect("spend watch lock");
        keys.iter_mut()
            .filter_map(|(id, k)| {
                std::mem::take(&mut k.wanted).then(|| (k.institution.clone(), id.clone()))
            })
            .collect()
    }

    fn set_bars(&self, key_id: &str, bars: Bars) {
        if let Some(k) = self.keys.lock().expect("spend watch lock").get_mut(key_id) {
            k.bars = Some(bars);
        }
    }

    /// Judges every key afresh (after thresholds arrived); those over one are quiet for
    /// a minute from now on.
    fn over(&self, now: DateTime<Utc>) -> Vec<Over> {
        let mut keys = self.keys.lock().expect("spend watch lock");
        let mut out = Vec::new();
        for (id, k) in keys.iter_mut() {
            if let Verdict::Over(o) = self.judge(id, k, now) {
                k.quiet_until = Some(now + QUIET);
                out.push(o);
            }
        }
        out
    }

    /// What to add to the shared store and which keys to read back: each key's spend
    /// not yet shared, and (with 0) every key that spent here in the last 2 minutes.
    fn to_share(&self, now: DateTime<Utc>) -> Vec<(String, i64, i64)> {
        let minute = now.timestamp().div_euclid(60) * 60;
        let mut out = Vec::new();
        for (id, k) in self.keys.lock().expect("spend watch lock").iter_mut() {
            let unshared = std::mem::take(&mut k.unshared);
            if unshared.is_empty() {
                if k.minutes.back().is_some_and(|(m, _)| *m >= minute - 60) {
                    out.push((id.clone(), minute, 0));
                }
                continue;
            }
            out.extend(unshared.into_iter().map(|(m, v)| (id.clone(), m, v)));
        }
        out
    }

    /// The shared store could not take `adds`: they wait for the next try (those still
    /// within the longest window).
    fn unshared_again(&self, adds: &[(String, i64, i64)], oldest: i64) {
        let mut keys = self.keys.lock().expect("spend watch lock");
        for (id, m, v) in adds.iter().filter(|(_, m, v)| *v != 0 && *m >= oldest) {
            if let Some(k) = keys.get_mut(id) {
                k.unshared.insert(0, (*m, *v));
            }
        }
    }

    /// Every gateway's spend of a key, as the shared store returned it.
    fn set_everyone(&self, key_id: &str, mut minutes: Vec<(i64, i64)>, at: DateTime<Utc>) {
        if let Some(k) = self.keys.lock().expect("spend watch lock").get_mut(key_id) {
            minutes.sort_unstable();
            k.everyone = Some((at, minutes));
        }
    }

    /// Forgets keys that settled nothing within the longest window.
    fn sweep(&self, now: DateTime<Utc>) {
        let oldest = now.timestamp() - self.longest() * 60;
        self.keys
            .lock()
            .expect("spend watch lock")
            .retain(|_, k| k.minutes.back().is_some_and(|(m, _)| *m >= oldest));
    }

    /// Keys watched now (for the gauge).
    pub fn len(&self) -> usize {
        self.keys.lock().expect("spend watch lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a raised incident goes: the store, the shared store's claims, delivery, the
/// brake, and this instance's keyring (paused at once here; elsewhere within a key
/// refresh).
pub struct Raiser {
    pub cfg: Config,
    pub store: Store,
    pub shared: Option<Arc<SharedStore>>,
    pub notifier: crate::alerts::deliver::Notifier,
    pub keys: Arc<super::keyring::Keyring>,
    pub instance: String,
    pub raised: Arc<super::metrics::Metrics>,
}

/// Reads thresholds for the keys that ask, judges, and raises; until `shutdown`.
pub async fn run(watch: Arc<SpendWatch>, raiser: Raiser, mut shutdown: Shutdown) {
    // With a shared store, spend is exchanged every second.
    let every = Duration::from_secs(if raiser.shared.is_some() { 1 } else { 10 });
    loop {
        tokio::select! {
            _ = watch.wake.notified() => {}
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        let now = Utc::now();
        watch.sweep(now);
        if let Some(shared) = &raiser.shared {
            share(&watch, shared, now).await;
        }
        let wanted = watch.wanted();
        if !wanted.is_empty() {
            let read = read_bars(&raiser, &watch, &wanted, now).await;
            tracing::debug!(keys = read.len(), "spend watch: thresholds read");
            for (key_id, bars) in read {
                watch.set_bars(&key_id, bars);
            }
        }
        for over in watch.over(Utc::now()) {
            raise(&raiser, over).await;
        }
    }
}

/// Adds what this gateway settled to every gateway's spend per key and reads the sums
/// back (one script call); if the store cannot be reached, the spend waits for the next
/// try and each key is judged by this gateway's own spend meanwhile.
async fn share(watch: &SpendWatch, shared: &SharedStore, now: DateTime<Utc>) {
    let adds = watch.to_share(now);
    if adds.is_empty() {
        return;
    }
    let longest = watch.longest();
    let oldest = now.timestamp().div_euclid(60) * 60 - (longest - 1) * 60;
    let ttl = Duration::from_secs((longest as u64 + 10) * 60);
    match shared.spend_minutes(&adds, oldest, ttl).await {
        Ok(rows) => {
            for (key_id, minutes) in rows {
                watch.set_everyone(&key_id, minutes, now);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "spend watch: cannot share spend now");
            watch.unshared_again(&adds, oldest);
        }
    }
}

/// Thresholds of `keys` at `now`, from their stored history; if it cannot be read, the
/// thresholds of a new key (the floors alone).
async fn read_bars(
    raiser: &Raiser,
    watch: &SpendWatch,
    keys: &[(String, String)],
    now: DateTime<Utc>,
) -> Vec<(String, Bars)> {
    let cfg = &raiser.cfg;
    let spike = &cfg.alerts.spike;
    let weeks = i64::from(spike.baseline_weeks.max(1));
    let from = now - Span::weeks(weeks) - Span::days(1);
    let read = async {
        let firsts = raiser
            .store
            .first_spend(SpendBy::Key, from.timestamp(), now.timestamp(), keys)
            .await?;
        let incidents = raiser.store.incidents(None).await?;
        let first = |inst: &str, entity: &str| {
            firsts
                .iter()
                .find(|f| f.institution_id == inst && entity == format!("{inst}/{}", f.subject))
                .and_then(|f| Utc.timestamp_opt(i64::from(f.hour), 0).single())
        };
        let spans = |entity: &str| spans_of(&incidents, entity, now);
        crate::alerts::evaluator::rate_verdicts(
            cfg,
            &raiser.store,
            SpendBy::Key,
            keys,
            now,
            first,
            spans,
        )
        .await
    };
    match read.await {
        Ok(verdicts) => verdicts
            .into_iter()
            .filter_map(|((inst, entity), checks)| {
                let key_id = entity.strip_prefix(&format!("{inst}/"))?.to_owned();
                Some((
                    key_id,
                    Bars {
                        at: now,
                        checks: checks.into_iter().map(|(_, c)| c).collect(),
                    },
                ))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, keys = keys.len(), "spend watch: cannot read baselines; judging these keys by the new-key floors");
            keys.iter()
                .map(|(_, key_id)| {
                    let checks = watch
                        .windows
                        .iter()
                        .map(|w| {
                            crate::alerts::judge(
                                Decimal::ZERO,
                                &[Decimal::ZERO],
                                Basis::New,
                                w.factor,
                                Decimal::from(w.minutes) / Decimal::from(60),
                                spike,
                            )
                        })
                        .collect();
                    (key_id.clone(), Bars { at: now, checks })
                })
                .collect()
        }
    }
}

/// The spans of an entity's key-spike incidents, for keeping them out of its baseline.
fn spans_of(
    incidents: &[crate::store::alerts::Incident],
    entity: &str,
    now: DateTime<Utc>,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let at = |s: u32| Utc.timestamp_opt(i64::from(s), 0).single().unwrap_or(now);
    incidents
        .iter()
        .filter(|i| i.kind == Kind::KeySpike.as_str() && i.entity == entity)
        .map(|i| {
            let end = if i.state == "firing" {
                now
            } else {
                at(i.changed_at)
            };
            (at(i.fired_at), end)
        })
        .collect()
}

/// The page for a key over its threshold (worded like the evaluator's spend-rate page,
/// saying it was seen at a gateway).
pub fn reading(o: &Over) -> Reading {
    crate::alerts::evaluator::rate_reading(
        Kind::KeySpike,
        &o.institution,
        &format!("{}/{}", o.institution, o.key_id),
        o.window,
        &o.check,
        "spend rate, seen at the gateway",
    )
}

/// Raises the incident of `o` unless it is raised already (here, by another gateway or
/// by the evaluator) or its key's last incident ended within the cooldown (the evaluator
/// decides reopening).
async fn raise(r: &Raiser, o: Over) {
    let reading = reading(&o);
    let now = Utc::now();
    match r.store.incidents(Some(&o.institution)).await {
        Ok(incidents) => {
            let cooldown = Span::seconds(r.cfg.alerts.cooldown_secs)
                .max(Span::hours(i64::from(r.cfg.alerts.spike.renotify_hours)));
            let known = incidents.iter().any(|i| {
                i.kind == Kind::KeySpike.as_str()
                    && i.entity == reading.entity
                    && (i.state == "firing"
                        || now.timestamp() - i64::from(i.changed_at) < cooldown.num_seconds())
            });
            if known {
                tracing::info!(entity = %reading.entity, "spend rate over its threshold at the gateway; its incident is raised already");
                return;
            }
        }
        Err(e) => tracing::warn!(error = %e, "spend watch: cannot read incidents; raising anyway"),
    }
    let at = now.duration_trunc(Span::seconds(1)).unwrap_or(now);
    if let Some(shared) = &r.shared {
        let name = format!("{}:{}", Kind::KeySpike.as_str(), reading.entity);
        match shared
            .claim(&name, &r.instance, Duration::from_secs(600))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(entity = %reading.entity, "spend rate over its threshold at the gateway; another gateway raises its incident");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "spend watch: cannot claim the incident; raising anyway")
            }
        }
    }
    let t = Transition {
        alert_id: crate::alerts::alert_id(&reading, at),
        resolved: false,
        reopened: false,
        at,
        reading,
    };
    tracing::warn!(entity = %t.reading.entity, alert = %t.alert_id, "spend rate over its threshold at the gateway");
    r.raised.spend_alerts.inc();
    let changes = [t];
    match crate::alerts::evaluator::record(&r.store, &changes).await {
        Ok(()) => {
            let paused = crate::alerts::evaluator::brake(&r.cfg, &r.store, &changes).await;
            for key_id in paused {
                r.keys.hold_now(&key_id);
            }
        }
        // The page matters more than its record: sent either way (the brake needs the
        // record to be undone by an acknowledgement, so it waits for the evaluator).
        Err(e) => {
            tracing::error!(error = %e, "spend watch: cannot record the incident; delivering it anyway")
        }
    }
    let [t] = changes;
    r.notifier.send(t);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn at(min: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 7, 12, 0, 0).unwrap() + Span::minutes(min)
    }

    fn watch() -> SpendWatch {
        SpendWatch::new(SpikeConfig {
            min_spend_usd: dec!(1),
            ..SpikeConfig::default()
        })
    }

    /// Thresholds of the 5-minute window out of reach unless said otherwise.
    fn bars(at: DateTime<Utc>, fire_15: Decimal, fire_360: Decimal) -> Bars {
        bars3(at, dec!(100), fire_15, fire_360)
    }

    fn bars3(at: DateTime<Utc>, fire_5: Decimal, fire_15: Decimal, fire_360: Decimal) -> Bars {
        let c = |fire_above| SpikeCheck {
            observed: Decimal::ZERO,
            baseline: dec!(0.1),
            fire_above,
            resolve_at_or_below: dec!(0.2),
            basis: Basis::Weekly,
        };
        Bars {
            at,
            checks: vec![c(fire_5), c(fire_15), c(fire_360)],
        }
    }

    #[test]
    fn windows_sum_what_was_settled_in_their_minutes_only() {
        let mut k = KeySpend::default();
        k.add(1_000_000, at(0), 360);
        k.add(2_000_000, at(10), 360);
        k.add(500_000, at(10) + Span::seconds(59), 360);
        k.add(250_000, at(14), 360);
        assert_eq!(k.sum(15, at(14)), dec!(3.75), "minutes 0..=14");
        assert_eq!(
            k.sum(15, at(15)),
            dec!(2.75),
            "minute 0 has left the window"
        );
        assert_eq!(k.sum(5, at(14)), dec!(2.75));
        assert_eq!(k.minutes.len(), 3, "one entry per minute");
        // Nothing older than the longest window is kept.
        k.add(1, at(400), 360);
        assert_eq!(k.minutes.len(), 1);
        assert_eq!(k.sum(360, at(400)), dec!(0.000001));
    }

    #[test]
    fn a_key_under_every_floor_stays_calm_and_asks_nothing() {
        let w = watch();
        // With $1 an hour the floors are $0.083 in 5 minutes, $0.25 in 15, $6 in 6 hours.
        w.add("uni", "k1", dec!(0.08), at(0));
        w.add("uni", "k1", dec!(0.08), at(6));
        w.add("uni", "k1", dec!(0.08), at(12));
        let mut keys = w.keys.lock().unwrap();
        let k = keys.get_mut("k1").unwrap();
        assert_eq!(w.judge("k1", k, at(12)), Verdict::Calm);
        assert!(!k.wanted);
    }

    #[test]
    fn over_a_floor_it_asks_for_thresholds_then_pages_over_them_once_a_minute() {
        let w = watch();
        w.add("uni", "k1", dec!(0.26), at(0));
        assert_eq!(w.wanted(), vec![("uni".to_owned(), "k1".to_owned())]);
        assert!(w.wanted().is_empty(), "asked once");
        w.set_bars("k1", bars(at(0), dec!(0.5), dec!(100)));
        assert!(w.over(at(0)).is_empty(), "under its threshold");
        let t = at(0) + Span::seconds(30);
        w.add("uni", "k1", dec!(0.25), t);
        let over = w.over(t);
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].window.minutes, 15);
        assert_eq!(over[0].check.observed, dec!(0.51));
        assert_eq!(over[0].check.fire_above, dec!(0.5));
        // Quiet for a minute, then judged again (with thresholds read afresh).
        assert!(w.over(t + Span::seconds(29)).is_empty());
        w.add("uni", "k1", dec!(0.01), at(2) + Span::seconds(1));
        assert_eq!(w.wanted().len(), 1, "its thresholds are a minute old");
        let r = reading(&over[0]);
        assert_eq!(r.entity, "uni/k1");
        assert_eq!(
            r.message,
            "API key uni/k1 spent $0.51 in the last 15 min; usual for this time of the week: $0.10 (spend rate, seen at the gateway)"
        );
    }

    #[test]
    fn the_long_window_pages_slow_abuse_the_short_one_does_not_see() {
        // $0.24 every 15 minutes: never over the 15-minute threshold ($0.50), over the
        // 6-hour one ($2.50) at its eleventh.
        let w = SpendWatch::new(SpikeConfig {
            min_spend_usd: dec!(0.4),
            ..SpikeConfig::default()
        });
        for m in (0..150).step_by(15) {
            w.add("uni", "k2", dec!(0.24), at(m));
            w.set_bars("k2", bars(at(m), dec!(0.5), dec!(2.5)));
            assert!(w.over(at(m)).is_empty(), "minute {m}");
        }
        w.add("uni", "k2", dec!(0.24), at(150));
        w.set_bars("k2", bars(at(150), dec!(0.5), dec!(2.5)));
        let over = w.over(at(150));
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].window.minutes, 360);
        assert_eq!(over[0].check.observed, dec!(2.64));
    }

    #[test]
    fn every_gateways_spend_counts_while_fresh_and_own_spend_waits_to_be_shared() {
        let w = watch();
        w.add("uni", "k1", dec!(0.10), at(0));
        w.add("uni", "k1", dec!(0.05), at(1));
        // Two minutes not yet shared, handed over once.
        assert_eq!(
            w.to_share(at(1)),
            vec![
                ("k1".to_owned(), at(0).timestamp(), 100_000),
                ("k1".to_owned(), at(1).timestamp(), 50_000)
            ]
        );
        assert_eq!(
            w.to_share(at(1)),
            vec![("k1".to_owned(), at(1).timestamp(), 0)],
            "then only read back"
        );
        // The store says every gateway spent $1.15 in those minutes (this one $0.15).
        w.set_everyone(
            "k1",
            vec![(at(1).timestamp(), 650_000), (at(0).timestamp(), 500_000)],
            at(1),
        );
        w.add("uni", "k1", dec!(0.01), at(1) + Span::seconds(2));
        let sum = |t| w.keys.lock().unwrap()["k1"].sum(15, t);
        assert_eq!(
            sum(at(1) + Span::seconds(2)),
            dec!(1.16),
            "everyone's + unshared"
        );
        // Stale after 5 s: this gateway's own.
        assert_eq!(sum(at(1) + Span::seconds(6)), dec!(0.16));
        // A failed exchange gives the spend back, within the window only.
        let adds = w.to_share(at(1) + Span::seconds(3));
        assert_eq!(adds, vec![("k1".to_owned(), at(1).timestamp(), 10_000)]);
        w.unshared_again(
            &[("k1".to_owned(), at(-400).timestamp(), 5), adds[0].clone()],
            at(1).timestamp() - 359 * 60,
        );
        assert_eq!(
            w.keys.lock().unwrap()["k1"].unshared,
            vec![(at(1).timestamp(), 10_000)]
        );
    }

    #[test]
    fn a_burst_pages_by_the_five_minute_window() {
        let w = watch();
        // $0.30 a minute for 4 minutes: over the 5-minute threshold ($1.00) at the fourth
        // ($1.20), far under the 15-minute one.
        for m in 0..4 {
            w.add("uni", "k3", dec!(0.30), at(m));
            w.set_bars("k3", bars3(at(m), dec!(1), dec!(5), dec!(50)));
            let over = w.over(at(m));
            assert_eq!(over.len(), usize::from(m == 3), "minute {m}");
            if m == 3 {
                assert_eq!(over[0].window.minutes, 5);
                assert_eq!(over[0].check.observed, dec!(1.20));
            }
        }
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let w = watch();
        w.add("uni", "k1", dec!(0.01), at(0));
        w.add("uni", "k2", dec!(0.01), at(300));
        w.sweep(at(361));
        assert_eq!(w.len(), 1);
        assert!(w.keys.lock().unwrap().contains_key("k2"));
    }
}
