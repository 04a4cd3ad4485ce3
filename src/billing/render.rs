//! Renderings of a document: JSON, CSV of lines, detailed usage CSV and PDF. All are
//! functions of the frozen document alone, so an issued invoice renders the same bytes
//! every time; the stored copies are what `show` and the portal return.

use std::fmt::Write as _;

use printpdf::{
    IndirectFontRef, Line as PdfLine, Mm, OffsetDateTime, PdfDocument, PdfLayerReference, Point,
};
use rust_decimal::Decimal;
use sha2::{Digest, Sha256};

use super::usage::Detail;
use super::{exact_amount, quantities, Document, Kind, Period};
use crate::format::{csv_field, money};
use crate::price::PriceBook;

/// The font embedded in every PDF (DejaVu Sans, see assets/fonts/DejaVuSans.LICENSE).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Pretty JSON with a final newline.
pub fn json(doc: &Document) -> String {
    let mut s = serde_json::to_string_pretty(doc).expect("documents serialize");
    s.push('\n');
    s
}

/// `list_unit_price` is the price book's price (quantity × it = `exact_amount`);
/// `billed_unit_price` the price with the contract, so quantity × billed_unit_price is
/// `amount` before rounding. The list price's column was called `unit_price` until
/// 2026-12: beside the billed amount, readers took it for the price billed; the column
/// keeps its position, so readers by position are unaffected.
pub const LINES_CSV_HEADER: &str = "number,kind,institution,invoice_period,usage_period,adjustment,description,model,variant,token_class,quantity,list_unit_price,unit,exact_amount,contract_percent,amount,currency,billed_unit_price,price_applies_from,price_applies_until,now_amount,billed_before";

/// One row per line; the amounts sum to the document's total.
/// "/1M tokens" or "/request".
fn per(class: super::Class) -> &'static str {
    if class.per_million() {
        "/1M tokens"
    } else {
        "/request"
    }
}

/// A readable summary of a document (the CLI's `--format table`). Unit prices are as
/// billed (with the contract), so every line multiplies out: quantity × unit price =
/// amount before rounding.
pub fn table(d: &Document) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {}  {} {} ({})",
        d.title(),
        d.number,
        d.customer.id,
        d.period,
        d.time_zone
    );
    if let Some(r) = &d.references {
        let _ = writeln!(s, "cancels {r}");
    }
    if let (Some(i), Some(due)) = (d.issue_date, d.due_date) {
        let _ = writeln!(s, "issued {i}, due {due}");
    }
    if !d.contract_percent.is_zero() {
        let what = if d.contract_percent < rust_decimal::Decimal::ZERO {
            "discount"
        } else {
            "markup"
        };
        let _ = writeln!(
            s,
            "contract {what} of {}%: unit prices below include it (list price × {})",
            d.contract_percent.abs(),
            super::multiplier(d.contract_percent).normalize()
        );
    }
    let _ = writeln!(
        s,
        "{:<64} {:>8} {:>14} {:>24} {:>12}",
        "line", "period", "quantity", "unit price", "amount"
    );
    for l in &d.lines {
        let desc = if l.adjustment {
            format!("adjustment: {}", l.description())
        } else {
            l.description()
        };
        let _ = writeln!(
            s,
            "{:<64} {:>8} {:>14} {:>24} {:>12}",
            desc,
            l.period.to_string(),
            l.quantity,
            format!(
                "${}{}",
                l.billed_unit_price(d.contract_percent),
                per(l.class)
            ),
            money(l.amount)
        );
        if let (Some(now), Some(before)) = (l.now_amount, l.billed_before) {
            let _ = writeln!(
                s,
                "    its events come to {} now; earlier documents billed {}",
                money(now),
                money(before)
            );
        }
    }
    let _ = writeln!(s, "{:>112} {:>12}", "subtotal", money(d.subtotal));
    let _ = writeln!(s, "{:>112} {:>12}", "adjustments", money(d.adjustments));
    let _ = writeln!(
        s,
        "{:>112} {:>12}",
        format!("total {}", d.currency),
        money(d.total)
    );
    if d.unpriced.events != 0 {
        let _ = writeln!(
            s,
            "UNPRICED: {} events ({} tokens) of {} are not billed",
            d.unpriced.events,
            d.unpriced.tokens,
            d.unpriced.models.join(", ")
        );
    }
    for u in &d.unpriced_earlier {
        let _ = writeln!(
            s,
            "UNPRICED (adjustment, {}): {} events ({} tokens) of {} arrived after that period was invoiced; not billed",
            u.period,
            u.events,
            u.tokens,
            u.models.join(", ")
        );
    }
    let _ = writeln!(s, "price book {}", d.price_book_version);
    if !d.sha256.is_empty() {
        let _ = writeln!(s, "sha256 {}", d.sha256);
        if !d.previous_sha256.is_empty() {
            let _ = writeln!(s, "previous document's sha256 {}", d.previous_sha256);
        }
    }
    s
}

pub fn lines_csv(doc: &Document) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{LINES_CSV_HEADER}");
    let kind = match doc.kind {
        Kind::Invoice => "invoice",
        Kind::CreditNote => "credit_note",
    };
    for l in &doc.lines {
        let unit = if l.class.per_million() {
            "per 1M tokens"
        } else {
            "per request"
        };
        let cells = [
            doc.number.clone(),
            kind.to_owned(),
            doc.customer.id.clone(),
            doc.period.to_string(),
            l.period.to_string(),
            l.adjustment.to_string(),
            l.description(),
            l.model.clone(),
            l.variant.clone(),
            l.class.as_str().to_owned(),
            l.quantity.to_string(),
            l.unit_price.to_string(),
            unit.to_owned(),
            l.exact.to_string(),
            doc.contract_percent.to_string(),
            l.amount.to_string(),
            doc.currency.clone(),
            l.billed_unit_price(doc.contract_percent).to_string(),
            l.applies.map(|r| r.from.to_string()).unwrap_or_default(),
            l.applies.map(|r| r.until.to_string()).unwrap_or_default(),
            l.now_amount.map(|d| d.to_string()).unwrap_or_default(),
            l.billed_before.map(|d| d.to_string()).unwrap_or_default(),
        ];
        let cells: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
        let _ = writeln!(out, "{}", cells.join(","));
    }
    out
}

/// Day × user × key × model × token class, with exact amounts before the contract.
/// Unpriced usage appears with class `unpriced` and no amount.
pub fn usage_csv(
    period: Period,
    details: &[Detail],
    book: &PriceBook,
    byok_fee: Decimal,
) -> Result<String, super::BillingError> {
    let mut out = String::from(USAGE_CSV_HEADER);
    for d in details {
        usage_csv_rows(period, d, book, byok_fee, &mut out)?;
    }
    Ok(out)
}

/// The usage CSV's first line (with its newline).
pub const USAGE_CSV_HEADER: &str =
    "day,user_id,api_key_id,model,variant,token_class,quantity,unit_price,exact_amount,group\n";

/// The usage CSV's rows of one detail (one per token class, or one `unpriced` row),
/// appended to `out`.
pub fn usage_csv_rows(
    period: Period,
    d: &Detail,
    book: &PriceBook,
    byok_fee: Decimal,
    out: &mut String,
) -> Result<(), super::BillingError> {
    let prefix = [d.day.to_string(), d.user_id.clone(), d.api_key_id.clone()];
    let prefix: Vec<String> = prefix.iter().map(|c| csv_field(c)).collect();
    let group = csv_field(&d.group);
    if !d.priced {
        let tokens = d.sums.input + d.sums.cache_read + d.sums.cache_write + d.sums.output;
        let _ = writeln!(
            out,
            "{},{},,unpriced,{tokens},,,{group}",
            prefix.join(","),
            csv_field(&d.model)
        );
        return Ok(());
    }
    for (k, q) in quantities(period, std::slice::from_ref(&d.sums), book, byok_fee)? {
        let _ = writeln!(
            out,
            "{},{},{},{},{q},{},{},{group}",
            prefix.join(","),
            csv_field(&k.model),
            csv_field(&k.variant),
            k.class.as_str(),
            k.unit_price,
            exact_amount(k.class, q, k.unit_price).normalize()
        );
    }
    Ok(())
}

/// Characters the PDF's own labels use beyond printable ASCII.
const LABEL_CHARS: &str = "—–…·−×‖≤≥€£";

/// The embedded font cut down to the glyphs this document can use (its JSON holds every
/// text it prints, labels add printable ASCII and a few marks): ~25 KB instead of the
/// whole 740 KB font. The subset keeps a Unicode cmap, so printpdf maps text through it
/// and writes a ToUnicode map as usual: the text stays extractable.
fn subset_font(doc: &Document) -> Result<Vec<u8>, super::BillingError> {
    use allsorts::binary::read::ReadScope;
    use allsorts::font_data::FontData;
    use allsorts::subset::{subset, CmapTarget, SubsetProfile};
    let fail = |e: String| super::BillingError::Render(format!("font subset: {e}"));
    let face = ttf_parser::Face::parse(FONT, 0).map_err(|e| fail(e.to_string()))?;
    let json = json(doc);
    let chars: std::collections::BTreeSet<char> = (' '..='~')
        .chain(LABEL_CHARS.chars())
        .chain(json.chars())
        .collect();
    let mut glyphs: Vec<u16> = chars
        .iter()
        .filter_map(|c| face.glyph_index(*c).map(|g| g.0))
        .filter(|g| *g != 0)
        .collect();
    glyphs.sort_unstable();
    glyphs.dedup();
    glyphs.insert(0, 0);
    let data = ReadScope::new(FONT)
        .read::<FontData<'_>>()
        .map_err(|e| fail(e.to_string()))?;
    let provider = data.table_provider(0).map_err(|e| fail(e.to_string()))?;
    subset(&provider, &glyphs, &SubsetProfile::Pdf, CmapTarget::Unicode)
        .map_err(|e| fail(e.to_string()))
}

/// Widths of text in the embedded font.
struct Metrics {
    face: ttf_parser::Face<'static>,
}

impl Metrics {
    fn new() -> Self {
        Self {
            face: ttf_parser::Face::parse(FONT, 0).expect("embedded font parses"),
        }
    }

    /// Width in millimetres at `size` points.
    fn width(&self, text: &str, size: f32) -> f32 {
        let units: f32 = text
            .chars()
            .map(|c| {
                self.face
                    .glyph_index(c)
                    .and_then(|g| self.face.glyph_hor_advance(g))
                    .unwrap_or(0) as f32
            })
            .sum();
        units / self.face.units_per_em() as f32 * size * 0.352_778
    }
}

struct Page<'a> {
    layer: PdfLayerReference,
    font: &'a IndirectFontRef,
    metrics: &'a Metrics,
}

impl Page<'_> {
    /// "DRAFT" across the page in light grey, under everything written after it: a draft
    /// must never pass for an invoice.
    fn watermark(&self) {
        use printpdf::{Color, Greyscale, TextMatrix};
        self.layer.save_graphics_state();
        self.layer
            .set_fill_color(Color::Greyscale(Greyscale::new(0.85, None)));
        self.layer.begin_text_section();
        self.layer.set_font(self.font, 110.0);
        self.layer.set_text_matrix(TextMatrix::TranslateRotate(
            Mm(48.0).into(),
            Mm(75.0).into(),
            52.0,
        ));
        self.layer.write_text("DRAFT", self.font);
        self.layer.end_text_section();
        self.layer.restore_graphics_state();
    }

    fn text(&self, s: &str, size: f32, x: f32, y: f32) {
        self.layer.use_text(s, size, Mm(x), Mm(y), self.font);
    }

    fn right(&self, s: &str, size: f32, right_x: f32, y: f32) {
        let w = self.metrics.width(s, size);
        self.text(s, size, right_x - w, y);
    }

    fn rule(&self, y: f32) {
        self.layer.set_outline_thickness(0.5);
        self.layer.add_line(PdfLine {
            points: vec![
                (Point::new(Mm(LEFT), Mm(y)), false),
                (Point::new(Mm(RIGHT), Mm(y)), false),
            ],
            is_closed: false,
        });
    }
}

const LEFT: f32 = 18.0;
const RIGHT: f32 = 192.0;
const PAGE_W: f32 = 210.0;
const PAGE_H: f32 = 297.0;

/// Breaks `s` into lines of at most `max_mm` at `size` points, at spaces where it can
/// (a word longer than a line is broken inside).
fn wrap(m: &Metrics, s: &str, size: f32, max_mm: f32) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in s.split(' ') {
        let candidate = if cur.is_empty() {
            word.to_owned()
        } else {
            format!("{cur} {word}")
        };
        if m.width(&candidate, size) <= max_mm {
            cur = candidate;
            continue;
        }
        if !cur.is_empty() {
            lines.push(std::mem::take(&mut cur));
        }
        let mut w = String::new();
        for ch in word.chars() {
            w.push(ch);
            if m.width(&w, size) > max_mm {
                w.pop();
                lines.push(std::mem::take(&mut w));
                w.push(ch);
            }
        }
        cur = w;
    }
    if !cur.is_empty() || lines.is_empty() {
        lines.push(cur);
    }
    lines
}

fn qty(q: i64) -> String {
    let s = q.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if q < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn date_or_dash(d: Option<chrono::NaiveDate>) -> String {
    d.map_or_else(|| "—".to_owned(), |d| d.to_string())
}

/// A one- or multi-page A4 PDF with the font embedded. Deterministic: the document id
/// and dates derive from the document, not the clock.
/// The pages of one PDF being written, and where the next row goes.
struct Sheet<'a> {
    pdf: &'a printpdf::PdfDocumentReference,
    pages: Vec<Page<'a>>,
    y: f32,
    /// Every page watermarked "DRAFT".
    draft: bool,
}

impl<'a> Sheet<'a> {
    fn page(&self) -> &Page<'a> {
        self.pages.last().expect("a sheet has a page")
    }

    fn metrics(&self) -> &'a Metrics {
        self.pages[0].metrics
    }

    /// Starts a new page; the next row goes to its top.
    fn new_page(&mut self) {
        let (pi, li) = self.pdf.add_page(Mm(PAGE_W), Mm(PAGE_H), "content");
        let first = &self.pages[0];
        let page = Page {
            layer: self.pdf.get_page(pi).get_layer(li),
            font: first.font,
            metrics: first.metrics,
        };
        if self.draft {
            page.watermark();
        }
        self.pages.push(page);
        self.y = PAGE_H - 22.0;
    }
}

/// The document as a PDF (A4, DejaVu Sans subset): the same document always renders to
/// the same bytes.
pub fn pdf(doc: &Document) -> Result<Vec<u8>, super::BillingError> {
    let render =
        |e: printpdf::Error| super::BillingError::Render(format!("PDF of {}: {e}", doc.number));
    let title = format!("{} {}", doc.title(), doc.number);
    let (pdf, page1, layer1) = PdfDocument::new(&title, Mm(PAGE_W), Mm(PAGE_H), "content");
    let id = hex::encode(&Sha256::digest(doc.number.as_bytes())[..16]);
    let when = doc
        .issued_at
        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.timestamp()).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let pdf = pdf
        .with_document_id(id.clone())
        .with_creation_date(when)
        .with_mod_date(when)
        .with_metadata_date(when)
        .with_producer("tokentally")
        .with_creator("tokentally");
    let font = pdf
        .add_external_font(subset_font(doc)?.as_slice())
        .map_err(render)?;
    let metrics = Metrics::new();
    let mut sheet = Sheet {
        pdf: &pdf,
        pages: vec![Page {
            layer: pdf.get_page(page1).get_layer(layer1),
            font: &font,
            metrics: &metrics,
        }],
        y: PAGE_H - 22.0,
        draft: doc.is_draft(),
    };
    if sheet.draft {
        sheet.page().watermark();
    }
    pdf_header(doc, &mut sheet);
    pdf_lines(doc, &mut sheet);
    pdf_totals(doc, &mut sheet);
    let paragraph = |sheet: &mut Sheet<'_>, text: &str, size: f32| {
        for row in wrap(&metrics, text, size, RIGHT - LEFT) {
            if sheet.y < 18.0 {
                sheet.new_page();
            }
            sheet.page().text(&row, size, LEFT, sheet.y);
            sheet.y -= size * 0.56;
        }
    };
    let pay = doc
        .issuer
        .payment_instructions
        .replace("{number}", &doc.number);
    if doc.kind == Kind::Invoice && !doc.is_draft() && !pay.trim().is_empty() {
        paragraph(&mut sheet, "How to pay", 10.0);
        for line in pay.lines() {
            paragraph(&mut sheet, line, 9.0);
        }
        sheet.y -= 3.0;
    }
    for n in pdf_notes(doc) {
        paragraph(&mut sheet, &n, 8.0);
    }
    // The evidence for verification on pages of its own.
    let evidence = pdf_evidence(doc);
    if !evidence.is_empty() {
        sheet.new_page();
        paragraph(&mut sheet, "Appendix: evidence for verification", 11.0);
        sheet.y -= 2.0;
        for n in evidence {
            paragraph(&mut sheet, &n, 8.0);
        }
    }
    let n = sheet.pages.len();
    for (i, p) in sheet.pages.iter().enumerate() {
        p.right(
            &format!("{} · page {} of {n}", doc.number, i + 1),
            7.5,
            RIGHT,
            12.0,
        );
    }
    drop(sheet);
    let bytes = pdf.save_to_bytes().map_err(render)?;
    Ok(with_fixed_id(bytes, &id))
}

/// Issuer left, document facts right, then whom it is billed to.
fn pdf_header(doc: &Document, sheet: &mut Sheet<'_>) {
    let p = sheet.page();
    let y = sheet.y;
    p.text(&doc.issuer.name, 15.0, LEFT, y);
    let title = if doc.is_draft() {
        format!("DRAFT {}", doc.title().to_uppercase())
    } else {
        doc.title().to_uppercase()
    };
    p.right(&title, 18.0, RIGHT, y);
    let mut ly = y - 6.0;
    for a in &doc.issuer.address {
        p.text(a, 9.0, LEFT, ly);
        ly -= 4.5;
    }
    for extra in [&doc.issuer.email, &doc.issuer.tax_id] {
        if !extra.is_empty() {
            p.text(extra, 9.0, LEFT, ly);
            ly -= 4.5;
        }
    }
    let mut facts = vec![
        ("Number", doc.number.clone()),
        ("Issue date", date_or_dash(doc.issue_date)),
        ("Due date", date_or_dash(doc.due_date)),
        ("Period", format!("{} ({})", doc.period, doc.time_zone)),
    ];
    if let Some(r) = &doc.references {
        facts.push(("Cancels invoice", r.clone()));
    }
    if doc.is_draft() {
        facts.push(("Status", "draft - not an invoice, nothing to pay".into()));
    }
    if !doc.customer_reference.is_empty() {
        facts.push(("Your reference", doc.customer_reference.clone()));
    }
    let mut ry = y - 7.0;
    for (k, v) in &facts {
        p.right(&format!("{k}: {v}"), 9.5, RIGHT, ry);
        ry -= 5.0;
    }
    let mut y = ly.min(ry) - 8.0;
    p.text("Bill to", 9.0, LEFT, y);
    y -= 5.5;
    p.text(&doc.customer.name, 11.0, LEFT, y);
    y -= 5.0;
    for a in doc
        .customer
        .address
        .iter()
        .chain([&doc.customer.email, &doc.customer.tax_id])
    {
        if !a.is_empty() {
            p.text(a, 9.0, LEFT, y);
            y -= 4.5;
        }
    }
    sheet.y = y - 6.0;
}

const COLS: [(&str, f32, bool); 5] = [
    ("Description", LEFT, false),
    ("Period", 112.0, false),
    ("Quantity", 150.0, true),
    ("Unit price", 171.0, true),
    ("Amount", RIGHT, true),
];

fn pdf_columns(p: &Page<'_>, y: f32) {
    for (name, x, right) in COLS {
        if right {
            p.right(name, 9.0, x, y);
        } else {
            p.text(name, 9.0, x, y);
        }
    }
    p.rule(y - 2.0);
}

/// One row (or a few, wrapped) per line, pages broken where a row would not fit.
fn pdf_lines(doc: &Document, sheet: &mut Sheet<'_>) {
    pdf_columns(sheet.page(), sheet.y);
    sheet.y -= 7.0;
    let metrics = sheet.metrics();
    for l in &doc.lines {
        let desc = if l.adjustment {
            format!("Adjustment: {}", l.description())
        } else {
            l.description()
        };
        let mut rows = wrap(metrics, &desc, 8.5, 90.0);
        if let (Some(now), Some(before)) = (l.now_amount, l.billed_before) {
            rows.extend(wrap(
                metrics,
                &format!(
                    "its events come to {} now; earlier documents billed {}",
                    money(now),
                    money(before)
                ),
                7.5,
                90.0,
            ));
        }
        let height = 4.0 * rows.len() as f32 + 1.0;
        if sheet.y - height < 36.0 {
            sheet.new_page();
            pdf_columns(sheet.page(), sheet.y);
            sheet.y -= 7.0;
        }
        let (p, y) = (sheet.page(), sheet.y);
        for (i, r) in rows.iter().enumerate() {
            let size = if i > 0 && r.starts_with("its events") {
                7.5
            } else {
                8.5
            };
            p.text(r, size, LEFT, y - 4.0 * i as f32);
        }
        p.text(&l.period.to_string(), 8.5, 112.0, y);
        p.right(&qty(l.quantity), 8.5, 150.0, y);
        let mut price = l.billed_unit_price(doc.contract_percent);
        if price.scale() < 2 {
            price.rescale(2);
        }
        let unit = if l.class.per_million() {
            format!("${price}/1M")
        } else {
            format!("${price}/req")
        };
        p.right(&unit, 8.5, 171.0, y);
        p.right(&money(l.amount), 8.5, RIGHT, y);
        sheet.y -= height;
    }
    if doc.lines.is_empty() {
        sheet
            .page()
            .text("No billable usage in this period.", 9.0, LEFT, sheet.y);
        sheet.y -= 5.0;
    }
}

/// Subtotal, adjustments and total (on a new page if they would not fit).
fn pdf_totals(doc: &Document, sheet: &mut Sheet<'_>) {
    if sheet.y < 70.0 {
        sheet.new_page();
    }
    let p = sheet.page();
    p.rule(sheet.y + 2.0);
    let mut y = sheet.y - 5.0;
    let totals = [
        (format!("Subtotal {}", doc.period), doc.subtotal, 9.5),
        (
            "Adjustments for earlier periods".to_owned(),
            doc.adjustments,
            9.5,
        ),
        (format!("Total ({})", doc.currency), doc.total, 12.0),
    ];
    for (label, value, size) in totals {
        p.right(&label, size, 160.0, y);
        p.right(&money(value), size, RIGHT, y);
        y -= 6.5;
    }
    sheet.y = y - 4.0;
}

/// The notes under the totals: contract, rounding, adjustments, what is not billed,
/// the price book, the document's hashes and each line's Merkle root.
fn pdf_notes(doc: &Document) -> Vec<String> {
    let mut notes = Vec::new();
    if !doc.contract_percent.is_zero() {
        let what = if doc.contract_percent < Decimal::ZERO {
            "discount"
        } else {
            "markup"
        };
        notes.push(format!(
            "Contract {what} of {}%: unit prices include it (list price × {}), so quantity × unit price is each line's amount before rounding.",
            doc.contract_percent.abs(),
            super::multiplier(doc.contract_percent).normalize()
        ));
    }
    notes.push(
        "Each line is the exact sum of its requests' costs, rounded once to cents; the total is the sum of the lines."
            .to_owned(),
    );
    if doc.lines.iter().any(|l| l.adjustment) {
        notes.push(
            "An adjustment bills what a line's stored requests come to now minus what earlier documents billed for it."
                .to_owned(),
        );
    }
    if doc.kind == Kind::Invoice && doc.unpriced.events != 0 {
        notes.push(format!(
            "Not billed: {} unpriced requests ({} tokens) of models without a price: {}.",
            doc.unpriced.events,
            qty(doc.unpriced.tokens),
            doc.unpriced.models.join(", ")
        ));
    }
    for u in &doc.unpriced_earlier {
        notes.push(format!(
            "Adjustments, not billed: {} unpriced requests ({} tokens) for {} arrived after it was invoiced; models without a price: {}.",
            u.events,
            qty(u.tokens),
            u.period,
            u.models.join(", ")
        ));
    }
    notes.push(format!("Price book version: {}", doc.price_book_version));
    notes
}

/// What lets anyone verify the document: its hashes and each line's Merkle root — an
/// appendix, after the invoice itself (none for a draft).
fn pdf_evidence(doc: &Document) -> Vec<String> {
    let mut notes = Vec::new();
    if !doc.sha256.is_empty() {
        notes.push(format!("Document SHA-256: {}", doc.sha256));
        if !doc.previous_sha256.is_empty() {
            notes.push(format!(
                "Previous document's SHA-256: {}",
                doc.previous_sha256
            ));
        }
    }
    if !doc.manifest.is_empty() {
        notes.push(
            "Verify with `tokentally invoice verify`; each line's requests are listed by its Merkle root:"
                .to_owned(),
        );
        for (i, m) in doc.manifest.iter().enumerate() {
            notes.push(format!(
                "line {}: {} requests, {}",
                i + 1,
                m.events,
                m.merkle_root
            ));
        }
    }
    notes
}

/// printpdf writes two random strings into the trailer's /ID; they are replaced (same
/// length, so no offset moves) with one derived from the number, so that the same
/// document always renders to the same bytes.
fn with_fixed_id(mut bytes: Vec<u8>, id: &str) -> Vec<u8> {
    let marker = b"/ID[(";
    if let Some(pos) = find(&bytes, marker) {
        let first = pos + marker.len();
        let second = first + 32 + 2;
        if bytes.len() >= second + 32 && &bytes[first + 32..second] == b")(" {
            let id = id.to_uppercase();
            bytes[first..first + 32].copy_from_slice(id.as_bytes());
            bytes[second..second + 32].copy_from_slice(id.as_bytes());
        }
    }
    bytes
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::billing::{Class, Line, Party, Unpriced};
    use chrono::{TimeZone, Utc};
    use rust_decimal_macros::dec;

    pub(crate) fn sample(lines: usize) -> Document {
        let p: Period = "2026-10".parse().unwrap();
        let (s, e) = p.bounds(chrono_tz::UTC);
        let mut d = Document {
            number: "TT-2026-000042".into(),
            seq: 42,
            kind: Kind::Invoice,
            references: None,
            issuer: Party {
                name: "Example Gateway GmbH".into(),
                address: vec!["Hauptstraße 1".into(), "10115 Berlin".into()],
                ..Default::default()
            },
            customer: Party {
                id: "uni-a".into(),
                name: "University A".into(),
                ..Default::default()
            },
            customer_reference: "PO-7".into(),
            period: p,
            time_zone: "UTC".into(),
            period_start: s,
            period_end: e,
            issued_at: Some(Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap()),
            issue_date: Some(chrono::NaiveDate::from_ymd_opt(2026, 11, 2).unwrap()),
            due_date: Some(chrono::NaiveDate::from_ymd_opt(2026, 12, 2).unwrap()),
            currency: "USD".into(),
            contract_percent: dec!(-10),
            price_book_version: "abc".into(),
            lines: (0..lines)
                .map(|i| Line {
                    period: p,
                    adjustment: false,
                    model: format!("model-{i}"),
                    variant: String::new(),
                    class: Class::Input,
                    quantity: 1_000_000,
                    unit_price: dec!(1.5),
                    exact: dec!(1.5),
                    amount: dec!(1.35),
                    contract_unit_price: Some(dec!(1.35)),
                    applies: None,
                    now_amount: None,
                    billed_before: None,
                })
                .collect(),
            subtotal: Decimal::ZERO,
            adjustments: Decimal::ZERO,
            total: Decimal::ZERO,
            unpriced: Unpriced::default(),
            unpriced_earlier: Vec::new(),
            manifest: Vec::new(),
            snapshot: String::new(),
            previous_sha256: String::new(),
            sha256: String::new(),
        };
        d.totals();
        d
    }

    #[test]
    fn pdf_is_deterministic_and_paginates() {
        let one = sample(3);
        let a = pdf(&one).unwrap();
        assert_eq!(a, pdf(&one).unwrap());
        assert!(a.starts_with(b"%PDF-"));
        // 120 lines need three pages; the page tree says so.
        let long = pdf(&sample(120)).unwrap();
        assert!(find(&long, b"/Count 3").is_some());
        assert!(find(&a, b"/Count 1").is_some());
    }

    #[test]
    fn an_issued_invoice_says_how_to_pay_and_keeps_its_evidence_for_an_appendix() {
        let mut d = sample(3);
        d.sha256 = "ab".repeat(32);
        d.manifest = (0..3)
            .map(|_| super::super::LineManifest {
                events: 2,
                merkle_root: "cd".repeat(32),
                price_ids: vec![],
            })
            .collect();
        let without = pdf(&d).unwrap();
        assert!(
            find(&without, b"/Count 2").is_some(),
            "the invoice, then its appendix"
        );
        d.issuer.payment_instructions = "IBAN DE00 1234\nQuote {number}".into();
        let with = pdf(&d).unwrap();
        assert_ne!(with, without);
        // A document issued before the field existed renders the same JSON as then.
        d.issuer.payment_instructions.clear();
        assert!(!json(&d).contains("payment_instructions"));
    }

    #[test]
    fn pdf_embeds_a_font_subset_and_wraps_long_descriptions() {
        let mut d = sample(3);
        d.lines[0].variant =
            "batch, prompts > 200000 tokens, own provider key, not charged, estimated usage".into();
        let bytes = pdf(&d).unwrap();
        eprintln!("PDF with a subset font: {} bytes", bytes.len());
        assert!(bytes.len() < 100 * 1024, "{} bytes", bytes.len());
        let m = Metrics::new();
        let rows = wrap(&m, &d.lines[0].description(), 8.5, 90.0);
        assert!(rows.len() >= 2, "{rows:?}");
        assert!(rows.iter().all(|r| m.width(r, 8.5) <= 90.0));
        // Nothing is lost in wrapping.
        assert_eq!(rows.join(" "), d.lines[0].description());
    }

    #[test]
    fn csv_amounts_sum_to_the_total() {
        let d = sample(5);
        let csv = lines_csv(&d);
        let sum: Decimal = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(15).unwrap().parse::<Decimal>().unwrap())
            .sum();
        assert_eq!(sum, d.total);
        assert_eq!(d.total, dec!(6.75));
    }

    /// Issue 33 (polish): no column is a list price under a name that reads as the price
    /// billed. Read by name: quantity × list price is the exact amount before the contract,
    /// quantity × billed price is the amount billed before rounding to the cent.
    #[test]
    fn csv_prices_say_which_price_they_are() {
        let d = sample(5);
        let csv = lines_csv(&d);
        let mut rows = csv.lines();
        let header: Vec<&str> = rows.next().unwrap().split(',').collect();
        assert!(!header.contains(&"unit_price"), "{header:?}");
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (q, list, exact, billed, amount) = (
            col("quantity"),
            col("list_unit_price"),
            col("exact_amount"),
            col("billed_unit_price"),
            col("amount"),
        );
        // Positions readers by position rely on.
        assert_eq!((q, list, exact, amount), (10, 11, 13, 15));
        for row in rows {
            let cells: Vec<Decimal> = row
                .split(',')
                .map(|c| c.parse().unwrap_or_default())
                .collect();
            let per = dec!(1_000_000);
            assert_eq!(cells[q] * cells[list] / per, cells[exact], "{row}");
            assert_eq!(
                (cells[q] * cells[billed] / per).round_dp(2),
                cells[amount],
                "{row}"
            );
            assert_ne!(
                cells[list], cells[billed],
                "the sample has a contract: {row}"
            );
        }
    }
}
