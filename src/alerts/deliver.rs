//! Delivery: Slack-compatible webhooks signed with HMAC-SHA256, and plain-text e-mail
//! over SMTP, each retried with exponential backoff until the receiver takes it (or the
//! configured attempts run out, which is logged as an error).
//!
//! Signature: `X-Tokentally-Signature: sha256=HEX(HMAC_SHA256(secret, TIMESTAMP + "." + BODY))`
//! with `X-Tokentally-Timestamp: TIMESTAMP` (unix seconds). Receivers recompute it over
//! the raw body and reject stale timestamps.

use std::time::Duration;

use hmac::{Hmac, Mac};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::mpsc;

use super::{Severity, Transition};
use crate::config::{AlertsConfig, Config};

/// Where one message goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Destinations {
    pub webhook: bool,
    pub email: Vec<String>,
}

/// Applies the routes (or the default: webhook and `email.to`) to one alert.
pub fn route(cfg: &AlertsConfig, severity: Severity, institution: &str) -> Destinations {
    let mut d = Destinations::default();
    if cfg.routes.is_empty() {
        d.webhook = !cfg.webhook.url.is_empty();
        if !cfg.email.smtp_host.is_empty() {
            d.email = cfg.email.to.clone();
        }
        return d;
    }
    for r in &cfg.routes {
        let inst_ok = r.institutions.is_empty() || r.institutions.iter().any(|i| i == institution);
        if severity >= r.min_severity && inst_ok {
            d.webhook |= r.webhook && !cfg.webhook.url.is_empty();
            if !cfg.email.smtp_host.is_empty() {
                for e in &r.email {
                    if !d.email.contains(e) {
                        d.email.push(e.clone());
                    }
                }
            }
        }
    }
    d
}

fn state(t: &Transition) -> &'static str {
    if t.resolved {
        "RESOLVED"
    } else {
        "FIRING"
    }
}

fn link(cfg: &AlertsConfig) -> String {
    format!("{}/alerts", cfg.dashboard_url.trim_end_matches('/'))
}

/// The webhook body: Slack's `text` plus an attachment with fields, and the structured
/// alert under `alert`.
pub fn webhook_body(cfg: &AlertsConfig, t: &Transition) -> Value {
    let r = &t.reading;
    let text = format!(
        "[{}] {} {}: {} <{}|dashboard>",
        state(t),
        r.severity.as_str(),
        r.kind.as_str().replace('_', " "),
        r.message,
        link(cfg)
    );
    let color = match (t.resolved, r.severity) {
        (true, _) => "#16a34a",
        (false, Severity::Critical) => "#dc2626",
        (false, Severity::Warning) => "#d97706",
        (false, Severity::Info) => "#2563eb",
    };
    let field = |title: &str, value: String| json!({"title": title, "value": value, "short": true});
    json!({
        "text": text,
        "attachments": [{
            "color": color,
            "fields": [
                field("kind", r.kind.as_str().into()),
                field("entity", r.entity.clone()),
                field("institution", r.institution.clone()),
                field("observed", r.observed.to_string()),
                field("baseline", r.baseline.to_string()),
                field("threshold", r.threshold.to_string()),
            ],
        }],
        "alert": {
            "id": t.alert_id,
            "state": if t.resolved { "resolved" } else { "firing" },
            "kind": r.kind.as_str(),
            "severity": r.severity.as_str(),
            "entity": r.entity,
            "institution": r.institution,
            "observed": r.observed.to_string(),
            "baseline": r.baseline.to_string(),
            "threshold": r.threshold.to_string(),
            "message": r.message,
            "at": t.at.to_rfc3339(),
            "dashboard": link(cfg),
        }
    })
}

/// `sha256=…` over `timestamp.body`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

pub fn email_text(cfg: &AlertsConfig, t: &Transition) -> (String, String) {
    let r = &t.reading;
    let subject = format!(
        "[tokentally] {} {}: {} {}",
        state(t),
        r.severity.as_str(),
        r.kind.as_str().replace('_', " "),
        r.entity
    );
    let body = format!(
        "{}\n\nstate:       {}\nkind:        {}\nentity:      {}\ninstitution: {}\nobserved:    {}\nbaseline:    {}\nthreshold:   {}\nat:          {}\nalert id:    {}\n\nDashboard: {}\n",
        r.message,
        state(t).to_lowercase(),
        r.kind.as_str(),
        r.entity,
        if r.institution.is_empty() { "-" } else { &r.institution },
        r.observed,
        r.baseline,
        r.threshold,
        t.at.to_rfc3339(),
        t.alert_id,
        link(cfg)
    );
    (subject, body)
}

/// Hands alerts to background senders; `send` never blocks the evaluator.
pub struct Notifier {
    tx: mpsc::UnboundedSender<Transition>,
}

impl Notifier {
    pub fn start(cfg: &Config) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Transition>();
        let cfg = cfg.alerts.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(cfg.webhook.timeout_secs.max(1)))
                .build()
                .expect("HTTP client");
            while let Some(t) = rx.recv().await {
                let d = route(&cfg, t.reading.severity, &t.reading.institution);
                if d.webhook {
                    tokio::spawn(send_webhook(http.clone(), cfg.clone(), t.clone()));
                }
                if !d.email.is_empty() {
                    tokio::spawn(send_email(cfg.clone(), t.clone(), d.email.clone()));
                }
            }
        });
        Self { tx }
    }

    pub fn send(&self, t: Transition) {
        let _ = self.tx.send(t);
    }
}

/// Delivers one alert and waits until every destination has answered (or its retries
/// are spent): for commands that raise an alert and then exit.
pub async fn deliver_now(cfg: &Config, t: &Transition) {
    let cfg = cfg.alerts.clone();
    let d = route(&cfg, t.reading.severity, &t.reading.institution);
    if d.webhook {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.webhook.timeout_secs.max(1)))
            .build()
            .expect("HTTP client");
        send_webhook(http, cfg.clone(), t.clone()).await;
    }
    if !d.email.is_empty() {
        send_email(cfg.clone(), t.clone(), d.email.clone()).await;
    }
}

/// The host of a webhook URL, the only part of it that is logged.
pub fn webhook_host(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "(invalid url)".into())
}

fn backoff(initial_ms: u64, attempt: u32) -> Duration {
    let ms = initial_ms.max(1).saturating_mul(1 << attempt.min(16));
    Duration::from_millis(ms.min(300_000))
}

async fn send_webhook(http: reqwest::Client, cfg: AlertsConfig, t: Transition) {
    let body = serde_json::to_vec(&webhook_body(&cfg, &t)).expect("json");
    for attempt in 0..cfg.webhook.max_attempts.max(1) {
        let ts = chrono::Utc::now().timestamp();
        let mut req = http
            .post(&cfg.webhook.url)
            .header("content-type", "application/json")
            .header("x-tokentally-timestamp", ts.to_string())
            .body(body.clone());
        if !cfg.webhook.secret.is_empty() {
            req = req.header(
                "x-tokentally-signature",
                signature(cfg.webhook.secret.expose(), ts, &body),
            );
        }
        match req.send().await {
            Ok(res) if res.status().is_success() => {
                tracing::info!(alert = %t.alert_id, attempt = attempt + 1, "webhook delivered");
                return;
            }
            Ok(res) => {
                tracing::warn!(alert = %t.alert_id, status = %res.status(), attempt = attempt + 1, "webhook refused; retrying")
            }
            Err(e) => {
                // Webhook URLs are secrets (Slack's carry the token in the path): log the
                // host only, and the error without its URL.
                tracing::warn!(alert = %t.alert_id, host = %webhook_host(&cfg.webhook.url), attempt = attempt + 1,
                               "webhook failed: {}; retrying", e.without_url())
            }
        }
        tokio::time::sleep(backoff(cfg.webhook.retry_initial_ms, attempt)).await;
    }
    tracing::error!(alert = %t.alert_id, "webhook not delivered after {} attempts", cfg.webhook.max_attempts);
}

fn transport(cfg: &AlertsConfig) -> anyhow::Result<AsyncSmtpTransport<Tokio1Executor>> {
    let e = &cfg.email;
    let builder = match e.security.as_str() {
        "none" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&e.smtp_host),
        "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(&e.smtp_host)?,
        _ => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&e.smtp_host)?,
    };
    let mut builder = builder
        .port(e.smtp_port)
        .timeout(Some(Duration::from_secs(30)));
    if !e.username.is_empty() {
        builder = builder.credentials(Credentials::new(
            e.username.clone(),
            e.password.expose().to_owned(),
        ));
    }
    Ok(builder.build())
}

async fn send_email(cfg: AlertsConfig, t: Transition, to: Vec<String>) {
    let (subject, body) = email_text(&cfg, &t);
    let message = || -> anyhow::Result<Message> {
        let mut m = Message::builder()
            .from(cfg.email.from.parse()?)
            .subject(subject.clone())
            .header(ContentType::TEXT_PLAIN);
        for r in &to {
            m = m.to(r.parse()?);
        }
        Ok(m.body(body.clone())?)
    };
    let (msg, mailer) = match (message(), transport(&cfg)) {
        (Ok(m), Ok(t)) => (m, t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(alert = %t.alert_id, "e-mail not sent: {e:#}");
            return;
        }
    };
    for attempt in 0..cfg.email.max_attempts.max(1) {
        match mailer.send(msg.clone()).await {
            Ok(_) => {
                tracing::info!(alert = %t.alert_id, attempt = attempt + 1, "e-mail delivered");
                return;
            }
            Err(e) => {
                tracing::warn!(alert = %t.alert_id, attempt = attempt + 1, "e-mail failed: {e}; retrying")
            }
        }
        tokio::time::sleep(backoff(cfg.email.retry_initial_ms, attempt)).await;
    }
    tracing::error!(alert = %t.alert_id, "e-mail not delivered after {} attempts", cfg.email.max_attempts);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;

    #[test]
    fn signature_matches_a_known_hmac() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?"; here the
        // data is "<ts>.<body>" with ts = "what do ya want for nothing?" split at the dot.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let a = signature("k", 1, b"{}");
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64);
        assert_ne!(a, signature("k", 2, b"{}"));
        assert_ne!(a, signature("j", 1, b"{}"));
    }

    #[test]
    fn routes_pick_destinations_by_severity_and_institution() {
        let mut cfg = AlertsConfig::default();
        cfg.webhook.url = "http://hook".into();
        cfg.email.smtp_host = "smtp".into();
        cfg.email.to = vec!["ops@x".into()];
        // No routes: everything to the webhook and the default recipients.
        let d = route(&cfg, Severity::Info, "a");
        assert!(d.webhook);
        assert_eq!(d.email, vec!["ops@x".to_string()]);
        cfg.routes = vec![
            RouteConfig {
                min_severity: Severity::Critical,
                institutions: vec![],
                webhook: true,
                email: vec!["pager@x".into()],
            },
            RouteConfig {
                min_severity: Severity::Warning,
                institutions: vec!["uni-a".into()],
                webhook: false,
                email: vec!["a-admin@x".into()],
            },
        ];
        assert_eq!(
            route(&cfg, Severity::Warning, "uni-b"),
            Destinations::default()
        );
        assert_eq!(
            route(&cfg, Severity::Warning, "uni-a"),
            Destinations {
                webhook: false,
                email: vec!["a-admin@x".into()]
            }
        );
        let d = route(&cfg, Severity::Critical, "uni-a");
        assert!(d.webhook);
        assert_eq!(d.email.len(), 2);
    }
}
