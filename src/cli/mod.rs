//! Command-line interface: one binary, one subcommand per job. Definitions and dispatch
//! live here; the invoice commands in `invoice`.

pub mod invoice;
pub mod keys;
pub mod limits;
pub mod providers;

use std::path::PathBuf;

use anyhow::Context as _;
use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::price::litellm::{import, ImportOptions};
use crate::price::PriceBook;
use crate::report::{Format, GroupBy};
use crate::shutdown::Shutdown;
use crate::store::Store;

#[derive(Parser, Debug)]
#[command(
    name = "tokentally",
    version,
    about = "Usage billing and spend analytics for LLM API gateways"
)]
pub struct Cli {
    /// Config file (TOML). Environment variables TOKENTALLY_* override its values.
    #[arg(long, global = true, env = "TOKENTALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "TOKENTALLY_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the database and apply pending schema migrations (idempotent).
    Migrate {
        /// On every replica of this cluster (of the servers' `remote_servers`), as
        /// replicated tables; default `clickhouse.cluster` (empty: one server).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Consume usage events from Kafka, price them and store them (until SIGINT/SIGTERM).
    Ingest,
    /// migrate, then ingest and serve, in one process.
    Run,
    /// The dashboard and JSON API (until SIGINT/SIGTERM).
    Serve,
    /// The gateway: proxy for OpenAI, Anthropic and Gemini with proxy keys, per-key rate
    /// limits and one usage event per request (until SIGINT/SIGTERM).
    Gateway,
    /// Proxy keys, ingest tokens and institutions' own provider keys.
    Keys {
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Spend, request and token limits per institution, user or key (enforced by the
    /// gateway in mode `block`, alerted in mode `alert`).
    Limits {
        #[command(subcommand)]
        command: limits::LimitsCommand,
    },
    /// A stand-in for the OpenAI, Anthropic and Gemini APIs, for demos, tests and
    /// benchmarks (until SIGINT/SIGTERM).
    Simulate(crate::simulate::SimulateArgs),
    /// Dashboard users (stored in the users file with argon2 password hashes).
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// API tokens (stored in the users file as SHA-256 hashes; shown once).
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Publish synthetic gateway traffic to the usage topic.
    Emit(crate::emit::EmitArgs),
    /// Work with price books.
    Prices {
        #[command(subcommand)]
        command: PricesCommand,
    },
    /// Re-rate stored events whose price changed or was missing.
    Reprice {
        /// First day (UTC, YYYY-MM-DD) whose events are re-rated.
        #[arg(long)]
        since: NaiveDate,
        /// Show what would change without writing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The providers' own usage and cost reports: import them, and reconcile them with
    /// what tokentally recorded.
    Providers {
        #[command(subcommand)]
        command: providers::ProvidersCommand,
    },
    /// Reports over stored usage.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
    /// Invoices: draft, issue (numbered, frozen), void (credit note), show, list.
    Invoice {
        #[command(subcommand)]
        command: invoice::InvoiceCommand,
    },
    /// The invoice register: check the ledger topic against ClickHouse's copies, and
    /// restore it from them if the topic was lost.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Spend and pipeline alerts.
    Alerts {
        #[command(subcommand)]
        command: AlertsCommand,
    },
    /// Per institution: invoice total vs. stored events, unpriced and rejected counts;
    /// per partition: Kafka messages consumed vs. rows stored. Exits 1 on a mismatch.
    Reconcile {
        /// Billing period, YYYY-MM.
        #[arg(long)]
        period: crate::billing::Period,
        #[arg(long, value_enum, default_value = "table")]
        format: invoice::ReportFormat,
    },
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Compare the ledger topic with the documents ClickHouse holds; exits 1 if the ledger
    /// lacks an issued document or the two disagree (issuing is refused until fixed).
    Verify {
        #[arg(long, value_enum, default_value = "table")]
        format: invoice::ReportFormat,
    },
    /// Re-append the documents ClickHouse holds and the ledger lacks, numbers unchanged,
    /// so that numbering continues above the highest number ever issued.
    Restore,
}

#[derive(Subcommand, Debug)]
pub enum AlertsCommand {
    /// Run the spend detectors over stored history as if live at every step; prints the
    /// alerts they would have fired and resolved, sending nothing.
    Backtest {
        /// First day (UTC, YYYY-MM-DD).
        #[arg(long)]
        from: NaiveDate,
        /// Last day, inclusive.
        #[arg(long)]
        to: NaiveDate,
        /// Hours between evaluations.
        #[arg(long, default_value_t = 1)]
        step_hours: u32,
        /// Score the spike alerts against labelled incidents: a JSON list of
        /// {"institution", "key" ("institution/key", optional), "start", "end", "what"};
        /// prints precision, recall, detection delay, false pages per institution-week and
        /// resolution time instead of the alerts.
        #[arg(long)]
        labels: Option<std::path::PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        format: invoice::ReportFormat,
    },
    /// Incidents of the last N days (open ones always).
    List {
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum PricesCommand {
    /// Validate the price book: numbers, dates, regexes, overlapping entries.
    Check {
        /// Price book file or folder (default: config `prices.path`).
        path: Option<PathBuf>,
    },
    /// Convert LiteLLM's model_prices_and_context_window.json to price-book TOML.
    ImportLitellm {
        /// The LiteLLM JSON file.
        file: PathBuf,
        /// Where to write the TOML (default: standard output).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Date the imported prices take effect (YYYY-MM-DD; default: today, UTC).
        #[arg(long)]
        effective_from: Option<NaiveDate>,
    },
}

#[derive(Subcommand, Debug)]
pub enum UsersCommand {
    /// Add a user, or replace the password and role of an existing one.
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: crate::people::Role,
        /// The institution an `institution` user may see.
        #[arg(long)]
        institution: Option<String>,
        /// Read the password from standard input (default: generate and print one).
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users and tokens (names and roles only).
    List,
}

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Create an API token; it is printed once and only its hash is stored.
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: crate::people::Role,
        #[arg(long)]
        institution: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReportCommand {
    /// Exact, deduplicated spend totals for a date range.
    Spend(SpendArgs),
}

#[derive(Args, Debug)]
pub struct SpendArgs {
    /// First day, inclusive (UTC, YYYY-MM-DD).
    #[arg(long)]
    pub from: NaiveDate,
    /// Last day, inclusive (UTC, YYYY-MM-DD).
    #[arg(long)]
    pub to: NaiveDate,
    #[arg(long, value_enum, default_value = "institution")]
    pub group_by: GroupBy,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKENTALLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let cfg = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Migrate { cluster } => {
            let mut cfg = cfg;
            if let Some(c) = cluster {
                cfg.clickhouse.cluster = c;
            }
            run_migrate(&cfg).await
        }
        Command::Ingest => crate::app::ingest::run(&cfg, Shutdown::on_signals()).await,
        Command::Run => {
            run_migrate(&cfg).await?;
            crate::app::run(&cfg, Shutdown::on_signals()).await
        }
        Command::Serve => crate::app::serve(&cfg, Shutdown::on_signals()).await,
        Command::Gateway => crate::app::gateway::run(&cfg, Shutdown::on_signals()).await,
        Command::Keys { command } => keys::run(&cfg, command).await,
        Command::Limits { command } => limits::run(&cfg, command).await,
        Command::Simulate(args) => crate::simulate::run(args, Shutdown::on_signals()).await,
        Command::Users { command } => users(&cfg, command),
        Command::Tokens {
            command:
                TokensCommand::Add {
                    name,
                    role,
                    institution,
                },
        } => {
            use crate::people::{check_role, random_hex, token_hash, TokenEntry, UsersFile};
            check_role(role, institution.as_deref()).map_err(anyhow::Error::msg)?;
            let path = &cfg.web.users_file;
            let mut file = UsersFile::load(path)?;
            let token = format!("tt_{}", random_hex(24));
            file.tokens.retain(|t| t.name != name);
            file.tokens.push(TokenEntry {
                name: name.clone(),
                role,
                institution,
                token_hash: token_hash(&token),
            });
            file.save(path)?;
            eprintln!("token `{name}` stored in {} (only its hash); use it as `Authorization: Bearer <token>`:", path.display());
            println!("{token}");
            Ok(())
        }
        Command::Emit(args) => crate::emit::run(&cfg, &args).await,
        Command::Prices { command } => prices(&cfg, command),
        Command::Reprice { since, dry_run } => {
            let book = load_book(&cfg)?;
            let store = Store::new(&cfg.clickhouse);
            let summary = crate::reprice::reprice(&store, &book, since, dry_run).await?;
            println!("{summary}");
            Ok(())
        }
        Command::Alerts {
            command:
                AlertsCommand::Backtest {
                    from,
                    to,
                    step_hours,
                    labels,
                    format,
                },
        } => {
            let store = Store::new(&cfg.clickhouse);
            let (incidents, institutions) =
                crate::alerts::backtest::backtest(&cfg, &store, from, to, step_hours).await?;
            if let Some(path) = labels {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let labels: Vec<crate::alerts::score::Label> = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a JSON list of labels", path.display()))?;
                let (start, end) = crate::alerts::backtest::range(from, to);
                let s = crate::alerts::score::score(
                    &incidents,
                    &labels,
                    institutions,
                    start,
                    end,
                    chrono::Duration::hours(i64::from(cfg.alerts.spike.window_hours.max(1))),
                );
                match format {
                    invoice::ReportFormat::Json => {
                        println!("{}", serde_json::to_string_pretty(&s)?)
                    }
                    invoice::ReportFormat::Table => print!("{}", crate::alerts::score::table(&s)),
                }
                return Ok(());
            }
            match format {
                invoice::ReportFormat::Json => {
                    println!("{}", serde_json::to_string_pretty(&incidents)?)
                }
                invoice::ReportFormat::Table => {
                    print!("{}", crate::alerts::backtest::table(&incidents))
                }
            }
            Ok(())
        }
        Command::Alerts {
            command: AlertsCommand::List { days },
        } => {
            let store = Store::new(&cfg.clickhouse);
            let since = chrono::Utc::now() - chrono::Duration::days(days);
            for i in crate::alerts::evaluator::incidents(&store, None, since).await? {
                println!(
                    "{:<17} {:<9} {:<8} {:<18} {:<32} {}",
                    i.alert_id, i.state, i.severity, i.kind, i.entity, i.message
                );
            }
            Ok(())
        }
        Command::Invoice { command } => invoice::invoice(&cfg, command).await,
        Command::Ledger { command } => invoice::ledger(&cfg, command).await,
        Command::Reconcile { period, format } => invoice::reconcile(&cfg, period, format).await,
        Command::Providers { command } => providers::run(&cfg, command).await,
        Command::Report {
            command: ReportCommand::Spend(args),
        } => {
            let store = Store::new(&cfg.clickhouse);
            let rows = crate::report::spend(&store, args.from, args.to, args.group_by).await?;
            print!(
                "{}",
                crate::report::render(&rows, args.group_by, args.format)?
            );
            Ok(())
        }
    }
}

fn users(cfg: &Config, command: UsersCommand) -> anyhow::Result<()> {
    use crate::people::{check_role, hash_password, random_hex, UserEntry, UsersFile};
    let path = &cfg.web.users_file;
    let mut file = UsersFile::load(path)?;
    match command {
        UsersCommand::Add {
            name,
            role,
            institution,
            password_stdin,
        } => {
            check_role(role, institution.as_deref()).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(!name.trim().is_empty(), "the user name is empty");
            let (password, generated) = if password_stdin {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                (line.trim_end_matches(['\n', '\r']).to_owned(), false)
            } else {
                (random_hex(10), true)
            };
            anyhow::ensure!(password.len() >= 8, "passwords need at least 8 characters");
            file.users.retain(|u| u.name != name);
            file.users.push(UserEntry {
                name: name.clone(),
                role,
                institution,
                password_hash: hash_password(&password)?,
            });
            file.save(path)?;
            eprintln!("user `{name}` stored in {}", path.display());
            if generated {
                println!("{password}");
            }
        }
        UsersCommand::List => {
            for u in &file.users {
                println!(
                    "user  {:<24} {:<12} {}",
                    u.name,
                    u.role.as_str().to_owned(),
                    u.institution.as_deref().unwrap_or("")
                );
            }
            for t in &file.tokens {
                println!(
                    "token {:<24} {:<12} {}",
                    t.name,
                    t.role.as_str().to_owned(),
                    t.institution.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

pub fn load_book(cfg: &Config) -> anyhow::Result<PriceBook> {
    PriceBook::load(&cfg.prices.path)
        .with_context(|| format!("loading price book {}", cfg.prices.path.display()))
}

async fn run_migrate(cfg: &Config) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    let cluster = Some(cfg.clickhouse.cluster.as_str()).filter(|c| !c.is_empty());
    let applied = crate::store::migrate::migrate_on(&store, cluster)
        .await
        .with_context(|| {
            format!(
                "migrating {} at {}{}",
                cfg.clickhouse.database,
                cfg.clickhouse.url,
                cluster
                    .map(|c| format!(" on cluster {c}"))
                    .unwrap_or_default()
            )
        })?;
    if applied.is_empty() {
        tracing::info!(database = store.database(), "schema is up to date");
    } else {
        tracing::info!(database = store.database(), ?applied, "migrations applied");
    }
    Ok(())
}

fn prices(cfg: &Config, command: PricesCommand) -> anyhow::Result<()> {
    match command {
        PricesCommand::Check { path } => {
            let path = path.unwrap_or_else(|| cfg.prices.path.clone());
            let book = PriceBook::load(&path)?;
            let providers: std::collections::BTreeSet<&str> =
                book.entries().iter().map(|e| e.provider.as_str()).collect();
            println!(
                "{}: {} entries, providers {}, version {}: OK",
                path.display(),
                book.entries().len(),
                providers.into_iter().collect::<Vec<_>>().join(", "),
                book.version()
            );
            Ok(())
        }
        PricesCommand::ImportLitellm {
            file,
            out,
            effective_from,
        } => {
            let json = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let date = effective_from.unwrap_or_else(|| chrono::Utc::now().date_naive());
            let (toml, n) = import(&json, &ImportOptions::mainstream(date))
                .with_context(|| format!("importing {}", file.display()))?;
            let header = format!(
                "# Imported by `tokentally prices import-litellm` from {} on {}.\n\n",
                file.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                chrono::Utc::now().date_naive()
            );
            match out {
                Some(path) => {
                    std::fs::write(&path, format!("{header}{toml}"))
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {n} price entries to {}", path.display());
                }
                None => print!("{header}{toml}"),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        for args in [
            &[
                "tokentally",
                "invoice",
                "show",
                "--number",
                "TT-2026-000001",
            ][..],
            &[
                "tokentally",
                "invoice",
                "draft",
                "--institution",
                "a",
                "--period",
                "2026-10",
                "--format",
                "usage-csv",
            ],
            &[
                "tokentally",
                "reconcile",
                "--period",
                "2026-10",
                "--format",
                "json",
            ],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(Cli::try_parse_from(["tokentally", "reconcile", "--period", "2026-13"]).is_err());
    }

    #[test]
    fn group_by_values_are_spelled_as_documented() {
        for (arg, want) in [
            ("institution", GroupBy::Institution),
            ("model", GroupBy::Model),
            ("api_key", GroupBy::ApiKey),
            ("user", GroupBy::User),
        ] {
            let cli = Cli::try_parse_from([
                "tokentally",
                "report",
                "spend",
                "--from",
                "2026-10-01",
                "--to",
                "2026-10-31",
                "--group-by",
                arg,
                "--format",
                "json",
            ])
            .unwrap_or_else(|e| panic!("{arg}: {e}"));
            match cli.command {
                Command::Report {
                    command: ReportCommand::Spend(a),
                } => assert_eq!(a.group_by, want),
                other => panic!("{other:?}"),
            }
        }
    }
}
