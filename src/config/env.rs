//! Environment overrides, derived from the configuration's shape: every setting `a.b.c`
//! (a string, number, boolean or list of strings, at any depth outside `[[…]]` arrays)
//! is read from `TOKENTALLY_A_B_C`. The names come from serializing the defaults, so a
//! field added to `Config` gets its variable without anyone writing it down; a few
//! older, shorter names stay as aliases (`ALIASES`). Values are parsed as the setting's
//! type here, so a bad one is reported with the variable's name.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::{Config, ConfigError};

/// Names kept from before the mapping was derived: (variable, setting).
pub const ALIASES: [(&str, &str); 4] = [
    ("TOKENTALLY_PRICES", "prices.path"),
    ("TOKENTALLY_USERS_FILE", "web.users_file"),
    ("TOKENTALLY_METRICS_LISTEN", "ingest.metrics_listen"),
    ("TOKENTALLY_ALERTS_SMTP_PASSWORD", "alerts.email.password"),
];

/// What a setting holds, as its default serializes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Integer,
    Float,
    Boolean,
    /// A list, given as comma-separated text.
    List,
}

/// Every setting that has a variable: (dotted path, variable, kind).
pub fn settings() -> Vec<(String, String, Kind)> {
    let defaults = Value::try_from(Config::default()).expect("the defaults serialize");
    let mut out = Vec::new();
    walk(&defaults, &mut Vec::new(), &mut out);
    out
}

fn walk(v: &Value, path: &mut Vec<String>, out: &mut Vec<(String, String, Kind)>) {
    let kind = match v {
        Value::Table(t) => {
            for (k, child) in t {
                path.push(k.clone());
                walk(child, path, out);
                path.pop();
            }
            return;
        }
        Value::String(_) => Kind::Text,
        Value::Integer(_) => Kind::Integer,
        Value::Float(_) => Kind::Float,
        Value::Boolean(_) => Kind::Boolean,
        // A list of tables (`[[institutions]]`) has no variable; a list of values has.
        Value::Array(a) if a.iter().all(|x| !x.is_table()) => Kind::List,
        Value::Array(_) | Value::Datetime(_) => return,
    };
    let name = format!("TOKENTALLY_{}", path.join("_").to_uppercase());
    out.push((path.join("."), name, kind));
}

/// The value of variable `name` as a setting of `kind`.
fn parse(name: &str, raw: &str, kind: Kind) -> Result<Value, ConfigError> {
    let bad = |reason: &str| ConfigError::Env {
        name: name.to_owned(),
        value: raw.to_owned(),
        reason: reason.to_owned(),
    };
    Ok(match kind {
        Kind::Text => Value::String(raw.to_owned()),
        Kind::Integer => Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| bad("must be a whole number"))?,
        ),
        Kind::Float => Value::Float(raw.trim().parse().map_err(|_| bad("must be a number"))?),
        Kind::Boolean => Value::Boolean(match raw.trim() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => return Err(bad("must be true or false")),
        }),
        Kind::List => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ),
    })
}

/// Sets `path` in `table`, making the tables on the way.
fn set(table: &mut Table, path: &str, value: Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("a path");
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        t = entry.as_table_mut().expect("a table");
    }
    t.insert(last.to_owned(), value);
}

/// Lays the variables `env` has over the file's settings (`table`). A setting's own
/// name wins over its alias.
pub fn overlay(table: &mut Table, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    let settings = settings();
    let kinds: BTreeMap<&str, Kind> = settings.iter().map(|(p, _, k)| (p.as_str(), *k)).collect();
    for (alias, path) in ALIASES {
        if let Some(raw) = env(alias) {
            set(table, path, parse(alias, &raw, kinds[path])?);
        }
    }
    for (path, name, kind) in &settings {
        if let Some(raw) = env(name) {
            set(table, path, parse(name, &raw, *kind)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_one_variable_and_the_documented_ones_exist() {
        let s = settings();
        let mut names = std::collections::BTreeSet::new();
        for (path, name, _) in &s {
            assert!(
                names.insert(name.clone()),
                "{name} names two settings (one is {path})"
            );
        }
        for name in [
            "TOKENTALLY_KAFKA_BROKERS",
            "TOKENTALLY_KAFKA_SESSION_TIMEOUT_MS",
            "TOKENTALLY_CLICKHOUSE_PASSWORD",
            "TOKENTALLY_INGEST_BATCH_MAX_MESSAGES",
            "TOKENTALLY_WEB_CLICKHOUSE_PASSWORD",
            "TOKENTALLY_WEB_PUBLIC_URL",
            "TOKENTALLY_GATEWAY_MASTER_KEY",
            "TOKENTALLY_GATEWAY_OPENAI_API_KEY",
            "TOKENTALLY_GATEWAY_GEMINI_BASE_URL",
            "TOKENTALLY_GATEWAY_SHARED_LIMITS_REDIS_URL",
            "TOKENTALLY_ALERTS_WEBHOOK_SECRET",
            "TOKENTALLY_BILLING_LEDGER_TOPIC",
        ] {
            assert!(names.contains(name), "{name}");
        }
        for (alias, path) in ALIASES {
            assert!(s.iter().any(|(p, _, _)| p == path), "{alias} → {path}");
            assert!(!names.contains(alias), "{alias} is also a derived name");
        }
    }

    #[test]
    fn values_are_parsed_as_their_setting() {
        let mut t = Table::new();
        overlay(&mut t, |n| match n {
            "TOKENTALLY_WEB_TRUSTED_PROXIES" => Some("10.0.0.1, 10.0.0.2".into()),
            "TOKENTALLY_WEB_SECURE_COOKIES" => Some("true".into()),
            "TOKENTALLY_KAFKA_SESSION_TIMEOUT_MS" => Some("3000".into()),
            _ => None,
        })
        .unwrap();
        let c: Config = Value::Table(t).try_into().unwrap();
        assert_eq!(c.web.trusted_proxies.len(), 2);
        assert!(c.web.secure_cookies);
        assert_eq!(c.kafka.session_timeout_ms, 3000);
        let err = overlay(&mut Table::new(), |n| {
            (n == "TOKENTALLY_KAFKA_SESSION_TIMEOUT_MS").then(|| "soon".into())
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("TOKENTALLY_KAFKA_SESSION_TIMEOUT_MS"),
            "{err}"
        );
    }
}
