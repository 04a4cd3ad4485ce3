//! `tokentally alerts backtest`: the spend detectors run over stored history as if they
//! had run live at every step, with the same tracker (one alert per incident, cooldown),
//! sending nothing. Pipeline detectors read live state (lag, recent rejections) and are
//! not replayed.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::evaluator::{load_series, spend_readings, SpendSeries};
use super::Tracker;
use crate::config::Config;
use crate::store::Store;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Incident {
    pub kind: &'static str,
    pub entity: String,
    pub institution: String,
    pub fired_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    #[serde(with = "rust_decimal::serde::str")]
    pub observed: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub baseline: Decimal,
    pub message: String,
}

/// Replays `(from, to]` in steps over `series` (pure).
pub fn replay(
    cfg: &Config,
    series: &SpendSeries,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Duration,
) -> Vec<Incident> {
    let mut tracker = Tracker::new(Duration::seconds(cfg.alerts.cooldown_secs));
    let mut out: Vec<Incident> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut end = from + step;
    while end <= to {
        let readings = spend_readings(cfg, series, end, &tracker);
        for t in tracker.step(end, readings) {
            if t.resolved {
                if let Some(&i) = index.get(&t.alert_id) {
                    let inc: &mut Incident = &mut out[i];
                    inc.resolved_at = Some(end);
                }
            } else {
                index.insert(t.alert_id.clone(), out.len());
                out.push(Incident {
                    kind: t.reading.kind.as_str(),
                    entity: t.reading.entity,
                    institution: t.reading.institution,
                    fired_at: end,
                    resolved_at: None,
                    observed: t.reading.observed,
                    baseline: t.reading.baseline,
                    message: t.reading.message,
                });
            }
        }
        end += step;
    }
    out
}

/// Loads what the replay needs (baseline weeks and the month before `from`) and runs it.
pub async fn backtest(
    cfg: &Config,
    store: &Store,
    from: NaiveDate,
    to: NaiveDate,
    step_hours: u32,
) -> anyhow::Result<Vec<Incident>> {
    anyhow::ensure!(from <= to, "--from must not be after --to");
    let start = from.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let end = (to + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let weeks = i64::from(cfg.alerts.spike.baseline_weeks.max(1));
    let window = i64::from(cfg.alerts.spike.window_hours.max(1));
    let load_from =
        (start - Duration::weeks(weeks) - Duration::hours(window)).min(start - Duration::days(32));
    let series = load_series(store, load_from, end).await?;
    Ok(replay(
        cfg,
        &series,
        start,
        end,
        Duration::hours(i64::from(step_hours.max(1))),
    ))
}

pub fn table(incidents: &[Incident]) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<18} {:<32} {:<20} {:<20} {:>12} {:>12}\n",
        "kind", "entity", "fired_at", "resolved_at", "observed", "baseline"
    );
    for i in incidents {
        let _ = writeln!(
            s,
            "{:<18} {:<32} {:<20} {:<20} {:>12} {:>12}",
            i.kind,
            i.entity,
            i.fired_at.format("%Y-%m-%d %H:%M"),
            i.resolved_at
                .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_else(|| "-".into()),
            i.observed.to_string(),
            i.baseline.to_string()
        );
    }
    let _ = writeln!(s, "{} alerts", incidents.len());
    s
}
