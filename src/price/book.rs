//! The effective-dated price book: TOML files under `prices/`, loaded, checked, indexed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use regex::Regex;
use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Rates carry at most this many decimals, so that a cost (tokens × rate / 10^6)
/// has at most 18 and fits `Decimal(38, 18)` exactly.
pub const MAX_RATE_SCALE: u32 = 12;

/// Per-million-token rates of one entry or one long-context tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rates {
    pub input_per_mtok: Decimal,
    pub cache_read_per_mtok: Decimal,
    pub cache_write_per_mtok: Decimal,
    pub output_per_mtok: Decimal,
    /// When set, reasoning tokens use it and the rest of output uses `output_per_mtok`.
    pub reasoning_per_mtok: Option<Decimal>,
}

/// Rates that apply to the whole request when its prompt tokens exceed `above_input_tokens`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub above_input_tokens: u64,
    pub rates: Rates,
}

/// One `[[price]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceEntry {
    /// Stable id stored with every event priced by this entry.
    pub id: String,
    pub provider: String,
    /// Canonical model name shown on invoices.
    pub model: String,
    pub match_exact: Vec<String>,
    pub match_regex: Vec<String>,
    pub effective_from: NaiveDate,
    pub currency: String,
    /// `None` is the entry for every tier that has no entry of its own.
    pub service_tier: Option<String>,
    pub rates: Rates,
    pub per_request: Decimal,
    /// The most output tokens the model writes in one answer (the gateway reserves this
    /// much for a request that sets no cap of its own); `None`: not known.
    pub max_output_tokens: Option<u64>,
    /// Sorted by threshold, ascending.
    pub tiers: Vec<Tier>,
    /// Where the entry was read from, for error messages.
    pub source: String,
}

/// One problem found in the price book, located by file and entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookProblem {
    pub location: String,
    pub message: String,
}

impl fmt::Display for BookProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BookError {
    #[error("cannot read price book {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("price book {path} has no .toml files")]
    Empty { path: PathBuf },
    #[error("price book has {} problem(s):\n{}", .0.len(), .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<BookProblem>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    price: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRates {
    input_per_mtok: Option<toml::Value>,
    cache_read_per_mtok: Option<toml::Value>,
    cache_write_per_mtok: Option<toml::Value>,
    output_per_mtok: Option<toml::Value>,
    reasoning_per_mtok: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    above_input_tokens: u64,
    #[serde(flatten)]
    rates: RawRates,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    id: Option<String>,
    provider: String,
    model: String,
    #[serde(rename = "match")]
    match_exact: Option<OneOrMany>,
    match_regex: Option<OneOrMany>,
    effective_from: toml::Value,
    currency: Option<String>,
    service_tier: Option<String>,
    per_request: Option<toml::Value>,
    max_output_tokens: Option<u64>,
    #[serde(default)]
    tier: Vec<RawTier>,
    #[serde(flatten)]
    rates: RawRates,
}

/// A loaded, checked and indexed price book.
#[derive(Debug, Clone)]
pub struct PriceBook {
    entries: Vec<PriceEntry>,
    /// (provider, exact model id) → entry indexes.
    exact: HashMap<(String, String), Vec<usize>>,
    /// (entry index, anchored regex).
    regexes: Vec<(usize, Regex)>,
    version: String,
}

/// Reads a rate: a decimal string (a TOML float would already have lost exactness).
fn parse_rate(v: &toml::Value, field: &str, max_scale: u32) -> Result<Decimal, String> {
    let text = match v {
        toml::Value::String(s) => s.trim().to_owned(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => {
            return Err(format!(
                "`{field}` = {f} is a float; write rates as decimal strings, e.g. \"{f}\""
            ))
        }
        other => return Err(format!("`{field}` must be a decimal string, got {other}")),
    };
    let d: Decimal = text
        .parse()
        .or_else(|_| Decimal::from_scientific(&text))
        .map_err(|_| format!("`{field}` = \"{text}\" is not a decimal number"))?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(format!("`{field}` = \"{text}\" is negative"));
    }
    let d = d.normalize();
    if d.scale() > max_scale {
        return Err(format!(
            "`{field}` = \"{text}\" has more than {max_scale} decimal places"
        ));
    }
    Ok(d)
}

fn parse_date(v: &toml::Value) -> Result<NaiveDate, String> {
    match v {
        toml::Value::String(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| format!("`effective_from` = \"{s}\" is not a YYYY-MM-DD date")),
        toml::Value::Datetime(d) => NaiveDate::parse_from_str(&d.to_string(), "%Y-%m-%d")
            .map_err(|_| format!("`effective_from` = {d} is not a YYYY-MM-DD date")),
        other => Err(format!(
            "`effective_from` must be a YYYY-MM-DD date, got {other}"
        )),
    }
}

impl RawRates {
    /// `base` supplies defaults (for tiers); without it input and output are required and
    /// cache rates default to the input rate (providers that don't discount caching).
    fn parse(&self, base: Option<&Rates>, problems: &mut Vec<String>) -> Option<Rates> {
        let mut get = |v: &Option<toml::Value>, field: &str| -> Option<Option<Decimal>> {
            match v.as_ref().map(|v| parse_rate(v, field, MAX_RATE_SCALE)) {
                None => Some(None),
                Some(Ok(d)) => Some(Some(d)),
                Some(Err(e)) => {
                    problems.push(e);
                    None
                }
            }
        };
        let input = get(&self.input_per_mtok, "input_per_mtok");
        let cache_read = get(&self.cache_read_per_mtok, "cache_read_per_mtok");
        let cache_write = get(&self.cache_write_per_mtok, "cache_write_per_mtok");
        let output = get(&self.output_per_mtok, "output_per_mtok");
        let reasoning = get(&self.reasoning_per_mtok, "reasoning_per_mtok");
        let (input, cache_read, cache_write, output, reasoning) =
            (input?, cache_read?, cache_write?, output?, reasoning?);
        let input = match (input, base) {
            (Some(d), _) => d,
            (None, Some(b)) => b.input_per_mtok,
            (None, None) => {
                problems.push("`input_per_mtok` is required".into());
                return None;
            }
        };
        let output = match (output, base) {
            (Some(d), _) => d,
            (None, Some(b)) => b.output_per_mtok,
            (None, None) => {
                problems.push("`output_per_mtok` is required".into());
                return None;
            }
        };
        Some(Rates {
            input_per_mtok: input,
            cache_read_per_mtok: cache_read
                .or(base.map(|b| b.cache_read_per_mtok))
                .unwrap_or(input),
            cache_write_per_mtok: cache_write
                .or(base.map(|b| b.cache_write_per_mtok))
                .unwrap_or(input),
            output_per_mtok: output,
            reasoning_per_mtok: reasoning.or(base.and_then(|b| b.reasoning_per_mtok)),
        })
    }
}

fn parse_entry(raw: RawEntry, source: String) -> Result<PriceEntry, Vec<String>> {
    let mut problems = Vec::new();
    let provider = crate::domain::canonical_provider(&raw.provider);
    if provider.is_empty() {
        problems.push("`provider` is empty".into());
    }
    if raw.model.trim().is_empty() {
        problems.push("`model` is empty".into());
    }
    let effective_from = parse_date(&raw.effective_from)
        .map_err(|e| problems.push(e))
        .ok();
    let currency = raw.currency.unwrap_or_else(|| "USD".into());
    if currency != "USD" {
        problems.push(format!("currency `{currency}` is not supported (only USD)"));
    }
    let match_exact = raw.match_exact.map(OneOrMany::into_vec).unwrap_or_default();
    let match_regex = raw.match_regex.map(OneOrMany::into_vec).unwrap_or_default();
    if match_exact.is_empty() && match_regex.is_empty() {
        problems.push("needs `match` (exact ids) or `match_regex`".into());
    }
    for re in &match_regex {
        if let Err(e) = Regex::new(&format!("^(?:{re})$")) {
            problems.push(format!("`match_regex` \"{re}\" is not a valid regex: {e}"));
        }
    }
    let rates = raw.rates.parse(None, &mut problems);
    let per_request = match raw
        .per_request
        .as_ref()
        .map(|v| parse_rate(v, "per_request", 18))
    {
        None => Some(Decimal::ZERO),
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            problems.push(e);
            None
        }
    };
    let mut tiers = Vec::new();
    if let Some(base) = &rates {
        for t in raw.tier {
            if t.above_input_tokens == 0 {
                problems.push("`tier.above_input_tokens` must be > 0".into());
            }
            if let Some(r) = t.rates.parse(Some(base), &mut problems) {
                tiers.push(Tier {
                    above_input_tokens: t.above_input_tokens,
                    rates: r,
                });
            }
        }
    }
    tiers.sort_by_key(|t| t.above_input_tokens);
    if tiers
        .windows(2)
        .any(|w| w[0].above_input_tokens == w[1].above_input_tokens)
    {
        problems.push("two tiers have the same `above_input_tokens`".into());
    }
    let service_tier = raw.service_tier.filter(|s| !s.is_empty());
    match (problems.is_empty(), effective_from, rates, per_request) {
        (true, Some(effective_from), Some(rates), Some(per_request)) => {
            let id = raw.id.unwrap_or_else(|| {
                let mut id = format!("{provider}:{}:{effective_from}", raw.model);
                if let Some(t) = &service_tier {
                    id.push(':');
                    id.push_str(t);
                }
                id
            });
            Ok(PriceEntry {
                id,
                provider,
                model: raw.model,
                match_exact,
                match_regex,
                effective_from,
                currency,
                service_tier,
                rates,
                per_request,
                max_output_tokens: raw.max_output_tokens.filter(|n| *n > 0),
                tiers,
                source,
            })
        }
        _ => Err(problems),
    }
}

/// Lists the `.toml` files of a book: the file itself, or a folder's files sorted by name.
pub fn book_files(path: &Path) -> Result<Vec<PathBuf>, BookError> {
    let io = |source| BookError::Io {
        path: path.to_owned(),
        source,
    };
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(BookError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(files)
}

/// The version of a book made of these (name, text) sources: a hash of file names and
/// contents, stamped on invoices and reported by ingest.
fn version_of(sources: &[(String, String)]) -> String {
    let mut hasher = Sha256::new();
    for (name, text) in sources {
        hasher.update(name.rsplit('/').next().unwrap_or(name).as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
    }
    format!("{:x}", hasher.finalize())[..16].to_owned()
}

/// (file name, text) of every file of the book at `path`.
fn read_sources(path: &Path) -> Result<Vec<(String, String)>, BookError> {
    book_files(path)?
        .into_iter()
        .map(|file| {
            std::fs::read_to_string(&file)
                .map(|text| (file.display().to_string(), text))
                .map_err(|source| BookError::Io { path: file, source })
        })
        .collect()
}

/// The version the book at `path` would have, without parsing it (cheap enough to poll).
pub fn fingerprint(path: &Path) -> Result<String, BookError> {
    Ok(version_of(&read_sources(path)?))
}

impl PriceBook {
    /// Loads a price book file, or every `.toml` file of a folder.
    pub fn load(path: &Path) -> Result<Self, BookError> {
        Self::from_sources(&read_sources(path)?)
    }

    /// Builds a book from (name, TOML text) pairs; reports every problem found.
    pub fn from_sources(sources: &[(String, String)]) -> Result<Self, BookError> {
        let mut problems = Vec::new();
        let mut entries = Vec::new();
        for (name, text) in sources {
            let raw: RawFile = match toml::from_str(text) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(BookProblem {
                        location: name.clone(),
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            for (i, entry) in raw.price.into_iter().enumerate() {
                let location = format!("{name}: price #{} (model `{}`)", i + 1, entry.model);
                match parse_entry(entry, location.clone()) {
                    Ok(e) => entries.push(e),
                    Err(ps) => problems.extend(ps.into_iter().map(|message| BookProblem {
                        location: location.clone(),
                        message,
                    })),
                }
            }
        }
        let book = Self::index(entries, version_of(sources));
        problems.extend(book.overlaps());
        if problems.is_empty() {
            Ok(book)
        } else {
            Err(BookError::Invalid(problems))
        }
    }

    fn index(entries: Vec<PriceEntry>, version: String) -> Self {
        let mut exact: HashMap<(String, String), Vec<usize>> = HashMap::new();
        let mut regexes = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            for m in &e.match_exact {
                exact
                    .entry((e.provider.clone(), m.clone()))
                    .or_default()
                    .push(i);
            }
            for re in &e.match_regex {
                // Validated in parse_entry.
                if let Ok(r) = Regex::new(&format!("^(?:{re})$")) {
                    regexes.push((i, r));
                }
            }
        }
        Self {
            entries,
            exact,
            regexes,
            version,
        }
    }

    /// Entries that would make a price ambiguous: the same id twice, or two entries for
    /// the same provider, tier and date that both claim one model id.
    fn overlaps(&self) -> Vec<BookProblem> {
        let mut problems = Vec::new();
        let mut ids: BTreeMap<&str, &PriceEntry> = BTreeMap::new();
        for e in &self.entries {
            if let Some(prev) = ids.insert(&e.id, e) {
                problems.push(BookProblem {
                    location: e.source.clone(),
                    message: format!("id `{}` is also used by {}", e.id, prev.source),
                });
            }
        }
        let key = |e: &PriceEntry| (e.provider.clone(), e.service_tier.clone(), e.effective_from);
        for ((provider, model), idx) in &self.exact {
            for (a, &i) in idx.iter().enumerate() {
                for &j in &idx[a + 1..] {
                    if key(&self.entries[i]) == key(&self.entries[j]) {
                        problems.push(BookProblem {
                            location: self.entries[j].source.clone(),
                            message: format!(
                                "overlaps {}: both match `{provider}/{model}` from {}",
                                self.entries[i].source, self.entries[j].effective_from
                            ),
                        });
                    }
                }
            }
        }
        // Two regex entries for the same provider/tier/date that both match a model id
        // the book knows by name are ambiguous for that id.
        let known: Vec<&(String, String)> = self.exact.keys().collect();
        for (a, (i, ri)) in self.regexes.iter().enumerate() {
            for (j, rj) in &self.regexes[a + 1..] {
                if i == j || key(&self.entries[*i]) != key(&self.entries[*j]) {
                    continue;
                }
                let provider = &self.entries[*i].provider;
                if let Some((_, m)) = known
                    .iter()
                    .find(|(p, m)| p == provider && ri.is_match(m) && rj.is_match(m))
                {
                    problems.push(BookProblem {
                        location: self.entries[*j].source.clone(),
                        message: format!(
                            "match_regex overlaps {}: both match `{provider}/{m}`",
                            self.entries[*i].source
                        ),
                    });
                }
            }
        }
        problems.sort_by(|a, b| a.location.cmp(&b.location).then(a.message.cmp(&b.message)));
        problems
    }

    pub fn entries(&self) -> &[PriceEntry] {
        &self.entries
    }

    /// Short content hash: the price-book version stamped on invoices.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn entry(&self, id: &str) -> Option<&PriceEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// The day the entry `id` stops applying: the `effective_from` of the next entry for
    /// the same provider, model and service tier, if any.
    pub fn superseded_on(&self, id: &str) -> Option<NaiveDate> {
        let e = self.entry(id)?;
        self.entries
            .iter()
            .filter(|o| {
                o.provider == e.provider
                    && o.model == e.model
                    && o.service_tier == e.service_tier
                    && o.effective_from > e.effective_from
            })
            .map(|o| o.effective_from)
            .min()
    }

    /// The entry that prices `model` of `provider` in `service_tier` on `date`.
    ///
    /// Precedence: an entry for the event's own tier over the tier-less one; an exact id
    /// over a regex; then the newest `effective_from` on or before `date`.
    pub fn lookup(
        &self,
        provider: &str,
        model: &str,
        service_tier: &str,
        date: NaiveDate,
    ) -> Option<&PriceEntry> {
        let exact = self
            .exact
            .get(&(provider.to_owned(), model.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let by_regex: Vec<usize> = self
            .regexes
            .iter()
            .filter(|(i, r)| self.entries[*i].provider == provider && r.is_match(model))
            .map(|(i, _)| *i)
            .collect();
        let own_tier = Some(service_tier).filter(|t| !t.is_empty() && *t != "default");
        let tiers = if own_tier.is_some() {
            vec![own_tier, None]
        } else {
            vec![None]
        };
        for tier in tiers {
            for candidates in [exact, by_regex.as_slice()] {
                let best = candidates
                    .iter()
                    .map(|&i| &self.entries[i])
                    .filter(|e| e.service_tier.as_deref() == tier && e.effective_from <= date)
                    .max_by_key(|e| e.effective_from);
                if best.is_some() {
                    return best;
                }
            }
        }
        None
    }
}
