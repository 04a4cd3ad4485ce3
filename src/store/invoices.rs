//! The `invoices` table: ClickHouse's copy of every document the ledger accepted, with
//! its frozen JSON, CSV and PDF renderings.

use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::rows::money2;
use super::{Store, StoreError};

/// A document as written (one row per sequence number; writers may repeat it).
#[derive(Debug, Clone, Row, Serialize)]
pub struct NewInvoiceRow {
    pub seq: u64,
    pub number: String,
    pub kind: String,
    pub institution_id: String,
    pub period: String,
    pub issued_at: u32,
    /// Decimal(38, 2) travels as cents.
    pub total: i128,
    pub references_number: String,
    pub document: String,
    pub csv: String,
    #[serde(with = "serde_bytes")]
    pub pdf: Vec<u8>,
}

/// A stored document (without its renderings).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct InvoiceRow {
    pub seq: u64,
    pub number: String,
    pub kind: String,
    pub institution_id: String,
    pub period: String,
    pub issued_at: u32,
    /// Exact, two decimals.
    #[serde(with = "money2")]
    pub total: Decimal,
    pub references_number: String,
    pub document: String,
}

/// The frozen renderings of one stored document.
#[derive(Row, Deserialize)]
pub struct Frozen {
    pub document: String,
    pub csv: String,
    #[serde(with = "serde_bytes")]
    pub pdf: Vec<u8>,
}

impl Store {
    /// Sequence numbers of the documents ClickHouse holds.
    pub async fn invoice_seqs(&self) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .client
            .query("SELECT DISTINCT seq FROM invoices")
            .fetch_all()
            .await?)
    }

    pub async fn insert_invoices(&self, rows: &[NewInvoiceRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self.client.insert::<NewInvoiceRow>("invoices").await?;
        for r in rows {
            insert.write(r).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Stored documents (one per number), optionally of one institution, newest first.
    pub async fn stored_invoices(
        &self,
        institution: Option<&str>,
    ) -> Result<Vec<InvoiceRow>, StoreError> {
        // Aliases end in `_`: 18.16 leaks an alias named like a column into the other
        // aggregates of its query.
        let inner = "SELECT seq, any(number) AS number_, any(kind) AS kind_, \
             any(institution_id) AS institution_id_, any(period) AS period_, \
             any(issued_at) AS issued_at_, any(total) AS total_, \
             any(references_number) AS references_number_, any(document) AS document_ \
             FROM invoices GROUP BY seq";
        let outer =
            "SELECT seq, number_ AS number, kind_ AS kind, institution_id_ AS institution_id, \
             period_ AS period, issued_at_ AS issued_at, total_ AS total, \
             references_number_ AS references_number, document_ AS document";
        let q = match institution {
            Some(i) => self
                .client
                .query(&format!(
                    "{outer} FROM ({inner}) WHERE institution_id = ? ORDER BY seq DESC"
                ))
                .bind(i),
            None => self
                .client
                .query(&format!("{outer} FROM ({inner}) ORDER BY seq DESC")),
        };
        Ok(q.fetch_all().await?)
    }

    /// One stored document by number.
    pub async fn stored_invoice(&self, number: &str) -> Result<Option<InvoiceRow>, StoreError> {
        Ok(self
            .client
            .query("SELECT ?fields FROM invoices WHERE number = ? LIMIT 1")
            .bind(number)
            .fetch_optional()
            .await?)
    }

    /// The frozen renderings of one stored document.
    pub async fn frozen_invoice(&self, number: &str) -> Result<Option<Frozen>, StoreError> {
        Ok(self
            .client
            .query("SELECT ?fields FROM invoices WHERE number = ? LIMIT 1")
            .bind(number)
            .fetch_optional()
            .await?)
    }
}
