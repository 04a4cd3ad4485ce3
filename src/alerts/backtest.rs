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
    /// When it fired again after a resolution within `renotify_hours` (same incident).
    pub reopened_at: Vec<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    #[serde(with = "rust_decimal::serde::str")]
    pub observed: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub baseline: Decimal,
    pub message: String,
}

impl Incident {
    /// Every time ops were paged about it.
    pub fn pages(&self) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        std::iter::once(self.fired_at).chain(self.reopened_at.iter().copied())
    }
}

/// How long before `from` the replay runs silently, so that it starts from the state
/// the live evaluator would have had at `from`: incidents already open, spans to leave
/// out of baselines, and budget thresholds already crossed this month (which a replay
/// starting empty would announce again at its first step).
pub const WARM_UP: Duration = Duration::days(3);

/// Replays `(from, to]` in steps over `series` (pure), after a silent warm-up over
/// `(from − WARM_UP, from]`. Reports the incidents that paged within `(from, to]`.
pub fn replay(
    cfg: &Config,
    series: &SpendSeries,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    step: Duration,
) -> Vec<Incident> {
    let mut tracker = Tracker::from_config(&cfg.alerts);
    let mut out: Vec<Incident> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut end = from - WARM_UP + step;
    while end <= to {
        let readings = spend_readings(cfg, series, end, &tracker);
        for t in tracker.step(end, readings) {
            match (t.resolved, t.reopened, index.get(&t.alert_id).copied()) {
                (true, _, Some(i)) => {
                    let inc: &mut Incident = &mut out[i];
                    inc.resolved_at = Some(end);
                }
                (false, true, Some(i)) => {
                    let inc: &mut Incident = &mut out[i];
                    inc.reopened_at.push(end);
                    inc.resolved_at = None;
                }
                (false, _, None) => {
                    index.insert(t.alert_id.clone(), out.len());
                    out.push(Incident {
                        kind: t.reading.kind.as_str(),
                        entity: t.reading.entity,
                        institution: t.reading.institution,
                        fired_at: end,
                        reopened_at: Vec::new(),
                        resolved_at: None,
                        observed: t.reading.observed,
                        baseline: t.reading.baseline,
                        message: t.reading.message,
                    });
                }
                _ => {}
            }
        }
        end += step;
    }
    out.retain(|i| i.pages().any(|p| p > from));
    out
}

/// The instants a `--from`/`--to` day range covers (UTC days, both inclusive).
pub fn range(from: NaiveDate, to: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = from.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let end = (to + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    (start, end)
}

/// Loads what the replay needs (the warm-up, baseline weeks and the month before
/// `from`) and runs it. Also returns how many institutions had spend.
pub async fn backtest(
    cfg: &Config,
    store: &Store,
    from: NaiveDate,
    to: NaiveDate,
    step_hours: u32,
) -> anyhow::Result<(Vec<Incident>, usize)> {
    anyhow::ensure!(from <= to, "--from must not be after --to");
    let (start, end) = range(from, to);
    let weeks = i64::from(cfg.alerts.spike.baseline_weeks.max(1));
    let window = i64::from(cfg.alerts.spike.window_hours.max(1));
    let load_from = (start - WARM_UP - Duration::weeks(weeks) - Duration::hours(window))
        .min(start - Duration::days(32));
    let series = load_series(store, load_from, end).await?;
    let institutions = series.institutions.len();
    Ok((
        replay(
            cfg,
            &series,
            start,
            end,
            Duration::hours(i64::from(step_hours.max(1))),
        ),
        institutions,
    ))
}

pub fn table(incidents: &[Incident]) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<18} {:<32} {:<20} {:<20} {:>12} {:>12}  reopened\n",
        "kind", "entity", "fired_at", "resolved_at", "observed", "baseline"
    );
    for i in incidents {
        let _ = writeln!(
            s,
            "{:<18} {:<32} {:<20} {:<20} {:>12} {:>12}  {}",
            i.kind,
            i.entity,
            i.fired_at.format("%Y-%m-%d %H:%M"),
            i.resolved_at
                .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                .unwrap_or_else(|| "-".into()),
            i.observed.to_string(),
            i.baseline.to_string(),
            i.reopened_at
                .iter()
                .map(|t| t.format("%m-%d %H:%M").to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let _ = writeln!(s, "{} alerts", incidents.len());
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Series;
    use crate::config::InstitutionConfig;
    use chrono::TimeZone;
    use std::collections::BTreeMap;

    #[test]
    fn a_replay_starts_from_the_state_at_from() {
        let mut cfg = Config::default();
        cfg.institutions.push(InstitutionConfig {
            id: "b".into(),
            name: String::new(),
            monthly_budget_usd: Some(Decimal::from(100)),
            time_zone: "UTC".into(),
            contract_percent: Decimal::ZERO,
            billing: Default::default(),
            reference: String::new(),
            moderation: false,
            byok_fee_per_request_usd: Decimal::ZERO,
            on_spike: crate::config::OnSpike::Alert,
        });
        // $60 spent on October 2nd: the 50% threshold was crossed before --from.
        let mut s = Series::new();
        let oct = |d, h| Utc.with_ymd_and_hms(2026, 10, d, h, 0, 0).unwrap();
        s.insert(oct(2, 12), Decimal::from(60));
        s.insert(oct(17, 12), Decimal::from(25));
        let mut institutions = BTreeMap::new();
        institutions.insert(("b".to_owned(), "b".to_owned()), s);
        let series = SpendSeries {
            institutions,
            keys: BTreeMap::new(),
        };
        let got = replay(&cfg, &series, oct(15, 0), oct(20, 0), Duration::hours(1));
        let budget: Vec<&Incident> = got.iter().filter(|i| i.kind == "budget").collect();
        // Only the 80% crossed on the 17th, not the 50% of the 2nd again.
        assert_eq!(budget.len(), 1, "{got:#?}");
        assert!(budget[0].entity.ends_with("/80"), "{got:#?}");
        assert_eq!(budget[0].fired_at, oct(17, 13));
    }
}
