//! Hard limits on one gateway instance: reserve the worst case before a request goes
//! upstream, settle to its priced cost when it ends, release on error or cancel.
//!
//! For each limit and period a *counter* holds:
//! - `stored`: what ClickHouse holds for the period, as of the last refresh;
//! - `pending`: what this instance priced since, by event id, until ClickHouse has it
//!   (the refresh reads the sums and which pending ids are in them in one query, so an
//!   event counts once: in `pending` or in `stored`);
//! - `reserved`: the worst case of every request still running here;
//! - `others`: the other instances' reserved and pending, as they last reported.
//!
//! A request is admitted only if, for every `block` limit it falls under,
//! `stored + pending + reserved + others + its own worst case ≤ limit`. Admission and
//! settlement take one lock, so concurrent requests on one instance can never pass a
//! limit together.
//!
//! With a shared store (`shared`), the store decides and these counters only mirror
//! what this instance holds (to fall back on, and to give back to the store after it
//! lost its state). Without one, other active instances' admissions since their last
//! report cannot be seen, so this instance admits at most its share of the headroom
//! between two refreshes (`share`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

pub use super::estimate::Ask;
use super::types::{
    Amounts, DecisionMode, Hold, Limit, LimitMode, LimitScope, Metric, SubjectUsage, UsageIndex,
};

/// Who a request is billed to.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub institution: &'a str,
    pub user: &'a str,
    pub key: &'a str,
}

/// A counter: one limit in one period (its id and the period's start, unix seconds).
pub type CounterKey = (String, i64);

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    pub limit: Arc<Limit>,
    /// Left of the limit before this request, over every instance (never below zero).
    pub remaining: Decimal,
    /// Set when the share rule allows this instance less than `remaining` until the
    /// instances next compare their holds: what it may still admit.
    pub instance_may_admit: Option<Decimal>,
    /// What this request may take at most (`None`: its model has no price).
    pub need: Option<Decimal>,
    /// When the period ends (the limit renews).
    pub renews: DateTime<Utc>,
    /// What may still be admitted of the tightest USD limit, for
    /// `x-tokentally-budget-remaining`.
    pub remaining_usd: Option<Decimal>,
}

impl Blocked {
    /// The message the client reads: which limit, what is left, what was asked, when it
    /// renews (in the institution's time zone). It never says more is left than the
    /// request needs without saying why that is not enough.
    pub fn message(&self, tz: chrono_tz::Tz) -> String {
        let l = &self.limit;
        let amount = |d: Decimal| match l.metric {
            Metric::Usd => format!(
                "${}",
                d.round_dp_with_strategy(4, rust_decimal::RoundingStrategy::ToZero)
                    .normalize()
            ),
            m => format!("{} {m}", d.normalize()),
        };
        let who = match l.scope {
            LimitScope::Institution => format!("institution {}", l.institution_id),
            LimitScope::User => format!("user {} of {}", l.subject, l.institution_id),
            LimitScope::Key => format!("API key {} of {}", l.subject, l.institution_id),
            LimitScope::Group => format!("group {} of {}", l.subject, l.institution_id),
        };
        let renews = self.renews.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z");
        let need = match &self.need {
            Some(n) => format!("this request needs up to {}", amount(*n)),
            None => {
                "this model has no price in the price book, so its cost cannot be held to a budget"
                    .into()
            }
        };
        let left = match self.instance_may_admit {
            Some(may) if self.need.is_some_and(|n| n <= self.remaining) => format!(
                "{}, of which this gateway instance may admit {} until the gateway instances next compare what they hold (about a second; another instance holds the rest)",
                amount(self.remaining),
                amount(may)
            ),
            _ => amount(self.remaining),
        };
        let advice = if self.instance_may_admit.is_some()
            && self.need.is_some_and(|n| n <= self.remaining)
        {
            " Try again in a moment, or ask for less (max_tokens)."
        } else {
            ""
        };
        format!(
            "Limit reached: {who} may use {} (limit {}). Left this period: {left}; {need}. It renews at {renews}.{advice}",
            l.amount_label(),
            l.id(),
        )
    }
}

/// What is left of a requests or tokens limit after an admitted request, for the
/// `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left {
    pub limit: u64,
    pub remaining: u64,
    pub renews: DateTime<Utc>,
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
    /// The share rule's view at the last refresh: other active instances (by id), the
    /// largest worst case they reported, and the caps they reported (what they may
    /// admit until their next refresh, which this instance cannot see until then).
    peers: Vec<String>,
    peers_unit: Amounts,
    peers_caps: Decimal,
    /// What this instance may admit under the limit until its next refresh (`None`: no
    /// other instance is active, so everything left).
    cap: Option<Decimal>,
    /// Admitted since the last refresh (what the other instances cannot see yet).
    since_sync: Amounts,
    /// Admitted something since the last report: this instance takes a share.
    active: bool,
    /// The largest worst case asked for this period (reported: the instances converge on
    /// one unit for the share rule).
    unit: Amounts,
    /// The share rule's inputs at the last refresh, to redo it for a request larger
    /// than any seen: the headroom not given to others, instances, this one's rank.
    share_headroom: Decimal,
    share_n: usize,
    share_rank: usize,
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

    /// Takes what a refresh read for this counter's limit and period, and sets this
    /// instance's cap for the next interval (instance `me`).
    fn refresh(&mut self, limit: &Limit, key: &CounterKey, snap: &Snapshot, me: &str) {
        self.stored = snap
            .usage
            .get(&(limit.institution_id.clone(), key.1, self.end))
            .map(|ix| ix.of(limit))
            .unwrap_or_default();
        let peers = snap.others.get(key);
        self.others = peers.map(|p| p.holds).unwrap_or_default();
        self.peers = peers.map(|p| p.active.clone()).unwrap_or_default();
        self.peers_unit = peers.map(|p| p.unit).unwrap_or_default();
        self.peers_caps = peers.map(|p| p.caps).unwrap_or_default();
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
        let m = limit.metric;
        // What the others have not already been given: their caps are spent where this
        // instance cannot see it until their next report.
        self.share_headroom =
            (limit.amount - self.used().of(m) - self.peers_caps).max(Decimal::ZERO);
        self.share_n = self.peers.len() + 1;
        self.share_rank = super::share::rank(me, &self.peers);
        self.cap = (!self.peers.is_empty()).then(|| self.share_cap(m, Decimal::ZERO));
    }

    /// The share rule for this interval, for requests of up to `need`.
    fn share_cap(&self, m: Metric, need: Decimal) -> Decimal {
        let unit = self.peers_unit.of(m).max(self.unit.of(m)).max(need);
        super::share::cap(self.share_headroom, self.share_n, self.share_rank, unit)
    }

    fn used(&self) -> Amounts {
        let mut u = self.stored;
        u.add(&self.pending_sum);
        u.add(&self.reserved);
        u.add(&self.others);
        u
    }

    /// What this instance may admit of `limit` now, for a request of up to `need`:
    /// everything left when no other instance is active, else what is left of its cap
    /// (redone with `need` when it is larger than any request the instances reported).
    fn may_admit(&self, limit: &Limit, need: Decimal) -> Decimal {
        let m = limit.metric;
        let left = (limit.amount - self.used().of(m)).max(Decimal::ZERO);
        let Some(cap) = self.cap else {
            return left;
        };
        let cap = if need > self.peers_unit.of(m).max(self.unit.of(m)) {
            self.share_cap(m, need)
        } else {
            cap
        };
        (cap - self.since_sync.of(m)).max(Decimal::ZERO).min(left)
    }
}

/// An institution's limits by subject (ids into `LimitSet::limits`).
#[derive(Debug, Default)]
struct Subjects {
    institution: Vec<String>,
    users: HashMap<String, Vec<String>>,
    keys: HashMap<String, Vec<String>>,
    groups: HashMap<String, Vec<String>>,
}

/// The limits in force, indexed by subject; rebuilt only when they change.
#[derive(Debug, Default)]
pub struct LimitSet {
    limits: HashMap<String, Arc<Limit>>,
    by_institution: HashMap<String, Subjects>,
    /// Each (institution, period kind) some limit uses: what a refresh reads.
    periods: Vec<(String, super::types::LimitPeriod)>,
    /// Who belongs to which group ((institution, user) → group).
    membership: HashMap<(String, String), String>,
}

impl LimitSet {
    pub fn new(limits: Vec<Limit>) -> Arc<Self> {
        Self::with_groups(limits, HashMap::new())
    }

    /// Limits and who belongs to which group (for group budgets).
    pub fn with_groups(
        limits: Vec<Limit>,
        membership: HashMap<(String, String), String>,
    ) -> Arc<Self> {
        let mut set = LimitSet {
            membership,
            ..LimitSet::default()
        };
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
                LimitScope::Group => s
                    .groups
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

    pub fn get(&self, id: &str) -> Option<&Arc<Limit>> {
        self.limits.get(id)
    }

    /// The group `user` of `institution` belongs to.
    pub fn group_of(&self, institution: &str, user: &str) -> Option<&str> {
        self.membership
            .get(&(institution.to_owned(), user.to_owned()))
            .map(String::as_str)
    }
}

/// What other instances hold against one counter, as they last reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Peers {
    /// Their reserved and pending amounts.
    pub holds: Amounts,
    /// Those that admitted requests under the limit in their last interval.
    pub active: Vec<String>,
    /// The largest worst case any of them reported.
    pub unit: Amounts,
    /// The caps they reported, in the limit's metric.
    pub caps: Decimal,
}

impl Peers {
    /// The others' latest holds, by counter (this instance's own rows left out).
    pub fn from_holds(holds: &[Hold], me: &str) -> HashMap<CounterKey, Peers> {
        let mut out: HashMap<CounterKey, Peers> = HashMap::new();
        for h in holds {
            if h.instance == me || h.limit_id.is_empty() {
                continue;
            }
            let p = out.entry((h.limit_id.clone(), h.period_start)).or_default();
            p.holds.add(&h.reserved);
            p.holds.add(&h.pending);
            if h.active {
                p.active.push(h.instance.clone());
                p.unit.max_each(&h.unit);
                p.caps += h.cap;
            }
        }
        out
    }
}

/// What a refresh read, built outside the lock and swapped in whole.
#[derive(Debug, Default)]
struct Snapshot {
    set: Arc<LimitSet>,
    /// Usage per (institution, period start, period end) read.
    usage: HashMap<(String, i64, i64), UsageIndex>,
    /// Other instances' holds per counter.
    others: HashMap<CounterKey, Peers>,
    /// Which pending event ids ClickHouse holds, per (institution, period start).
    stored_ids: HashMap<(String, i64), HashSet<String>>,
}

/// A reservation this instance holds, as it would give it back to a shared store.
#[derive(Debug, Clone)]
pub struct Held {
    pub id: String,
    pub counters: Vec<CounterKey>,
    pub amounts: Amounts,
}

#[derive(Debug, Default)]
struct Inner {
    snap: Arc<Snapshot>,
    /// Counters of the limits requests fell under on this instance.
    counters: HashMap<CounterKey, Counter>,
    /// Open reservations by id.
    open: HashMap<String, Held>,
}

impl Inner {
    /// The `block` limits `who` falls under.
    fn applying(&self, who: &Who<'_>) -> Vec<Arc<Limit>> {
        let snap = &self.snap.set;
        let Some(s) = snap.by_institution.get(who.institution) else {
            return Vec::new();
        };
        let group = snap
            .group_of(who.institution, who.user)
            .and_then(|g| s.groups.get(g));
        s.institution
            .iter()
            .chain(s.users.get(who.user).into_iter().flatten())
            .chain(s.keys.get(who.key).into_iter().flatten())
            .chain(group.into_iter().flatten())
            .filter_map(|id| snap.limits.get(id))
            .filter(|l| l.mode == LimitMode::Block)
            .cloned()
            .collect()
    }

    /// The counter of `l` in the period holding `now`, created (and filled from the last
    /// refresh) on first use.
    fn counter(
        &mut self,
        l: &Limit,
        now: DateTime<Utc>,
        tz: chrono_tz::Tz,
        me: &str,
    ) -> (CounterKey, i64) {
        let (start, end) = l.period.bounds(now, tz);
        let key = (l.id(), start.timestamp());
        let snap = self.snap.clone();
        self.counters.entry(key.clone()).or_insert_with(|| {
            let mut c = Counter {
                end: end.timestamp(),
                ..Counter::default()
            };
            c.refresh(l, &key, &snap, me);
            c
        });
        (key, end.timestamp())
    }
}

/// One ClickHouse read a refresh needs: an institution's usage in one period, and which
/// of the pending events of that institution are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub institution: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub pending: Vec<String>,
}

/// One counter a request falls under, as a shared store needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Applying {
    pub key: CounterKey,
    pub end: i64,
    pub limit: Arc<Limit>,
    /// What this instance's last refresh read as stored (a starting point for a store
    /// that has not seen the counter yet).
    pub stored: Amounts,
}

/// Every limit's counters on this instance.
#[derive(Debug)]
pub struct Budgets {
    inner: Mutex<Inner>,
    zones: HashMap<String, chrono_tz::Tz>,
    /// This instance's id (the share rule ranks instances by it).
    instance: String,
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

fn take_of(ask: &Ask) -> Amounts {
    Amounts {
        usd: *ask.usd.as_ref().unwrap_or(&Decimal::ZERO),
        requests: 1,
        tokens: ask.tokens,
    }
}

impl Budgets {
    /// `zones`: institutions' time zones (others are UTC); `instance`: this instance's id.
    pub fn new(zones: HashMap<String, chrono_tz::Tz>, instance: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
            zones,
            instance: instance.into(),
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
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

    /// The counters `who` falls under at `now`, for a shared store's decision.
    pub fn applying(&self, who: &Who<'_>, now: DateTime<Utc>) -> Vec<Applying> {
        let tz = self.zone(who.institution);
        let mut inner = self.lock();
        let limits = inner.applying(who);
        limits
            .into_iter()
            .map(|l| {
                let (key, end) = inner.counter(&l, now, tz, &self.instance);
                let stored = inner.counters[&key].stored;
                Applying {
                    key,
                    end,
                    limit: l,
                    stored,
                }
            })
            .collect()
    }

    /// Decides on this instance alone: reserves `ask` against every `block` limit of
    /// `who` within this instance's share, or refuses.
    pub fn admit(self: &Arc<Self>, who: &Who<'_>, ask: &Ask, now: DateTime<Utc>) -> Admission {
        let tz = self.zone(who.institution);
        let mut inner = self.lock();
        let limits = inner.applying(who);
        if limits.is_empty() {
            return Admission::Free;
        }
        let take = take_of(ask);
        let mut keys = Vec::with_capacity(limits.len());
        // What may still be admitted of the tightest USD limit, before this request.
        let mut usd_left: Option<Decimal> = None;
        let mut refused: Option<Blocked> = None;
        for l in &limits {
            let (key, end) = inner.counter(l, now, tz, &self.instance);
            let c = inner.counters.get_mut(&key).expect("created above");
            let left = (l.amount - c.used().of(l.metric)).max(Decimal::ZERO);
            let need = match (l.metric, &ask.usd) {
                (Metric::Usd, Err(_)) => None,
                (m, _) => Some(take.of(m)),
            };
            let may = c.may_admit(l, need.unwrap_or_default());
            c.unit.max_each(&take);
            if l.metric == Metric::Usd {
                usd_left = Some(usd_left.map_or(may, |u| u.min(may)));
            }
            let fits = need.is_some_and(|n| n <= may);
            if !fits && refused.is_none() {
                c.refused += 1;
                c.dirty = true;
                refused = Some(Blocked {
                    limit: l.clone(),
                    remaining: left,
                    instance_may_admit: (may < left).then_some(may),
                    need,
                    renews: DateTime::from_timestamp(end, 0).unwrap_or(now),
                    remaining_usd: None,
                });
            }
            keys.push(key);
        }
        if let Some(mut b) = refused {
            b.remaining_usd = usd_left;
            return Admission::Refused(b);
        }
        let held = self.hold(&mut inner, keys, take, new_reservation_id());
        Admission::Admitted(Reservation {
            budgets: self.clone(),
            held,
            remaining_usd: usd_left.map(|u| (u - take.usd).max(Decimal::ZERO)),
            shared: None,
            done: false,
        })
    }

    /// Mirrors a reservation a shared store made for `applying` (no local check: the
    /// store decided).
    pub fn mirror(
        self: &Arc<Self>,
        applying: &[Applying],
        ask: &Ask,
        id: String,
        remaining_usd: Option<Decimal>,
    ) -> Reservation {
        let take = take_of(ask);
        let mut inner = self.lock();
        for a in applying {
            if let Some(c) = inner.counters.get_mut(&a.key) {
                c.unit.max_each(&take);
            }
        }
        let held = self.hold(
            &mut inner,
            applying.iter().map(|a| a.key.clone()).collect(),
            take,
            id,
        );
        Reservation {
            budgets: self.clone(),
            held,
            remaining_usd,
            shared: None,
            done: false,
        }
    }

    /// Counts a refusal a shared store decided against `key`.
    pub fn note_refused(&self, key: &CounterKey) {
        if let Some(c) = self.lock().counters.get_mut(key) {
            c.refused += 1;
            c.dirty = true;
        }
    }

    fn hold(&self, inner: &mut Inner, keys: Vec<CounterKey>, take: Amounts, id: String) -> HeldRef {
        let mut epochs = Vec::with_capacity(keys.len());
        for key in &keys {
            let c = inner
                .counters
                .get_mut(key)
                .expect("counter of an applying limit");
            c.reserved.add(&take);
            c.since_sync.add(&take);
            c.open += 1;
            c.active = true;
            epochs.push(c.epoch);
        }
        inner.open.insert(
            id.clone(),
            Held {
                id: id.clone(),
                counters: keys.clone(),
                amounts: take,
            },
        );
        HeldRef {
            id,
            keys,
            epochs,
            amounts: take,
        }
    }

    fn finish(&self, held: &HeldRef, event: Option<(&str, Amounts)>) {
        let mut inner = self.lock();
        inner.open.remove(&held.id);
        for (key, epoch) in held.keys.iter().zip(&held.epochs) {
            if let Some(c) = inner.counters.get_mut(key) {
                c.reserved.sub(&held.amounts);
                c.open = c.open.saturating_sub(1);
                if c.epoch == *epoch {
                    // Admitted since the last refresh: what the other instances cannot
                    // see yet is what the request really used, not its reservation.
                    c.since_sync.sub(&held.amounts);
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
        self.plan_set(&LimitSet::new(limits.to_vec()), now, &HashMap::new())
    }

    /// The reads the next refresh needs for `set` at `now`: one per institution and
    /// period, with the pending events of that institution's counters in the period —
    /// this instance's, and `extra` ones by (institution, period start) (those a shared
    /// store holds for every instance).
    pub fn plan_set(
        &self,
        set: &LimitSet,
        now: DateTime<Utc>,
        extra: &HashMap<(String, i64), Vec<String>>,
    ) -> Vec<Read> {
        let mut pending: HashMap<(String, i64), Vec<String>> = extra.clone();
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
        let mut seen = HashSet::new();
        let mut reads = Vec::new();
        for (institution, period) in &set.periods {
            let (start, end) = period.bounds(now, self.zone(institution));
            if !seen.insert((institution.clone(), start, end)) {
                continue;
            }
            let mut ids = pending
                .remove(&(institution.clone(), start.timestamp()))
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
        others: &HashMap<CounterKey, Peers>,
        now: DateTime<Utc>,
    ) {
        self.apply_set(LimitSet::new(limits), reads, others, now)
    }

    /// Installs `set` (every current limit; others are dropped) with the usage read for
    /// `plan_set(set, now)`: stored amounts replaced, stored events no longer pending.
    /// `others`: the other instances' holds by counter (see `Peers`). The usage is
    /// indexed before the lock is taken; under it, only the counters requests use are
    /// updated.
    pub fn apply_set(
        &self,
        set: Arc<LimitSet>,
        reads: &[(Read, Vec<SubjectUsage>)],
        others: &HashMap<CounterKey, Peers>,
        now: DateTime<Utc>,
    ) {
        let mut snap = Snapshot {
            set,
            others: others.clone(),
            ..Snapshot::default()
        };
        for (read, rows) in reads {
            // A group's stored usage is its current members' (as the dashboard counts it).
            let ix = UsageIndex::of_rows_in_groups(
                rows.iter().map(|r| (&r.user_id, &r.api_key_id, r.amounts)),
                |user| snap.set.group_of(&read.institution, user),
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
                    c.refresh(l, key, &snap, &self.instance);
                }
            }
            c.open > 0 || (c.end > now_ts && limit.is_some())
        });
        drop(inner);
        self.ready.store(true, std::sync::atomic::Ordering::Release);
    }

    /// What the last refresh read as stored for `limit` in the period starting at
    /// `start`, and which of `pending` it found stored (for a shared store's base).
    pub fn stored_of(
        &self,
        limit: &Limit,
        start: i64,
        end: i64,
    ) -> Option<(Amounts, HashSet<String>)> {
        let inner = self.lock();
        let ix = inner
            .snap
            .usage
            .get(&(limit.institution_id.clone(), start, end))?;
        let ids = inner
            .snap
            .stored_ids
            .get(&(limit.institution_id.clone(), start))
            .cloned()
            .unwrap_or_default();
        Some((ix.of(limit), ids))
    }

    /// What this instance holds beyond ClickHouse, per limit (for the dashboard and the
    /// other instances): counters that hold something or admitted since the last report,
    /// and once more (as zeros) those that just stopped. Resets the "since the last
    /// report" marks.
    pub fn holds(&self, now: DateTime<Utc>, mode: DecisionMode) -> Vec<Hold> {
        let mut inner = self.lock();
        let snap = inner.snap.clone();
        let mut out = Vec::new();
        for ((id, start), c) in inner.counters.iter_mut() {
            let holds = c.holds_something() || c.active;
            if !snap.set.limits.contains_key(id) || !(holds || c.reported || c.dirty) {
                continue;
            }
            out.push(Hold {
                instance: self.instance.clone(),
                limit_id: id.clone(),
                period_start: *start,
                reserved: c.reserved,
                open: c.open,
                pending: c.pending_sum,
                refused: c.refused,
                reported_at: now.timestamp(),
                active: c.active,
                unit: c.unit,
                cap: c.cap.unwrap_or_default(),
                mode,
            });
            c.reported = holds;
            c.dirty = false;
            c.active = c.open > 0;
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

    /// Everything this instance holds, to give back to a shared store that lost it:
    /// open reservations, pending usage by counter, and each counter's period end.
    #[allow(clippy::type_complexity)]
    pub fn held(
        &self,
    ) -> (
        Vec<Held>,
        Vec<(CounterKey, Vec<(String, Amounts)>)>,
        HashMap<CounterKey, i64>,
    ) {
        let inner = self.lock();
        let open = inner.open.values().cloned().collect();
        let pending = inner
            .counters
            .iter()
            .filter(|(_, c)| !c.pending.is_empty())
            .map(|(k, c)| {
                (
                    k.clone(),
                    c.pending.iter().map(|(id, a)| (id.clone(), *a)).collect(),
                )
            })
            .collect();
        let ends = inner
            .counters
            .iter()
            .map(|(k, c)| (k.clone(), c.end))
            .collect();
        (open, pending, ends)
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

    /// What `who`'s requests and tokens limits leave after the requests just admitted,
    /// tightest first (for `x-ratelimit-*-requests` / `-tokens`).
    pub fn left(&self, who: &Who<'_>, now: DateTime<Utc>) -> (Option<Left>, Option<Left>) {
        let tz = self.zone(who.institution);
        let mut inner = self.lock();
        let limits = inner.applying(who);
        let (mut requests, mut tokens): (Option<Left>, Option<Left>) = (None, None);
        for l in limits {
            if l.metric == Metric::Usd {
                continue;
            }
            let (key, end) = inner.counter(&l, now, tz, &self.instance);
            let c = &inner.counters[&key];
            let left = Left {
                limit: l.amount.try_into().unwrap_or(u64::MAX),
                remaining: (l.amount - c.used().of(l.metric))
                    .max(Decimal::ZERO)
                    .try_into()
                    .unwrap_or(0),
                renews: DateTime::from_timestamp(end, 0).unwrap_or(now),
            };
            let slot = if l.metric == Metric::Requests {
                &mut requests
            } else {
                &mut tokens
            };
            if slot.is_none_or(|s| left.remaining < s.remaining) {
                *slot = Some(left);
            }
        }
        (requests, tokens)
    }

    pub fn limit_count(&self) -> usize {
        self.lock().snap.set.limits.len()
    }
}

fn new_reservation_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A reservation's place in the counters.
#[derive(Debug)]
pub struct HeldRef {
    pub id: String,
    pub keys: Vec<CounterKey>,
    epochs: Vec<u64>,
    pub amounts: Amounts,
}

/// Called when a reservation ends: a shared store gives back what it held (its own
/// bookkeeping runs in the background; the local mirror is already updated).
pub trait OnSettle: Send + Sync + std::fmt::Debug {
    /// `event`: the event id and what the request used; `None`: released unused.
    fn settled(&self, held: &HeldRef, event: Option<(&str, Amounts)>);
}

/// A request's hold on its limits. Settle it with the request's priced usage; dropped
/// unsettled (an error, a cancel, a panic), it is released.
#[derive(Debug)]
pub struct Reservation {
    budgets: Arc<Budgets>,
    held: HeldRef,
    /// What may still be admitted of the tightest USD limit after this reservation.
    pub remaining_usd: Option<Decimal>,
    shared: Option<Arc<dyn OnSettle>>,
    done: bool,
}

impl Reservation {
    /// Tells a shared store when this reservation ends.
    pub fn with_shared(mut self, shared: Arc<dyn OnSettle>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Replaces the reservation by what the request used (kept until ClickHouse has
    /// event `event_id`).
    pub fn settle(mut self, event_id: &str, actual: Amounts) {
        self.done = true;
        self.budgets.finish(&self.held, Some((event_id, actual)));
        if let Some(s) = &self.shared {
            s.settled(&self.held, Some((event_id, actual)));
        }
    }

    pub fn reserved(&self) -> Amounts {
        self.held.amounts
    }

    pub fn id(&self) -> &str {
        &self.held.id
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            self.budgets.finish(&self.held, None);
            if let Some(s) = &self.shared {
                s.settled(&self.held, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::types::LimitPeriod;
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
        b.apply(limits, &reads, &HashMap::new(), now());
    }

    #[test]
    fn reserve_settle_release() {
        let b = Budgets::new(HashMap::new(), "gw-a");
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
    fn a_groups_budget_is_shared_by_its_members_and_by_no_one_else() {
        let b = Budgets::new(HashMap::new(), "gw-a");
        let membership: HashMap<(String, String), String> = [
            ("alice", "students"),
            ("bob", "students"),
            ("carol", "staff"),
        ]
        .into_iter()
        .map(|(u, g)| (("uni-a".to_owned(), u.to_owned()), g.to_owned()))
        .collect();
        let set = LimitSet::with_groups(
            vec![limit(
                LimitScope::Group,
                "students",
                Metric::Usd,
                dec!(1.00),
            )],
            membership,
        );
        // Alice has already spent $0.30 this month (stored).
        let reads: Vec<(Read, Vec<SubjectUsage>)> = b
            .plan_set(&set, now(), &HashMap::new())
            .into_iter()
            .map(|r| {
                let rows = vec![SubjectUsage {
                    user_id: "alice".into(),
                    api_key_id: "ka".into(),
                    amounts: Amounts {
                        usd: dec!(0.30),
                        requests: 3,
                        tokens: 300,
                    },
                    stored: vec!["e0".into()],
                }];
                (r, rows)
            })
            .collect();
        b.apply_set(set, &reads, &HashMap::new(), now());
        let member = |user: &'static str, key: &'static str| Who {
            institution: "uni-a",
            user,
            key,
        };
        // Bob's request fits what Alice left: $0.70.
        let Admission::Admitted(held) = b.admit(&member("bob", "kb"), &usd(dec!(0.60)), now())
        else {
            panic!("bob's first request fits the group's budget")
        };
        assert_eq!(held.remaining_usd, Some(dec!(0.10)));
        // Alice now meets Bob's reservation: $0.10 left, her $0.20 does not fit.
        let Admission::Refused(x) = b.admit(&member("alice", "ka"), &usd(dec!(0.20)), now()) else {
            panic!("the group's budget is shared")
        };
        assert_eq!((x.remaining, x.need), (dec!(0.10), Some(dec!(0.20))));
        let msg = x.message(chrono_tz::UTC);
        assert!(msg.contains("group students"), "{msg}");
        // Carol is in another group; someone in no group is not limited either.
        assert!(matches!(
            b.admit(&member("carol", "kc"), &usd(dec!(5)), now()),
            Admission::Free
        ));
        assert!(matches!(
            b.admit(&member("dave", "kd"), &usd(dec!(5)), now()),
            Admission::Free
        ));
        // Bob's request settles at $0.05: Alice's $0.20 fits again ($0.65 left).
        held.settle(
            "e1",
            Amounts {
                usd: dec!(0.05),
                requests: 1,
                tokens: 80,
            },
        );
        assert!(matches!(
            b.admit(&member("alice", "ka"), &usd(dec!(0.20)), now()),
            Admission::Admitted(_)
        ));
    }

    #[test]
    fn other_subjects_and_alert_limits_do_not_block() {
        let b = Budgets::new(HashMap::new(), "gw-a");
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
        let b = Budgets::new(HashMap::new(), "gw-a");
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
                amounts: Amounts {
                    usd: dec!(0.3),
                    requests: 1,
                    tokens: 10,
                },
                stored: vec!["e1".into()],
            },
            SubjectUsage {
                user_id: "alice".into(),
                api_key_id: "k9".into(),
                amounts: Amounts {
                    usd: dec!(0.2),
                    requests: 1,
                    tokens: 10,
                },
                stored: vec![],
            },
            SubjectUsage {
                user_id: "bob".into(),
                api_key_id: "k2".into(),
                amounts: Amounts {
                    usd: dec!(7),
                    requests: 1,
                    tokens: 10,
                },
                stored: vec![],
            },
        ];
        b.apply(
            limits.clone(),
            &[(reads[0].clone(), rows)],
            &HashMap::new(),
            now(),
        );
        assert_eq!(b.used(id, now()).unwrap().usd, dec!(0.5));
        // Another instance holds 0.25: counted too.
        let start = reads[0].start.timestamp();
        let others = HashMap::from([((id.to_string(), start), peers(dec!(0.25), &[]))]);
        b.apply(
            limits.clone(),
            &[(b.plan(&limits, now())[0].clone(), vec![])],
            &others,
            now(),
        );
        assert_eq!(b.used(id, now()).unwrap().usd, dec!(0.25));
        // A limit removed: its counter goes.
        b.apply(vec![], &[], &HashMap::new(), now());
        assert_eq!(b.used(id, now()), None);
    }

    fn peers(usd: Decimal, active: &[&str]) -> Peers {
        Peers {
            holds: Amounts {
                usd,
                requests: 0,
                tokens: 0,
            },
            active: active.iter().map(|s| s.to_string()).collect(),
            unit: Amounts::default(),
            caps: Decimal::ZERO,
        }
    }

    fn refresh_with(b: &Budgets, limits: &[Limit], others: HashMap<CounterKey, Peers>) {
        let reads: Vec<_> = b
            .plan(limits, now())
            .into_iter()
            .map(|r| (r, vec![]))
            .collect();
        b.apply(limits.to_vec(), &reads, &others, now());
    }

    #[test]
    fn with_another_active_instance_each_spends_its_share_between_refreshes() {
        let b = Budgets::new(HashMap::new(), "gw-a");
        let limits = vec![limit(LimitScope::Key, "k1", Metric::Usd, dec!(1))];
        let key = (
            "uni-a:key:k1:usd:month".to_string(),
            b.plan(&limits, now())[0].start.timestamp(),
        );
        refresh_with(
            &b,
            &limits,
            HashMap::from([(key.clone(), peers(dec!(0), &["gw-b"]))]),
        );
        let mut held = Vec::new();
        for _ in 0..5 {
            let Admission::Admitted(r) = b.admit(&who(), &usd(dec!(0.1)), now()) else {
                panic!()
            };
            held.push(r);
        }
        // 0.5 admitted since the refresh: the other half is the other instance's, and
        // the refusal says so instead of contradicting itself.
        let Admission::Refused(x) = b.admit(&who(), &usd(dec!(0.1)), now()) else {
            panic!()
        };
        assert_eq!(
            (x.remaining, x.instance_may_admit),
            (dec!(0.5), Some(dec!(0)))
        );
        let msg = x.message(chrono_tz::UTC);
        assert!(
            msg.contains(
                "Left this period: $0.5, of which this gateway instance may admit $0 until"
            ),
            "{msg}"
        );
        assert_eq!(x.remaining_usd, Some(dec!(0)));
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
        refresh_with(
            &b,
            &limits,
            HashMap::from([(key.clone(), peers(dec!(0.3), &["gw-b"]))]),
        );
        let Admission::Admitted(_r) = b.admit(&who(), &usd(dec!(0.1)), now()) else {
            panic!()
        };
        assert!(matches!(
            b.admit(&who(), &usd(dec!(0.01)), now()),
            Admission::Refused(_)
        ));
    }

    #[test]
    fn an_idle_instance_does_not_shrink_the_share() {
        let b = Budgets::new(HashMap::new(), "gw-b");
        let limits = vec![limit(LimitScope::Key, "k1", Metric::Usd, dec!(1))];
        let key = (
            "uni-a:key:k1:usd:month".to_string(),
            b.plan(&limits, now())[0].start.timestamp(),
        );
        // gw-a is live (it reported a row) but admitted nothing under this limit.
        refresh_with(&b, &limits, HashMap::from([(key, peers(dec!(0), &[]))]));
        let mut held = Vec::new();
        while let Admission::Admitted(r) = b.admit(&who(), &usd(dec!(0.1)), now()) {
            held.push(r);
        }
        assert_eq!(held.len(), 10, "the busy instance admits as if alone");
    }

    #[test]
    fn the_end_of_a_budget_can_be_spent_with_two_instances() {
        // $0.03 left, requests of up to $0.0162: halves ($0.015) would fit none. The
        // first instance by id gets it all; the other says what it may admit and why.
        let limits = vec![limit(LimitScope::Key, "k1", Metric::Usd, dec!(0.03))];
        for (me, other, admitted) in [("gw-a", "gw-b", true), ("gw-b", "gw-a", false)] {
            let b = Budgets::new(HashMap::new(), me);
            let key = (
                "uni-a:key:k1:usd:month".to_string(),
                b.plan(&limits, now())[0].start.timestamp(),
            );
            refresh_with(
                &b,
                &limits,
                HashMap::from([(key, peers(dec!(0), &[other]))]),
            );
            match b.admit(&who(), &usd(dec!(0.0162)), now()) {
                Admission::Admitted(_) => assert!(admitted, "{me}"),
                Admission::Refused(x) => {
                    assert!(!admitted, "{me}");
                    assert_eq!(x.instance_may_admit, Some(dec!(0)));
                    assert_eq!(x.remaining_usd, Some(dec!(0)));
                }
                Admission::Free => panic!(),
            }
        }
    }

    #[test]
    fn periods_roll_over() {
        let b = Budgets::new(
            HashMap::from([("uni-a".to_string(), "Europe/Oslo".parse().unwrap())]),
            "gw-a",
        );
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
        let b = Budgets::new(HashMap::new(), "gw-a");
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
            let b = Budgets::new(HashMap::new(), "gw-a");
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
