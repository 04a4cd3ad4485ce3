//! `tokentally serve`: the dashboard's state, the tasks beside it (invoice upkeep, the
//! alert evaluator) and its listener. The router knows nothing of the background tasks.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;

use crate::config::Config;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::web::auth::{self, Auth, UsersFile};
use crate::web::{router, AppState};

use super::Running;

/// Creates the first admin `name` when the users file has no users at all (a fresh
/// install, e.g. `docker compose up`): with `password` if given (8 characters or more),
/// else a generated one, which is returned to be shown once. Does nothing otherwise.
pub fn first_admin(
    path: &std::path::Path,
    name: &str,
    password: Option<String>,
) -> anyhow::Result<Option<String>> {
    use crate::web::auth::{hash_password, random_hex, Role, UserEntry};
    let mut file = UsersFile::load(path)?;
    if !file.users.is_empty() || name.trim().is_empty() {
        return Ok(None);
    }
    let given = password.filter(|p| !p.is_empty());
    if let Some(p) = &given {
        anyhow::ensure!(
            p.len() >= 8,
            "TOKENTALLY_FIRST_ADMIN_PASSWORD needs at least 8 characters"
        );
    }
    let generated = given.is_none().then(|| random_hex(10));
    let password = given.or_else(|| generated.clone()).expect("one of them");
    file.users.push(UserEntry {
        name: name.trim().to_owned(),
        role: Role::Admin,
        institution: None,
        password_hash: hash_password(&password)?,
    });
    file.save(path)?;
    Ok(generated)
}

/// The dashboard's shared state for `cfg` with these users and price book: clients and
/// caches only, nothing read or started yet (router tests build one without servers).
pub fn state(
    cfg: &Config,
    users: UsersFile,
    book: crate::price::watch::SharedBook,
) -> anyhow::Result<Arc<AppState>> {
    let (store, writer) = (Store::dashboard_reader(cfg), Store::new(&cfg.clickhouse));
    Ok(Arc::new(AppState {
        auth: Auth::new(
            users,
            cfg.web.session_hours,
            cfg.web.login_attempts_per_minute,
            cfg.web.secure_cookies,
        ),
        keys: Arc::new(crate::keys::store::Tables {
            read: store.clone(),
            write: writer.clone(),
        }),
        store,
        writer,
        book,
        ledger: crate::billing::ledger::LedgerCache::new(crate::billing::ledger::LedgerLog::new(
            cfg,
        )),
        drafts: auth::WindowCounter::new(10_000),
        limits: crate::limits::configured(&cfg.limits)?,
        roster: crate::people::directory::Roster::new(
            Store::new(&cfg.clickhouse),
            crate::people::groups::configured(&cfg.groups)?,
        ),
        sso: {
            let providers = crate::people::sso::configured(&cfg.sso)?;
            if providers.is_empty() {
                None
            } else {
                Some(Arc::new(crate::web::sso::Sso::new(providers)?))
            }
        },
        base_url: std::sync::OnceLock::new(),
        trusted_proxies: cfg
            .web
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        cfg: cfg.clone(),
    }))
}

/// Starts the dashboard and the tasks beside it (invoice upkeep, the alert evaluator) on
/// `cfg.web.listen` (port 0: the system picks one) and returns once it listens.
pub async fn spawn(cfg: &Config, mut shutdown: Shutdown) -> anyhow::Result<Running> {
    if let Ok(name) = std::env::var("TOKENTALLY_FIRST_ADMIN") {
        let password = std::env::var("TOKENTALLY_FIRST_ADMIN_PASSWORD").ok();
        if let Some(generated) = first_admin(&cfg.web.users_file, &name, password)? {
            // Shown once, on the terminal (not through the log), so the first person can
            // log in; it is stored only as a hash.
            eprintln!(
                "tokentally: first admin `{name}` created with the one-time password {generated}\n\
                 tokentally: log in and set your own with `tokentally users add {name} --role admin --password-stdin`"
            );
        }
    }
    let users = UsersFile::load(&cfg.web.users_file)?;
    if users.users.is_empty() && users.tokens.is_empty() {
        tracing::warn!(file = %cfg.web.users_file.display(), "no users: add one with `tokentally users add NAME --role admin`");
    }
    // Reloaded when its files change: drafts and invoices look rates up by id.
    let watcher = crate::price::watch::BookWatcher::load(&cfg.prices.path)?;
    let book = crate::price::watch::SharedBook::new(watcher.current());
    book.keep_fresh(watcher, shutdown.clone());
    let state = state(cfg, users, book)?;
    tokio::spawn(invoice_upkeep(state.clone(), shutdown.clone()));
    if cfg.alerts.enabled {
        tokio::spawn(crate::alerts::evaluator::run(
            cfg.clone(),
            state.writer.clone(),
            shutdown.clone(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(&cfg.web.listen)
        .await
        .with_context(|| format!("binding {}", cfg.web.listen))?;
    // The bound address (with port 0 the system picks one; tests read it from here).
    let addr = listener.local_addr()?;
    let _ = state.base_url.set(if cfg.web.public_url.is_empty() {
        format!("http://{addr}")
    } else {
        cfg.web.public_url.trim_end_matches('/').to_owned()
    });
    tracing::info!(listen = %addr, "dashboard listening");
    // TCP_NODELAY: hyper writes head and body separately; with Nagle the body waited
    // for the browser's delayed ACK (the gateway measured +43 ms per response).
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        axum::serve(
            listener,
            router(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await?;
        Ok(())
    });
    Ok(Running { addr, task })
}

/// Serves the dashboard until `shutdown`.
pub async fn serve(cfg: &Config, shutdown: Shutdown) -> anyhow::Result<()> {
    spawn(cfg, shutdown).await?.task.await?
}

/// Every minute: copy documents from the invoice ledger that ClickHouse lacks (an
/// issuer may have stopped between appending and writing), and on the configured day
/// issue last month's invoices.
async fn invoice_upkeep(state: Arc<AppState>, mut shutdown: Shutdown) {
    let book = state.book.current();
    let billing = crate::billing::issue::Billing::new(&state.cfg, &state.writer, &book);
    loop {
        match billing.sync().await {
            // At start and every minute: a ledger that lacks issued documents is reported
            // (and never replaced by an empty one); issuing stays refused until restored.
            Err(e) => {
                tracing::error!("invoice ledger check failed (will retry in a minute): {e:#}")
            }
            Ok(ledger) if state.cfg.billing.auto_issue_day > 0 => {
                match billing.auto_issue(&ledger).await {
                    Ok(issued) if !issued.is_empty() => {
                        tracing::info!(count = issued.len(), "invoices issued automatically")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("automatic invoicing failed (will retry): {e:#}"),
                }
            }
            Ok(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_admin_is_created_once_on_an_empty_users_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.toml");
        let generated = first_admin(&path, "admin", None)
            .unwrap()
            .expect("a password");
        assert_eq!(generated.len(), 20);
        let file = UsersFile::load(&path).unwrap();
        assert_eq!(file.users.len(), 1);
        assert!(!std::fs::read_to_string(&path).unwrap().contains(&generated));
        // Users exist: nothing happens, whatever the environment says.
        assert_eq!(
            first_admin(&path, "other", Some("a-long-password".into())).unwrap(),
            None
        );
        assert_eq!(UsersFile::load(&path).unwrap().users.len(), 1);
        // A given password is used (and must be long enough).
        let other = dir.path().join("u2.toml");
        assert_eq!(
            first_admin(&other, "root", Some("a-long-password".into())).unwrap(),
            None
        );
        assert!(first_admin(&dir.path().join("u3.toml"), "root", Some("short".into())).is_err());
    }
}
