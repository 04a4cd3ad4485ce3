//! `tokentally limits …`: spend, request and token limits the gateway enforces.

use chrono::Utc;
use clap::Subcommand;
use rust_decimal::Decimal;

use super::invoice::ReportFormat;
use crate::config::Config;
use crate::keys::cli_actor;
use crate::limits::{Limit, LimitMode, LimitPeriod, LimitScope, Metric};
use crate::store::Store;

#[derive(Subcommand, Debug)]
pub enum LimitsCommand {
    /// Set (add or change) a limit. Without --user or --key it is the institution's.
    /// Every gateway applies it within `gateway.limits_refresh_ms` (default 1 s).
    ///
    /// Examples:
    ///   tokentally limits set --institution uni-a --usd 500 --per month
    ///   tokentally limits set --institution uni-a --user alice --requests 15 --per day
    ///   tokentally limits set --institution uni-a --key tk_3f… --usd 20 --per week --mode alert
    Set {
        #[arg(long)]
        institution: String,
        #[arg(long, conflicts_with = "key")]
        user: Option<String>,
        /// A proxy key id (`tokentally keys list` shows them).
        #[arg(long)]
        key: Option<String>,
        /// Spend in USD (exact decimal, e.g. 12.50).
        #[arg(long, group = "amount")]
        usd: Option<Decimal>,
        /// Requests the provider served.
        #[arg(long, group = "amount")]
        requests: Option<u64>,
        /// Prompt plus output tokens.
        #[arg(long, group = "amount")]
        tokens: Option<u64>,
        /// day, week (from Monday) or month, in the institution's time zone.
        #[arg(long, default_value = "month")]
        per: LimitPeriod,
        /// block: the gateway refuses what would pass the limit; alert: alerts only.
        #[arg(long, default_value = "block")]
        mode: LimitMode,
    },
    /// Remove a limit by id (as `limits list` shows it).
    Remove { limit_id: String },
    /// Every limit with its standing this period: used, reserved by running requests,
    /// remaining, requests refused.
    List {
        #[arg(long)]
        institution: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
}

pub async fn run(cfg: &Config, command: LimitsCommand) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    match command {
        LimitsCommand::Set {
            institution,
            user,
            key,
            usd,
            requests,
            tokens,
            per,
            mode,
        } => {
            let (metric, amount) = match (usd, requests, tokens) {
                (Some(d), None, None) => (Metric::Usd, d),
                (None, Some(n), None) => (Metric::Requests, Decimal::from(n)),
                (None, None, Some(n)) => (Metric::Tokens, Decimal::from(n)),
                _ => anyhow::bail!("give exactly one of --usd, --requests, --tokens"),
            };
            let (scope, subject) = match (user, key) {
                (Some(u), None) => (LimitScope::User, u),
                (None, Some(k)) => (LimitScope::Key, k),
                _ => (LimitScope::Institution, String::new()),
            };
            if cfg.institution(&institution).is_none() {
                eprintln!(
                    "note: institution {institution} is not in the config; its periods use UTC"
                );
            }
            let limit = Limit {
                institution_id: institution,
                scope,
                subject,
                metric,
                period: per,
                amount,
                mode,
            };
            crate::limits::set(&store, &limit, &cli_actor()).await?;
            println!("{}", limit.id());
            eprintln!(
                "set: {} may use {} ({}); gateways apply it within {} ms",
                limit.subject_label(),
                limit.amount_label(),
                limit.mode,
                cfg.gateway.limits_refresh_ms
            );
            Ok(())
        }
        LimitsCommand::Remove { limit_id } => {
            let configured = crate::limits::configured(&cfg.limits)?;
            let derived = people_limits(cfg, &store).await?;
            let l = crate::limits::remove(&store, &configured, &derived, &limit_id, &cli_actor())
                .await?;
            eprintln!("removed: {} ({})", l.id(), l.amount_label());
            Ok(())
        }
        LimitsCommand::List {
            institution,
            format,
        } => {
            let configured = crate::limits::configured(&cfg.limits)?;
            let derived = people_limits(cfg, &store).await?;
            let rows = crate::limits::standings(
                &store,
                &configured,
                &derived,
                &|i| cfg.institution_tz(i),
                institution.as_deref(),
                Utc::now(),
            )
            .await?;
            match format {
                ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                ReportFormat::Table => {
                    println!(
                        "{:<48} {:<6} {:>14} {:>14} {:>12} {:>14} {:>8}  period",
                        "limit", "mode", "limit", "used", "reserved", "remaining", "blocked"
                    );
                    for r in rows {
                        println!(
                            "{:<48} {:<6} {:>14} {:>14} {:>12} {:>14} {:>8}  {} .. {}",
                            r.limit_id,
                            r.mode,
                            r.limit,
                            r.used,
                            r.reserved,
                            r.remaining,
                            r.blocked,
                            r.period_start.format("%Y-%m-%d %H:%M"),
                            r.period_end.format("%Y-%m-%d %H:%M UTC"),
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

/// The limits people imply (group defaults and budgets), as the gateways apply them.
async fn people_limits(cfg: &Config, store: &Store) -> anyhow::Result<crate::limits::Derived> {
    let groups = crate::people::groups::configured(&cfg.groups)?;
    Ok(crate::people::directory::Directory::load(store, &groups)
        .await?
        .derived())
}
