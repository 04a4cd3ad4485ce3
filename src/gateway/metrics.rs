//! Prometheus metrics of the gateway (bounded labels: statuses and refusal reasons).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    tokens: Counter,
    pub spool_pending_bytes: Gauge,
    pub keys: Gauge,
    pub events_spooled: Gauge,
    pub events_sent: Gauge,
    pub limits: Gauge,
    pub reservations_open: Gauge,
    /// 0: shares (no shared store), 1: exact (through the shared store), 2: fallback.
    pub limits_mode: Gauge,
    pub admission_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Spend-rate incidents this instance raised (issue 36's fast path).
    pub spend_alerts: Counter,
    /// Keys whose spend rate this instance watches now.
    pub spend_watched: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut m = Metrics {
            registry: Registry::with_prefix("tokentally_gateway"),
            requests: Family::default(),
            refused: Family::default(),
            tokens: Counter::default(),
            spool_pending_bytes: Gauge::default(),
            keys: Gauge::default(),
            events_spooled: Gauge::default(),
            events_sent: Gauge::default(),
            limits: Gauge::default(),
            reservations_open: Gauge::default(),
            limits_mode: Gauge::default(),
            spend_alerts: Counter::default(),
            spend_watched: Gauge::default(),
            admission_seconds: prometheus_client::metrics::histogram::Histogram::new([
                0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.25,
            ]),
        };
        m.registry.register(
            "limits",
            "Limits this instance enforces or watches",
            m.limits.clone(),
        );
        m.registry.register(
            "reservations_open",
            "Requests holding a reservation on a limit right now",
            m.reservations_open.clone(),
        );
        m.registry.register(
            "limits_mode",
            "How limits are decided: 0 by shares (no shared store configured), 1 exactly through the shared store, 2 by shares because the shared store is unreachable",
            m.limits_mode.clone(),
        );
        m.registry.register(
            "spend_alerts",
            "Spend-rate incidents this instance raised from the spend it settled",
            m.spend_alerts.clone(),
        );
        m.registry.register(
            "spend_watched_keys",
            "Keys whose spend rate this instance watches (settled within the last 6 hours)",
            m.spend_watched.clone(),
        );
        m.registry.register(
            "admission_seconds",
            "Time to decide a request against its limits (worst case and reservation)",
            m.admission_seconds.clone(),
        );
        m.registry.register(
            "requests",
            "Requests that produced an event, by status",
            m.requests.clone(),
        );
        m.registry.register(
            "refused",
            "Requests refused before any event (unknown, revoked, expired keys)",
            m.refused.clone(),
        );
        m.registry
            .register("tokens", "Tokens of finished requests", m.tokens.clone());
        m.registry.register(
            "spool_pending_bytes",
            "Bytes in the spool not yet sent to Kafka",
            m.spool_pending_bytes.clone(),
        );
        m.registry
            .register("keys", "Keys known to this instance", m.keys.clone());
        m.registry.register(
            "events_spooled",
            "Events written to the spool since start",
            m.events_spooled.clone(),
        );
        m.registry.register(
            "events_sent",
            "Spooled events acknowledged by Kafka since start",
            m.events_sent.clone(),
        );
        Arc::new(m)
    }

    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }

    /// An event was written with `status` (one of `event::Status`'s names).
    pub fn recorded(&self, status: &str) {
        self.requests
            .get_or_create(&StatusLabel {
                status: status.into(),
            })
            .inc();
    }

    pub fn add_tokens(&self, tokens: u64) {
        self.tokens.inc_by(tokens);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String cannot fail");
        out
    }
}
