//! Row types, in the column order of `schema/`.

use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize, Serializer};

/// ClickHouse `Decimal(38, 18)` travels as an i128 scaled by 10^18.
pub const COST_SCALE: u32 = 18;

pub fn cost_to_i128(cost: Decimal) -> i128 {
    let mut d = cost;
    d.rescale(COST_SCALE);
    d.mantissa()
}

pub fn cost_from_i128(v: i128) -> Decimal {
    Decimal::from_i128_with_scale(v, COST_SCALE).normalize()
}

/// A ClickHouse `Decimal(38, scale)` as an exact `Decimal`, or an error: its 38 digits can
/// exceed what `rust_decimal` holds (28), and a wrong amount must never pass as a right
/// one (nor as zero).
pub fn decimal_from_i128(v: i128, scale: u32) -> Result<Decimal, String> {
    Decimal::try_from_i128_with_scale(v, scale)
        .map_err(|_| format!("the amount {v}e-{scale} does not fit an exact decimal"))
}

/// Serde for money columns read back from sums: `sum(Decimal(38, 18))` is a
/// `Decimal(38, 18)`, an i128 in RowBinary.
pub mod money18 {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        let v = i128::deserialize(d)?;
        super::decimal_from_i128(v, super::COST_SCALE)
            .map(|d| d.normalize())
            .map_err(serde::de::Error::custom)
    }
}

/// Serde for `Decimal(38, 2)` (invoice totals, in cents; the scale is kept: `12.30`).
pub mod money2 {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        let v = i128::deserialize(d)?;
        super::decimal_from_i128(v, 2).map_err(serde::de::Error::custom)
    }
}

mod cost_serde {
    use super::*;
    use serde::Deserializer;

    pub fn serialize<S: Serializer>(v: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i128(cost_to_i128(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        i128::deserialize(d).map(cost_from_i128)
    }
}

/// Raw bytes as a ClickHouse `String` (payloads need not be UTF-8).
fn as_bytes<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v)
}

#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct EventRow {
    pub event_id: String,
    pub occurred_at: u32,
    pub occurred_ms: u16,
    pub institution_id: String,
    pub user_id: String,
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
    pub endpoint: String,
    pub service_tier: String,
    pub status: String,
    pub latency_ms: u32,
    pub tag_keys: Vec<String>,
    pub tag_values: Vec<String>,
    pub input_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub priced: u8,
    #[serde(with = "cost_serde")]
    pub cost: Decimal,
    pub price_id: String,
    pub price_model: String,
    pub price_tier: u64,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub ingested_at: u32,
    pub version: u32,
    pub sign: i8,
    pub usage_estimated: u8,
    /// `''` (platform) or `byok`.
    pub billing: String,
}

#[derive(Debug, Clone, Row, Serialize)]
pub struct RejectedRow {
    pub received_at: u32,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    #[serde(serialize_with = "as_bytes")]
    pub kafka_key: Vec<u8>,
    pub reason: String,
    pub detail: String,
    #[serde(serialize_with = "as_bytes")]
    pub payload: Vec<u8>,
    /// The institution the payload names (else the key), empty if neither is readable.
    pub institution_id: String,
    /// When the payload says the usage happened (unix seconds), 0 if unreadable.
    pub occurred_at: u32,
}

#[derive(Debug, Clone, Row, Serialize)]
pub struct DuplicateRow {
    pub received_at: u32,
    pub event_id: String,
    pub institution_id: String,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub original_partition: i32,
    pub original_offset: i64,
}

/// A message published under a wrong or missing key, re-published with key =
/// institution_id (`rekeyed_events`).
#[derive(Debug, Clone, Row, Serialize)]
pub struct RekeyedRow {
    pub received_at: u32,
    pub event_id: String,
    pub institution_id: String,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    #[serde(serialize_with = "as_bytes")]
    pub kafka_key: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn an_amount_that_does_not_fit_is_an_error_not_zero() {
        assert_eq!(
            decimal_from_i128(375_000_000_000_000, 18).unwrap(),
            dec!(0.000375)
        );
        assert_eq!(decimal_from_i128(-1230, 2).unwrap().to_string(), "-12.30");
        // A corrupted sum (38 digits) cannot pass as a smaller amount or as zero.
        let corrupt = 10i128.pow(37);
        assert!(decimal_from_i128(corrupt, 18).is_err());
        // Through the column decoder the rows use: the read fails.
        use serde::de::value::{Error, I128Deserializer};
        assert!(money18::deserialize(I128Deserializer::<Error>::new(corrupt)).is_err());
        assert_eq!(
            money18::deserialize(I128Deserializer::<Error>::new(1_500_000_000_000_000_000))
                .unwrap(),
            dec!(1.5)
        );
    }

    #[test]
    fn cost_round_trips_through_i128() {
        for d in [
            dec!(0),
            dec!(0.000000000000000001),
            dec!(0.000375),
            dec!(12345678.123456789012345678),
        ] {
            assert_eq!(cost_from_i128(cost_to_i128(d)), d.normalize());
        }
        assert_eq!(cost_to_i128(dec!(1)), 1_000_000_000_000_000_000);
    }
}
