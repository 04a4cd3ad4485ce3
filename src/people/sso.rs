//! Single sign-on with OpenID Connect: the providers an installation trusts
//! (`[[sso]]`) and the rules that turn a person's verified claims into an institution, a
//! group and a role. The flow itself (authorization code with PKCE, ID-token validation)
//! is `web::sso`; this is the pure part.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::members::MemberRole;
use crate::secret::Secret;

/// One OpenID Connect provider (`[[sso]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsoProvider {
    /// Short name in URLs (`/sso/{id}/login`): letters, digits, `-`.
    pub id: String,
    /// On the sign-in page: "Sign in with {label}".
    pub label: String,
    /// The issuer URL; its `/.well-known/openid-configuration` is read at start.
    pub issuer: String,
    pub client_id: String,
    /// Env: `TOKENTALLY_SSO_{ID}_CLIENT_SECRET` (id upper-cased, `-` as `_`). Never
    /// logged.
    #[serde(default)]
    pub client_secret: Secret,
    /// Or a file holding it (first line).
    #[serde(default)]
    pub client_secret_file: std::path::PathBuf,
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Which claim is the person's id: `sub` (default), `email` or
    /// `eduPersonPrincipalName` (or any other string claim).
    #[serde(default = "default_id_claim")]
    pub id_claim: String,
    /// The first rule that matches decides institution, group and role; a person no rule
    /// matches cannot sign in.
    #[serde(default)]
    pub rules: Vec<ClaimRule>,
}

/// The config's `[[sso]]`, checked (with each provider's client secret from the
/// environment, `TOKENTALLY_SSO_{ID}_CLIENT_SECRET`, where set).
pub fn configured(values: &[toml::Value]) -> anyhow::Result<Vec<SsoProvider>> {
    let mut out: Vec<SsoProvider> = Vec::new();
    for v in values {
        let mut p: SsoProvider = v
            .clone()
            .try_into()
            .map_err(|e| anyhow::anyhow!("[[sso]]: {e}"))?;
        p.validate().map_err(anyhow::Error::msg)?;
        let var = format!(
            "TOKENTALLY_SSO_{}_CLIENT_SECRET",
            p.id.to_uppercase().replace('-', "_")
        );
        if let Ok(secret) = std::env::var(&var) {
            p.client_secret = Secret::new(secret);
        }
        if out.iter().any(|o| o.id == p.id) {
            anyhow::bail!("[[sso]] {} is configured twice", p.id);
        }
        out.push(p);
    }
    Ok(out)
}

fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "profile".into()]
}

fn default_id_claim() -> String {
    "sub".into()
}

/// `claim` (a string, or an array of strings such as `groups` or
/// `eduPersonAffiliation`) must satisfy the one condition given.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClaimRule {
    pub claim: String,
    /// The claim (or one of its values) equals this.
    #[serde(default)]
    pub equals: Option<String>,
    /// The claim (or one of its values) ends with this (an e-mail domain: `@uio.no`).
    #[serde(default)]
    pub ends_with: Option<String>,
    pub institution: String,
    pub group: String,
    #[serde(default = "member_role")]
    pub role: String,
}

fn member_role() -> String {
    "member".into()
}

/// Who a person is, once a rule matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub person_id: String,
    pub name: String,
    pub email: String,
    pub institution: String,
    pub group: String,
    pub role: MemberRole,
}

impl SsoProvider {
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty()
            || self.id.len() > 32
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "[[sso]] id `{}`: 1-32 letters, digits or `-`",
                self.id
            ));
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err(format!("[[sso]] {}: scopes must include openid", self.id));
        }
        if self.rules.is_empty() {
            return Err(format!(
                "[[sso]] {}: no rules, so nobody could sign in; add [[sso.rules]]",
                self.id
            ));
        }
        for r in &self.rules {
            if r.equals.is_some() == r.ends_with.is_some() {
                return Err(format!(
                    "[[sso]] {}: a rule on `{}` needs exactly one of equals, ends_with",
                    self.id, r.claim
                ));
            }
            if MemberRole::parse(&r.role).is_none() {
                return Err(format!(
                    "[[sso]] {}: role `{}`: member or institution_admin",
                    self.id, r.role
                ));
            }
            if r.institution.is_empty() || r.group.is_empty() {
                return Err(format!(
                    "[[sso]] {}: every rule names an institution and a group",
                    self.id
                ));
            }
        }
        Ok(())
    }

    /// The client secret: the field, else the file's first line.
    pub fn secret(&self) -> Result<Secret, String> {
        if !self.client_secret.is_empty() || self.client_secret_file.as_os_str().is_empty() {
            return Ok(self.client_secret.clone());
        }
        let text = std::fs::read_to_string(&self.client_secret_file).map_err(|e| {
            format!(
                "[[sso]] {}: reading {}: {e}",
                self.id,
                self.client_secret_file.display()
            )
        })?;
        Ok(Secret::new(text.lines().next().unwrap_or("").trim()))
    }

    /// Applies the rules to a person's verified claims.
    pub fn map(&self, claims: &Map<String, Value>) -> Result<Mapped, String> {
        let person_id = claims
            .get(&self.id_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= crate::domain::MAX_ID_LEN)
            .ok_or_else(|| {
                format!(
                    "the provider did not send the claim `{}` that identifies you",
                    self.id_claim
                )
            })?;
        let text = |k: &str| {
            claims
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let rule = self
            .rules
            .iter()
            .find(|r| r.matches(claims))
            .ok_or_else(|| {
                "your account is not one this service admits; ask your institution's administrator"
                    .to_owned()
            })?;
        Ok(Mapped {
            person_id: person_id.to_owned(),
            name: text("name"),
            email: text("email"),
            institution: rule.institution.clone(),
            group: rule.group.clone(),
            role: MemberRole::parse(&rule.role).unwrap_or_default(),
        })
    }
}

impl ClaimRule {
    fn matches(&self, claims: &Map<String, Value>) -> bool {
        let values: Vec<&str> = match claims.get(&self.claim) {
            Some(Value::String(s)) => vec![s.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => return false,
        };
        values.iter().any(|v| {
            self.equals.as_deref().is_some_and(|e| *v == e)
                || self
                    .ends_with
                    .as_deref()
                    .is_some_and(|e| v.to_ascii_lowercase().ends_with(&e.to_ascii_lowercase()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn provider() -> SsoProvider {
        toml::from_str(
            r#"
id = "uio"
label = "University of Oslo"
issuer = "https://idp.example"
client_id = "tokentally"
id_claim = "eduPersonPrincipalName"

[[rules]]
claim = "eduPersonAffiliation"
equals = "staff"
institution = "uni-oslo"
group = "staff"

[[rules]]
claim = "groups"
equals = "it-admins"
institution = "uni-oslo"
group = "staff"
role = "institution_admin"

[[rules]]
claim = "email"
ends_with = "@uio.no"
institution = "uni-oslo"
group = "students"
"#,
        )
        .unwrap()
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_first_matching_rule_decides_and_arrays_match_any_value() {
        let p = provider();
        p.validate().unwrap();
        let staff = p
            .map(&claims(
                json!({"eduPersonPrincipalName": "ola@uio.no", "email": "ola@uio.no",
                "eduPersonAffiliation": ["member", "staff"], "name": "Ola"}),
            ))
            .unwrap();
        assert_eq!(
            (
                staff.group.as_str(),
                staff.role,
                staff.person_id.as_str(),
                staff.name.as_str()
            ),
            ("staff", MemberRole::Member, "ola@uio.no", "Ola")
        );
        let student = p
            .map(&claims(
                json!({"eduPersonPrincipalName": "kari@uio.no", "email": "Kari@UIO.no",
                "eduPersonAffiliation": ["student"]}),
            ))
            .unwrap();
        assert_eq!(student.group, "students");
        let admin = p
            .map(&claims(
                json!({"eduPersonPrincipalName": "it@uio.no", "groups": ["it-admins"]}),
            ))
            .unwrap();
        assert_eq!(admin.role, MemberRole::InstitutionAdmin);
    }

    #[test]
    fn a_person_no_rule_admits_or_without_an_id_cannot_sign_in() {
        let p = provider();
        let e = p
            .map(&claims(
                json!({"eduPersonPrincipalName": "x@other.org", "email": "x@other.org"}),
            ))
            .unwrap_err();
        assert!(e.contains("not one this service admits"), "{e}");
        let e = p.map(&claims(json!({"email": "kari@uio.no"}))).unwrap_err();
        assert!(e.contains("eduPersonPrincipalName"), "{e}");
    }

    #[test]
    fn rules_are_checked_at_load() {
        let mut p = provider();
        p.rules[0].ends_with = Some("x".into());
        assert!(p.validate().is_err());
        let mut p = provider();
        p.scopes = vec!["email".into()];
        assert!(p.validate().is_err());
    }
}
