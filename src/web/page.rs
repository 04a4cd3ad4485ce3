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
use crate::format::{csv_field, group_thousands, html as esc, money, urlencode};

#[derive(Debug, Clone)]
pub enum Cell {
    Text(String),
    Int(i64),
    /// Exact USD.
    Money(Decimal),
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
            Cell::Money(d) => format!(r#"<span title="{}">{}</span>"#, d.normalize(), money(*d)),
            Cell::Link { text, href } => format!(r#"<a href="{}">{}</a>"#, esc(href), esc(text)),
        }
    }

    fn numeric(&self) -> bool {
        matches!(self, Cell::Int(_) | Cell::Money(_))
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
}

#[derive(Debug, Clone)]
pub struct PageData {
    pub title: String,
    pub figures: Vec<Figure>,
    pub charts: Vec<Chart>,
    pub tables: Vec<Table>,
    pub notes: Vec<String>,
}

impl PageData {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            figures: vec![],
            charts: vec![],
            tables: vec![],
            notes: vec![],
        }
    }

    pub fn figure(&mut self, label: impl Into<String>, value: Cell) {
        self.figures.push(Figure {
            label: label.into(),
            value,
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
    /// (name, numeric)
    columns: Vec<(&'static str, bool)>,
    /// (html, numeric)
    rows: Vec<Vec<(String, bool)>>,
}

struct HtmlFigure {
    label: String,
    value: String,
}

#[derive(Template)]
#[template(path = "page.html")]
struct PageTemplate<'a> {
    title: &'a str,
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
pub fn respond(
    page: &PageData,
    filters: &Filters,
    path: &str,
    principal: &Principal,
    csrf: &str,
) -> Result<Response, AppError> {
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
    let tables = page
        .tables
        .iter()
        .map(|t| HtmlTable {
            title: t.title.clone(),
            csv_href: format!(
                "{path}?{}",
                query_string(filters, &[("format", "csv"), ("table", t.name)])
            ),
            columns: t
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        *c,
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
                .map(|r| r.iter().map(|c| (c.html(), c.numeric())).collect())
                .collect(),
        })
        .collect();
    let role = principal.role.as_str().to_owned();
    let t = PageTemplate {
        title: &page.title,
        user: &principal.name,
        role: &role,
        csrf,
        pipeline: principal.sees_pipeline(),
        filters,
        figures: page
            .figures
            .iter()
            .map(|f| HtmlFigure {
                label: f.label.clone(),
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
        show_institution_filter: principal.institution.is_none(),
    };
    Ok(Html(t.render()?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let j = p.to_json(&Filters::default());
        assert_eq!(j["tables"]["x"][0]["cost_usd"], "0.000375");
    }
}
