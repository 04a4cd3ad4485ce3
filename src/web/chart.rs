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
            r#"<text x="{}" y="{}" text-anchor="end" font-size="13">{}</text>"#,
            LEFT - 4.0,
            TOP + 10.0,
            esc(&crate::format::money_on_chart(max))
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end" font-size="13">$0</text>"#,
            LEFT - 4.0,
            TOP + plot_h
        );
        // X labels, evenly spaced and never touching (at 13 px a character takes ~7.2
        // units), under their points (bars: their slot); the last one too where it fits.
        let n_labels = self.labels.len();
        if n_labels > 0 {
            let chars = self
                .labels
                .iter()
                .map(|l| l.chars().count())
                .max()
                .unwrap_or(1) as f64;
            let room = 1.5 * (chars * 7.2 + 12.0);
            let step = match self.kind {
                Kind::Line if n > 1 => plot_w / (n - 1) as f64,
                Kind::Line => plot_w,
                Kind::Bar => plot_w / n as f64,
            };
            let every = ((room / step).ceil() as usize).max(1);
            let slot = plot_w / n as f64;
            for (i, label) in self.labels.iter().enumerate() {
                let last = i + 1 == n_labels;
                if i % every != 0 && !(last && (i % every) as f64 * step >= room) {
                    continue;
                }
                let lx = match self.kind {
                    Kind::Line => x(i),
                    Kind::Bar => LEFT + slot * (i as f64 + 0.5),
                };
                let anchor = if n_labels == 1 {
                    "middle"
                } else if i == 0 && self.kind == Kind::Line {
                    "start"
                } else if last && self.kind == Kind::Line {
                    "end"
                } else {
                    "middle"
                };
                let _ = write!(
                    out,
                    r#"<text class="x" x="{lx:.1}" y="{}" text-anchor="{anchor}" font-size="13">{}</text>"#,
                    H - 8.0,
                    esc(label)
                );
            }
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
        out.push_str("</svg>");
        // The legend under the chart, in the page's own text (readable on a phone, and
        // never over a peak).
        if !self.series.is_empty() {
            out.push_str(r#"<ul class="legend">"#);
            for (si, s) in self.series.iter().enumerate() {
                let _ = write!(
                    out,
                    r#"<li><span class="swatch" style="background:{}"></span>{}</li>"#,
                    PALETTE[si % PALETTE.len()],
                    esc(&s.name)
                );
            }
            out.push_str("</ul>");
        }
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
    fn a_month_is_labelled_every_few_days_and_the_legend_is_outside_the_plot() {
        let c = Chart {
            title: "t".into(),
            kind: Kind::Bar,
            labels: (1..=31).map(|d| format!("2026-10-{d:02}")).collect(),
            series: vec![
                Series {
                    name: "gpt-4o".into(),
                    values: vec![dec!(1); 31],
                },
                Series {
                    name: "other".into(),
                    values: vec![dec!(2); 31],
                },
            ],
        };
        let svg = c.svg();
        let shown: Vec<&str> = svg
            .split(r#"<text class="x""#)
            .skip(1)
            .filter_map(|t| t.split('>').nth(1)?.split('<').next())
            .collect();
        assert_eq!(
            shown,
            [
                "2026-10-01",
                "2026-10-07",
                "2026-10-13",
                "2026-10-19",
                "2026-10-25",
                "2026-10-31"
            ]
        );
        let (chart, legend) = svg.split_once("</svg>").unwrap();
        assert!(
            !chart.contains(">other</text>") && legend.contains(">other</li>"),
            "{legend}"
        );
        // 14 bars with short labels: every one labelled (2 of 14 were).
        let two_weeks = Chart {
            labels: (1..=14).map(|d| d.to_string()).collect(),
            series: vec![Series {
                name: "s".into(),
                values: vec![dec!(1); 14],
            }],
            ..c
        };
        assert_eq!(two_weeks.svg().matches(r#"<text class="x""#).count(), 14);
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
