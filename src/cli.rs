//! Command-line interface: one binary, one subcommand per job.

use std::path::PathBuf;

use anyhow::Context as _;
use chrono::NaiveDate;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Config;
use crate::price::litellm::{import, ImportOptions};
use crate::price::PriceBook;
use crate::shutdown::Shutdown;
use crate::store::{migrate::migrate, Store};

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
    Migrate,
    /// Consume usage events from Kafka, price them and store them (until SIGINT/SIGTERM).
    Ingest,
    /// migrate, then ingest, in one process.
    Run,
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
    /// Reports over stored usage.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
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

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Institution,
    Model,
    ApiKey,
    User,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Table,
}

pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOKENTALLY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        Command::Migrate => run_migrate(&cfg).await,
        Command::Ingest => crate::ingest::run(&cfg, Shutdown::on_signals()).await,
        Command::Run => {
            run_migrate(&cfg).await?;
            crate::ingest::run(&cfg, Shutdown::on_signals()).await
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

fn load_book(cfg: &Config) -> anyhow::Result<PriceBook> {
    PriceBook::load(&cfg.prices.path)
        .with_context(|| format!("loading price book {}", cfg.prices.path.display()))
}

async fn run_migrate(cfg: &Config) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    let applied = migrate(&store).await.with_context(|| {
        format!(
            "migrating {} at {}",
            cfg.clickhouse.database, cfg.clickhouse.url
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
