//! The `alerts` table (append-only state changes of incidents) and the hourly spend the
//! spike and budget detectors read.

use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::rows::money18;
use super::{Store, StoreError};

/// One state change as written: `firing`, `resolved` or `acknowledged`.
#[derive(Debug, Clone, Row, Serialize)]
pub struct AlertRow {
    pub alert_id: String,
    pub at: u32,
    pub seq: u64,
    pub state: String,
    pub kind: String,
    pub entity: String,
    pub institution_id: String,
    pub severity: String,
    /// Decimal(38, 6) travels as millionths.
    pub observed: i128,
    pub baseline: i128,
    pub threshold: i128,
    pub message: String,
    pub actor: String,
}

/// A Decimal as millionths for `Decimal(38, 6)` columns (rounded to six decimals).
pub fn micros(d: Decimal) -> i128 {
    let mut d = d.round_dp(6);
    d.rescale(6);
    d.mantissa()
}

/// Serde for `Decimal(38, 6)` read back (scale kept, e.g. `60.000000`, as shown).
mod money6 {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        let v = i128::deserialize(d)?;
        super::super::rows::decimal_from_i128(v, 6).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
}

/// One incident as stored: its latest state and the figures it fired with.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize, Serialize)]
pub struct Incident {
    pub alert_id: String,
    pub state: String,
    pub kind: String,
    pub entity: String,
    pub institution_id: String,
    pub severity: String,
    pub fired_at: u32,
    pub changed_at: u32,
    #[serde(with = "money6")]
    pub observed: Decimal,
    #[serde(with = "money6")]
    pub baseline: Decimal,
    pub message: String,
    pub acknowledged_by: String,
}

/// Spend of one (hour, institution, key).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct HourSpend {
    pub hour: u32,
    pub institution_id: String,
    pub api_key_id: String,
    #[serde(with = "money18")]
    pub cost: Decimal,
}

/// Whose spend a per-minute read groups by: API keys, users (every key of theirs) or
/// whole institutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SpendBy {
    Key,
    User,
    Institution,
}

impl SpendBy {
    /// The column that names the subject (fixed text, never a value).
    fn column(self) -> &'static str {
        match self {
            SpendBy::Key => "api_key_id",
            SpendBy::User => "user_id",
            SpendBy::Institution => "institution_id",
        }
    }

    /// `AND (0 OR (institution_id = ? AND {column} = ?) …)` for `subjects`.
    fn only(self, q: &mut super::sql::Sql, subjects: &[(String, String)]) {
        q.push(" AND (0");
        for (inst, subject) in subjects {
            q.bind(
                &format!(" OR (institution_id = ? AND {} = ?)", self.column()),
                [
                    super::sql::s(inst.as_str()),
                    super::sql::s(subject.as_str()),
                ],
            );
        }
        q.push(")");
    }
}

/// Spend of one (minute, institution, subject — a key id, a user id or the institution
/// id, see `SpendBy`), from the stored events.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct MinuteSpend {
    pub minute: u32,
    pub institution_id: String,
    pub subject: String,
    #[serde(with = "money18")]
    pub cost: Decimal,
}

/// The first hour a subject spent anything.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct FirstSpend {
    pub hour: u32,
    pub institution_id: String,
    pub subject: String,
}

impl Store {
    /// Spend per minute × institution × subject (`by`) in the union of `ranges` (unix
    /// seconds, `[from, to)`), from the stored events (the rollups are hourly and
    /// quarter-hourly): of every subject, or only of `subjects` ((institution, subject)).
    pub async fn minute_spend(
        &self,
        by: SpendBy,
        ranges: &[(i64, i64)],
        subjects: Option<&[(String, String)]>,
    ) -> Result<Vec<MinuteSpend>, StoreError> {
        if ranges.is_empty() || subjects.is_some_and(<[_]>::is_empty) {
            return Ok(Vec::new());
        }
        let col = by.column();
        let mut q = super::sql::Sql::new(&format!(
            "SELECT ?fields FROM (SELECT m AS minute, institution_id, s AS subject, c AS cost FROM \
             (SELECT toUInt32(toStartOfMinute(occurred_at)) AS m, institution_id, {col} AS s, \
             sum(cost * sign) AS c FROM usage_events WHERE {col} != '' AND (0"
        ));
        for (from, to) in ranges {
            q.bind(
                " OR (occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?))",
                [super::sql::i(*from), super::sql::i(*to)],
            );
        }
        q.push(")");
        if let Some(subjects) = subjects {
            by.only(&mut q, subjects);
        }
        q.push(" GROUP BY m, institution_id, s HAVING c != 0))");
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// Which user each key that spent in `[from, to)` belongs to: (institution, key id,
    /// user id).
    pub async fn key_users(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT DISTINCT institution_id, api_key_id, user_id FROM usage_events \
                 WHERE occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?) \
                 AND api_key_id != '' AND user_id != ''",
            )
            .bind(from)
            .bind(to)
            .fetch_all()
            .await?)
    }

    /// When each of `subjects` first spent anything in `[from, to)` (hourly rollup).
    pub async fn first_spend(
        &self,
        by: SpendBy,
        from: i64,
        to: i64,
        subjects: &[(String, String)],
    ) -> Result<Vec<FirstSpend>, StoreError> {
        if subjects.is_empty() {
            return Ok(Vec::new());
        }
        let col = by.column();
        let mut q = super::sql::Sql::new(&format!(
            "SELECT ?fields FROM (SELECT min(h) AS hour, institution_id, s AS subject FROM \
             (SELECT toUInt32(hour) AS h, institution_id, {col} AS s, sum(cost) AS c \
             FROM usage_hourly_institution WHERE {col} != ''"
        ));
        q.bind(
            " AND hour >= toDateTime(?) AND hour < toDateTime(?)",
            [super::sql::i(from), super::sql::i(to)],
        );
        by.only(&mut q, subjects);
        q.push(" GROUP BY h, institution_id, s HAVING c != 0) GROUP BY institution_id, s)");
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// Appends state changes (one insert).
    pub async fn record_alerts(&self, rows: &[AlertRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self.client.insert::<AlertRow>("alerts").await?;
        for r in rows {
            insert.write(r).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// All incidents, the open ones first, then by latest change; optionally of one
    /// institution.
    pub async fn incidents(&self, institution: Option<&str>) -> Result<Vec<Incident>, StoreError> {
        // Aliases differ from column names: 18.16 would substitute an alias named like a
        // column into the other aggregates of the query.
        let inner = "SELECT alert_id, \
               argMaxIf(state, seq, state != 'acknowledged') AS state_, \
               argMaxIf(kind, seq, state != 'acknowledged') AS kind_, \
               argMaxIf(entity, seq, state != 'acknowledged') AS entity_, \
               argMaxIf(institution_id, seq, state != 'acknowledged') AS inst_, \
               argMaxIf(severity, seq, state != 'acknowledged') AS severity_, \
               toUInt32(minIf(at, state = 'firing')) AS fired_at_, \
               toUInt32(maxIf(at, state != 'acknowledged')) AS changed_at_, \
               argMaxIf(observed, seq, state = 'firing') AS observed_, \
               argMaxIf(baseline, seq, state = 'firing') AS baseline_, \
               argMaxIf(message, seq, state = 'firing') AS message_, \
               argMaxIf(actor, seq, state = 'acknowledged') AS acked_by_ \
             FROM alerts GROUP BY alert_id";
        let outer = "SELECT alert_id, state_ AS state, kind_ AS kind, entity_ AS entity, \
             inst_ AS institution_id, severity_ AS severity, fired_at_ AS fired_at, \
             changed_at_ AS changed_at, observed_ AS observed, baseline_ AS baseline, \
             message_ AS message, acked_by_ AS acknowledged_by";
        let order = "ORDER BY (state = 'firing') DESC, changed_at DESC";
        let q = match institution {
            Some(i) => self
                .client
                .query(&format!(
                    "{outer} FROM ({inner}) WHERE institution_id = ? {order}"
                ))
                .bind(i),
            None => self
                .client
                .query(&format!("{outer} FROM ({inner}) {order}")),
        };
        Ok(q.fetch_all().await?)
    }

    /// Key-spike incidents that are firing (what the evaluator adopts each round).
    pub async fn open_key_spikes(&self) -> Result<Vec<Incident>, StoreError> {
        Ok(self
            .incidents(None)
            .await?
            .into_iter()
            .filter(|i| i.state == "firing" && i.kind == "key_spike")
            .collect())
    }

    /// Whether an incident exists that is not only an acknowledgement.
    pub async fn alert_exists(&self, alert_id: &str) -> Result<bool, StoreError> {
        let n: u64 = self
            .client
            .query(
                "SELECT toUInt64(count()) FROM alerts WHERE alert_id = ? AND state != 'acknowledged'",
            )
            .bind(alert_id)
            .fetch_one()
            .await?;
        Ok(n > 0)
    }

    /// Spend per hour × institution in `[from, to)` (unix seconds); `api_key_id` empty.
    pub async fn hourly_spend_by_institution(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<HourSpend>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT hour_ AS hour, institution_id, '' AS api_key_id, cost_ AS cost FROM \
                 (SELECT toUInt32(hour) AS hour_, institution_id, sum(cost) AS cost_ \
                 FROM usage_hourly_model WHERE hour >= toDateTime(?) AND hour < toDateTime(?) \
                 GROUP BY hour_, institution_id)",
            )
            .bind(from)
            .bind(to)
            .fetch_all()
            .await?)
    }

    /// Spend per hour × institution × key (keys only) in the hours of `ranges`
    /// (`[from, to)` unix seconds each).
    pub async fn key_spend_in(&self, ranges: &[(i64, i64)]) -> Result<Vec<HourSpend>, StoreError> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = super::sql::Sql::new(
            "SELECT ?fields FROM (SELECT h AS hour, institution_id, api_key_id, c AS cost FROM \
             (SELECT toUInt32(hour) AS h, institution_id, api_key_id, sum(cost) AS c \
             FROM usage_hourly_institution WHERE api_key_id != '' AND (0",
        );
        for (from, to) in ranges {
            q.bind(
                " OR (hour >= toDateTime(?) AND hour < toDateTime(?))",
                [super::sql::i(*from), super::sql::i(*to)],
            );
        }
        q.push(") GROUP BY h, institution_id, api_key_id))");
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// Per key, its first hour in `[from, to)` with spend other than zero, and that spend.
    pub async fn key_first_spend(&self, from: i64, to: i64) -> Result<Vec<HourSpend>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT min(h) AS hour, institution_id, api_key_id, argMin(c, h) AS cost FROM \
                 (SELECT toUInt32(hour) AS h, institution_id, api_key_id, sum(cost) AS c \
                 FROM usage_hourly_institution WHERE hour >= toDateTime(?) AND hour < toDateTime(?) \
                 AND api_key_id != '' GROUP BY h, institution_id, api_key_id HAVING c != 0) \
                 GROUP BY institution_id, api_key_id",
            )
            .bind(from)
            .bind(to)
            .fetch_all()
            .await?)
    }

    /// Spend per hour × institution × key in `[from, to)` (unix seconds).
    pub async fn hourly_spend(&self, from: i64, to: i64) -> Result<Vec<HourSpend>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT hour_ AS hour, institution_id, api_key_id, cost_ AS cost FROM \
                 (SELECT toUInt32(hour) AS hour_, institution_id, api_key_id, \
                 sum(cost) AS cost_ FROM usage_hourly_institution \
                 WHERE hour >= toDateTime(?) AND hour < toDateTime(?) \
                 GROUP BY hour_, institution_id, api_key_id)",
            )
            .bind(from)
            .bind(to)
            .fetch_all()
            .await?)
    }
}
