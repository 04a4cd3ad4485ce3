//! Graceful shutdown on SIGINT/SIGTERM, shared by long-running commands.

use tokio::sync::watch;

/// Resolves once shutdown was requested (and immediately on every later wait).
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A handle that ends when the process receives SIGINT or SIGTERM.
    pub fn on_signals() -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received, stopping");
            let _ = tx.send(true);
        });
        Shutdown(rx)
    }

    /// A handle that never ends, plus its trigger (for tests and embedding).
    pub fn manual() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    pub async fn wait(&mut self) {
        // An error means the sender is gone: nobody can ask for shutdown any more.
        if self.0.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }
}
