//! Who is asking, and what they may see. Users and API tokens come from the users file
//! (argon2 password hashes, SHA-256 token hashes); sessions live in memory.
//!
//! Every handler takes `Scoped` (or `Authed` where no institution is involved): the one
//! place where an institution user is confined to their own institution.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use axum::extract::{ConnectInfo, FromRequestParts, Path as UrlPath, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use chrono::{DateTime, Duration, Utc};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::AppError;
use super::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Finance,
    Ops,
    Institution,
}

/// An authenticated user or API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// Set exactly when `role` is `Institution`.
    pub institution: Option<String>,
}

impl Principal {
    /// Admin and ops see the pipeline (raw rejected payloads of every institution).
    pub fn sees_pipeline(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Ops)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub institution: Option<String>,
    pub password_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub institution: Option<String>,
    /// SHA-256 (hex) of the token; tokens are random, so a fast hash is enough.
    pub token_hash: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    #[serde(default, rename = "user")]
    pub users: Vec<UserEntry>,
    #[serde(default, rename = "token")]
    pub tokens: Vec<TokenEntry>,
}

impl UsersFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(path)?;
        let file: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("users file {}: {e}", path.display()))?;
        for (name, role, inst) in file
            .users
            .iter()
            .map(|u| (&u.name, u.role, &u.institution))
            .chain(
                file.tokens
                    .iter()
                    .map(|t| (&t.name, t.role, &t.institution)),
            )
        {
            check_role(role, inst.as_deref())
                .map_err(|e| anyhow::anyhow!("users file {}: `{name}`: {e}", path.display()))?;
        }
        Ok(file)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "# tokentally users and API tokens. Written by `tokentally users add` / `tokens add`;\n\
             # only hashes are stored.\n\n{}",
            toml::to_string(self)?
        );
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

pub fn check_role(role: Role, institution: Option<&str>) -> Result<(), String> {
    match (role, institution) {
        (Role::Institution, Some(i)) if !i.is_empty() => Ok(()),
        (Role::Institution, _) => Err("role institution needs an institution".into()),
        (_, Some(_)) => Err("only role institution takes an institution".into()),
        (_, None) => Ok(()),
    }
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A random secret as hex (session ids, CSRF tokens, API tokens, generated passwords).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

struct Session {
    principal: Principal,
    csrf: String,
    expires: DateTime<Utc>,
}

/// Users, tokens, sessions and the failed-login limiter.
pub struct Auth {
    users: UsersFile,
    sessions: Mutex<HashMap<String, Session>>,
    failures: DefaultKeyedRateLimiter<String>,
    session_length: Duration,
    pub secure_cookies: bool,
}

/// An argon2 hash of a random password nobody knows.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$dG9rZW50YWxseWR1bW15$Zy0c2mG2cqvH2S8b4k3Yx3f1kQ4q1aZs0nHq1m3p0oU";

pub const SESSION_COOKIE: &str = "tt_session";
pub const LOGIN_CSRF_COOKIE: &str = "tt_login_csrf";

impl Auth {
    pub fn new(
        users: UsersFile,
        session_hours: i64,
        attempts_per_minute: u32,
        secure_cookies: bool,
    ) -> Self {
        let quota =
            Quota::per_minute(NonZeroU32::new(attempts_per_minute.max(1)).expect("non-zero"));
        Self {
            users,
            sessions: Mutex::new(HashMap::new()),
            failures: RateLimiter::keyed(quota),
            session_length: Duration::hours(session_hours),
            secure_cookies,
        }
    }

    /// Checks a password. `Err` means the caller is rate limited: every attempt uses
    /// one unit of the per-user-name and the per-address quota, so guessing is slow
    /// whichever of the two an attacker varies.
    pub fn login(&self, name: &str, password: &str, client: &str) -> Result<Option<Principal>, ()> {
        let keys = [format!("user:{name}"), format!("addr:{client}")];
        if keys
            .iter()
            .map(|k| self.failures.check_key(k).is_err())
            .fold(false, |a, b| a | b)
        {
            return Err(());
        }
        let user = self.users.users.iter().find(|u| u.name == name);
        // Unknown names cost the same argon2 work, so timing does not reveal which exist.
        let hash = user.map_or(DUMMY_HASH, |u| u.password_hash.as_str());
        let ok = verify_password(password, hash) && user.is_some();
        Ok(user.filter(|_| ok).map(|u| Principal {
            name: u.name.clone(),
            role: u.role,
            institution: u.institution.clone(),
        }))
    }

    pub fn create_session(&self, principal: Principal) -> (String, String) {
        let id = random_hex(32);
        let csrf = random_hex(32);
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let now = Utc::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            id.clone(),
            Session {
                principal,
                csrf: csrf.clone(),
                expires: now + self.session_length,
            },
        );
        (id, csrf)
    }

    pub fn end_session(&self, id: &str) {
        self.sessions.lock().expect("sessions lock").remove(id);
    }

    fn session(&self, id: &str) -> Option<(Principal, String)> {
        let sessions = self.sessions.lock().expect("sessions lock");
        sessions
            .get(id)
            .filter(|s| s.expires > Utc::now())
            .map(|s| (s.principal.clone(), s.csrf.clone()))
    }

    fn token(&self, token: &str) -> Option<Principal> {
        let h = token_hash(token);
        self.users
            .tokens
            .iter()
            .find(|t| t.token_hash == h)
            .map(|t| Principal {
                name: t.name.clone(),
                role: t.role,
                institution: t.institution.clone(),
            })
    }
}

pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
}

pub fn set_cookie(name: &str, value: &str, secure: bool, max_age: Option<i64>) -> String {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if secure {
        c.push_str("; Secure");
    }
    if let Some(a) = max_age {
        c.push_str(&format!("; Max-Age={a}"));
    }
    c
}

pub fn client_addr(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_default()
}

/// An authenticated request: by session cookie (pages) or bearer token (API).
pub struct Authed {
    pub principal: Principal,
    /// The session's CSRF token (empty for bearer tokens, which forms never use).
    pub csrf: String,
}

impl FromRequestParts<Arc<AppState>> for Authed {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, AppError> {
        let api = parts.uri.path().starts_with("/api/");
        if let Some(v) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            let token = v
                .strip_prefix("Bearer ")
                .ok_or(AppError::Unauthenticated { api })?;
            let principal = state
                .auth
                .token(token.trim())
                .ok_or(AppError::Unauthenticated { api })?;
            return Ok(Authed {
                principal,
                csrf: String::new(),
            });
        }
        let id = cookie(&parts.headers, SESSION_COOKIE).ok_or(AppError::Unauthenticated { api })?;
        let (principal, csrf) = state
            .auth
            .session(&id)
            .ok_or(AppError::Unauthenticated { api })?;
        Ok(Authed { principal, csrf })
    }
}

/// Which institutions a request may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    One(String),
}

impl Scope {
    pub fn institution(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::One(i) => Some(i),
        }
    }
}

#[derive(Deserialize)]
struct InstitutionParam {
    institution: Option<String>,
}

/// An authenticated request plus the institutions it may see: the institution named in
/// the path (`/institutions/{institution}`) or the `institution` query parameter, checked
/// against the principal. An institution user asking for another one gets 403; asking
/// for none gets their own.
pub struct Scoped {
    pub principal: Principal,
    pub csrf: String,
    pub scope: Scope,
}

impl FromRequestParts<Arc<AppState>> for Scoped {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, AppError> {
        let Authed { principal, csrf } = Authed::from_request_parts(parts, state).await?;
        let from_path = UrlPath::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .ok()
            .and_then(|p| p.0.get("institution").cloned());
        let from_query = Query::<InstitutionParam>::from_request_parts(parts, state)
            .await
            .ok()
            .and_then(|q| q.0.institution)
            .filter(|i| !i.is_empty());
        if let Some(own) = &principal.institution {
            if [&from_path, &from_query]
                .into_iter()
                .flatten()
                .any(|i| i != own)
            {
                return Err(AppError::Forbidden);
            }
        }
        if let (Some(a), Some(b)) = (&from_path, &from_query) {
            if a != b {
                return Err(AppError::BadRequest(
                    "conflicting institutions in path and query".into(),
                ));
            }
        }
        let requested = from_path.or(from_query);
        let scope = match (&principal.institution, requested) {
            (Some(own), Some(req)) if *own != req => return Err(AppError::Forbidden),
            (Some(own), _) => Scope::One(own.clone()),
            (None, Some(req)) => Scope::One(req),
            (None, None) => Scope::All,
        };
        Ok(Scoped {
            principal,
            csrf,
            scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_are_stored_hashed() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert_eq!(token_hash("abc").len(), 64);
    }

    #[test]
    fn failed_logins_are_rate_limited() {
        let users = UsersFile {
            users: vec![UserEntry {
                name: "f".into(),
                role: Role::Finance,
                institution: None,
                password_hash: hash_password("pw").unwrap(),
            }],
            tokens: vec![],
        };
        let auth = Auth::new(users, 1, 3, false);
        assert_eq!(
            auth.login("f", "pw", "1.2.3.4").unwrap().unwrap().role,
            Role::Finance
        );
        // The limiter counts attempts; after the quota even the right password waits.
        let mut limited = false;
        for _ in 0..5 {
            if auth.login("f", "bad", "1.2.3.4").is_err() {
                limited = true;
            }
        }
        assert!(limited);
        assert!(auth.login("f", "pw", "1.2.3.4").is_err());
    }

    #[test]
    fn roles_and_institutions_must_agree() {
        assert!(check_role(Role::Institution, None).is_err());
        assert!(check_role(Role::Finance, Some("x")).is_err());
        assert!(check_role(Role::Institution, Some("x")).is_ok());
    }
}
