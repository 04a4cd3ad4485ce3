//! Limits as the store keeps them (`store::limits` rows) and back.

use rust_decimal::Decimal;

use super::types::{Amounts, DecisionMode, Hold, Limit, SubjectUsage};
use crate::store::limits::{HoldRow, LimitRow, SubjectUsageRow};

/// The limit a row sets, or why it cannot be read (a row written by hand).
pub fn limit_of(r: &LimitRow) -> Result<Limit, String> {
    let l = Limit {
        institution_id: r.institution_id.clone(),
        scope: r.scope.parse()?,
        subject: r.subject.clone(),
        metric: r.metric.parse()?,
        period: r.period.parse()?,
        amount: r
            .amount
            .parse()
            .map_err(|_| format!("amount {:?} is not a number", r.amount))?,
        mode: r.mode.parse()?,
    };
    l.validate()?;
    Ok(l)
}

/// A state of `limit` as a row.
pub fn limit_row(limit: &Limit, version: u64, removed: bool, at: u32, by: &str) -> LimitRow {
    LimitRow {
        limit_id: limit.id(),
        version,
        institution_id: limit.institution_id.clone(),
        scope: limit.scope.as_str().into(),
        subject: limit.subject.clone(),
        metric: limit.metric.as_str().into(),
        period: limit.period.as_str().into(),
        amount: limit.amount.normalize().to_string(),
        mode: limit.mode.as_str().into(),
        removed: u8::from(removed),
        updated_at: at,
        updated_by: by.into(),
    }
}

fn stamp(t: i64) -> u32 {
    u32::try_from(t.max(0)).unwrap_or(u32::MAX)
}

pub fn hold_row(h: &Hold) -> HoldRow {
    HoldRow {
        instance: h.instance.clone(),
        limit_id: h.limit_id.clone(),
        period_start: stamp(h.period_start),
        reserved_usd: h.reserved.usd.normalize().to_string(),
        reserved_requests: h.reserved.requests,
        reserved_tokens: h.reserved.tokens,
        open_reservations: h.open,
        pending_usd: h.pending.usd.normalize().to_string(),
        pending_requests: h.pending.requests,
        pending_tokens: h.pending.tokens,
        refused: h.refused,
        reported_at: stamp(h.reported_at),
        active: u8::from(h.active),
        unit_usd: h.unit.usd.normalize().to_string(),
        unit_requests: h.unit.requests,
        unit_tokens: h.unit.tokens,
        cap: h.cap.normalize().to_string(),
        mode: h.mode.as_str().to_owned(),
    }
}

pub fn hold_of(r: HoldRow) -> Hold {
    let usd = |s: &str| s.parse::<Decimal>().unwrap_or_default();
    Hold {
        reserved: Amounts {
            usd: usd(&r.reserved_usd),
            requests: r.reserved_requests,
            tokens: r.reserved_tokens,
        },
        open: r.open_reservations,
        pending: Amounts {
            usd: usd(&r.pending_usd),
            requests: r.pending_requests,
            tokens: r.pending_tokens,
        },
        refused: r.refused,
        period_start: i64::from(r.period_start),
        reported_at: i64::from(r.reported_at),
        active: r.active == 1,
        unit: Amounts {
            usd: usd(&r.unit_usd),
            requests: r.unit_requests,
            tokens: r.unit_tokens,
        },
        cap: usd(&r.cap),
        mode: r.mode.parse().unwrap_or(DecisionMode::Shares),
        instance: r.instance,
        limit_id: r.limit_id,
    }
}

pub fn usage_of(r: SubjectUsageRow) -> SubjectUsage {
    SubjectUsage {
        amounts: Amounts {
            usd: r.usd,
            requests: u64::try_from(r.requests).unwrap_or(0),
            tokens: u64::try_from(r.tokens).unwrap_or(0),
        },
        user_id: r.user_id,
        api_key_id: r.api_key_id,
        stored: r.stored,
    }
}
