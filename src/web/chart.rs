//! Server-rendered SVG charts: no JavaScript, readable in print and on a phone.
//! Values are exact decimals; only pixel positions are approximated.

use std::fmt::Write as _;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub name: String,
    /// One value per x label.
    pub values: Vec<Decimal>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Line,
    Bar,
}

#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    pub title: String,
    pub kind: Kind,
    pub labels: Vec<String>,
    pub series: Vec<Series>,
}

const PALETTE: [&str; 8] = [
    "#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#4b5563",
];
const W: f64 = 800.0;
const H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 30.0;

use crate::format::html as esc;

impl Chart {
    /// Number of data points drawn (what the browser test counts).
    pub fn points(&self) -> usize {
        self.series.iter().map(|s| s.values.len()).sum()
    }

    pub fn svg(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
            esc(&self.title)
        );
        let max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter())
            .copied()
            .max()
            .unwrap_or_default()
            .max(Decimal::ZERO);
        let max_f = max.to_f64().unwrap_or(0.0).max(1e-9);
        let n = self.labels.len().max(1);
        let plot_w = W - LEFT - RIGHT;
        let plot_h = H - TOP - BOTTOM;
        let x = |i: usize| {
            LEFT + if n == 1 {
                plot_w / 2.0
            } else {
                plot_w * i as f64 / (n - 1) as f64
            }
        };
        let y = |v: Decimal| TOP + plot_h - plot_h * v.to_f64().unwrap_or(0.0) / max_f;
        // Axes and labels.
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#9ca3af"/>"##,
            TOP + plot_h,
            W - RIGHT,
            TOP + plot_h
        );
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="#9ca3af"/>"##,
            TOP + plot_h
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end" font-size="12">{}</text>"#,
            LEFT - 4.0,
            TOP + 10.0,
            esc(&crate::format::money_on_chart(max))
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end" font-size="12">$0</text>"#,
            LEFT - 4.0,
            TOP + plot_h
        );
        if let (Some(first), Some(last)) = (self.labels.first(), self.labels.last()) {
            let _ = write!(
                out,
                r#"<text x="{LEFT}" y="{}" font-size="12">{}</text>"#,
                H - 8.0,
                esc(first)
            );
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" text-anchor="end" font-size="12">{}</text>"#,
                W - RIGHT,
                H - 8.0,
                esc(last)
            );
        }
        let groups = self.series.len().max(1) as f64;
        for (si, s) in self.series.iter().enumerate() {
            let color = PALETTE[si % PALETTE.len()];
            match self.kind {
                Kind::Line => {
                    let pts: Vec<String> = s
                        .values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
                        .collect();
                    let _ = write!(
                        out,
                        r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                        pts.join(" ")
                    );
                    for (i, v) in s.values.iter().enumerate() {
                        let label = self.labels.get(i).map(String::as_str).unwrap_or("");
                        let _ = write!(
                            out,
                            r#"<circle class="pt" cx="{:.1}" cy="{:.1}" r="3" fill="{color}" data-value="{v}"><title>{} {}: {}</title></circle>"#,
                            x(i),
                            y(*v),
                            esc(&s.name),
                            esc(label),
                            esc(&crate::format::money_on_chart(*v))
                        );
                    }
                }
                Kind::Bar => {
                    let slot = plot_w / n as f64;
                    let bw = (slot * 0.8 / groups).max(1.0);
                    for (i, v) in s.values.iter().enumerate() {
                        let bx = LEFT + slot * i as f64 + slot * 0.1 + bw * si as f64;
                        let by = y(*v);
                        let label = self.labels.get(i).map(String::as_str).unwrap_or("");
                        let _ = write!(
                            out,
                            r#"<rect class="pt" x="{bx:.1}" y="{by:.1}" width="{bw:.1}" height="{:.1}" fill="{color}" data-value="{v}"><title>{} {}: {}</title></rect>"#,
                            (TOP + plot_h - by).max(0.0),
                            esc(&s.name),
                            esc(label),
                            esc(&crate::format::money_on_chart(*v))
                        );
                    }
                }
            }
        }
        // Legend, top right, on a white box so lines don't run through it.
        if !self.series.is_empty() {
            let longest = self
                .series
                .iter()
                .map(|s| s.name.chars().count())
                .max()
                .unwrap_or(0) as f64;
            let bw = 24.0 + 6.5 * longest;
            let bx = W - RIGHT - bw - 4.0;
            let _ = write!(
                out,
                r##"<rect x="{bx:.1}" y="{TOP}" width="{bw:.1}" height="{:.1}" fill="#ffffff" fill-opacity="0.85" stroke="#e5e7eb"/>"##,
                6.0 + 14.0 * self.series.len() as f64
            );
            for (si, s) in self.series.iter().enumerate() {
                let c = PALETTE[si % PALETTE.len()];
                let ly = TOP + 14.0 + 14.0 * si as f64;
                let _ = write!(
                    out,
                    r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{c}"/><text x="{:.1}" y="{ly:.1}" font-size="11">{}</text>"#,
                    bx + 5.0,
                    ly - 9.0,
                    bx + 19.0,
                    esc(&s.name)
                );
            }
        }
        out.push_str("</svg>");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn one_marker_per_value_with_exact_values() {
        let c = Chart {
            title: "t<".into(),
            kind: Kind::Line,
            labels: vec!["a".into(), "b".into(), "c".into()],
            series: vec![Series {
                name: "s".into(),
                values: vec![dec!(1.5), dec!(0), dec!(0.000375)],
            }],
        };
        let svg = c.svg();
        assert_eq!(svg.matches(r#"class="pt""#).count(), 3);
        assert!(svg.contains(r#"data-value="0.000375""#));
        assert!(svg.contains("t&lt;"));
        let bars = Chart {
            kind: Kind::Bar,
            ..c
        };
        assert_eq!(bars.svg().matches("<rect class=\"pt\"").count(), 3);
    }

    #[test]
    fn empty_chart_renders() {
        let c = Chart {
            title: "x".into(),
            kind: Kind::Line,
            labels: vec![],
            series: vec![],
        };
        assert!(c.svg().starts_with("<svg"));
        assert_eq!(c.points(), 0);
    }
}
