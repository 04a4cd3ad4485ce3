//! Limits exact across gateway instances: every instance decides through one atomic
//! store (Redis or Valkey, one primary), so `stored + pending + every instance's open
//! reservations + this request ≤ limit` is checked and reserved in one step.
//!
//! The store holds only what is in flight, in integer units (micro-dollars, requests,
//! tokens; never floats):
//! - per counter (one limit in one period) a hash: the stored base `s_*` (what
//!   ClickHouse held at the read stamped `s_at`), the open reservations `r:{id}` and the
//!   priced-but-not-yet-stored events `p:{event id}` with their totals `r_*` and `p_*`,
//!   and a sorted set of their deadlines (renewed by the instance that holds them, so a
//!   crashed instance's entries expire);
//! - per key with rpm/tpm a hash of one-second buckets (`q{second}`, `t{second}`);
//! - a set of the counters in use, an epoch (a new one means the store lost its state)
//!   and a leader lease.
//!
//! ClickHouse stays the truth for stored usage. One instance at a time (the leader)
//! writes the stored bases: it reads the counters' pending ids, then the usage sums and
//! which of those ids are stored (one query), and replaces the base and drops those ids
//! in one atomic step. Its reads follow each other in time, so a newer base always holds
//! everything an older one held; a base from an older read (`s_at`) is never installed
//! over a newer one. An event therefore counts once: pending until a base holds it.
//!
//! Amounts are rounded up to the micro-dollar (limits down), so the store errs towards
//! refusing by at most a micro-dollar per event. Lua numbers are doubles: every amount
//! stays below 2^53 (about $9 billion in micro-dollars); amounts are written to
//! `HINCRBY` as the decimal strings they arrived as, never re-formatted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

use super::budget::{Applying, Budgets, CounterKey, HeldRef, OnSettle};
use super::types::{Amounts, DecisionMode, Limit, Metric};

/// Settings of the shared store (`[gateway.shared_limits]`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    /// Prefix of every key (several deployments can share one server).
    pub namespace: String,
    /// Longest wait for one call before the instance falls back to shares.
    pub timeout: Duration,
    /// A reservation (or not-yet-stored event) not renewed by its instance for this
    /// long is dropped (its instance is gone).
    pub reservation_ttl: Duration,
    pub pending_ttl: Duration,
    /// The leader's lease.
    pub leader_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("the shared limit store is not connected")]
    NotConnected,
    #[error("the shared limit store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("shared limit store: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("shared limit store answered something unexpected: {0}")]
    Reply(String),
}

/// A key's requests/tokens per minute as the store counted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateCount {
    pub requests: u64,
    pub tokens: u64,
    /// Seconds (unix) of the oldest counted request and tokens.
    pub oldest_request: u64,
    pub oldest_tokens: u64,
}

/// What the store decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Reserved in every counter; what each counter has left after it (integer units),
    /// and the key's window after counting this request.
    Admitted { left: Vec<i64>, rate: RateCount },
    /// Over the key's rpm (`requests`) or tpm (`tokens`).
    RateLimited { what: &'static str, rate: RateCount },
    /// Counter `index` (0-based) has `left` (integer units) — less than the request needs.
    Refused { index: usize, left: i64 },
}

/// A key's per-minute limits, for one decision.
#[derive(Debug, Clone, Copy)]
pub struct Rate<'a> {
    pub key_id: &'a str,
    pub rpm: u32,
    pub tpm: u64,
}

const MICRO: i64 = 1_000_000;

/// USD in micro-dollars, rounded up (what is used or held).
pub fn micros_up(usd: Decimal) -> i64 {
    (usd * Decimal::from(MICRO))
        .ceil()
        .to_i64()
        .unwrap_or(i64::MAX)
}

/// An amount in the store's integer units: micro-dollars (rounded up), requests, tokens.
pub fn units(a: &Amounts) -> (i64, i64, i64) {
    (
        micros_up(a.usd).max(0),
        i64::try_from(a.requests).unwrap_or(i64::MAX),
        i64::try_from(a.tokens).unwrap_or(i64::MAX),
    )
}

/// A limit's amount in integer units (micro-dollars rounded down).
pub fn limit_units(l: &Limit) -> i64 {
    match l.metric {
        Metric::Usd => (l.amount * Decimal::from(MICRO))
            .floor()
            .to_i64()
            .unwrap_or(i64::MAX),
        _ => l.amount.floor().to_i64().unwrap_or(i64::MAX),
    }
}

/// Integer units back to the limit's metric.
pub fn from_units(metric: Metric, n: i64) -> Decimal {
    match metric {
        Metric::Usd => Decimal::new(n, 6),
        _ => Decimal::from(n),
    }
}

fn metric_code(m: Metric) -> &'static str {
    match m {
        Metric::Usd => "u",
        Metric::Requests => "r",
        Metric::Tokens => "t",
    }
}

/// A counter's id in the set of counters in use: `{limit id}|{start}|{end}`.
pub fn counter_id(key: &CounterKey, end: i64) -> String {
    format!("{}|{}|{}", key.0, key.1, end)
}

/// The counter key and period end of a counter id.
pub fn parse_counter_id(id: &str) -> Option<(CounterKey, i64)> {
    let (rest, end) = id.rsplit_once('|')?;
    let (limit, start) = rest.rsplit_once('|')?;
    Some(((limit.to_owned(), start.parse().ok()?), end.parse().ok()?))
}

/// Subtracts an entry ("usd req tok") from the totals with prefix `p` of hash `h`.
const LUA_PRELUDE: &str = r#"
local function neg(a) if a == '0' then return '0' end return '-' .. a end
local function drop(h, z, m)
  local v = redis.call('HGET', h, m)
  if v then
    local a, b, c = string.match(v, '^(%d+) (%d+) (%d+)$')
    local p = string.sub(m, 1, 1)
    redis.call('HINCRBY', h, p .. '_usd', neg(a))
    redis.call('HINCRBY', h, p .. '_req', neg(b))
    redis.call('HINCRBY', h, p .. '_tok', neg(c))
    redis.call('HDEL', h, m)
  end
  redis.call('ZREM', z, m)
end
local function add(h, z, m, a, b, c, deadline)
  redis.call('HSET', h, m, a .. ' ' .. b .. ' ' .. c)
  local p = string.sub(m, 1, 1)
  redis.call('HINCRBY', h, p .. '_usd', a)
  redis.call('HINCRBY', h, p .. '_req', b)
  redis.call('HINCRBY', h, p .. '_tok', c)
  redis.call('ZADD', z, deadline, m)
end
"#;

/// KEYS: the key's rate window, then per counter its hash and deadlines, then the set of
/// counters in use. ARGV: now (ms), reservation id, deadline (ms), take (usd micros,
/// requests, tokens), rpm, tpm, now (s), counters n, then per counter: metric, limit,
/// base (usd, requests, tokens) to start from if the counter is new, its id.
const ADMIT: &str = r#"
local now = tonumber(ARGV[1])
local res, deadline = ARGV[2], tonumber(ARGV[3])
local take = {u = tonumber(ARGV[4]), r = tonumber(ARGV[5]), t = tonumber(ARGV[6])}
local rpm, tpm, sec, n = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local F = {u = 'usd', r = 'req', t = 'tok'}
local rq, rt, oq, ot = 0, 0, sec, sec
if rpm > 0 or tpm > 0 then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local f, v = all[i], tonumber(all[i + 1])
    local s = tonumber(string.sub(f, 2))
    if s <= sec - 60 then
      redis.call('HDEL', KEYS[1], f)
    elseif string.sub(f, 1, 1) == 'q' then
      rq = rq + v
      if s < oq then oq = s end
    else
      rt = rt + v
      if s < ot then ot = s end
    end
  end
  if rpm > 0 and rq >= rpm then return {'rate', 'requests', rq, rt, oq, ot} end
  if tpm > 0 and rt >= tpm then return {'rate', 'tokens', rq, rt, oq, ot} end
end
local lefts = {}
for i = 1, n do
  local h, z = KEYS[2 * i], KEYS[2 * i + 1]
  local b = 10 + (i - 1) * 6
  local m, lim = ARGV[b + 1], tonumber(ARGV[b + 2])
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', '(' .. now)) do drop(h, z, old) end
  if redis.call('HEXISTS', h, 's_at') == 0 then
    redis.call('HSET', h, 's_usd', ARGV[b + 3], 's_req', ARGV[b + 4], 's_tok', ARGV[b + 5], 's_at', '0')
  end
  local f = F[m]
  local v = redis.call('HMGET', h, 's_' .. f, 'p_' .. f, 'r_' .. f)
  local used = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) + (tonumber(v[3]) or 0)
  if used + take[m] > lim then
    local left = lim - used
    if left < 0 then left = 0 end
    return {'limit', i, left}
  end
  lefts[i] = lim - used - take[m]
end
for i = 1, n do
  add(KEYS[2 * i], KEYS[2 * i + 1], 'r:' .. res, ARGV[4], ARGV[5], ARGV[6], deadline)
  redis.call('SADD', KEYS[2 * n + 2], ARGV[10 + i * 6])
end
if rpm > 0 or tpm > 0 then
  redis.call('HINCRBY', KEYS[1], 'q' .. sec, 1)
  redis.call('EXPIRE', KEYS[1], 120)
  rq = rq + 1
end
local out = {'ok', rq, rt, oq, ot}
for i = 1, n do out[5 + i] = lefts[i] end
return out
"#;

/// KEYS: per counter its hash and deadlines, then the set of counters in use. ARGV:
/// reservation id, event id ('' to release), used (usd micros, requests, tokens),
/// deadline (ms) of the pending entry, counters n, their ids.
const SETTLE: &str = r#"
local res, ev, n = ARGV[1], ARGV[2], tonumber(ARGV[7])
local nonzero = ARGV[3] ~= '0' or ARGV[4] ~= '0' or ARGV[5] ~= '0'
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  drop(h, z, 'r:' .. res)
  if ev ~= '' and nonzero then
    drop(h, z, 'p:' .. ev)
    add(h, z, 'p:' .. ev, ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]))
    redis.call('SADD', KEYS[2 * n + 1], ARGV[7 + i])
  end
end
return 1
"#;

/// KEYS: one counter's hash, deadlines, the set of counters in use. ARGV: its id, then
/// entries of five: member (`r:{id}` / `p:{id}`), usd, requests, tokens, deadline. Adds
/// the entries the store does not hold (after it lost its state or was unreachable).
const REPUSH: &str = r#"
redis.call('SADD', KEYS[3], ARGV[1])
for i = 2, #ARGV, 5 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then
    add(KEYS[1], KEYS[2], ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], tonumber(ARGV[i + 4]))
  end
end
return 1
"#;

/// KEYS: one counter's hash, deadlines, the leader lease. ARGV: the leader, the read's
/// stamp, the stored base (usd micros, requests, tokens), then the pending event ids
/// that read found stored. Only the lease holder writes; an older read never replaces a
/// newer base.
const APPLY: &str = r#"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
local at = tonumber(redis.call('HGET', KEYS[1], 's_at') or '-1')
if tonumber(ARGV[2]) > at then
  redis.call('HSET', KEYS[1], 's_usd', ARGV[3], 's_req', ARGV[4], 's_tok', ARGV[5], 's_at', ARGV[2])
end
for i = 6, #ARGV do drop(KEYS[1], KEYS[2], 'p:' .. ARGV[i]) end
return 1
"#;

/// KEYS: the lease. ARGV: the candidate, ttl (ms). 1 if the candidate holds it now.
const LEAD: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// A key's spend per minute from every gateway (`gateway::spend_watch`): KEYS[i] the
/// key's hash (field: the minute's unix seconds; value: micro-dollars); ARGV[1] the
/// oldest minute kept, ARGV[2] the hash's lifetime in seconds, then per key the minute
/// and what this instance adds to it (0: only read). Returns per key its fields, older
/// ones dropped.
const SPEND: &str = r#"
local oldest = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  local m = ARGV[2 * i + 1]
  local d = tonumber(ARGV[2 * i + 2])
  if d ~= 0 then redis.call('HINCRBY', k, m, d) end
  redis.call('EXPIRE', k, ARGV[2])
  local all = redis.call('HGETALL', k)
  local row = {}
  for j = 1, #all, 2 do
    if tonumber(all[j]) < oldest then
      redis.call('HDEL', k, all[j])
    else
      row[#row + 1] = all[j]
      row[#row + 1] = all[j + 1]
    end
  end
  out[i] = row
end
return out
"#;

/// Keys per call of `SPEND` (each reads up to 360 fields): calls stay short beside the
/// limits' own.
const SPEND_BATCH: usize = 200;

struct Scripts {
    spend: redis::Script,
    admit: redis::Script,
    settle: redis::Script,
    repush: redis::Script,
    apply: redis::Script,
    lead: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let with = |body: &str| redis::Script::new(&format!("{LUA_PRELUDE}{body}"));
        Self {
            spend: redis::Script::new(SPEND),
            admit: with(ADMIT),
            settle: with(SETTLE),
            repush: with(REPUSH),
            apply: with(APPLY),
            lead: redis::Script::new(LEAD),
        }
    }
}

/// The shared store, as one gateway instance uses it.
pub struct SharedStore {
    settings: Settings,
    client: redis::Client,
    conn: tokio::sync::RwLock<Option<redis::aio::ConnectionManager>>,
    scripts: Scripts,
    up: AtomicBool,
    /// A call failed since the store last got back what this instance holds.
    lost: AtomicBool,
    /// The store's epoch as this instance last saw it.
    epoch: Mutex<Option<String>>,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("namespace", &self.settings.namespace)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SharedStore {
    /// The store at `settings.url` (connected on first use: a gateway starts even while
    /// the store is down, and decides by shares until it answers).
    pub fn new(settings: Settings) -> Result<Arc<Self>, SharedError> {
        let client = redis::Client::open(settings.url.as_str())?;
        Ok(Arc::new(Self {
            settings,
            client,
            conn: tokio::sync::RwLock::new(None),
            scripts: Scripts::new(),
            up: AtomicBool::new(false),
            lost: AtomicBool::new(true),
            epoch: Mutex::new(None),
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// How this instance decides now.
    pub fn mode(&self) -> DecisionMode {
        if self.is_up() {
            DecisionMode::Exact
        } else {
            DecisionMode::Fallback
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.settings.namespace.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    fn counter_keys(&self, key: &CounterKey) -> (String, String) {
        let start = key.1.to_string();
        (
            self.key(&["c", &key.0, &start]),
            self.key(&["z", &key.0, &start]),
        )
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, SharedError> {
        if let Some(c) = self.conn.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut slot = self.conn.write().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.settings.timeout))
            .set_response_timeout(Some(self.settings.timeout))
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            self.settings.timeout * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| SharedError::Timeout(self.settings.timeout * 2))??;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `call` with a connection, within the timeout; a failure marks the store down.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, SharedError>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        let result = self.run_beside(call).await;
        if let Err(e) = &result {
            self.down(e);
        }
        result
    }

    /// Runs `call` like `run`, but a failure does not mark the store down: for work
    /// beside the limits (the spend watch's exchange), whose slowness must not send the
    /// limits to fallback.
    async fn run_beside<T, F, Fut>(&self, call: F) -> Result<T, SharedError>
    where
        F: FnOnce(redis::aio::ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        let conn = self.connection().await?;
        tokio::time::timeout(self.settings.timeout, call(conn))
            .await
            .map_err(|_| SharedError::Timeout(self.settings.timeout))?
            .map_err(SharedError::from)
    }

    fn down(&self, e: &SharedError) {
        self.lost.store(true, Ordering::Release);
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, "the shared limit store is unreachable: limits are enforced by shares of the headroom until it is back");
        }
    }

    /// Decides one request: the key's rate window and every counter it falls under, in
    /// one atomic step; reserves `take` in every counter if it fits.
    pub async fn admit(
        &self,
        applying: &[Applying],
        take: &Amounts,
        reservation: &str,
        rate: Option<Rate<'_>>,
        now: DateTime<Utc>,
    ) -> Result<Decision, SharedError> {
        let now_ms = now.timestamp_millis();
        let deadline = now_ms + self.settings.reservation_ttl.as_millis() as i64;
        let (tu, tr, tt) = units(take);
        let rate_key = self.key(&["rate", rate.map_or("-", |r| r.key_id)]);
        let mut inv = self.scripts.admit.key(&rate_key);
        for a in applying {
            let (h, z) = self.counter_keys(&a.key);
            inv.key(h).key(z);
        }
        inv.key(self.key(&["active"]));
        inv.arg(now_ms)
            .arg(reservation)
            .arg(deadline)
            .arg(tu)
            .arg(tr)
            .arg(tt)
            .arg(rate.map_or(0, |r| r.rpm))
            .arg(rate.map_or(0, |r| r.tpm))
            .arg(now.timestamp())
            .arg(applying.len());
        for a in applying {
            let (bu, br, bt) = units(&a.stored);
            inv.arg(metric_code(a.limit.metric))
                .arg(limit_units(&a.limit))
                .arg(bu)
                .arg(br)
                .arg(bt)
                .arg(counter_id(&a.key, a.end));
        }
        let reply: Vec<redis::Value> = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        self.up.store(true, Ordering::Release);
        parse_decision(&reply)
    }

    /// Gives back a reservation, replacing it by the event's usage (`None`: released).
    pub async fn settle(
        &self,
        id: &str,
        keys: &[CounterKey],
        ends: &[i64],
        event: Option<(&str, Amounts)>,
        now: DateTime<Utc>,
    ) -> Result<(), SharedError> {
        let deadline = now.timestamp_millis() + self.settings.pending_ttl.as_millis() as i64;
        let (eu, er, et) = event.map(|(_, a)| units(&a)).unwrap_or((0, 0, 0));
        let mut inv = self.scripts.settle.prepare_invoke();
        for key in keys {
            let (h, z) = self.counter_keys(key);
            inv.key(h).key(z);
        }
        inv.key(self.key(&["active"]));
        inv.arg(id)
            .arg(event.map_or("", |(id, _)| id))
            .arg(eu)
            .arg(er)
            .arg(et)
            .arg(deadline)
            .arg(keys.len());
        for (key, end) in keys.iter().zip(ends) {
            inv.arg(counter_id(key, *end));
        }
        let _: i64 = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// Adds a finished request's tokens to its key's window.
    pub async fn add_tokens(
        &self,
        key_id: &str,
        tokens: u64,
        now: DateTime<Utc>,
    ) -> Result<(), SharedError> {
        let k = self.key(&["rate", key_id]);
        let field = format!("t{}", now.timestamp());
        let _: () = self
            .run(|mut c| async move {
                redis::pipe()
                    .hincr(&k, field, tokens)
                    .ignore()
                    .expire(&k, 120)
                    .ignore()
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    /// Adds this instance's spend — (key id, minute start in unix seconds,
    /// micro-dollars; 0 to only read) — and returns each key's spend per minute from
    /// every instance, minutes before `oldest` dropped: one script call per
    /// `SPEND_BATCH` keys. A failure here leaves the limits' mode alone.
    pub async fn spend_minutes(
        &self,
        adds: &[(String, i64, i64)],
        oldest: i64,
        ttl: Duration,
    ) -> Result<Vec<(String, Vec<(i64, i64)>)>, SharedError> {
        let mut out = Vec::with_capacity(adds.len());
        for batch in adds.chunks(SPEND_BATCH) {
            out.extend(self.spend_batch(batch, oldest, ttl).await?);
        }
        Ok(out)
    }

    async fn spend_batch(
        &self,
        adds: &[(String, i64, i64)],
        oldest: i64,
        ttl: Duration,
    ) -> Result<Vec<(String, Vec<(i64, i64)>)>, SharedError> {
        let mut inv = self.scripts.spend.prepare_invoke();
        for (key_id, _, _) in adds {
            inv.key(self.key(&["spend", key_id]));
        }
        inv.arg(oldest).arg(ttl.as_secs().max(1));
        for (_, minute, micros) in adds {
            inv.arg(*minute).arg(*micros);
        }
        let reply: Vec<Vec<i64>> = self
            .run_beside(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        if reply.len() != adds.len() {
            return Err(SharedError::Reply(format!(
                "{} spend rows for {} keys",
                reply.len(),
                adds.len()
            )));
        }
        Ok(adds
            .iter()
            .zip(reply)
            .map(|((key_id, _, _), row)| {
                let minutes = row.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                (key_id.clone(), minutes)
            })
            .collect())
    }

    /// Takes `name` for `ttl` if nobody holds it (`SET NX`): whether this call took it.
    /// Several gateways raising one incident claim it here, and one of them raises it.
    pub async fn claim(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, SharedError> {
        let k = self.key(&["claim", name]);
        let ms = ttl.as_millis().max(1) as u64;
        let holder = holder.to_owned();
        let taken: Option<String> = self
            .run(|mut c| async move {
                redis::cmd("SET")
                    .arg(&k)
                    .arg(holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(taken.is_some())
    }

    /// The store's clock in milliseconds (stamps a read that is about to start).
    pub async fn time_ms(&self) -> Result<i64, SharedError> {
        let (s, us): (i64, i64) = self
            .run(|mut c| async move { redis::cmd("TIME").query_async(&mut c).await })
            .await?;
        Ok(s * 1000 + us / 1000)
    }

    /// Takes or renews the leader's lease; whether this instance holds it.
    pub async fn lead(&self, me: &str) -> Result<bool, SharedError> {
        let inv = {
            let mut i = self.scripts.lead.key(self.key(&["leader"]));
            i.arg(me).arg(self.settings.leader_ttl.as_millis() as u64);
            i
        };
        let held: i64 = self
            .run(|mut c| async move { inv.invoke_async(&mut c).await })
            .await?;
        Ok(held == 1)
    }

    /// The counters in use, with the pending event ids each holds.
    pub async fn in_use(&self) -> Result<Vec<(CounterKey, i64, Vec<String>)>, SharedError> {
        let active = self.key(&["active"]);
        let ids: Vec<String> = self
            .run(
                |mut c| async move { redis::cmd("SMEMBERS").arg(active).query_async(&mut c).await },
            )
            .await?;
        let counters: Vec<(CounterKey, i64)> =
            ids.iter().filter_map(|i| parse_counter_id(i)).collect();
        if counters.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (key, _) in &counters {
            pipe.hkeys(self.counter_keys(key).0);
        }
        let fields: Vec<Vec<String>> = self
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(counters
            .into_iter()
            .zip(fields)
            .map(|((key, end), f)| {
                let pending = f
                    .into_iter()
                    .filter_map(|f| f.strip_prefix("p:").map(str::to_owned))
                    .collect();
                (key, end, pending)
            })
            .collect())
    }

    /// Writes stored bases as the leader `me`: per counter, the base a read stamped
    /// `stamp` found and the pending ids it found stored.
    pub async fn apply(
        &self,
        me: &str,
        stamp: i64,
        bases: Vec<(CounterKey, Amounts, Vec<String>)>,
    ) -> Result<(), SharedError> {
        if bases.is_empty() {
            return Ok(());
        }
        let leader = self.key(&["leader"]);
        let mut pipe = redis::pipe();
        for (key, base, ids) in &bases {
            let (h, z) = self.counter_keys(key);
            let (u, r, t) = units(base);
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.scripts.apply.get_hash())
                .arg(3)
                .arg(h)
                .arg(z)
                .arg(&leader);
            cmd.arg(me).arg(stamp).arg(u).arg(r).arg(t);
            for id in ids {
                cmd.arg(id);
            }
            pipe.add_command(cmd).ignore();
        }
        self.load(&self.scripts.apply).await?;
        let _: () = self
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// Forgets counters of ended periods and of limits no longer in force.
    pub async fn forget(&self, counters: &[(CounterKey, i64)]) -> Result<(), SharedError> {
        if counters.is_empty() {
            return Ok(());
        }
        let active = self.key(&["active"]);
        let mut pipe = redis::pipe();
        for (key, end) in counters {
            let (h, z) = self.counter_keys(key);
            pipe.del(h).ignore().del(z).ignore();
            pipe.srem(&active, counter_id(key, *end)).ignore();
        }
        let _: () = self
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn load(&self, script: &redis::Script) -> Result<(), SharedError> {
        let inv = script.prepare_invoke();
        let _: String = self
            .run(|mut c| async move { inv.load_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// Keeps what this instance holds alive in the store (renews its deadlines) and,
    /// after the store lost its state (a new epoch) or was unreachable, gives it back.
    /// `ends`: each counter's period end.
    pub async fn sync(
        &self,
        budgets: &Budgets,
        ends: &HashMap<CounterKey, i64>,
        now: DateTime<Utc>,
    ) -> Result<(), SharedError> {
        let epoch_key = self.key(&["epoch"]);
        let fresh = uuid::Uuid::new_v4().simple().to_string();
        let epoch: String = self
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("SET")
                    .arg(&epoch_key)
                    .arg(&fresh)
                    .arg("NX")
                    .ignore()
                    .get(&epoch_key)
                    .query_async::<(String,)>(&mut c)
                    .await
                    .map(|(e,)| e)
            })
            .await?;
        let changed = {
            let mut seen = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
            let changed = seen.as_deref().is_some_and(|s| s != epoch);
            *seen = Some(epoch);
            changed
        };
        let (open, pending, _) = budgets.held();
        let now_ms = now.timestamp_millis();
        let r_deadline = now_ms + self.settings.reservation_ttl.as_millis() as i64;
        let p_deadline = now_ms + self.settings.pending_ttl.as_millis() as i64;
        // Entries by counter: (member, amounts, deadline).
        let mut by_counter: HashMap<CounterKey, Vec<(String, Amounts, i64)>> = HashMap::new();
        for h in &open {
            for key in &h.counters {
                by_counter.entry(key.clone()).or_default().push((
                    format!("r:{}", h.id),
                    h.amounts,
                    r_deadline,
                ));
            }
        }
        for (key, entries) in pending {
            for (id, a) in entries {
                by_counter
                    .entry(key.clone())
                    .or_default()
                    .push((format!("p:{id}"), a, p_deadline));
            }
        }
        let repush = changed || self.lost.load(Ordering::Acquire);
        if changed {
            tracing::warn!("the shared limit store lost its state (new epoch): giving back this instance's reservations and pending usage");
        }
        if by_counter.is_empty() {
            self.lost.store(false, Ordering::Release);
            self.up.store(true, Ordering::Release);
            return Ok(());
        }
        let active = self.key(&["active"]);
        let mut pipe = redis::pipe();
        if repush {
            self.load(&self.scripts.repush).await?;
        }
        for (key, entries) in &by_counter {
            let (h, z) = self.counter_keys(key);
            if repush {
                let Some(end) = ends.get(key) else { continue };
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.scripts.repush.get_hash())
                    .arg(3)
                    .arg(&h)
                    .arg(&z)
                    .arg(&active);
                cmd.arg(counter_id(key, *end));
                for (m, a, d) in entries {
                    let (u, r, t) = units(a);
                    cmd.arg(m).arg(u).arg(r).arg(t).arg(*d);
                }
                pipe.add_command(cmd).ignore();
            } else {
                for (m, _, d) in entries {
                    pipe.cmd("ZADD").arg(&z).arg("XX").arg(*d).arg(m).ignore();
                }
            }
        }
        let _: () = self
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        self.lost.store(false, Ordering::Release);
        self.up.store(true, Ordering::Release);
        Ok(())
    }
}

fn parse_decision(reply: &[redis::Value]) -> Result<Decision, SharedError> {
    use redis::Value as V;
    let int = |i: usize| -> Result<i64, SharedError> {
        match reply.get(i) {
            Some(V::Int(n)) => Ok(*n),
            other => Err(SharedError::Reply(format!("item {i}: {other:?}"))),
        }
    };
    let text = |i: usize| -> Result<String, SharedError> {
        match reply.get(i) {
            Some(V::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
            Some(V::SimpleString(s)) => Ok(s.clone()),
            other => Err(SharedError::Reply(format!("item {i}: {other:?}"))),
        }
    };
    let rate = |from: usize| -> Result<RateCount, SharedError> {
        Ok(RateCount {
            requests: int(from)?.max(0) as u64,
            tokens: int(from + 1)?.max(0) as u64,
            oldest_request: int(from + 2)?.max(0) as u64,
            oldest_tokens: int(from + 3)?.max(0) as u64,
        })
    };
    match text(0)?.as_str() {
        "ok" => Ok(Decision::Admitted {
            rate: rate(1)?,
            left: (5..reply.len()).map(int).collect::<Result<_, _>>()?,
        }),
        "rate" => Ok(Decision::RateLimited {
            what: if text(1)? == "requests" {
                "requests"
            } else {
                "tokens"
            },
            rate: rate(2)?,
        }),
        "limit" => Ok(Decision::Refused {
            index: usize::try_from(int(1)? - 1).unwrap_or(0),
            left: int(2)?,
        }),
        other => Err(SharedError::Reply(other.to_owned())),
    }
}

/// Tells the store when a reservation ends, in the background (the request's answer
/// does not wait). A failure leaves the entry to this instance's next `sync`.
#[derive(Debug)]
pub struct Settler {
    pub store: Arc<SharedStore>,
    /// Each counter's period end, in the reservation's order.
    pub ends: Vec<i64>,
}

impl OnSettle for Settler {
    fn settled(&self, held: &HeldRef, event: Option<(&str, Amounts)>) {
        let store = self.store.clone();
        let ends = self.ends.clone();
        let (id, keys) = (held.id.clone(), held.keys.clone());
        let event = event.map(|(id, a)| (id.to_owned(), a));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let event = event.as_ref().map(|(id, a)| (id.as_str(), *a));
            if let Err(e) = store.settle(&id, &keys, &ends, event, Utc::now()).await {
                tracing::debug!(error = %e, "settling in the shared store failed; the next sync gives it back");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn units_round_towards_refusing() {
        assert_eq!(micros_up(dec!(0.0000001)), 1);
        assert_eq!(micros_up(dec!(0.5)), 500_000);
        assert_eq!(micros_up(dec!(0.0162000001)), 16_201);
        let l = Limit {
            institution_id: "u".into(),
            scope: super::super::types::LimitScope::Key,
            subject: "k".into(),
            metric: Metric::Usd,
            period: super::super::types::LimitPeriod::Month,
            amount: dec!(0.5000009),
            mode: super::super::types::LimitMode::Block,
        };
        assert_eq!(limit_units(&l), 500_000);
        assert_eq!(from_units(Metric::Usd, 16_201), dec!(0.016201));
    }

    #[test]
    fn counter_ids_round_trip_even_with_bars_in_the_subject() {
        let key = ("uni:user:a|b@x:usd:month".to_string(), 1_764_547_200);
        let id = counter_id(&key, 1_767_225_600);
        assert_eq!(parse_counter_id(&id), Some((key, 1_767_225_600)));
    }

    #[test]
    fn decisions_parse() {
        use redis::Value as V;
        let s = |x: &str| V::BulkString(x.as_bytes().to_vec());
        assert_eq!(
            parse_decision(&[
                s("ok"),
                V::Int(3),
                V::Int(10),
                V::Int(100),
                V::Int(101),
                V::Int(7)
            ])
            .unwrap(),
            Decision::Admitted {
                left: vec![7],
                rate: RateCount {
                    requests: 3,
                    tokens: 10,
                    oldest_request: 100,
                    oldest_tokens: 101
                }
            }
        );
        assert_eq!(
            parse_decision(&[s("limit"), V::Int(2), V::Int(55)]).unwrap(),
            Decision::Refused { index: 1, left: 55 }
        );
        assert!(matches!(
            parse_decision(&[
                s("rate"),
                s("tokens"),
                V::Int(1),
                V::Int(2),
                V::Int(3),
                V::Int(4)
            ])
            .unwrap(),
            Decision::RateLimited { what: "tokens", .. }
        ));
    }
}
