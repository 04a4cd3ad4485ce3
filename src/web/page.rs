//! A page's data — figures, charts and named tables — and its three renderings:
//! HTML (askama), CSV (any one table) and JSON (`/api/v1/...`).

use std::fmt::Write as _;

use askama::Template;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

use super::auth::Principal;
use super::chart::Chart;
use super::error::AppError;
use super::query::Filters;
use crate::format::{csv_field, group_thousands, html as esc, urlencode};

#[derive(Debug, Clone)]
pub enum Cell {
    Text(String),
    Int(i64),
    /// Exact USD.
    Money(Decimal),
    /// No price yet for any of the row's usage: "unpriced" on a page, 0 in CSV and JSON.
    Unpriced,
    Link {
        text: String,
        href: String,
    },
}

impl Cell {
    fn plain(&self) -> String {
        match self {
            Cell::Text(s) | Cell::Link { text: s, .. } => s.clone(),
            Cell::Int(i) => i.to_string(),
            Cell::Money(d) => d.normalize().to_string(),
            Cell::Unpriced => "0".into(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Int(i) => json!(i),
            other => json!(other.plain()),
        }
    }

    fn html(&self) -> String {
        match self {
            Cell::Text(s) => esc(s),
            Cell::Int(i) => group_thousands(&i.to_string()),
            Cell::Money(d) => format!(
                r#"<span title="{}">{}</span>"#,
                d.normalize(),
                crate::format::money_on_page(*d)
            ),
            Cell::Unpriced => {
                r#"<span class="unpriced" title="no price for this usage yet">unpriced</span>"#
                    .into()
            }
            Cell::Link { text, href } => format!(r#"<a href="{}">{}</a>"#, esc(href), esc(text)),
        }
    }

    /// HTML for a cell of an institution column: the name, the id as secondary text.
    fn html_institution(&self, names: &dyn Fn(&str) -> Option<String>) -> String {
        let (id, href) = match self {
            Cell::Text(s) => (s.as_str(), None),
            Cell::Link { text, href } => (text.as_str(), Some(href.as_str())),
            _ => return self.html(),
        };
        let Some(name) = names(id).filter(|n| n != id) else {
            return self.html();
        };
        let label = format!(r#"{} <small class="id">{}</small>"#, esc(&name), esc(id));
        match href {
            Some(h) => format!(r#"<a href="{}">{label}</a>"#, esc(h)),
            None => label,
        }
    }

    fn numeric(&self) -> bool {
        matches!(self, Cell::Int(_) | Cell::Money(_) | Cell::Unpriced)
    }
}

#[derive(Debug, Clone)]
pub struct Table {
    pub name: &'static str,
    pub title: String,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<Cell>>,
}

#[derive(Debug, Clone)]
pub struct Figure {
    pub label: String,
    pub value: Cell,
    /// A part of the label that links somewhere (an invoice number to its document).
    pub link: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct PageData {
    pub title: String,
    /// The days the page's figures cover (UTC), said under the title.
    pub range: Option<(chrono::NaiveDate, chrono::NaiveDate)>,
    pub figures: Vec<Figure>,
    pub charts: Vec<Chart>,
    pub tables: Vec<Table>,
    pub notes: Vec<String>,
}

impl PageData {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            range: None,
            figures: vec![],
            charts: vec![],
            tables: vec![],
            notes: vec![],
        }
    }

    /// A page about the days of `sel` (every page with date filters): says which.
    pub fn about(title: impl Into<String>, sel: &crate::domain::Selection) -> Self {
        Self {
            range: Some((sel.from, sel.to)),
            ..Self::new(title)
        }
    }

    pub fn figure(&mut self, label: impl Into<String>, value: Cell) {
        self.figures.push(Figure {
            label: label.into(),
            value,
            link: None,
        });
    }

    /// A figure whose label names something with a page of its own: `text` (a part of
    /// the label) links to `href` on the page; JSON and CSV keep the label as text.
    pub fn figure_linked(
        &mut self,
        label: impl Into<String>,
        value: Cell,
        link: Option<(String, String)>,
    ) {
        self.figures.push(Figure {
            label: label.into(),
            value,
            link,
        });
    }

    pub fn to_json(&self, filters: &Filters) -> Value {
        let mut figures = Map::new();
        for f in &self.figures {
            figures.insert(f.label.clone(), f.value.json());
        }
        let tables: Map<String, Value> = self
            .tables
            .iter()
            .map(|t| {
                let rows: Vec<Value> = t
                    .rows
                    .iter()
                    .map(|r| {
                        Value::Object(
                            t.columns
                                .iter()
                                .zip(r)
                                .map(|(c, v)| ((*c).to_owned(), v.json()))
                                .collect(),
                        )
                    })
                    .collect();
                (t.name.to_owned(), Value::Array(rows))
            })
            .collect();
        json!({
            "title": self.title,
            "filters": filters,
            "figures": figures,
            "charts": self.charts,
            "tables": tables,
            "notes": self.notes,
        })
    }

    pub fn csv(&self, table: &str) -> Option<String> {
        let t = self.tables.iter().find(|t| t.name == table)?;
        let mut out = String::new();
        let _ = writeln!(out, "{}", t.columns.join(","));
        for r in &t.rows {
            let cells: Vec<String> = r.iter().map(|c| csv_field(&c.plain())).collect();
            let _ = writeln!(out, "{}", cells.join(","));
        }
        Some(out)
    }
}

struct HtmlTable {
    title: String,
    csv_href: String,
    /// (human label, numeric)
    columns: Vec<(String, bool)>,
    /// (html, numeric, sort key)
    rows: Vec<Vec<(String, bool, String)>>,
}

/// The label a person reads for a column (CSV keeps the machine name as its header, JSON
/// its keys).
pub fn column_label(c: &str) -> String {
    let known = match c {
        "institution" | "institution_id" => "Institution",
        "model" => "Model",
        "price_model" => "Model (price book)",
        "api_key" | "api_key_id" | "key" => "API key",
        "user" | "user_id" => "User",
        "events" => "Requests",
        "unpriced_events" => "Unpriced requests",
        "input_tokens" => "Input tokens",
        "cache_read_tokens" => "Cached input tokens",
        "cache_write_tokens" => "Cache-write tokens",
        "output_tokens" => "Output tokens",
        "reasoning_tokens" => "Reasoning tokens",
        "cost_usd" => "Cost (USD)",
        "day" => "Day",
        "hour" => "Hour",
        "tag" => "Tag",
        "price_id" => "Price entry",
        "effective_from" => "Effective from",
        "received_at" => "Received",
        "committed_offset" => "Committed offset",
        "end_offset" => "End offset",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_owned();
    }
    let mut out = c.replace('_', " ");
    if let Some(f) = out.get_mut(0..1) {
        f.make_ascii_uppercase();
    }
    out
}

/// The order columns are shown in: the label first, then the money, then the rest.
fn display_order(columns: &[&str]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..columns.len()).collect();
    if let Some(pos) = columns.iter().position(|c| c.starts_with("cost")) {
        if pos > 1 {
            order.remove(pos);
            order.insert(1, pos);
        }
    }
    order
}

struct HtmlFigure {
    /// HTML (escaped, with the figure's link).
    label: String,
    value: String,
}

#[derive(Template)]
#[template(path = "page.html")]
struct PageTemplate<'a> {
    title: &'a str,
    /// "1 – 31 October 2026 (UTC days)" or None.
    range: Option<String>,
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    filters: &'a Filters,
    figures: Vec<HtmlFigure>,
    charts: Vec<(String, String)>,
    tables: Vec<HtmlTable>,
    notes: &'a [String],
    api_href: String,
    show_institution_filter: bool,
    /// (id, name) for the institution picker.
    institutions: Vec<(String, String)>,
    /// (label, href, active) date-range shortcuts.
    presets: Vec<(&'static str, String, bool)>,
}

/// The days a page covers, in words: "1 – 31 October 2026", "28 November – 7 December
/// 2026", "30 December 2025 – 2 January 2026", "7 December 2026"; UTC days, said.
pub fn range_label(from: chrono::NaiveDate, to: chrono::NaiveDate) -> String {
    use chrono::Datelike;
    let days = if from == to {
        to.format("%-d %B %Y").to_string()
    } else if from.year() != to.year() {
        format!("{} – {}", from.format("%-d %B %Y"), to.format("%-d %B %Y"))
    } else if from.month() != to.month() {
        format!("{} – {}", from.format("%-d %B"), to.format("%-d %B %Y"))
    } else {
        format!("{} – {}", from.format("%-d"), to.format("%-d %B %Y"))
    };
    format!("{days} (UTC days)")
}

/// "This month", "Last month", "This quarter", "Last 30 days": the same page and
/// filters with another range (UTC days, as the filters are).
pub fn range_presets(
    filters: &Filters,
    path: &str,
    today: chrono::NaiveDate,
) -> Vec<(&'static str, String, bool)> {
    use chrono::{Datelike, Duration, NaiveDate};
    let month = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).expect("a month");
    let last_month_end = month - Duration::days(1);
    let last_month =
        NaiveDate::from_ymd_opt(last_month_end.year(), last_month_end.month(), 1).expect("a month");
    let q_month = (today.month0() / 3) * 3 + 1;
    let quarter = NaiveDate::from_ymd_opt(today.year(), q_month, 1).expect("a quarter");
    [
        ("This month", month, today),
        ("Last month", last_month, last_month_end),
        ("This quarter", quarter, today),
        ("Last 30 days", today - Duration::days(29), today),
    ]
    .into_iter()
    .map(|(label, from, to)| {
        let f = Filters {
            from: from.to_string(),
            to: to.to_string(),
            ..filters.clone()
        };
        let active = filters.from == f.from && filters.to == f.to;
        (label, format!("{path}?{}", query_string(&f, &[])), active)
    })
    .collect()
}

/// Query string of the current filters plus extra pairs.
pub fn query_string(filters: &Filters, extra: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> = [
        ("from", &filters.from),
        ("to", &filters.to),
        ("institution", &filters.institution),
        ("model", &filters.model),
        ("key", &filters.key),
        ("user", &filters.user),
        ("tag", &filters.tag),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| ((*k).to_owned(), (*v).clone()))
    .collect();
    pairs.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Renders `page` as JSON (API paths), CSV (`format=csv&table=...`) or HTML.
pub async fn respond(
    page: &PageData,
    filters: &Filters,
    path: &str,
    principal: &Principal,
    csrf: &str,
    state: &super::AppState,
) -> Result<Response, AppError> {
    let cfg = &state.cfg;
    if path.starts_with("/api/") {
        return Ok(axum::Json(page.to_json(filters)).into_response());
    }
    if filters.format == "csv" {
        let csv = page.csv(&filters.table).ok_or(AppError::NotFound)?;
        let name = format!(
            "{}-{}.csv",
            path.trim_matches('/').replace('/', "-"),
            filters.table
        );
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{}\"", name.replace('"', "")),
                ),
            ],
            csv,
        )
            .into_response());
    }
    let names = |id: &str| {
        cfg.institution(id)
            .map(|i| i.name.clone())
            .filter(|n| !n.is_empty())
    };
    let tables = page
        .tables
        .iter()
        .map(|t| {
            let order = display_order(&t.columns);
            let institution_col = |i: usize| {
                matches!(
                    t.columns.get(i),
                    Some(&"institution") | Some(&"institution_id")
                )
            };
            HtmlTable {
                title: t.title.clone(),
                csv_href: format!(
                    "{path}?{}",
                    query_string(filters, &[("format", "csv"), ("table", t.name)])
                ),
                columns: order
                    .iter()
                    .map(|&i| {
                        (
                            column_label(t.columns[i]),
                            t.rows
                                .first()
                                .and_then(|r| r.get(i))
                                .is_some_and(Cell::numeric),
                        )
                    })
                    .collect(),
                rows: t
                    .rows
                    .iter()
                    .map(|r| {
                        order
                            .iter()
                            .filter_map(|&i| r.get(i).map(|c| (i, c)))
                            .map(|(i, c)| {
                                let html = if institution_col(i) {
                                    c.html_institution(&names)
                                } else {
                                    c.html()
                                };
                                (html, c.numeric(), c.plain())
                            })
                            .collect()
                    })
                    .collect(),
            }
        })
        .collect();
    let show_institution_filter = principal.institution.is_none();
    let institutions = if show_institution_filter {
        state.institution_choices(&filters.institution).await?
    } else {
        Vec::new()
    };
    let presets = range_presets(filters, path, chrono::Utc::now().date_naive());
    let role = principal.role.as_str().to_owned();
    let t = PageTemplate {
        title: &page.title,
        range: page.range.map(|(from, to)| range_label(from, to)),
        user: &principal.name,
        role: &role,
        csrf,
        pipeline: principal.sees_pipeline(),
        filters,
        figures: page
            .figures
            .iter()
            .map(|f| HtmlFigure {
                label: match &f.link {
                    Some((text, href)) if f.label.contains(text.as_str()) => {
                        let (before, after) = f.label.split_once(text.as_str()).expect("contains");
                        format!(
                            r#"{}<a href="{}">{}</a>{}"#,
                            esc(before),
                            esc(href),
                            esc(text),
                            esc(after)
                        )
                    }
                    _ => esc(&f.label),
                },
                value: f.value.html(),
            })
            .collect(),
        charts: page
            .charts
            .iter()
            .map(|c| (c.title.clone(), c.svg()))
            .collect(),
        tables,
        notes: &page.notes,
        api_href: format!("/api/v1{path}?{}", query_string(filters, &[])),
        show_institution_filter,
        institutions,
        presets,
    };
    Ok(Html(t.render()?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_said_in_words_without_repeating_its_month_or_year() {
        let d = |y, m, d| chrono::NaiveDate::from_ymd_opt(y, m, d).unwrap();
        for (from, to, said) in [
            (
                d(2026, 10, 1),
                d(2026, 10, 31),
                "1 – 31 October 2026 (UTC days)",
            ),
            (
                d(2026, 11, 28),
                d(2026, 12, 7),
                "28 November – 7 December 2026 (UTC days)",
            ),
            (
                d(2025, 12, 30),
                d(2026, 1, 2),
                "30 December 2025 – 2 January 2026 (UTC days)",
            ),
            (d(2026, 12, 7), d(2026, 12, 7), "7 December 2026 (UTC days)"),
        ] {
            assert_eq!(range_label(from, to), said);
        }
    }
    use rust_decimal_macros::dec;

    #[test]
    fn csv_is_exact_quoted_and_defused() {
        let mut p = PageData::new("t");
        p.tables.push(Table {
            name: "x",
            title: "X".into(),
            columns: vec!["k", "cost_usd"],
            rows: vec![vec![
                Cell::Text("=cmd,1".into()),
                Cell::Money(dec!(0.000375)),
            ]],
        });
        assert_eq!(p.csv("x").unwrap(), "k,cost_usd\n\"'=cmd,1\",0.000375\n");
        assert!(p.csv("y").is_none());
        // People read labels, with the money next to the label; CSV keeps machine names.
        assert_eq!(column_label("cache_read_tokens"), "Cached input tokens");
        assert_eq!(column_label("institution_id"), "Institution");
        assert_eq!(column_label("some_new_column"), "Some new column");
        assert_eq!(
            display_order(&["model", "events", "input_tokens", "cost_usd"]),
            vec![0, 3, 1, 2]
        );
        let presets = range_presets(
            &Filters::default(),
            "/models",
            chrono::NaiveDate::from_ymd_opt(2026, 12, 3).unwrap(),
        );
        assert_eq!(presets[1].1, "/models?from=2026-11-01&to=2026-11-30");
        assert_eq!(presets[2].1, "/models?from=2026-10-01&to=2026-12-03");
        let j = p.to_json(&Filters::default());
        assert_eq!(j["tables"]["x"][0]["cost_usd"], "0.000375");
    }
}
