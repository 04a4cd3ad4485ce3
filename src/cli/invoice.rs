//! `tokentally invoice …`, `tokentally ledger …` and `tokentally reconcile`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand, ValueEnum};

use crate::billing::audit::{Audit, Reconciliation};
use crate::billing::issue::Billing;
use crate::billing::ledger;
use crate::billing::{Document, Period};
use crate::config::Config;
use crate::format::money;
use crate::store::Store;

#[derive(Subcommand, Debug)]
pub enum InvoiceCommand {
    /// Compute the invoice a period would get now (nothing is stored).
    Draft(Target),
    /// Issue the invoice of an ended period: numbered, frozen and stored.
    Issue {
        #[command(flatten)]
        target: Target,
        /// Issue even though the period has unpriced usage (listed on the invoice, not billed).
        #[arg(long)]
        allow_unpriced: bool,
    },
    /// Void an issued invoice by issuing a credit note that references it.
    Void {
        /// The invoice number (or give --institution and --period).
        #[arg(long)]
        number: Option<String>,
        #[arg(long)]
        institution: Option<String>,
        #[arg(long)]
        period: Option<Period>,
        /// Why (kept in the ledger).
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long, value_enum, default_value = "table")]
        format: DocFormat,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// An issued invoice exactly as frozen (or, for a period not issued yet, its draft).
    Show {
        #[command(flatten)]
        target: Target,
        /// Show this document number instead of an institution's period.
        #[arg(long, conflicts_with_all = ["institution", "period"])]
        number: Option<String>,
    },
    /// List issued invoices and credit notes.
    List {
        #[arg(long)]
        institution: Option<String>,
    },
    /// Check a document against the ledger, the stored events and the price book: that its
    /// bytes are as issued, its hash chain holds, and each line recomputes from its events.
    /// Exits 1 and names what differs when anything does.
    Verify {
        /// A document's JSON rendering (`invoice show --format json`), or a document
        /// number (checks ClickHouse's stored copy).
        document: String,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
    /// The events behind one line of an issued invoice, as CSV ("explain this line").
    Explain {
        #[arg(long)]
        number: String,
        /// The line, 1-based as printed.
        #[arg(long)]
        line: usize,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct Target {
    #[arg(long)]
    pub institution: Option<String>,
    /// Billing period, YYYY-MM (calendar month in the institution's time zone).
    #[arg(long)]
    pub period: Option<Period>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: DocFormat,
    /// Write to this file instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub use crate::billing::format::Format as DocFormat;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Table,
    Json,
}

fn emit(bytes: &[u8], output: Option<&PathBuf>, binary: bool) -> anyhow::Result<()> {
    match output {
        Some(path) => {
            std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} ({} bytes)", path.display(), bytes.len());
        }
        None => {
            let mut out = std::io::stdout().lock();
            if binary && out.is_terminal() {
                bail!("refusing to write a PDF to the terminal; use --output FILE or redirect");
            }
            out.write_all(bytes)?;
            out.flush()?;
        }
    }
    Ok(())
}

/// Writes an issued document's frozen usage export part by part (never whole).
async fn emit_usage_as_issued(
    billing: &Billing<'_>,
    d: &Document,
    output: Option<&PathBuf>,
) -> anyhow::Result<()> {
    let mut parts = billing
        .usage_csv_as_issued(d)
        .await?
        .ok_or_else(|| crate::billing::BillingError::NoFrozenUsage(d.number.clone()))?;
    let mut out: Box<dyn Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut written = 0;
    while let Some(p) = parts.next().await? {
        out.write_all(p.as_bytes())?;
        written += p.len();
    }
    out.flush()?;
    if let Some(path) = output {
        eprintln!("wrote {} ({written} bytes)", path.display());
    }
    Ok(())
}

async fn render_doc(
    billing: &Billing<'_>,
    d: &Document,
    format: DocFormat,
    frozen: Option<&crate::store::invoices::Frozen>,
) -> anyhow::Result<(Vec<u8>, bool)> {
    Ok((
        format.render(billing, d, frozen).await?.bytes,
        format.is_binary(),
    ))
}

pub async fn invoice(cfg: &Config, command: InvoiceCommand) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    let book = super::load_book(cfg)?;
    let billing = Billing::new(cfg, &store, &book);
    match command {
        InvoiceCommand::Draft(t) => {
            let ledger = billing.sync().await?;
            let (inst, period) = need(&t)?;
            let d = billing.draft(&ledger, inst, period).await?;
            let (bytes, bin) = render_doc(&billing, &d, t.format, None).await?;
            emit(&bytes, t.output.as_ref(), bin)
        }
        InvoiceCommand::Issue {
            target,
            allow_unpriced,
        } => {
            let (inst, period) = need(&target)?;
            let d = billing.issue(inst, period, allow_unpriced).await?;
            eprintln!(
                "issued {} for {} {}: {}",
                d.number,
                inst,
                period,
                money(d.total)
            );
            let frozen = store.frozen_invoice(&d.number).await?;
            let (bytes, bin) = render_doc(&billing, &d, target.format, frozen.as_ref()).await?;
            emit(&bytes, target.output.as_ref(), bin)
        }
        InvoiceCommand::Void {
            number,
            institution,
            period,
            reason,
            format,
            output,
        } => {
            let number = match (number, institution, period) {
                (Some(n), _, _) => n,
                (None, Some(i), Some(p)) => {
                    let ledger = billing.sync().await?;
                    ledger
                        .live_invoice(&i, p)
                        .map(|d| d.number.clone())
                        .with_context(|| format!("{i} {p} has no issued invoice to void"))?
                }
                _ => bail!("give --number, or --institution and --period"),
            };
            let credit = billing.void(&number, &reason).await?;
            eprintln!("voided {number} with credit note {}", credit.number);
            let frozen = store.frozen_invoice(&credit.number).await?;
            let (bytes, bin) = render_doc(&billing, &credit, format, frozen.as_ref()).await?;
            emit(&bytes, output.as_ref(), bin)
        }
        InvoiceCommand::Show { target, number } => {
            let ledger = billing.sync().await?;
            let doc = match &number {
                Some(n) => ledger.docs.iter().find(|d| &d.number == n).cloned(),
                None => {
                    let (inst, period) = need(&target)?;
                    ledger.live_invoice(inst, period).cloned()
                }
            };
            match doc {
                Some(d) if target.format == DocFormat::UsageCsvAsIssued => {
                    emit_usage_as_issued(&billing, &d, target.output.as_ref()).await
                }
                Some(d) => {
                    let frozen = store.frozen_invoice(&d.number).await?;
                    let (bytes, bin) =
                        render_doc(&billing, &d, target.format, frozen.as_ref()).await?;
                    emit(&bytes, target.output.as_ref(), bin)
                }
                None => {
                    if let Some(n) = number {
                        bail!("no document numbered {n}");
                    }
                    let (inst, period) = need(&target)?;
                    eprintln!("{inst} {period} is not issued; showing the live draft");
                    let d = billing.draft(&ledger, inst, period).await?;
                    let (bytes, bin) = render_doc(&billing, &d, target.format, None).await?;
                    emit(&bytes, target.output.as_ref(), bin)
                }
            }
        }
        InvoiceCommand::List { institution } => {
            let ledger = billing.sync().await?;
            println!(
                "{:<16} {:<12} {:<20} {:<8} {:<11} {:>14}  status",
                "number", "kind", "institution", "period", "issued", "total"
            );
            for d in ledger
                .docs
                .iter()
                .filter(|d| institution.as_deref().is_none_or(|i| d.customer.id == i))
            {
                let status = match (&d.references, ledger.voided_by(&d.number)) {
                    (Some(r), _) => format!("cancels {r}"),
                    (None, Some(c)) => format!("voided by {c}"),
                    (None, None) => "issued".into(),
                };
                println!(
                    "{:<16} {:<12} {:<20} {:<8} {:<11} {:>14}  {status}",
                    d.number,
                    match d.kind {
                        crate::billing::Kind::Invoice => "invoice",
                        crate::billing::Kind::CreditNote => "credit note",
                    },
                    d.customer.id,
                    d.period.to_string(),
                    d.issue_date.map(|x| x.to_string()).unwrap_or_default(),
                    money(d.total)
                );
            }
            Ok(())
        }
        InvoiceCommand::Verify { document, format } => {
            let bytes = if std::path::Path::new(&document).exists() {
                std::fs::read(&document).with_context(|| format!("reading {document}"))?
            } else {
                store
                    .frozen_invoice(&document)
                    .await?
                    .with_context(|| {
                        format!("{document} is neither a file nor a stored document number")
                    })?
                    .document
                    .into_bytes()
            };
            let v = Audit::new(cfg, &store, &book).verify(&bytes).await?;
            match format {
                ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                ReportFormat::Table => print!("{}", verification_table(&v)),
            }
            if !v.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        InvoiceCommand::Explain {
            number,
            line,
            output,
        } => {
            let ledger = billing.sync().await?;
            let doc = ledger
                .docs
                .iter()
                .find(|d| d.number == number)
                .with_context(|| format!("no document numbered {number}"))?;
            // Written as the rows are known (a line of millions of events is never held).
            let audit = Audit::new(cfg, &store, &book);
            match output {
                Some(path) => {
                    Audit::explainable(doc, line)?;
                    let mut file = tokio::fs::File::create(&path)
                        .await
                        .with_context(|| format!("writing {}", path.display()))?;
                    let rows = audit.explain_line(doc, line, &mut file).await?;
                    eprintln!("wrote {} ({rows} events)", path.display());
                }
                None => {
                    audit
                        .explain_line(doc, line, &mut tokio::io::stdout())
                        .await?;
                }
            }
            Ok(())
        }
    }
}

fn verification_table(v: &crate::billing::audit::InvoiceVerification) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let d = &v.document;
    let _ = writeln!(
        s,
        "{} {}",
        d.number,
        if d.ok {
            "document: as issued, hash chain holds"
        } else {
            "document: ALTERED"
        }
    );
    for p in &d.problems {
        let _ = writeln!(s, "  - {p}");
    }
    if let Some(n) = &v.price_book_note {
        let _ = writeln!(s, "note: {n}");
    }
    for l in &v.lines {
        let later = if l.arrived_later > 0 {
            format!(
                " ({} event(s) stored since: later adjustments)",
                l.arrived_later
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "line {:>3} {:<8} {}{later}",
            l.line,
            if l.ok { "matches" } else { "DIFFERS" },
            l.description
        );
        for p in &l.problems {
            let _ = writeln!(s, "           - {p}");
        }
    }
    let _ = writeln!(s, "{}", if v.ok { "verified" } else { "NOT verified" });
    s
}

fn need(t: &Target) -> anyhow::Result<(&str, Period)> {
    match (&t.institution, t.period) {
        (Some(i), Some(p)) => Ok((i, p)),
        _ => bail!("give --institution ID and --period YYYY-MM"),
    }
}

pub async fn ledger(cfg: &Config, command: super::LedgerCommand) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    let log = ledger::LedgerLog::new(cfg);
    match command {
        super::LedgerCommand::Verify { format } => {
            let v = log.verify(&store).await?;
            match format {
                ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                ReportFormat::Table => {
                    println!(
                        "ledger topic {}: {}",
                        log.topic(),
                        if v.topic_exists { "present" } else { "MISSING" }
                    );
                    println!("documents in the ledger:     {}", v.in_ledger);
                    println!("documents in ClickHouse:     {}", v.in_clickhouse);
                    let list = |l: &[String]| {
                        if l.is_empty() {
                            "none".to_owned()
                        } else {
                            l.join(", ")
                        }
                    };
                    println!(
                        "missing from the ledger:     {}",
                        list(&v.missing_from_ledger)
                    );
                    println!("not yet copied to ClickHouse: {}", list(&v.not_copied));
                    println!("conflicts:                   {}", list(&v.conflicts));
                }
            }
            if !v.ok() {
                eprintln!(
                    "the ledger is not whole: issuing is refused. {}",
                    if v.conflicts.is_empty() {
                        "Run `tokentally ledger restore`."
                    } else {
                        "The conflicts need a person: compare both sides."
                    }
                );
                std::process::exit(1);
            }
            eprintln!("ledger ok");
            Ok(())
        }
        super::LedgerCommand::Restore => {
            let restored = log.restore(&store).await?;
            if restored.is_empty() {
                eprintln!("nothing to restore: the ledger holds every document ClickHouse has");
            } else {
                eprintln!(
                    "restored {} document(s) to ledger topic {}: {}",
                    restored.len(),
                    log.topic(),
                    restored.join(", ")
                );
            }
            Ok(())
        }
    }
}

pub async fn reconcile(cfg: &Config, period: Period, format: ReportFormat) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    let book = super::load_book(cfg)?;
    let r = Audit::new(cfg, &store, &book).reconcile(period).await?;
    match format {
        ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        ReportFormat::Table => print!("{}", reconcile_table(&r)),
    }
    if r.problems > 0 {
        eprintln!("{} discrepancies found", r.problems);
        std::process::exit(1);
    }
    Ok(())
}

fn reconcile_table(r: &Reconciliation) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "period {} (each institution's billing month, in its time zone)",
        r.period
    );
    let _ = writeln!(
        s,
        "{:<20} {:<16} {:>13} {:>13} {:>13} {:>11} {:>13} {:>15} {:>15} {:>13}  status",
        "institution",
        "invoice",
        "invoice_total",
        "billed",
        "events_amount",
        "difference",
        "priced_events",
        "unpriced_events",
        "unpriced_listed",
        "rejected_events"
    );
    for i in &r.institutions {
        let _ = writeln!(
            s,
            "{:<20} {:<16} {:>13} {:>13} {:>13} {:>11} {:>13} {:>15} {:>15} {:>13}  {}",
            i.institution,
            i.invoice.as_deref().unwrap_or("-"),
            i.invoice_total
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            i.billed.to_string(),
            i.events_amount.to_string(),
            i.difference.to_string(),
            i.priced_events,
            i.unpriced_events,
            i.unpriced_listed,
            i.rejected_events,
            i.status
        );
    }
    let _ = writeln!(
        s,
        "rejected messages naming no institution (UTC month): {}",
        r.rejected_unattributed
    );
    let _ = writeln!(s, "\nkafka partition  consumed  stored  status");
    for p in &r.partitions {
        let _ = writeln!(
            s,
            "{:>15} {:>9} {:>7}  {}",
            p.partition, p.consumed, p.stored, p.status
        );
    }
    s
}
