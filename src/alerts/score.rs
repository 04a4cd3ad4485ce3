//! `alerts backtest --labels FILE`: scores the spike detectors against incidents a person
//! labelled, so that ops can tune the settings on their own history. An alert is *true*
//! when it paged (fired, or fired again) for a labelled incident's institution — and key,
//! if the label names one, or the institution as a whole — between the incident's start
//! and one window after its end; a label is *detected* when some alert paged for it then.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::backtest::Incident;

/// One labelled incident.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Label {
    pub institution: String,
    /// `institution/key` when the incident is one key's; empty for the institution.
    #[serde(default)]
    pub key: String,
    /// First hour of the incident (inclusive) and its end (exclusive).
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// What happened (free text).
    #[serde(default)]
    pub what: String,
}

/// How ops would have fared.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub labels: usize,
    pub detected: usize,
    pub recall: f64,
    pub alerts: usize,
    pub true_alerts: usize,
    pub false_alerts: usize,
    pub precision: f64,
    /// Median over detected labels of (first page − start), hours.
    pub median_delay_hours: f64,
    /// The same delays: median and 90th percentile (nearest rank), in minutes.
    pub median_delay_minutes: f64,
    pub p90_delay_minutes: f64,
    pub institutions: usize,
    pub weeks: f64,
    pub false_pages_per_institution_week: f64,
    /// Detected labels whose alert resolved within 6 h of the end (or whose end is less
    /// than 6 h before the range's end).
    pub resolved_within_6h: usize,
    /// Pages (first fire and every re-fire) per detected label.
    pub pages_per_incident: f64,
    pub per_label: Vec<LabelResult>,
    pub false_alerts_list: Vec<Incident>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabelResult {
    pub label: Label,
    pub detected: bool,
    pub delay_hours: Option<f64>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolved_in_time: bool,
}

fn matches(i: &Incident, l: &Label, window: Duration) -> bool {
    i.institution == l.institution
        && (l.key.is_empty() || i.entity == l.key || i.kind == "institution_spike")
        && i.pages().any(|p| p > l.start && p <= l.end + window)
}

fn is_spike(i: &Incident) -> bool {
    i.kind == "institution_spike" || i.kind == "key_spike"
}

/// Scores `incidents` (of `(from, to]`) against `labels`, over `institutions`.
pub fn score(
    incidents: &[Incident],
    labels: &[Label],
    institutions: usize,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    window: Duration,
) -> Score {
    let spikes: Vec<&Incident> = incidents.iter().filter(|i| is_spike(i)).collect();
    let labels: Vec<&Label> = labels
        .iter()
        .filter(|l| l.end > from && l.start < to)
        .collect();
    let mut per_label = Vec::new();
    let mut delays = Vec::new();
    let mut pages = 0usize;
    for l in &labels {
        let hits: Vec<&&Incident> = spikes.iter().filter(|i| matches(i, l, window)).collect();
        let first = hits
            .iter()
            .flat_map(|i| i.pages())
            .filter(|p| *p > l.start && *p <= l.end + window)
            .min();
        let delay = first.map(|f| (f - l.start).num_minutes() as f64 / 60.0);
        if let Some(d) = delay {
            delays.push(d);
        }
        pages += hits
            .iter()
            .filter(|i| i.entity == l.key || (l.key.is_empty() && i.kind == "institution_spike"))
            .map(|i| i.pages().count())
            .sum::<usize>()
            .max(usize::from(first.is_some()));
        // Resolution is judged on the alert about what the label names: the key's own
        // incident when there is one (the institution's may stay open for its own reasons).
        let own: Vec<&&Incident> = hits.iter().filter(|i| i.entity == l.key).copied().collect();
        let judged = if own.is_empty() { &hits } else { &own };
        let resolved_at = judged.iter().filter_map(|i| i.resolved_at).max();
        let unresolved = judged.iter().any(|i| i.resolved_at.is_none());
        let resolved_in_time = first.is_some()
            && if unresolved {
                to - l.end <= Duration::hours(6)
            } else {
                resolved_at.is_some_and(|r| r - l.end <= Duration::hours(6))
            };
        per_label.push(LabelResult {
            label: (*l).clone(),
            detected: first.is_some(),
            delay_hours: delay,
            resolved_at: if unresolved { None } else { resolved_at },
            resolved_in_time,
        });
    }
    let true_alerts = spikes
        .iter()
        .filter(|i| labels.iter().any(|l| matches(i, l, window)))
        .count();
    let false_alerts_list: Vec<Incident> = spikes
        .iter()
        .filter(|i| !labels.iter().any(|l| matches(i, l, window)))
        .map(|i| (*i).clone())
        .collect();
    let detected = per_label.iter().filter(|r| r.detected).count();
    delays.sort_by(|a, b| a.total_cmp(b));
    let median_delay_hours = match delays.len() {
        0 => 0.0,
        n if n % 2 == 1 => delays[n / 2],
        n => (delays[n / 2 - 1] + delays[n / 2]) / 2.0,
    };
    let p90_delay_hours = match delays.len() {
        0 => 0.0,
        n => delays[(n * 9).div_ceil(10) - 1],
    };
    let weeks = (to - from).num_hours() as f64 / 168.0;
    let ratio = |a: usize, b: usize| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    Score {
        labels: labels.len(),
        detected,
        recall: ratio(detected, labels.len()),
        alerts: spikes.len(),
        true_alerts,
        false_alerts: false_alerts_list.len(),
        precision: ratio(true_alerts, spikes.len()),
        median_delay_hours,
        median_delay_minutes: median_delay_hours * 60.0,
        p90_delay_minutes: p90_delay_hours * 60.0,
        institutions,
        weeks,
        false_pages_per_institution_week: if institutions == 0 || weeks <= 0.0 {
            0.0
        } else {
            false_alerts_list.len() as f64 / (institutions as f64 * weeks)
        },
        resolved_within_6h: per_label.iter().filter(|r| r.resolved_in_time).count(),
        pages_per_incident: if detected == 0 {
            0.0
        } else {
            pages as f64 / detected as f64
        },
        per_label,
        false_alerts_list,
    }
}

/// The score as a table: the goals first, then each label, then the false alerts.
pub fn table(s: &Score) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{:<40} {:>10}", "labelled incidents", s.labels);
    let _ = writeln!(out, "{:<40} {:>10}", "detected", s.detected);
    let _ = writeln!(out, "{:<40} {:>10.3}", "recall", s.recall);
    let _ = writeln!(out, "{:<40} {:>10}", "spike alerts", s.alerts);
    let _ = writeln!(out, "{:<40} {:>10}", "false alerts", s.false_alerts);
    let _ = writeln!(out, "{:<40} {:>10.3}", "precision", s.precision);
    let _ = writeln!(
        out,
        "{:<40} {:>10.2}",
        "median detection delay (h)", s.median_delay_hours
    );
    let _ = writeln!(
        out,
        "{:<40} {:>10}",
        "detection delay, median / p90 (min)",
        format!("{:.0} / {:.0}", s.median_delay_minutes, s.p90_delay_minutes)
    );
    let _ = writeln!(
        out,
        "{:<40} {:>10.3}",
        format!(
            "false pages per institution-week ({} × {:.1})",
            s.institutions, s.weeks
        ),
        s.false_pages_per_institution_week
    );
    let _ = writeln!(
        out,
        "{:<40} {:>10}",
        "resolved within 6 h of the end",
        format!("{}/{}", s.resolved_within_6h, s.detected)
    );
    let _ = writeln!(
        out,
        "{:<40} {:>10.2}",
        "pages per detected incident", s.pages_per_incident
    );
    let _ = writeln!(out);
    for r in &s.per_label {
        let _ = writeln!(
            out,
            "{:<9} {:<28} {} .. {}  delay {:<6} resolved {}  {}",
            if r.detected { "detected" } else { "MISSED" },
            if r.label.key.is_empty() {
                &r.label.institution
            } else {
                &r.label.key
            },
            r.label.start.format("%Y-%m-%d %H:%M"),
            r.label.end.format("%m-%d %H:%M"),
            r.delay_hours
                .map(|d| format!("{d:.1}h"))
                .unwrap_or_else(|| "-".into()),
            r.resolved_at
                .map(|t| t.format("%m-%d %H:%M").to_string())
                .unwrap_or_else(|| "-".into()),
            r.label.what
        );
    }
    for i in &s.false_alerts_list {
        let _ = writeln!(
            out,
            "FALSE     {:<28} {}  {}",
            i.entity,
            i.fired_at.format("%Y-%m-%d %H:%M"),
            i.message
        );
    }
    out
}
