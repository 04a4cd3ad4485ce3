//! The price book on disk, as every process holds it: loaded at start, reloaded when its
//! files change (checked every `BOOK_CHECK`), so a new price applies without a restart —
//! in ingest (pricing), the gateway (reservations, settlements) and serve (drafts and
//! invoices look rates up by id).

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::{info, warn};

use super::PriceBook;

/// How often the price book's files are compared with what is loaded.
const BOOK_CHECK: Duration = Duration::from_secs(10);

/// The loaded price book, reloaded when its files change.
pub struct BookWatcher {
    path: std::path::PathBuf,
    book: Arc<PriceBook>,
    checked: Instant,
    reloads: u64,
    /// The version of a changed book that failed to load (reported once).
    broken: Option<String>,
}

impl BookWatcher {
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        let book = PriceBook::load(path)
            .with_context(|| format!("loading price book {}", path.display()))?;
        info!(
            entries = book.entries().len(),
            version = book.version(),
            "price book loaded"
        );
        Ok(Self {
            path: path.to_owned(),
            book: Arc::new(book),
            checked: Instant::now(),
            reloads: 0,
            broken: None,
        })
    }

    pub fn current(&self) -> Arc<PriceBook> {
        self.book.clone()
    }

    pub fn version(&self) -> String {
        self.book.version().to_owned()
    }

    pub fn reloads(&self) -> u64 {
        self.reloads
    }

    /// Reloads if the files changed. A book that fails to load is reported and the
    /// loaded one stays in force (events keep their prices; `reprice` fixes them later).
    pub fn maybe_reload(&mut self) {
        if self.checked.elapsed() < BOOK_CHECK {
            return;
        }
        self.checked = Instant::now();
        let fingerprint = match crate::price::book::fingerprint(&self.path) {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "price book unreadable; keeping the loaded one");
                return;
            }
        };
        if fingerprint == self.book.version() || self.broken.as_deref() == Some(&fingerprint) {
            return;
        }
        match PriceBook::load(&self.path) {
            Ok(book) => {
                info!(
                    old = self.book.version(),
                    new = book.version(),
                    entries = book.entries().len(),
                    "price book changed on disk: reloaded"
                );
                self.book = Arc::new(book);
                self.reloads += 1;
                self.broken = None;
            }
            Err(e) => {
                warn!(error = %e, version = %fingerprint, loaded = self.book.version(),
                      "the changed price book is invalid; still pricing with the loaded one");
                self.broken = Some(fingerprint);
            }
        }
    }
}

/// The current price book, shared by a process's tasks and kept fresh by `keep_fresh`.
#[derive(Clone)]
pub struct SharedBook(Arc<RwLock<Arc<PriceBook>>>);

impl SharedBook {
    pub fn new(book: Arc<PriceBook>) -> Self {
        Self(Arc::new(RwLock::new(book)))
    }

    pub fn current(&self) -> Arc<PriceBook> {
        self.0
            .read()
            .map(|b| b.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Takes the watcher's book if it changed.
    pub fn update(&self, watcher: &BookWatcher) {
        let next = watcher.current();
        if let Ok(mut b) = self.0.write() {
            if b.version() != next.version() {
                *b = next;
            }
        }
    }

    /// Reloads from disk every `BOOK_CHECK` until `shutdown`.
    pub fn keep_fresh(
        &self,
        mut watcher: BookWatcher,
        mut shutdown: crate::shutdown::Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let shared = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(BOOK_CHECK) => {}
                    _ = shutdown.wait() => return,
                }
                watcher.maybe_reload();
                shared.update(&watcher);
            }
        })
    }
}
