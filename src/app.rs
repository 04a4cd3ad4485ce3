//! The composition root: what `serve` and `run` start, and how the parts meet. The
//! dashboard's router knows nothing of the background tasks that run beside it.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;

use crate::config::Config;
use crate::price::PriceBook;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::web::auth::{self, Auth, UsersFile};
use crate::web::{router, AppState};

/// Serves the dashboard until `shutdown`.
pub async fn serve(cfg: &Config, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let users = UsersFile::load(&cfg.web.users_file)?;
    if users.users.is_empty() && users.tokens.is_empty() {
        tracing::warn!(file = %cfg.web.users_file.display(), "no users: add one with `tokentally users add NAME --role admin`");
    }
    let book = PriceBook::load(&cfg.prices.path)
        .with_context(|| format!("loading price book {}", cfg.prices.path.display()))?;
    let state = Arc::new(AppState {
        auth: Auth::new(
            users,
            cfg.web.session_hours,
            cfg.web.login_attempts_per_minute,
            cfg.web.secure_cookies,
        ),
        store: Store::dashboard_reader(cfg),
        writer: Store::new(&cfg.clickhouse),
        book,
        ledger: crate::billing::ledger::LedgerCache::new(crate::billing::ledger::LedgerLog::new(
            cfg,
        )),
        drafts: auth::WindowCounter::new(10_000),
        trusted_proxies: cfg
            .web
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        cfg: cfg.clone(),
    });
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
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, "dashboard listening");
    // TCP_NODELAY: hyper writes head and body separately; with Nagle the body waited
    // for the browser's delayed ACK (the gateway measured +43 ms per response).
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.wait().await })
    .await?;
    Ok(())
}

/// Every minute: copy documents from the invoice ledger that ClickHouse lacks (an
/// issuer may have stopped between appending and writing), and on the configured day
/// issue last month's invoices.
async fn invoice_upkeep(state: Arc<AppState>, mut shutdown: Shutdown) {
    let billing = crate::billing::service::Billing::new(&state.cfg, &state.writer, &state.book);
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

/// `tokentally run`: migrate, then ingest and serve in one process; either half failing
/// (e.g. the dashboard port is taken) stops the process.
pub async fn run(cfg: &Config, shutdown: Shutdown) -> anyhow::Result<()> {
    tokio::try_join!(
        crate::ingest::run(cfg, shutdown.clone()),
        serve(cfg, shutdown)
    )
    .map(|_| ())
}
