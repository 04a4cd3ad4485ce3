//! Groups and members (`groups`, `members`): their rows, read latest state first.
//! What they mean is `people`.

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// One state of a group's policy.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct GroupRow {
    pub institution_id: String,
    pub group_id: String,
    pub version: u64,
    pub name: String,
    pub models: Vec<String>,
    pub member_limits: String,
    pub budget_usd: String,
    pub budget_period: String,
    pub keys_per_member: u32,
    pub max_key_days: u32,
    pub default_rpm: u32,
    pub default_tpm: u64,
    pub max_idle_days: u32,
    pub removed: u8,
    pub updated_at: u32,
    pub updated_by: String,
}

/// One state of a person.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct MemberRow {
    pub institution_id: String,
    pub person_id: String,
    pub version: u64,
    pub name: String,
    pub email: String,
    pub group_id: String,
    pub role: String,
    pub group_source: String,
    pub suspended: u8,
    pub last_sign_in: u32,
    pub created_at: u32,
    pub updated_at: u32,
    pub updated_by: String,
}

impl Store {
    /// Every group's latest state (removed ones included, flagged).
    pub async fn current_groups(&self) -> Result<Vec<GroupRow>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM groups ORDER BY institution_id, group_id, version DESC \
                 LIMIT 1 BY institution_id, group_id",
            )
            .fetch_all()
            .await?)
    }

    pub async fn write_group(&self, row: &GroupRow) -> Result<(), StoreError> {
        let mut insert = self.client.insert::<GroupRow>("groups").await?;
        insert.write(row).await?;
        insert.end().await?;
        Ok(())
    }

    /// Every person's latest state, of one institution or all.
    pub async fn current_members(
        &self,
        institution: Option<&str>,
    ) -> Result<Vec<MemberRow>, StoreError> {
        let q = match institution {
            Some(i) => self
                .client
                .query(
                    "SELECT ?fields FROM members WHERE institution_id = ? \
                     ORDER BY institution_id, person_id, version DESC LIMIT 1 BY institution_id, person_id",
                )
                .bind(i),
            None => self.client.query(
                "SELECT ?fields FROM members ORDER BY institution_id, person_id, version DESC \
                 LIMIT 1 BY institution_id, person_id",
            ),
        };
        Ok(q.fetch_all().await?)
    }

    /// One person's latest state.
    pub async fn member(
        &self,
        institution: &str,
        person: &str,
    ) -> Result<Option<MemberRow>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM members WHERE institution_id = ? AND person_id = ? \
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(institution)
            .bind(person)
            .fetch_optional()
            .await?)
    }

    pub async fn write_member(&self, row: &MemberRow) -> Result<(), StoreError> {
        let mut insert = self.client.insert::<MemberRow>("members").await?;
        insert.write(row).await?;
        insert.end().await?;
        Ok(())
    }

    /// (rows, highest version) of `groups` and of `members`: what gateways compare to
    /// know whether to read them again.
    pub async fn people_fingerprint(&self) -> Result<(u64, u64, u64, u64), StoreError> {
        Ok(self
            .client
            .query(
                "SELECT (SELECT count() FROM groups), (SELECT max(version) FROM groups), \
                 (SELECT count() FROM members), (SELECT max(version) FROM members)",
            )
            .fetch_one::<(u64, u64, u64, u64)>()
            .await?)
    }
}
