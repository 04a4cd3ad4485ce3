//! The formats a billing document is rendered in, chosen in one place for the CLI
//! (`--format`), the dashboard's downloads and the ledger's materialisation: each says
//! what it renders, its content type and its file extension.

use clap::ValueEnum;

use super::issue::Billing;
use super::{render, BillingError, Document};

use crate::store::invoices::Frozen;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// A readable summary.
    Table,
    Json,
    /// One row per invoice line.
    Csv,
    Pdf,
    /// Day × user × key × model × token class for the period as stored now ("live":
    /// includes events that arrived after an invoice was issued).
    UsageCsv,
    /// The same, frozen when the invoice was issued: adds up to its own-period lines.
    UsageCsvAsIssued,
}

/// A rendered document: its bytes, content type and file extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub extension: &'static str,
}

impl Format {
    /// What the dashboard offers for an issued document, in this order.
    pub const DOWNLOADS: [Format; 5] = [
        Format::Pdf,
        Format::Csv,
        Format::Json,
        Format::UsageCsvAsIssued,
        Format::UsageCsv,
    ];

    /// The name in URLs and on the command line (`usage-csv`).
    pub const fn name(self) -> &'static str {
        match self {
            Format::Table => "table",
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Pdf => "pdf",
            Format::UsageCsv => "usage-csv",
            Format::UsageCsvAsIssued => "usage-csv-as-issued",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Format::Table,
            Format::Json,
            Format::Csv,
            Format::Pdf,
            Format::UsageCsv,
            Format::UsageCsvAsIssued,
        ]
        .into_iter()
        .find(|f| f.name() == s)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Pdf => "application/pdf",
            Format::Json => "application/json",
            Format::Table => "text/plain; charset=utf-8",
            Format::Csv | Format::UsageCsv | Format::UsageCsvAsIssued => "text/csv; charset=utf-8",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Pdf => "pdf",
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Table => "txt",
            Format::UsageCsv => "usage-live.csv",
            Format::UsageCsvAsIssued => "usage-as-issued.csv",
        }
    }

    /// Binary output (not for a terminal).
    pub fn is_binary(self) -> bool {
        self == Format::Pdf
    }

    /// Renders what needs only the document (table, JSON, lines CSV, PDF); `None` for
    /// the usage exports, which read the stored events.
    pub fn render_document(self, doc: &Document) -> Option<Result<Vec<u8>, BillingError>> {
        Some(match self {
            Format::Table => Ok(render::table(doc).into_bytes()),
            Format::Json => Ok(render::json(doc).into_bytes()),
            Format::Csv => Ok(render::lines_csv(doc).into_bytes()),
            Format::Pdf => render::pdf(doc),
            Format::UsageCsv | Format::UsageCsvAsIssued => return None,
        })
    }

    /// `doc` in this format: an issued document's frozen bytes where the format has
    /// some (`frozen`), else rendered now; usage exports from the stored events. In one
    /// piece: downloads of the frozen usage export stream it instead
    /// (`Billing::usage_csv_as_issued`).
    pub async fn render(
        self,
        billing: &Billing<'_>,
        doc: &Document,
        frozen: Option<&Frozen>,
    ) -> Result<Rendered, BillingError> {
        let bytes = match (self, frozen) {
            (Format::Json, Some(f)) => f.document.clone().into_bytes(),
            (Format::Csv, Some(f)) => f.csv.clone().into_bytes(),
            (Format::Pdf, Some(f)) => f.pdf.clone(),
            (Format::UsageCsv, _) => billing.usage_csv(doc).await?.into_bytes(),
            (Format::UsageCsvAsIssued, _) => {
                let mut parts = billing
                    .usage_csv_as_issued(doc)
                    .await?
                    .ok_or_else(|| BillingError::NoFrozenUsage(doc.number.clone()))?;
                let mut bytes = Vec::new();
                while let Some(p) = parts.next().await? {
                    bytes.extend_from_slice(p.as_bytes());
                }
                bytes
            }
            (f, _) => f.render_document(doc).expect("a document format")?,
        };
        Ok(Rendered {
            bytes,
            content_type: self.content_type(),
            extension: self.extension(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_every_format_has_a_type_and_extension() {
        for f in Format::value_variants() {
            assert_eq!(Format::parse(f.name()), Some(*f));
            // The CLI's names are the same as the URLs'.
            assert_eq!(f.to_possible_value().unwrap().get_name(), f.name(), "{f:?}");
            assert!(!f.content_type().is_empty() && !f.extension().is_empty());
        }
        assert_eq!(Format::parse("xlsx"), None);
        assert!(Format::Pdf.is_binary() && !Format::Csv.is_binary());
    }
}
