//! `tokentally keys …`: proxy keys, ingest tokens, institutions' own provider keys, and
//! the audit log of every change to them.

use std::io::Read as _;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDate};
use clap::Subcommand;

use super::invoice::ReportFormat;
use crate::config::Config;
use crate::gateway::wire::Provider;
use crate::keys::crypto::MasterKey;
use crate::keys::{self, cli_actor, KeyKind, KeySpec};
use crate::store::keys::{KeyRow, UpstreamKeyRow};
use crate::store::Store;

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a proxy key for one user of an institution; the key is printed once (only
    /// its hash is stored). Every gateway accepts it within `gateway.keys_refresh_ms`.
    Create {
        #[arg(long)]
        institution: String,
        #[arg(long)]
        user: String,
        /// A label (e.g. "thesis notebook").
        #[arg(long, default_value = "")]
        name: String,
        /// Models the key may use, comma-separated (exact ids, or prefixes ending in
        /// `*`); default: any.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// The key works until this day begins (UTC, YYYY-MM-DD).
        #[arg(long)]
        expires: Option<NaiveDate>,
        /// Requests per minute (0: unlimited).
        #[arg(long, default_value_t = 0)]
        rpm: u32,
        /// Tokens per minute (0: unlimited).
        #[arg(long, default_value_t = 0)]
        tpm: u64,
        /// `text`: the key alone on standard output; `json`: key and settings.
        #[arg(long, value_enum, default_value = "text")]
        format: CreatedFormat,
    },
    /// Create an ingest token for `POST /v1/usage-events` (bound to one institution, or
    /// to any without `--institution`).
    CreateIngest {
        #[arg(long)]
        institution: Option<String>,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, value_enum, default_value = "text")]
        format: CreatedFormat,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        institution: Option<String>,
        /// Include revoked and expired keys.
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
    /// Revoke a key: every gateway refuses it within `gateway.keys_refresh_ms`.
    Revoke { key_id: String },
    /// Give a key a new secret (same id, settings and history); the old one stops working.
    Rotate {
        key_id: String,
        #[arg(long, value_enum, default_value = "text")]
        format: CreatedFormat,
    },
    /// The audit log: who created, revoked, rotated which key, and upstream key changes.
    Log {
        #[arg(long)]
        institution: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u64,
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
    /// Which institution and user a pseudonymous end-user id (as a provider's abuse
    /// report names it) belongs to.
    Whois { pseudonym: String },
    /// Institutions' own provider keys (bring your own key).
    Upstream {
        #[command(subcommand)]
        command: UpstreamCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum UpstreamCommand {
    /// Store an institution's own key for a provider, read from standard input; it is
    /// encrypted with the master key and never shown again. That institution's requests
    /// then go upstream with it and are billed as `byok`.
    Set {
        #[arg(long)]
        institution: String,
        /// openai, anthropic or gemini.
        #[arg(long)]
        provider: String,
    },
    /// Remove it: the institution's requests use the platform's key again.
    Remove {
        #[arg(long)]
        institution: String,
        #[arg(long)]
        provider: String,
    },
    /// Which institutions have their own keys (fingerprints only).
    List,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CreatedFormat {
    Text,
    Json,
}

fn print_created(row: &KeyRow, secret: &str, format: CreatedFormat) -> anyhow::Result<()> {
    match format {
        CreatedFormat::Text => {
            eprintln!(
                "key {} for {} / {} (shown once; only its hash is stored):",
                row.key_id,
                if row.institution_id.is_empty() {
                    "any institution"
                } else {
                    &row.institution_id
                },
                if row.user_id.is_empty() {
                    "-"
                } else {
                    &row.user_id
                }
            );
            println!("{secret}");
        }
        CreatedFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "key_id": row.key_id, "key": secret, "kind": row.kind,
                "institution": row.institution_id, "user": row.user_id, "name": row.name,
                "models": row.models, "rpm": row.rpm, "tpm": row.tpm,
                "expires": expires_text(row.expires_at),
            }))?
        ),
    }
    Ok(())
}

fn expires_text(t: u32) -> String {
    if t == 0 {
        return String::new();
    }
    DateTime::from_timestamp(i64::from(t), 0)
        .map(|d| d.date_naive().to_string())
        .unwrap_or_default()
}

fn state(row: &KeyRow, now: i64) -> &'static str {
    if row.revoked != 0 {
        "revoked"
    } else if row.expires_at != 0 && i64::from(row.expires_at) <= now {
        "expired"
    } else {
        "active"
    }
}

pub async fn run(cfg: &Config, command: KeysCommand) -> anyhow::Result<()> {
    let store = Store::new(&cfg.clickhouse);
    let actor = cli_actor();
    match command {
        KeysCommand::Create {
            institution,
            user,
            name,
            models,
            expires,
            rpm,
            tpm,
            format,
        } => {
            let spec = KeySpec {
                institution_id: institution,
                user_id: user,
                name,
                models,
                expires,
                rpm,
                tpm,
            };
            let (row, new) = keys::create(&store, KeyKind::Proxy, &spec, &actor).await?;
            print_created(&row, &new.secret, format)
        }
        KeysCommand::CreateIngest {
            institution,
            name,
            format,
        } => {
            let spec = KeySpec {
                institution_id: institution.unwrap_or_default(),
                name,
                ..Default::default()
            };
            let (row, new) = keys::create(&store, KeyKind::Ingest, &spec, &actor).await?;
            print_created(&row, &new.secret, format)
        }
        KeysCommand::List {
            institution,
            all,
            format,
        } => {
            let now = chrono::Utc::now().timestamp();
            let rows: Vec<KeyRow> = keys::list(&store, institution.as_deref())
                .await?
                .into_iter()
                .filter(|r| all || state(r, now) == "active")
                .collect();
            match format {
                ReportFormat::Json => {
                    let out: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "key_id": r.key_id, "kind": r.kind, "state": state(r, now),
                                "institution": r.institution_id, "user": r.user_id, "name": r.name,
                                "models": r.models, "rpm": r.rpm, "tpm": r.tpm,
                                "expires": expires_text(r.expires_at),
                                "created_by": r.created_by,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&out)?);
                }
                ReportFormat::Table => {
                    println!(
                        "{:<13} {:<7} {:<8} {:<16} {:<24} {:<10} {:>5} {:>8}  MODELS",
                        "KEY", "KIND", "STATE", "INSTITUTION", "USER", "EXPIRES", "RPM", "TPM"
                    );
                    for r in &rows {
                        println!(
                            "{:<13} {:<7} {:<8} {:<16} {:<24} {:<10} {:>5} {:>8}  {}",
                            r.key_id,
                            r.kind,
                            state(r, now),
                            r.institution_id,
                            r.user_id,
                            expires_text(r.expires_at),
                            r.rpm,
                            r.tpm,
                            if r.models.is_empty() {
                                "any".into()
                            } else {
                                r.models.join(",")
                            }
                        );
                    }
                }
            }
            Ok(())
        }
        KeysCommand::Revoke { key_id } => {
            let row = keys::revoke(&store, &key_id, None, &actor).await?;
            eprintln!(
                "key {} revoked; every gateway refuses it within {} ms",
                row.key_id, cfg.gateway.keys_refresh_ms
            );
            Ok(())
        }
        KeysCommand::Rotate { key_id, format } => {
            let (row, new) = keys::rotate(&store, &key_id, None, &actor).await?;
            print_created(&row, &new.secret, format)
        }
        KeysCommand::Log {
            institution,
            limit,
            format,
        } => {
            let rows = store.key_events(institution.as_deref(), limit).await?;
            match format {
                ReportFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                ReportFormat::Table => {
                    for r in rows {
                        let at = DateTime::from_timestamp(i64::from(r.at), 0)
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                            .unwrap_or_default();
                        println!(
                            "{at}  {:<20} {:<16} {:<13} {:<16} {}",
                            r.actor, r.action, r.key_id, r.institution_id, r.detail
                        );
                    }
                }
            }
            Ok(())
        }
        KeysCommand::Whois { pseudonym } => {
            let master = MasterKey::load(&cfg.gateway, false)?;
            let p = master.pseudonyms();
            let mut pairs: Vec<(String, String)> = store
                .current_keys()
                .await?
                .into_iter()
                .filter(|k| k.kind == "proxy")
                .map(|k| (k.institution_id, k.user_id))
                .collect();
            pairs.sort();
            pairs.dedup();
            match pairs.iter().find(|(i, u)| p.id(i, u) == pseudonym.trim()) {
                Some((i, u)) => {
                    println!("institution {i}, user {u}");
                    Ok(())
                }
                None => anyhow::bail!("no user of any key has the pseudonymous id {pseudonym}"),
            }
        }
        KeysCommand::Upstream { command } => upstream(cfg, &store, &actor, command).await,
    }
}

async fn upstream(
    cfg: &Config,
    store: &Store,
    actor: &str,
    command: UpstreamCommand,
) -> anyhow::Result<()> {
    let provider_of = |p: &str| {
        Provider::parse(p)
            .map(|p| p.config_name())
            .with_context(|| format!("unknown provider `{p}` (openai, anthropic or gemini)"))
    };
    let version = || u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    let now = || u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(u32::MAX);
    match command {
        UpstreamCommand::Set {
            institution,
            provider,
        } => {
            let provider = provider_of(&provider)?;
            anyhow::ensure!(!institution.trim().is_empty(), "--institution is empty");
            let mut secret = String::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_string(&mut secret)
                .context("reading the key from standard input")?;
            let secret = secret.trim();
            anyhow::ensure!(!secret.is_empty(), "no key on standard input");
            anyhow::ensure!(
                !secret.chars().any(char::is_whitespace),
                "the key contains whitespace; give just the key"
            );
            let master = MasterKey::load(&cfg.gateway, true)?;
            let (nonce, ciphertext) = master.seal(&institution, provider, secret);
            let fingerprint = master.fingerprint(secret);
            store
                .write_upstream_key(&UpstreamKeyRow {
                    institution_id: institution.clone(),
                    provider: provider.into(),
                    version: version(),
                    nonce,
                    ciphertext,
                    fingerprint: fingerprint.clone(),
                    removed: 0,
                    set_at: now(),
                    set_by: actor.into(),
                })
                .await?;
            keys::audit_upstream(
                store,
                actor,
                "upstream_set",
                &institution,
                provider,
                &fingerprint,
            )
            .await?;
            eprintln!("{provider} key of {institution} stored encrypted (fingerprint {fingerprint}); gateways use it within {} ms", cfg.gateway.keys_refresh_ms);
            Ok(())
        }
        UpstreamCommand::Remove {
            institution,
            provider,
        } => {
            let provider = provider_of(&provider)?;
            let current = store
                .current_upstream_keys()
                .await?
                .into_iter()
                .find(|u| {
                    u.institution_id == institution && u.provider == provider && u.removed == 0
                })
                .with_context(|| format!("{institution} has no {provider} key stored"))?;
            store
                .write_upstream_key(&UpstreamKeyRow {
                    version: version().max(current.version + 1),
                    nonce: String::new(),
                    ciphertext: String::new(),
                    removed: 1,
                    set_at: now(),
                    set_by: actor.into(),
                    ..current.clone()
                })
                .await?;
            keys::audit_upstream(
                store,
                actor,
                "upstream_remove",
                &institution,
                provider,
                &current.fingerprint,
            )
            .await?;
            eprintln!(
                "{provider} key of {institution} removed; its requests use the platform key again"
            );
            Ok(())
        }
        UpstreamCommand::List => {
            for u in store
                .current_upstream_keys()
                .await?
                .into_iter()
                .filter(|u| u.removed == 0)
            {
                let at = DateTime::from_timestamp(i64::from(u.set_at), 0)
                    .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                    .unwrap_or_default();
                println!(
                    "{:<20} {:<10} fingerprint {}  set {} by {}",
                    u.institution_id, u.provider, u.fingerprint, at, u.set_by
                );
            }
            Ok(())
        }
    }
}
