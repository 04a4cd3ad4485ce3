//! `tokentally providers`: import the providers' usage and cost reports, and reconcile
//! them with what tokentally recorded.

use std::path::PathBuf;

use anyhow::Context as _;
use chrono::{Duration, NaiveDate, Utc};
use clap::Subcommand;
use rust_decimal::Decimal;

use super::invoice::ReportFormat;
use crate::alerts::{Kind, Reading, Severity, Transition};
use crate::bills::reconcile::{reconcile, Ownership, Reconciliation, Settings};
use crate::bills::{parse::parse, Report};
use crate::config::Config;
use crate::format::money;
use crate::store::Store;

#[derive(Subcommand, Debug)]
pub enum ProvidersCommand {
    /// Store the providers' usage and cost reports for a day range: from files (their
    /// admin APIs' JSON pages, or CSV with the same fields) or fetched with the
    /// configured admin keys (`[provider_bills.openai]`, `[provider_bills.anthropic]`).
    /// A re-import of a day replaces what an earlier one said of it.
    Import {
        /// Report files (JSON pages or CSV); without any, fetch from the providers.
        #[arg(long = "file")]
        files: Vec<PathBuf>,
        /// The provider of CSV files (JSON pages say it themselves): openai or anthropic.
        #[arg(long)]
        provider: Option<String>,
        /// Which report CSV files (or pages without results) are: usage or cost.
        #[arg(long, value_parser = parse_report)]
        report: Option<Report>,
        /// First day to fetch (UTC, YYYY-MM-DD; default: 7 days before `to`).
        #[arg(long)]
        from: Option<NaiveDate>,
        /// Last day to fetch, inclusive (default: yesterday, UTC).
        #[arg(long)]
        to: Option<NaiveDate>,
        /// Fetch only this provider (default: every one with an admin key).
        #[arg(long = "only")]
        only: Option<String>,
    },
    /// Compare per day, provider and model the providers' reports with what tokentally
    /// recorded: tokens, cost at the book's prices, the provider's own cost, and the
    /// causes that can be known. Exits 1 when a difference exceeds
    /// `provider_bills.threshold_usd` or a day has no provider report (and raises a
    /// `provider_bill` alert for it).
    Reconcile {
        /// First day (UTC, YYYY-MM-DD).
        #[arg(long)]
        from: NaiveDate,
        /// Last day, inclusive.
        #[arg(long)]
        to: NaiveDate,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
        /// Print every line, not only those with a difference or a cause.
        #[arg(long)]
        all: bool,
        /// Do not raise an alert for differences over the threshold.
        #[arg(long)]
        no_alert: bool,
    },
}

fn parse_report(s: &str) -> Result<Report, String> {
    Report::parse(s).ok_or_else(|| format!("{s:?} is not a report: usage or cost"))
}

pub async fn run(cfg: &Config, command: ProvidersCommand) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    match command {
        ProvidersCommand::Import {
            files,
            provider,
            report,
            from,
            to,
            only,
        } => {
            if !files.is_empty() {
                for f in &files {
                    let text = std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?;
                    let exports = parse(&text, provider.as_deref(), report)
                        .with_context(|| format!("{}", f.display()))?;
                    for e in exports {
                        let id = store
                            .import_bill(&e, &f.display().to_string(), "cli")
                            .await?;
                        println!(
                            "imported {} {} report from {}: {} day(s), {} row(s) ({id})",
                            e.provider,
                            e.report,
                            f.display(),
                            e.days.len(),
                            e.rows.len()
                        );
                    }
                }
                return Ok(());
            }
            let to = to.unwrap_or_else(|| Utc::now().date_naive() - Duration::days(1));
            let from = from.unwrap_or(to - Duration::days(6));
            anyhow::ensure!(from <= to, "--from {from} is after --to {to}");
            let mut fetched = 0;
            for (name, source) in cfg.provider_bills.sources() {
                if only.as_deref().is_some_and(|o| o != name) {
                    continue;
                }
                if source.key()?.is_none() {
                    if only.is_some() {
                        anyhow::bail!("{name}: no admin key (set [provider_bills.{name}] admin_key or admin_key_file)");
                    }
                    println!("{name}: no admin key configured; skipped");
                    continue;
                }
                println!("{name}: fetching usage and cost reports {from} .. {to}");
                for e in crate::bills::fetch::fetch(name, source, from, to).await? {
                    let id = store
                        .import_bill(&e, &format!("{name} admin API"), "cli")
                        .await?;
                    println!(
                        "imported {name} {} report: {} day(s), {} row(s) ({id})",
                        e.report,
                        e.days.len(),
                        e.rows.len()
                    );
                }
                fetched += 1;
            }
            anyhow::ensure!(
                fetched > 0,
                "nothing to fetch: give --file, or configure an admin key under [provider_bills.openai] or [provider_bills.anthropic]"
            );
            Ok(())
        }
        ProvidersCommand::Reconcile {
            from,
            to,
            format,
            all,
            no_alert,
        } => {
            anyhow::ensure!(from <= to, "--from {from} is after --to {to}");
            let book = super::load_book(cfg)?;
            let started = std::time::Instant::now();
            let r = compare(cfg, &store, &book, from, to).await?;
            match format {
                ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                _ => print!("{}", table(&r, all)),
            }
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                lines = r.lines.len(),
                "providers reconciled"
            );
            let over = r.over().count();
            if over > 0 {
                if !no_alert {
                    alert(cfg, &store, &r).await;
                }
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// The settings `reconcile` runs with, from the configuration.
pub fn settings(cfg: &Config) -> Settings {
    let own = |s: &crate::config::BillSourceConfig| Ownership {
        key_ids: s.gateway_key_ids.clone(),
        projects: s.gateway_projects.clone(),
    };
    Settings {
        threshold: cfg.provider_bills.threshold_usd,
        price_tolerance_percent: cfg.provider_bills.price_tolerance_percent,
        ownership: cfg
            .provider_bills
            .sources()
            .into_iter()
            .map(|(name, s)| (name.to_owned(), own(s)))
            .collect(),
    }
}

/// Reads both sides and compares them (the command and the dashboard page).
pub async fn compare(
    cfg: &Config,
    store: &Store,
    book: &crate::price::PriceBook,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Reconciliation, crate::store::StoreError> {
    let exports = store.latest_bills(from, to).await?;
    let recorded = store.recorded_for_bills(from, to).await?;
    Ok(reconcile(
        from,
        to,
        &recorded,
        &exports,
        book,
        &settings(cfg),
    ))
}

fn signed(d: Decimal) -> String {
    crate::format::signed(d, money)
}

/// The report as text: totals per provider, then each line with a difference or a cause.
pub fn table(r: &Reconciliation, all: bool) -> String {
    let mut out = format!(
        "Provider reports against recorded usage, {} .. {} (threshold {})\n",
        r.from,
        r.to,
        money(r.threshold)
    );
    for p in &r.providers {
        out.push_str(&format!(
            "{}: recorded {}, provider charged {} ({}) on the days its cost report covers{}; {} of {} day(s) covered by both reports; {} line(s) over the threshold\n",
            p.provider,
            money(p.ours),
            money(p.theirs),
            signed(p.theirs - p.ours),
            if p.ours_uncovered.is_zero() {
                String::new()
            } else {
                format!(" (and {} recorded on days it does not cover)", money(p.ours_uncovered))
            },
            p.days_covered,
            p.days,
            p.lines_over
        ));
    }
    for n in &r.not_compared {
        out.push_str(&format!(
            "{}: not compared (no report imported for the range): {} request(s), {} recorded\n",
            n.provider,
            n.requests,
            money(n.cost)
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<10} {:<10} {:<28} {:>12} {:>12} {:>10} {:>12} {:>12}  {}\n",
        "day",
        "provider",
        "model",
        "tokens ours",
        "theirs",
        "book diff",
        "charged",
        "cost diff",
        "causes"
    ));
    for l in r
        .lines
        .iter()
        .filter(|l| all || l.over || !l.causes.is_empty())
    {
        let causes: Vec<String> = l.causes.iter().map(|c| c.describe(&l.provider)).collect();
        out.push_str(&format!(
            "{:<10} {:<10} {:<28} {:>12} {:>12} {:>10} {:>12} {:>12}  {}{}\n",
            l.day,
            l.provider,
            l.model,
            l.ours.tokens(),
            l.theirs
                .as_ref()
                .map_or("-".into(), |t| t.tokens().to_string()),
            signed(l.book_difference),
            l.theirs.as_ref().map_or("-".into(), |t| money(t.cost)),
            l.cost_difference.map_or("-".into(), signed),
            if l.over { "OVER: " } else { "" },
            causes.join("; ")
        ));
    }
    out
}

/// One `provider_bill` incident per provider and range with lines over the threshold
/// (once: re-running the same range does not page again).
async fn alert(cfg: &Config, store: &Store, r: &Reconciliation) {
    let known = match store.incidents(None).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read incidents; not raising the provider_bill alert");
            return;
        }
    };
    let now = Utc::now();
    for p in r.providers.iter().filter(|p| p.lines_over > 0) {
        let entity = format!("{}:{}..{}", p.provider, r.from, r.to);
        if known
            .iter()
            .any(|i| i.kind == Kind::ProviderBill.as_str() && i.entity == entity)
        {
            eprintln!("alert for {entity} raised before; not again");
            continue;
        }
        let over: Vec<_> = r.over().filter(|l| l.provider == p.provider).collect();
        let first = over
            .iter()
            .take(3)
            .map(|l| {
                let why = l
                    .causes
                    .first()
                    .map(|c| c.describe(&l.provider))
                    .unwrap_or_else(|| "tokens or cost differ".into());
                format!("{} {}: {why}", l.day, l.model)
            })
            .collect::<Vec<_>>()
            .join("; ");
        let reading = Reading {
            kind: Kind::ProviderBill,
            entity: entity.clone(),
            institution: String::new(),
            firing: true,
            severity: Severity::Warning,
            observed: p.theirs,
            baseline: p.ours,
            threshold: r.threshold,
            message: format!(
                "{}'s reports differ from recorded usage {} .. {} on {} line(s) over {} (provider charged {}, recorded {}): {first}{}",
                p.provider,
                r.from,
                r.to,
                over.len(),
                money(r.threshold),
                money(p.theirs),
                money(p.ours),
                if over.len() > 3 { "; …" } else { "" }
            ),
        };
        let t = Transition {
            alert_id: crate::alerts::alert_id(&reading, now),
            resolved: false,
            reopened: false,
            at: now,
            reading,
        };
        if let Err(e) = crate::alerts::evaluator::record(store, std::slice::from_ref(&t)).await {
            tracing::error!(error = %e, "cannot record the provider_bill alert; delivering it anyway");
        }
        crate::alerts::deliver::deliver_now(cfg, &t).await;
        eprintln!("alert raised: {}", t.reading.message);
    }
}
