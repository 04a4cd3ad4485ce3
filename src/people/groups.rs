//! Groups inside an institution (students, staff, a course, a research project): the
//! trust levels. A group says which models its members may use, the limits each member
//! gets by default, an optional budget the whole group shares, and its key policy.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::limits::{Limit, LimitMode, LimitPeriod, LimitScope, Metric};

/// A limit every member of a group gets (unless an administrator set one of their own
/// with the same metric and period).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberLimit {
    pub metric: Metric,
    pub period: LimitPeriod,
    /// USD as a decimal string, or a whole number of requests or tokens.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// One group's policy (`[[groups]]` in the config, or set on the dashboard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub institution: String,
    pub id: String,
    /// Shown on pages ("Students").
    #[serde(default)]
    pub name: String,
    /// Models members may use: exact ids or prefixes ending in `*`; empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// Limits each member gets by default.
    #[serde(default)]
    pub member_limits: Vec<MemberLimit>,
    /// A budget the whole group shares (USD per `budget_period`); none if absent.
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub budget_usd: Option<Decimal>,
    #[serde(default = "month")]
    pub budget_period: LimitPeriod,
    /// Keys a member may hold at once (0: no limit).
    #[serde(default)]
    pub keys_per_member: u32,
    /// Longest lifetime of a key a member creates, in days (0: no limit).
    #[serde(default)]
    pub max_key_days: u32,
    /// Requests and tokens per minute of a member's key when the key sets none.
    #[serde(default)]
    pub default_rpm: u32,
    #[serde(default)]
    pub default_tpm: u64,
    /// A member who has not signed in for this many days has every key refused (0:
    /// never), until they sign in again.
    #[serde(default)]
    pub max_idle_days: u32,
}

/// The config's `[[groups]]`, checked: each valid, none twice.
pub fn configured(values: &[toml::Value]) -> anyhow::Result<Vec<Group>> {
    let mut out: Vec<Group> = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for v in values {
        let g: Group = v
            .clone()
            .try_into()
            .map_err(|e| anyhow::anyhow!("[[groups]]: {e}"))?;
        g.validate()
            .map_err(|e| anyhow::anyhow!("group {}: {e}", g.id))?;
        if !ids.insert((g.institution.clone(), g.id.clone())) {
            anyhow::bail!("group {} of {} is configured twice", g.id, g.institution);
        }
        out.push(g);
    }
    Ok(out)
}

impl MemberLimit {
    /// Reads `15 requests per day`, `$5 per month`, `5 usd per month`, `100000 tokens
    /// per week` (what the People page's form takes, one per line).
    pub fn parse(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let bad = || {
            format!(
                "`{}`: write a limit as `15 requests per day`, `$5 per month` or \
                 `100000 tokens per week`",
                crate::format::log_safe(line, 60)
            )
        };
        let (amount, metric, period) = match words.as_slice() {
            [a, "per", p] if a.starts_with('$') => (&a[1..], Metric::Usd, *p),
            [a, m, "per", p] => {
                let metric = match m.to_ascii_lowercase().as_str() {
                    "usd" | "$" => Metric::Usd,
                    "request" | "requests" => Metric::Requests,
                    "token" | "tokens" => Metric::Tokens,
                    _ => return Err(bad()),
                };
                (a.trim_start_matches('$'), metric, *p)
            }
            _ => return Err(bad()),
        };
        let amount: Decimal = amount.replace(',', "").parse().map_err(|_| bad())?;
        let period: LimitPeriod = period.to_ascii_lowercase().parse().map_err(|_| bad())?;
        Ok(MemberLimit {
            metric,
            period,
            amount,
        })
    }

    /// The form `parse` reads.
    pub fn label(&self) -> String {
        match self.metric {
            Metric::Usd => format!("${} per {}", self.amount.normalize(), self.period.as_str()),
            Metric::Requests => format!(
                "{} requests per {}",
                self.amount.normalize(),
                self.period.as_str()
            ),
            Metric::Tokens => format!(
                "{} tokens per {}",
                self.amount.normalize(),
                self.period.as_str()
            ),
        }
    }
}

fn month() -> LimitPeriod {
    LimitPeriod::Month
}

/// Longest group id.
pub const MAX_GROUP_ID: usize = 64;

impl Group {
    /// An empty policy for `institution` / `id` (everything allowed, nothing limited).
    pub fn open(institution: &str, id: &str) -> Self {
        Self {
            institution: institution.to_owned(),
            id: id.to_owned(),
            name: String::new(),
            models: Vec::new(),
            member_limits: Vec::new(),
            budget_usd: None,
            budget_period: LimitPeriod::Month,
            keys_per_member: 0,
            max_key_days: 0,
            default_rpm: 0,
            default_tpm: 0,
            max_idle_days: 0,
        }
    }

    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            &self.id
        } else {
            &self.name
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.institution.is_empty() || self.institution.len() > crate::domain::MAX_ID_LEN {
            return Err("a group needs an institution".into());
        }
        if self.id.is_empty()
            || self.id.len() > MAX_GROUP_ID
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "group id `{}`: 1-{MAX_GROUP_ID} letters, digits, `-`, `_` or `.`",
                crate::format::log_safe(&self.id, 80)
            ));
        }
        for l in &self.member_limits {
            self.member_limit(l, "x").validate()?;
        }
        if let Some(b) = self.budget_usd {
            self.budget_limit(b).validate()?;
        }
        if self.models.len() > 100 {
            return Err("at most 100 models per group".into());
        }
        Ok(())
    }

    /// The limit `l` as it applies to member `person`.
    pub fn member_limit(&self, l: &MemberLimit, person: &str) -> Limit {
        Limit {
            institution_id: self.institution.clone(),
            scope: LimitScope::User,
            subject: person.to_owned(),
            metric: l.metric,
            period: l.period,
            amount: l.amount,
            mode: LimitMode::Block,
        }
    }

    /// The group's shared budget as a limit.
    pub fn budget_limit(&self, usd: Decimal) -> Limit {
        Limit {
            institution_id: self.institution.clone(),
            scope: LimitScope::Group,
            subject: self.id.clone(),
            metric: Metric::Usd,
            period: self.budget_period,
            amount: usd,
            mode: LimitMode::Block,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn a_group_reads_from_toml_and_its_limits_apply_per_member() {
        let g: Group = toml::from_str(
            r#"
institution = "uni-oslo"
id = "students"
name = "Students"
models = ["gpt-4o-mini", "claude-haiku*"]
member_limits = [{ metric = "requests", period = "day", amount = "15" }]
budget_usd = "500"
keys_per_member = 2
max_key_days = 90
default_rpm = 20
max_idle_days = 120
"#,
        )
        .unwrap();
        g.validate().unwrap();
        let l = g.member_limit(&g.member_limits[0], "kari@uio.no");
        assert_eq!(l.id(), "uni-oslo:user:kari@uio.no:requests:day");
        assert_eq!(l.amount, dec!(15));
        let b = g.budget_limit(g.budget_usd.unwrap());
        assert_eq!(b.id(), "uni-oslo:group:students:usd:month");
        let mut bad = g.clone();
        bad.id = "a b".into();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn member_limits_read_as_written_on_the_page() {
        for (line, metric, period, amount) in [
            (
                "15 requests per day",
                Metric::Requests,
                LimitPeriod::Day,
                dec!(15),
            ),
            ("$5 per month", Metric::Usd, LimitPeriod::Month, dec!(5)),
            (
                "2.50 USD per week",
                Metric::Usd,
                LimitPeriod::Week,
                dec!(2.50),
            ),
            (
                "100,000 tokens per Week",
                Metric::Tokens,
                LimitPeriod::Week,
                dec!(100000),
            ),
        ] {
            let l = MemberLimit::parse(line).unwrap();
            assert_eq!(
                (l.metric, l.period, l.amount),
                (metric, period, amount),
                "{line}"
            );
            assert_eq!(
                MemberLimit::parse(&l.label()).unwrap(),
                l,
                "{line} round trip"
            );
        }
        for bad in [
            "",
            "15 per day",
            "15 requests a day",
            "x requests per day",
            "5 requests per fortnight",
        ] {
            assert!(MemberLimit::parse(bad).is_err(), "{bad}");
        }
    }
}
