//! The invoice ledger: a single-partition Kafka topic that orders every request to issue
//! or void a document. Numbers are assigned by folding the log in order, so they are
//! gap-free and never reused whoever issues, from however many processes at once:
//!
//! 1. An issuer folds the log up to its end `E`, drafts the document from that state
//!    (including adjustments for what earlier documents billed) and appends a request
//!    that says `based_on = E`.
//! 2. Folding is deterministic. A request is accepted unless the period already has a
//!    live invoice, or another document for the same institution was accepted after
//!    `based_on` (the draft would be stale: the issuer drafts again and retries).
//! 3. Each accepted request takes the next number. The request is durable in Kafka
//!    before anyone learns its number, so a crash never leaves a gap: the next fold
//!    (any issuer, `serve`) materialises it into ClickHouse.
//!
//! ClickHouse's `invoices` table is a copy, keyed by sequence number, written as part of
//! every issue. The two check each other: a topic can vanish (retention misconfigured,
//! cluster migrated, deleted by mistake), and a register that restarted empty would hand
//! out used numbers. So a ledger that lacks a document ClickHouse holds is never used for
//! issuing (`LedgerError::Incomplete`), and `restore` re-appends the missing documents
//! with their numbers, after which numbering continues above the highest ever used.

mod fold;
mod log;

pub use fold::{compare, voids, Comparison, Ledger, Outcome, Record, Request, Verification};
pub use log::{materialize, stored_documents, LedgerCache, LedgerError, LedgerLog};
