//! Hard limits at the gateway: reserve the worst case before a request goes upstream,
//! settle to its priced cost when it ends, release on error or cancel.
//!
//! For each limit and period a *counter* holds three amounts:
//! - `stored`: what ClickHouse holds for the period, as of the last refresh;
//! - `pending`: what this instance priced since, by event id, until ClickHouse has it
//!   (the refresh reads the sums and which pending ids are in them in one query, so an
//!   event counts once: in `pending` or in `stored`);
//! - `reserved`: the worst case of every request still running.
//!
//! A request is admitted only if, for every `block` limit it falls under,
//! `stored + pending + reserved + its own worst case ≤ limit`. Admission and settlement
//! take one lock, so concurrent requests on one instance can never pass a limit
//! together. Other instances' requests show up through ClickHouse: see the README for
//! the bound on what several instances can overshoot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::domain::{Limit, LimitMode, LimitScope, Metric};
use crate::store::limits::{HoldRow, SubjectUsage};

pub use crate::domain::limits::Amounts;
use crate::domain::limits::UsageIndex;

/// Who a request is billed to.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub institution: &'a str,
    pub user: &'a str,
    pub key: &'a str,
}

/// The worst case of one request, before it is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// `Err`: the model has no price, so a USD limit cannot be held.
    pub usd: Result<Decimal, String>,
    pub tokens: u64,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub limit: Arc<Limit>,
    /// Left of the limit before this request (never below zero).
    pub remaining: Decimal,
    /// What this request may take at most (`None`: its model has no price).
    pub need: Option<Decimal>,
    /// When the period ends (the limit renews).
    pub renews: DateTime<Utc>,
    /// Left of the tightest USD limit, for `x-tokentally-budget-remaining`.
    pub remaining_usd: Option<Decimal>,
}

impl Blocked {
    /// The message the client reads: which limit, what is left, what was asked, when
    /// it renews (in the institution's time zone).
    pub fn message(&self, tz: chrono_tz::Tz) -> String {
        let l = &self.limit;
        let money = |d: Decimal| {
            format!(
                "${}",
                d.round_dp_with_strategy(4, rust_decimal::RoundingStrategy::ToZero)
                    .normalize()
            )
        };
        let amount = |d: Decimal| match l.metric {
            Metric::Usd => money(d),
            m => format!("{} {m}", d.normalize()),
        };
        let who = match l.scope {
            LimitScope::Institution => format!("institution {}", l.institution_id),
            LimitScope::User => format!("user {} of {}", l.subject, l.institution_id),
            LimitScope::Key => format!("API key {} of {}", l.subject, l.institution_id),
        };
        let renews = self.renews.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z");
        let need = match &self.need {
            Some(n) => format!("this request needs up to {}", amount(*n)),
            None => {
                "this model has no price in the price book, so its cost cannot be held to a budget"
                    .into()
            }
        };
        format!(
            "Limit reached: {who} may use {} (limit {}). Left this period: {}; {need}. It renews at {renews}.",
            l.amount_label(),
            l.id(),
            amount(self.remaining),
        )
    }
}

#[derive(Debug, Default)]
struct Counter {
    end: i64,
    stored: Amounts,
    pending: HashMap<String, Amounts>,
    pending_sum: Amounts,
    reserved: Amounts,
    open: u64,
    /// Other instances' reservations and not-yet-stored usage, as they last reported.
    others: Amounts,
    /// With other instances live: the most this instance may admit between two
    /// refreshes (its share of the headroom it saw), and what it admitted since.
    share: Option<Decimal>,
    since_sync: Amounts,
    /// Its last report to `limit_holds` was not all zero.
    reported: bool,
    /// Requests this limit refused in this period on this instance; `dirty`: since the
    /// last report.
    refused: u64,
    dirty: bool,
    /// Refreshes so far: a reservation made in the current epoch is in `since_sync`.
    epoch: u64,
}

impl Counter {
    fn holds_something(&self) -> bool {
        self.open > 0 || !self.pending.is_empty() || !self.reserved.is_zero()
    }

    /// Takes what a refresh read for this counter's limit and period.
    fn refresh(&mut self, limit: &Limit, key: &(String, i64), snap: &Snapshot) {
        self.stored = snap
            .usage
            .get(&(limit.institution_id.clone(), key.1, self.end))
            .map(|ix| ix.of(limit))
            .unwrap_or_default();
        self.others = snap.others.get(key).copied().unwrap_or_default();
        if let Some(ids) = snap.stored_ids.get(&(limit.institution_id.clone(), key.1)) {
            let gone: Vec<String> = self
                .pending
                .keys()
                .filter(|id| ids.contains(id.as_str()))
                .cloned()
                .collect();
            for id in gone {
                if let Some(a) = self.pending.remove(&id) {
                    self.pending_sum.sub(&a);
                }
            }
        }
        self.since_sync = Amounts::default();
        self.epoch += 1;
        self.share = (snap.instances > 1).then(|| {
            (limit.amount - self.used().of(limit.metric)).max(Decimal::ZERO)
                / Decimal::from(snap.instances as u64)
        });
    }

    fn used(&self) -> Amounts {
        let mut u = self.stored;
        u.add(&self.pending_sum);
        u.add(&self.reserved);
        u.add(&self.others);
        u
    }
}

/// An institution's limits by subject (ids into `Inner::limits`).
#[derive(Debug, Default)]
struct Subjects {
    institution: Vec<String>,
    users: HashMap<String, Vec<String>>,
    keys: HashMap<String, Vec<String>>,
}

/// The limits in force, indexed by subject; rebuilt only when they change.
#[derive(Debug, Default)]
pub struct LimitSet {
    limits: HashMap<String, Arc<Limit>>,
    by_institution: HashMap<String, Subjects>,
    /// Each (institution, period kind) some limit uses: what a refresh reads.
    periods: Vec<(String, crate::domain::LimitPeriod)>,
}

impl LimitSet {
    pub fn new(limits: Vec<Limit>) -> Arc<Self> {
        let mut set = LimitSet::default();
        let mut periods = std::collections::BTreeSet::new();
        for l in limits {
            let id = l.id();
            periods.insert((l.institution_id.clone(), l.period));
            let s = set
                .by_institution
                .entry(l.institution_id.clone())
                .or_default();
            match l.scope {
                LimitScope::Institution => s.institution.push(id.clone()),
                LimitScope::User => s
                    .users
                    .entry(l.subject.clone())
                    .or_default()
                    .push(id.clone()),
                LimitScope::Key => s
                    .keys
                    .entry(l.subject.clone())
                    .or_default()
                    .push(id.clone()),
            }
            set.limits.insert(id, Arc::new(l));
        }
        set.periods = periods.into_iter().collect();
        Arc::new(set)
    }

    pub fn len(&self) -> usize {
        self.limits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
}

/// What a refresh read, built outside the lock and swapped in whole.
#[derive(Debug, Default)]
struct Snapshot {
    set: Arc<LimitSet>,
    /// Usage per (institution, period start, period end) read.
    usage: HashMap<(String, i64, i64), UsageIndex>,
    /// Other instances' holds per (limit id, period start).
    others: HashMap<(String, i64), Amounts>,
    /// Which pending event ids ClickHouse holds, per (institution, period start).
    stored_ids: HashMap<(String, i64), std::collections::HashSet<String>>,
    /// Live gateway instances, this one included.
    instances: usize,
}

#[derive(Debug, Default)]
struct Inner {
    snap: Arc<Snapshot>,
    /// (limit id, period start) → counter; only for limits that requests fell under.
    counters: HashMap<(String, i64), Counter>,
}

impl Inner {
    /// The `block` limits `who` falls under.
    fn applying(&self, who: &Who<'_>) -> Vec<Arc<Limit>> {
        let snap = &self.snap.set;
        let Some(s) = snap.by_institution.get(who.institution) else {
            return Vec::new();
        };
        s.institution
            .iter()
            .chain(s.users.get(who.user).into_iter().flatten())
            .chain(s.keys.get(who.key).into_iter().flatten())
            .filter_map(|id| snap.limits.get(id))
            .filter(|l| l.mode == LimitMode::Block)
            .cloned()
            .collect()
    }
}

/// One ClickHouse read a refresh needs: an institution's usage in one period, and which
/// of this instance's pending events of that institution are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub institution: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub pending: Vec<String>,
}

/// Every limit's counters on this instance.
#[derive(Debug)]
pub struct Budgets {
    inner: Mutex<Inner>,
    zones: HashMap<String, chrono_tz::Tz>,
    /// Limits and usage have been read once: until then nothing is admitted.
    ready: std::sync::atomic::AtomicBool,
}

/// What admission decided.
#[derive(Debug)]
pub enum Admission {
    /// No `block` limit applies.
    Free,
    Admitted(Reservation),
    Refused(Blocked),
}

impl Budgets {
    /// `zones`: institutions' time zones (others are UTC).
    pub fn new(zones: HashMap<String, chrono_tz::Tz>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            zones,
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn zone(&self, institution: &str) -> chrono_tz::Tz {
        self.zones
            .get(institution)
            .copied()
            .unwrap_or(chrono_tz::UTC)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any `block` limit applies to `who` (cheap: decides whether the worst
    /// case must be computed at all).
    pub fn applies(&self, who: &Who<'_>) -> bool {
        !self.lock().applying(who).is_empty()
    }

    /// Reserves `ask` against every `block` limit of `who`, or refuses.
    pub fn admit(self: &Arc<Self>, who: &Who<'_>, ask: &Ask, now: DateTime<Utc>) -> Admission {
        let tz = self.zone(who.institution);
        let mut inner = self.lock();
        let limits = inner.applying(who);
        if limits.is_empty() {
            return Admission::Free;
        }
        let take = Amounts {
            usd: *ask.usd.as_ref().unwrap_or(&Decimal::ZERO),
            requests: 1,
            tokens: ask.tokens,
        };
        let mut keys = Vec::with_capacity(limits.len());
        // What is left of the tightest USD limit, before this request.
        let mut usd_left: Option<Decimal> = None;
        let mut refused: Option<Blocked> = None;
        let snap = inner.snap.clone();
        for l in &limits {
            let (start, end) = l.period.bounds(now, tz);
            let key = (l.id(), start.timestamp());
            let c = inner.counters.entry(key.clone()).or_insert_with(|| {
                let mut c = Counter {
                    end: end.timestamp(),
                    ..Counter::default()
                };
                c.refresh(l, &key, &snap);
                c
            });
            let left = (l.amount - c.used().of(l.metric)).max(Decimal::ZERO);
            let need = match (l.metric, &ask.usd) {
                (Metric::Usd, Err(_)) => None,
                (m, _) => Some(take.of(m)),
            };
            if l.metric == Metric::Usd {
                usd_left = Some(usd_left.map_or(left, |u| u.min(left)));
            }
            let fits = need.is_some_and(|n| {
                n <= left
                    && c.share
                        .is_none_or(|cap| c.since_sync.of(l.metric) + n <= cap)
            });
            if !fits && refused.is_none() {
                c.refused += 1;
                c.dirty = true;
                refused = Some(Blocked {
                    limit: l.clone(),
                    remaining: left,
                    need,
                    renews: end,
                    remaining_usd: None,
                });
            }
            keys.push(key);
        }
        if let Some(mut b) = refused {
            b.remaining_usd = usd_left;
            return Admission::Refused(b);
        }
        let mut epochs = Vec::with_capacity(keys.len());
        for key in &keys {
            let c = inner.counters.get_mut(key).expect("entered above");
            c.reserved.add(&take);
            c.since_sync.add(&take);
            c.open += 1;
            epochs.push(c.epoch);
        }
        Admission::Admitted(Reservation {
            budgets: self.clone(),
            keys,
            epochs,
            amounts: take,
            remaining_usd: usd_left.map(|u| (u - take.usd).max(Decimal::ZERO)),
            done: false,
        })
    }

    fn finish(
        &self,
        keys: &[(String, i64)],
        epochs: &[u64],
        reserved: &Amounts,
        event: Option<(&str, Amounts)>,
    ) {
        let mut inner = self.lock();
        for (key, epoch) in keys.iter().zip(epochs) {
            if let Some(c) = inner.counters.get_mut(key) {
                c.reserved.sub(reserved);
                c.open = c.open.saturating_sub(1);
                if c.epoch == *epoch {
                    // Admitted since the last refresh: what the other instances cannot
                    // see yet is what the request really used, not its reservation.
                    c.since_sync.sub(reserved);
                    if let Some((_, actual)) = event {
                        c.since_sync.add(&actual);
                    }
                }
                if let Some((id, actual)) = event.filter(|(_, a)| !a.is_zero()) {
                    if let Some(old) = c.pending.insert(id.to_owned(), actual) {
                        c.pending_sum.sub(&old);
                    }
                    c.pending_sum.add(&actual);
                }
            }
        }
    }

    /// The limits in force now.
    pub fn limit_set(&self) -> Arc<LimitSet> {
        self.lock().snap.set.clone()
    }

    /// The reads the next refresh needs, for `limits` at `now` (tests; see `plan_set`).
    pub fn plan(&self, limits: &[Limit], now: DateTime<Utc>) -> Vec<Read> {
        self.plan_set(&LimitSet::new(limits.to_vec()), now)
    }

    /// The reads the next refresh needs for `set` at `now`: one per institution and
    /// period, with the pending events of that institution's counters in the period.
    pub fn plan_set(&self, set: &LimitSet, now: DateTime<Utc>) -> Vec<Read> {
        let mut pending: HashMap<(String, i64), Vec<String>> = HashMap::new();
        {
            let inner = self.lock();
            for ((id, start), c) in &inner.counters {
                if c.pending.is_empty() {
                    continue;
                }
                if let Some(l) = inner.snap.set.limits.get(id) {
                    pending
                        .entry((l.institution_id.clone(), *start))
                        .or_default()
                        .extend(c.pending.keys().cloned());
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut reads = Vec::new();
        for (institution, period) in &set.periods {
            let (start, end) = period.bounds(now, self.zone(institution));
            if !seen.insert((institution.clone(), start, end)) {
                continue;
            }
            let mut ids = pending
                .get(&(institution.clone(), start.timestamp()))
                .cloned()
                .unwrap_or_default();
            ids.sort();
            ids.dedup();
            reads.push(Read {
                institution: institution.clone(),
                start,
                end,
                pending: ids,
            });
        }
        reads
    }

    /// As `apply_set` with a set built from `limits` (tests, benchmarks).
    pub fn apply(
        &self,
        limits: Vec<Limit>,
        reads: &[(Read, Vec<SubjectUsage>)],
        others: &HashMap<(String, i64), Amounts>,
        instances: usize,
        now: DateTime<Utc>,
    ) {
        self.apply_set(LimitSet::new(limits), reads, others, instances, now)
    }

    /// Installs `set` (every current limit; others are dropped) with the usage read for
    /// `plan_set(set, now)`: stored amounts replaced, stored events no longer pending.
    /// `others`: the other instances' holds by (limit id, period start); `instances`:
    /// how many gateway instances are live, this one included. With more than one, each
    /// may admit at most its share (1/`instances`) of the headroom it sees until the next
    /// refresh, so that instances that cannot see each other's latest admissions do not
    /// all spend the same headroom. The usage is indexed before the lock is taken; under
    /// it, only the counters requests use are updated.
    pub fn apply_set(
        &self,
        set: Arc<LimitSet>,
        reads: &[(Read, Vec<SubjectUsage>)],
        others: &HashMap<(String, i64), Amounts>,
        instances: usize,
        now: DateTime<Utc>,
    ) {
        let mut snap = Snapshot {
            set,
            others: others.clone(),
            instances: instances.max(1),
            ..Snapshot::default()
        };
        for (read, rows) in reads {
            let ix = UsageIndex::of_rows(
                rows.iter()
                    .map(|r| (&r.user_id, &r.api_key_id, r.amounts())),
            );
            snap.stored_ids.insert(
                (read.institution.clone(), read.start.timestamp()),
                rows.iter().flat_map(|r| r.stored.iter().cloned()).collect(),
            );
            snap.usage.insert(
                (
                    read.institution.clone(),
                    read.start.timestamp(),
                    read.end.timestamp(),
                ),
                ix,
            );
        }
        let snap = Arc::new(snap);
        let now_ts = now.timestamp();
        let mut inner = self.lock();
        inner.snap = snap.clone();
        inner.counters.retain(|key, c| {
            let limit = snap.set.limits.get(&key.0);
            if let Some(l) = limit {
                if snap
                    .usage
                    .contains_key(&(l.institution_id.clone(), key.1, c.end))
                {
                    c.refresh(l, key, &snap);
                }
            }
            c.open > 0 || (c.end > now_ts && limit.is_some())
        });
        drop(inner);
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    /// What this instance holds beyond ClickHouse, per limit (for the dashboard and the
    /// other instances): counters that hold something, and once more (as zeros) those
    /// that just stopped holding anything.
    pub fn holds(&self, instance: &str, now: DateTime<Utc>) -> Vec<HoldRow> {
        let mut inner = self.lock();
        let snap = inner.snap.clone();
        let mut out = Vec::new();
        for ((id, start), c) in inner.counters.iter_mut() {
            let holds = c.holds_something();
            if !snap.set.limits.contains_key(id) || !(holds || c.reported || c.dirty) {
                continue;
            }
            c.reported = holds;
            c.dirty = false;
            out.push(HoldRow {
                instance: instance.to_owned(),
                limit_id: id.clone(),
                period_start: u32::try_from(*start).unwrap_or(0),
                reserved_usd: c.reserved.usd.normalize().to_string(),
                reserved_requests: c.reserved.requests,
                reserved_tokens: c.reserved.tokens,
                open_reservations: c.open,
                pending_usd: c.pending_sum.usd.normalize().to_string(),
                pending_requests: c.pending_sum.requests,
                pending_tokens: c.pending_sum.tokens,
                refused: c.refused,
                reported_at: u32::try_from(now.timestamp()).unwrap_or(0),
            });
        }
        out
    }

    /// Open reservations and their USD, over every counter (for metrics and tests).
    pub fn open(&self) -> (u64, Decimal) {
        let inner = self.lock();
        inner
            .counters
            .values()
            .fold((0, Decimal::ZERO), |(n, usd), c| {
                (n + c.open, usd + c.reserved.usd)
            })
    }

    /// The used amount of a limit in the period holding `now` (tests, dashboard).
    pub fn used(&self, limit_id: &str, now: DateTime<Utc>) -> Option<Amounts> {
        let inner = self.lock();
        let l = inner.snap.set.limits.get(limit_id)?;
        let (start, _) = l.period.bounds(now, self.zone(&l.institution_id));
        inner
            .counters
            .get(&(limit_id.to_owned(), start.timestamp()))
            .map(Counter::used)
    }

    pub fn limit_count(&self) -> usize {
        self.lock().snap.set.limits.len()
    }
}

/// A request's hold on its limits. Settle it with the request's priced usage; dropped
/// unsettled (an error, a cancel, a panic), it is released.
#[derive(Debug)]
pub struct Reservation {
    budgets: Arc<Budgets>,
    keys: Vec<(String, i64)>,
    epochs: Vec<u64>,
    amounts: Amounts,
    /// Left of the tightest USD limit after this reservation.
    pub remaining_usd: Option<Decimal>,
    done: bool,
}

impl Reservation {
    /// Replaces the reservation by what the request used (kept until ClickHouse has
    /// event `event_id`).
    pub fn settle(mut self, event_id: &str, actual: Amounts) {
        self.done = true;
        self.budgets.finish(
            &self.keys,
            &self.epochs,
            &self.amounts,
            Some((event_id, actual)),
        );
    }

    pub fn reserved(&self) -> Amounts {
        self.amounts
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.budgets
                .finish(&self.keys, &self.epochs, &self.amounts, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::LimitPeriod;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn limit(scope: LimitScope, subject: &str, metric: Metric, amount: Decimal) -> Limit {
        Limit {
            institution_id: "uni-a".into(),
            scope,
            subject: subject.into(),
            metric,
            period: LimitPeriod::Month,
            amount,
            mode: LimitMode::Block,
        }
    }

    fn who() -> Who<'static> {
        Who {
            institution: "uni-a",
            user: "alice",
            key: "k1",
        }
    }

    fn usd(d: Decimal) -> Ask {
        Ask {
            usd: Ok(d),
            tokens: 100,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-12-03T12:00:00Z".parse().unwrap()
    }

    fn install(b: &Budgets, limits: Vec<Limit>) {
        let reads: Vec<(Read, Vec<SubjectUsage>)> = b
            .plan(&limits, now())
            .into_iter()
            .map(|r| (r, vec![]))
            .collect();
        b.apply(limits, &reads, &HashMap::new(), 1, now());
    }

    #[test]
    fn reserve_settle_release() {
        let b = Budgets::new(HashMap::new());
        install(
            &b,
            vec![limit(LimitScope::Key, "k1", Metric::Usd, dec!(1.00))],
        );
        let Admission::Admitted(r1) = b.admit(&who(), &usd(dec!(0.40)), now()) else {
            panic!()
        };
        assert_eq!(r1.remaining_usd, Some(dec!(0.60)));
        let Admission::Admitted(r2) = b.admit(&who(), &usd(dec!(0.40)), now()) else {
            panic!()
        };
        // 0.80 reserved: a third 0.40 does not fit, 0.20 does.
        let Admission::Refused(x) = b.admit(&who(), &usd(dec!(0.40)), now()) else {
            panic!()
        };
        assert_eq!((x.remaining, x.need), (dec!(0.20), Some(dec!(0.40))));
        assert!(
            x.message(chrono_tz::UTC)
                .contains("Left this period: $0.2;"),
            "{}",
            x.message(chrono_tz::UTC)
        );
        // Settled below the reservation: the difference is free again.
        r1.settle(
            "e1",
            Amounts {
                usd: dec!(0.10),
                requests: 1,
                tokens: 50,
            },
        );
        drop(r2); // released: an error or a cancel
        assert_eq!(b.open(), (0, Decimal::ZERO));
        assert_eq!(
            b.used("uni-a:key:k1:usd:month", now()).unwrap().usd,
            dec!(0.10)
        );
        let Admission::Admitted(_held) = b.admit(&who(), &usd(dec!(0.90)), now()) else {
            panic!()
        };
        let Admission::Refused(_) = b.admit(&who(), &usd(dec!(0.000001)), now()) else {
            panic!()
        };
    }

    #[test]
    fn other_subjects_and_alert_limits_do_not_block() {
        let b = Budgets::new(HashMap::new());
        let mut alert = limit(LimitScope::Institution, "", Metric::Usd, dec!(0));
        alert.mode = LimitMode::Alert;
        install(
            &b,
            vec![
                limit(LimitScope::User, "bob", Metric::Requests, dec!(0)),
                alert,
            ],
        );
        assert!(matches!(
            b.admit(&who(), &usd(dec!(5)), now()),
            Admission::Free
        ));
        assert!(!b.applies(&who()));
    }

    #[test]
    fn a_refresh_counts_a_stored_event_once() {
        let b = Budgets::new(HashMap::new());
        let limits = vec![limit(LimitScope::User, "alice", Metric::Usd, dec!(1))];
        install(&b, limits.clone());
        let Admission::Admitted(r) = b.admit(&who(), &usd(dec!(0.5)), now()) else {
            panic!()
        };
        r.settle(
            "e1",
            Amounts {
                usd: dec!(0.3),
                requests: 1,
                tokens: 10,
            },
        );
        let id = "uni-a:user:alice:usd:month";
        assert_eq!(b.used(id, now()).unwrap().usd, dec!(0.3));
        let reads = b.plan(&limits, now());
        assert_eq!(reads[0].pending, vec!["e1".to_string()]);
        // ClickHouse now has e1 and another instance's 0.2.
        let rows = vec![
            SubjectUsage {
                user_id: "alice".into(),
                api_key_id: "k1".into(),
                usd: dec!(0.3),
                requests: 1,
                tokens: 10,
                stored: vec!["e1".into()],
            },
            SubjectUsage {
                user_id: "alice".into(),
                api_key_id: "k9".into(),
                usd: dec!(0.2),
                requests: 1,
                tokens: 10,
                stored: vec![],
            },
            SubjectUsage {
                user_id: "bob".into(),
                api_key_id: "k2".into(),
                usd: dec!(7),
                requests: 1,
                tokens: 10,
                stored: vec![],
            },
        ];
        b.apply(
            limits.clone(),
            &[(reads[0].clone(), rows)],
            &HashMap::new(),
            1,
            now(),
        );
        assert_eq!(b.used(id, now()).unwrap().usd, dec!(0.5));
        // Another instance holds 0.25: counted too.
        let start = reads[0].start.timestamp();
        let others = HashMap::from([(
            (id.to_string(), start),
            Amounts {
                usd: dec!(0.25),
                requests: 1,
                tokens: 0,
            },
        )]);
        b.apply(
            limits.clone(),
            &[(b.plan(&limits, now())[0].clone(), vec![])],
            &others,
            1,
            now(),
        );
        assert_eq!(b.used(id, now()).unwrap().usd, dec!(0.25));
        // A limit removed: its counter goes.
        b.apply(vec![], &[], &HashMap::new(), 1, now());
        assert_eq!(b.used(id, now()), None);
    }

    #[test]
    fn with_two_instances_each_spends_half_the_headroom_between_refreshes() {
        let b = Budgets::new(HashMap::new());
        let limits = vec![limit(LimitScope::Key, "k1", Metric::Usd, dec!(1))];
        let reads: Vec<_> = b
            .plan(&limits, now())
            .into_iter()
            .map(|r| (r, vec![]))
            .collect();
        b.apply(limits.clone(), &reads, &HashMap::new(), 2, now());
        let mut held = Vec::new();
        for _ in 0..5 {
            let Admission::Admitted(r) = b.admit(&who(), &usd(dec!(0.1)), now()) else {
                panic!()
            };
            held.push(r);
        }
        // 0.5 admitted since the refresh: the other half is the other instance's.
        assert!(matches!(
            b.admit(&who(), &usd(dec!(0.1)), now()),
            Admission::Refused(_)
        ));
        // One settles at 0.02: the other instances will see 0.02, not 0.1, so 0.08 of
        // this instance's share is free again.
        held.pop().unwrap().settle(
            "e-small",
            Amounts {
                usd: dec!(0.02),
                requests: 1,
                tokens: 0,
            },
        );
        let Admission::Admitted(r) = b.admit(&who(), &usd(dec!(0.08)), now()) else {
            panic!()
        };
        held.push(r);
        assert!(matches!(
            b.admit(&who(), &usd(dec!(0.01)), now()),
            Admission::Refused(_)
        ));
        // Next refresh: the other instance reported 0.3; headroom 0.2, share 0.1.
        let id = "uni-a:key:k1:usd:month".to_string();
        let start = reads[0].0.start.timestamp();
        let others = HashMap::from([(
            (id, start),
            Amounts {
                usd: dec!(0.3),
                requests: 3,
                tokens: 0,
            },
        )]);
        let reads: Vec<_> = b
            .plan(&limits, now())
            .into_iter()
            .map(|r| (r, vec![]))
            .collect();
        b.apply(limits, &reads, &others, 2, now());
        let Admission::Admitted(_r) = b.admit(&who(), &usd(dec!(0.1)), now()) else {
            panic!()
        };
        assert!(matches!(
            b.admit(&who(), &usd(dec!(0.01)), now()),
            Admission::Refused(_)
        ));
    }

    #[test]
    fn periods_roll_over() {
        let b = Budgets::new(HashMap::from([(
            "uni-a".to_string(),
            "Europe/Oslo".parse().unwrap(),
        )]));
        let mut l = limit(LimitScope::User, "alice", Metric::Requests, dec!(2));
        l.period = LimitPeriod::Day;
        install(&b, vec![l]);
        // 22:30 UTC on Dec 3 is 23:30 in Oslo; 23:30 UTC is already Dec 4 there.
        let late: DateTime<Utc> = "2026-12-03T22:30:00Z".parse().unwrap();
        let next: DateTime<Utc> = "2026-12-03T23:30:00Z".parse().unwrap();
        for _ in 0..2 {
            let Admission::Admitted(r) = b.admit(&who(), &usd(dec!(0)), late) else {
                panic!()
            };
            r.settle(
                &uuid::Uuid::now_v7().to_string(),
                Amounts {
                    usd: dec!(0),
                    requests: 1,
                    tokens: 1,
                },
            );
        }
        let Admission::Refused(x) = b.admit(&who(), &usd(dec!(0)), late) else {
            panic!()
        };
        assert_eq!(x.renews, next - chrono::Duration::minutes(30));
        assert!(x
            .message("Europe/Oslo".parse().unwrap())
            .contains("renews at 2026-12-04 00:00 CET"));
        assert!(matches!(
            b.admit(&who(), &usd(dec!(0)), next),
            Admission::Admitted(_)
        ));
    }

    #[test]
    fn an_unpriced_model_is_refused_only_by_usd_limits() {
        let b = Budgets::new(HashMap::new());
        install(
            &b,
            vec![limit(LimitScope::Key, "k1", Metric::Usd, dec!(100))],
        );
        let ask = Ask {
            usd: Err("no price".into()),
            tokens: 10,
        };
        let Admission::Refused(x) = b.admit(&who(), &ask, now()) else {
            panic!()
        };
        assert!(x.message(chrono_tz::UTC).contains("no price"));
        install(
            &b,
            vec![limit(LimitScope::Key, "k1", Metric::Tokens, dec!(100))],
        );
        assert!(matches!(
            b.admit(&who(), &ask, now()),
            Admission::Admitted(_)
        ));
    }

    proptest! {
        /// Whatever the order of admissions, settlements (each at most its reservation)
        /// and releases, used never passes the limit, and at the end nothing is reserved.
        #[test]
        fn never_over_the_limit(ops in proptest::collection::vec((1u32..200, 0u32..=100, 0u8..3), 1..200), cents in 1u32..2000) {
            let b = Budgets::new(HashMap::new());
            let amount = Decimal::new(i64::from(cents), 2);
            install(&b, vec![limit(LimitScope::Key, "k1", Metric::Usd, amount)]);
            let mut open: Vec<(Reservation, u32)> = Vec::new();
            let mut settled = Decimal::ZERO;
            for (i, (ask_m, pct, action)) in ops.into_iter().enumerate() {
                let ask = Decimal::new(i64::from(ask_m), 3);
                match b.admit(&who(), &usd(ask), now()) {
                    Admission::Admitted(r) => open.push((r, pct)),
                    Admission::Refused(x) => prop_assert!(x.remaining < ask),
                    Admission::Free => prop_assert!(false),
                }
                if action > 0 && !open.is_empty() {
                    let (r, pct) = open.swap_remove(i % open.len());
                    if action == 1 {
                        let actual = r.reserved().usd * Decimal::from(pct) / Decimal::ONE_HUNDRED;
                        settled += actual;
                        r.settle(&format!("e{i}"), Amounts { usd: actual, requests: 1, tokens: 0 });
                    }
                }
                let used = b.used("uni-a:key:k1:usd:month", now()).unwrap().usd;
                prop_assert!(used <= amount, "used {} > {}", used, amount);
            }
            drop(open);
            prop_assert_eq!(b.open(), (0, Decimal::ZERO));
            prop_assert_eq!(b.used("uni-a:key:k1:usd:month", now()).unwrap().usd, settled);
            prop_assert!(settled <= amount);
        }
    }
}
