//! One admission decision for a request: the key's requests/tokens per minute and every
//! `block` limit it falls under — through the shared store when there is one and it
//! answers (exact across instances), else on this instance (its rate window and its
//! share of each limit's headroom).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::budget::{Admission, Ask, Blocked, Budgets, Reservation, Who};
use super::rate::{Exceeded, Limiter, Standing};
use super::shared::{self, Decision as SharedDecision, Rate, Settler, SharedStore};
use super::types::{Amounts, DecisionMode, Metric};

/// A request's subject: who pays, and its key's per-minute limits (0: none).
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub who: Who<'a>,
    pub rpm: u32,
    pub tpm: u64,
}

/// What is left of the tightest requests or tokens limit after an admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLine {
    pub limit: u64,
    pub remaining: u64,
    /// Until it renews (a period's end) or frees up (the minute window slides).
    pub reset: Duration,
}

/// The remaining quota an admitted request reports (`x-ratelimit-*`,
/// `x-tokentally-budget-remaining`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub requests: Option<QuotaLine>,
    pub tokens: Option<QuotaLine>,
    /// What may still be admitted of the tightest USD limit.
    pub usd: Option<Decimal>,
}

impl Quota {
    fn tighten(slot: &mut Option<QuotaLine>, line: QuotaLine) {
        if slot.is_none_or(|s| line.remaining < s.remaining) {
            *slot = Some(line);
        }
    }
}

/// What admission decided.
#[derive(Debug)]
pub enum Decision {
    /// Forward it; `reservation` holds its worst case (none when no `block` limit applies).
    Admitted {
        reservation: Option<Reservation>,
        quota: Quota,
    },
    /// Over the key's requests or tokens per minute.
    RateLimited(Exceeded),
    /// A `block` limit would be passed.
    Refused(Blocked),
}

/// Everything admission needs on one gateway instance.
#[derive(Debug)]
pub struct Gate {
    pub budgets: Arc<Budgets>,
    pub rate: Limiter,
    pub shared: Option<Arc<SharedStore>>,
}

fn until(end: i64, now: DateTime<Utc>) -> Duration {
    Duration::from_secs(u64::try_from(end - now.timestamp()).unwrap_or(0))
}

fn window_reset(oldest: u64, now: DateTime<Utc>) -> Duration {
    Duration::from_secs((oldest + 60).saturating_sub(u64::try_from(now.timestamp()).unwrap_or(0)))
}

impl Gate {
    pub fn new(budgets: Arc<Budgets>, shared: Option<Arc<SharedStore>>) -> Self {
        Self {
            budgets,
            rate: Limiter::default(),
            shared,
        }
    }

    /// How this instance decides now.
    pub fn mode(&self) -> DecisionMode {
        self.shared
            .as_ref()
            .map_or(DecisionMode::Shares, |s| s.mode())
    }

    /// Decides one request; `ask` (its worst case) is computed only if a `block` limit
    /// applies.
    pub async fn admit(
        &self,
        subject: &Subject<'_>,
        ask: impl FnOnce() -> Ask,
        now: DateTime<Utc>,
    ) -> Decision {
        let applies = self.budgets.applies(&subject.who);
        let has_rate = subject.rpm > 0 || subject.tpm > 0;
        if !applies && !has_rate {
            return Decision::Admitted {
                reservation: None,
                quota: Quota::default(),
            };
        }
        let ask = applies.then(ask);
        if let Some(shared) = self.shared.as_ref().filter(|s| s.is_up()) {
            if let Some(d) = self.admit_shared(shared, subject, ask.as_ref(), now).await {
                return d;
            }
        }
        self.admit_local(subject, ask.as_ref(), now)
    }

    /// Through the shared store; `None` if it did not answer (the caller falls back).
    async fn admit_shared(
        &self,
        shared: &Arc<SharedStore>,
        subject: &Subject<'_>,
        ask: Option<&Ask>,
        now: DateTime<Utc>,
    ) -> Option<Decision> {
        let applying = match ask {
            Some(_) => self.budgets.applying(&subject.who, now),
            None => Vec::new(),
        };
        let take = ask.map(|a| Amounts {
            usd: *a.usd.as_ref().unwrap_or(&Decimal::ZERO),
            requests: 1,
            tokens: a.tokens,
        });
        // An unpriced model cannot be held to a USD limit: refused without asking.
        if let (Some(a), Some(first_usd)) =
            (ask, applying.iter().find(|c| c.limit.metric == Metric::Usd))
        {
            if a.usd.is_err() {
                self.budgets.note_refused(&first_usd.key);
                return Some(Decision::Refused(Blocked {
                    limit: first_usd.limit.clone(),
                    remaining: Decimal::ZERO.max(first_usd.limit.amount - first_usd.stored.usd),
                    instance_may_admit: None,
                    need: None,
                    renews: DateTime::from_timestamp(first_usd.end, 0).unwrap_or(now),
                    remaining_usd: None,
                }));
            }
        }
        let rate = (subject.rpm > 0 || subject.tpm > 0).then_some(Rate {
            key_id: subject.who.key,
            rpm: subject.rpm,
            tpm: subject.tpm,
        });
        let id = uuid::Uuid::new_v4().simple().to_string();
        let decision = shared
            .admit(&applying, &take.unwrap_or_default(), &id, rate, now)
            .await
            .ok()?;
        let standing = |r: &shared::RateCount| Standing {
            rpm: subject.rpm,
            tpm: subject.tpm,
            requests_left: u64::from(subject.rpm).saturating_sub(r.requests),
            tokens_left: subject.tpm.saturating_sub(r.tokens),
            requests_reset: window_reset(r.oldest_request, now),
            tokens_reset: window_reset(r.oldest_tokens, now),
        };
        Some(match decision {
            SharedDecision::Admitted { left, rate: r } => {
                let mut quota = Quota::default();
                if rate.is_some() {
                    rate_quota(&mut quota, &standing(&r));
                }
                for (c, l) in applying.iter().zip(&left) {
                    let remaining = shared::from_units(c.limit.metric, *l);
                    match c.limit.metric {
                        Metric::Usd => {
                            quota.usd = Some(quota.usd.map_or(remaining, |u| u.min(remaining)))
                        }
                        m => {
                            let line = QuotaLine {
                                limit: c.limit.amount.try_into().unwrap_or(u64::MAX),
                                remaining: u64::try_from(*l).unwrap_or(0),
                                reset: until(c.end, now),
                            };
                            let slot = if m == Metric::Requests {
                                &mut quota.requests
                            } else {
                                &mut quota.tokens
                            };
                            Quota::tighten(slot, line);
                        }
                    }
                }
                let reservation = ask.map(|a| {
                    self.budgets
                        .mirror(&applying, a, id, quota.usd)
                        .with_shared(Arc::new(Settler {
                            store: shared.clone(),
                            ends: applying.iter().map(|c| c.end).collect(),
                        }))
                });
                Decision::Admitted { reservation, quota }
            }
            SharedDecision::RateLimited { what, rate: r } => {
                let s = standing(&r);
                let (limit, retry_after) = if what == "requests" {
                    (u64::from(subject.rpm), s.requests_reset)
                } else {
                    (subject.tpm, s.tokens_reset)
                };
                Decision::RateLimited(Exceeded {
                    what,
                    limit,
                    retry_after: retry_after.max(Duration::from_secs(1)),
                    standing: s,
                })
            }
            SharedDecision::Refused { index, left } => {
                let c = &applying[index.min(applying.len().saturating_sub(1))];
                self.budgets.note_refused(&c.key);
                let remaining = shared::from_units(c.limit.metric, left.max(0));
                let need = take.map(|t| t.of(c.limit.metric));
                Decision::Refused(Blocked {
                    limit: c.limit.clone(),
                    remaining,
                    instance_may_admit: None,
                    need,
                    renews: DateTime::from_timestamp(c.end, 0).unwrap_or(now),
                    remaining_usd: (c.limit.metric == Metric::Usd).then_some(remaining),
                })
            }
        })
    }

    /// On this instance alone: its rate window and its share of each limit.
    fn admit_local(
        &self,
        subject: &Subject<'_>,
        ask: Option<&Ask>,
        now: DateTime<Utc>,
    ) -> Decision {
        let mut quota = Quota::default();
        let secs = u64::try_from(now.timestamp()).unwrap_or(0);
        match self
            .rate
            .admit(subject.who.key, subject.rpm, subject.tpm, secs)
        {
            Ok(Some(standing)) => rate_quota(&mut quota, &standing),
            Ok(None) => {}
            Err(e) => return Decision::RateLimited(e),
        }
        let Some(ask) = ask else {
            return Decision::Admitted {
                reservation: None,
                quota,
            };
        };
        match self.budgets.admit(&subject.who, ask, now) {
            Admission::Free => Decision::Admitted {
                reservation: None,
                quota,
            },
            Admission::Admitted(r) => {
                quota.usd = r.remaining_usd;
                let (requests, tokens) = self.budgets.left(&subject.who, now);
                for (slot, left) in [(&mut quota.requests, requests), (&mut quota.tokens, tokens)] {
                    if let Some(l) = left {
                        Quota::tighten(
                            slot,
                            QuotaLine {
                                limit: l.limit,
                                remaining: l.remaining,
                                reset: until(l.renews.timestamp(), now),
                            },
                        );
                    }
                }
                let r = match &self.shared {
                    // Settled into the store when it is back (or given back by `sync`).
                    Some(s) => {
                        let ends = self
                            .budgets
                            .applying(&subject.who, now)
                            .iter()
                            .map(|c| c.end)
                            .collect();
                        r.with_shared(Arc::new(Settler {
                            store: s.clone(),
                            ends,
                        }))
                    }
                    None => r,
                };
                Decision::Admitted {
                    reservation: Some(r),
                    quota,
                }
            }
            Admission::Refused(b) => Decision::Refused(b),
        }
    }

    /// Adds a finished request's tokens to its key's minute window (here, and in the
    /// shared store when there is one).
    pub fn add_tokens(&self, key_id: &str, tpm: u64, tokens: u64, now: DateTime<Utc>) {
        let secs = u64::try_from(now.timestamp()).unwrap_or(0);
        self.rate.add_tokens(key_id, tokens, secs);
        if tpm == 0 || tokens == 0 {
            return;
        }
        if let Some(shared) = self.shared.clone().filter(|s| s.is_up()) {
            let key = key_id.to_owned();
            tokio::spawn(async move {
                if let Err(e) = shared.add_tokens(&key, tokens, now).await {
                    tracing::debug!(error = %e, "tokens not counted in the shared store");
                }
            });
        }
    }
}

fn rate_quota(quota: &mut Quota, s: &Standing) {
    if s.rpm > 0 {
        Quota::tighten(
            &mut quota.requests,
            QuotaLine {
                limit: u64::from(s.rpm),
                remaining: s.requests_left,
                reset: s.requests_reset,
            },
        );
    }
    if s.tpm > 0 {
        Quota::tighten(
            &mut quota.tokens,
            QuotaLine {
                limit: s.tpm,
                remaining: s.tokens_left,
                reset: s.tokens_reset,
            },
        );
    }
}
