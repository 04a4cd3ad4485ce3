//! What invoices are computed from, in billing's terms: the store's sums of one
//! institution's events in one period (see `store::billing`).

use chrono::{DateTime, NaiveDate, Utc};

use super::{BillingError, GroupSums, Unpriced};
use crate::store::billing::PriceGroup;
use crate::store::Store;

impl From<PriceGroup> for GroupSums {
    fn from(r: PriceGroup) -> Self {
        GroupSums {
            price_id: r.price_id,
            price_model: r.price_model,
            price_tier: r.price_tier,
            byok: r.billing == "byok",
            estimated: r.estimated == 1,
            events: r.events,
            served: r.served,
            input: r.input,
            cache_read: r.cache_read,
            cache_write: r.cache_write,
            output: r.output,
            reasoning: r.reasoning,
            cost: r.cost.normalize(),
        }
    }
}

/// Priced usage of `[start, end)`, per price entry and tier.
pub async fn groups(
    store: &Store,
    institution: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<GroupSums>, BillingError> {
    Ok(store
        .price_groups(institution, start.timestamp(), end.timestamp())
        .await?
        .into_iter()
        .map(Into::into)
        .collect())
}

/// Unpriced usage of `[start, end)`.
pub async fn unpriced(
    store: &Store,
    institution: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Unpriced, BillingError> {
    let u = store
        .unpriced_usage(institution, start.timestamp(), end.timestamp())
        .await?;
    Ok(Unpriced {
        events: u.events,
        tokens: u.tokens,
        models: u.models,
    })
}

/// One row of the detailed usage export, before it is split into token classes.
pub struct Detail {
    pub day: NaiveDate,
    pub user_id: String,
    /// The member's group when the request was made (the `group` tag); empty if none.
    pub group: String,
    pub api_key_id: String,
    /// The model as the gateway named it (for unpriced rows).
    pub model: String,
    pub priced: bool,
    pub sums: GroupSums,
}

/// Usage of `[start, end)` per local day (in `tz`) × user × key × price entry.
pub async fn details(
    store: &Store,
    institution: &str,
    tz: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<Detail>, BillingError> {
    store
        .usage_details(institution, tz, start.timestamp(), end.timestamp())
        .await?
        .into_iter()
        .map(|r| {
            Ok(Detail {
                day: r.day.parse().map_err(|_| {
                    BillingError::Corrupt(format!("ClickHouse returned the day {:?}", r.day))
                })?,
                user_id: r.user_id,
                group: r.group_id,
                api_key_id: r.api_key_id,
                model: r.model,
                priced: r.priced == 1,
                sums: r.group.into(),
            })
        })
        .collect()
}
