//! Who is asking, and what they may see. Users and API tokens come from the users file
//! (argon2 password hashes, SHA-256 token hashes); sessions live in memory.
//!
//! Every handler takes `Scoped` (or `Authed` where no institution is involved): the one
//! place where an institution user is confined to their own institution.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use axum::extract::{ConnectInfo, FromRequestParts, Path as UrlPath, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use chrono::{DateTime, Duration, Utc};
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
    /// Reads one institution's pages, invoices and keys.
    Institution,
    /// An institution user who also creates and revokes their institution's proxy keys.
    #[serde(rename = "institution_admin")]
    #[value(name = "institution_admin")]
    InstitutionAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Finance => "finance",
            Role::Ops => "ops",
            Role::Institution => "institution",
            Role::InstitutionAdmin => "institution_admin",
        }
    }

    /// Roles confined to one institution.
    pub fn is_institution(self) -> bool {
        matches!(self, Role::Institution | Role::InstitutionAdmin)
    }
}

/// An authenticated user or API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
    /// Set exactly when `role` is `Institution` or `InstitutionAdmin`.
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
        // Password and token hashes: readable by the owner only (0600), from creation on.
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

pub fn check_role(role: Role, institution: Option<&str>) -> Result<(), String> {
    match (role.is_institution(), institution) {
        (true, Some(i)) if !i.is_empty() => Ok(()),
        (true, _) => Err(format!("role {} needs an institution", role.as_str())),
        (false, Some(_)) => {
            Err("only roles institution and institution_admin take an institution".into())
        }
        (false, None) => Ok(()),
    }
}

/// The one place an institution's principal is confined: the institution a request names
/// (`None`: none named) must be the principal's own; returns the institution the request
/// is about (`None`: every institution, for principals that may see all).
pub fn confine(principal: &Principal, requested: Option<&str>) -> Result<Option<String>, AppError> {
    match (&principal.institution, requested) {
        (Some(own), Some(req)) if own != req => Err(AppError::Forbidden),
        (Some(own), _) => Ok(Some(own.clone())),
        (None, req) => Ok(req.map(str::to_owned)),
    }
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

#[cfg(test)]
fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::PasswordVerifier as _;
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Verifies an argon2 password hash with caller-owned working memory. argon2 needs 19 MiB per check;
/// allocating it anew each time left the process tens of MiB larger per login (measured:
/// +19 MiB per failed login, never returned), so the login threads keep theirs.
fn verify_password_with(password: &str, hash: &str, blocks: &mut Vec<argon2::Block>) -> bool {
    let Ok(h) = PasswordHash::new(hash) else {
        return false;
    };
    let Ok(params) = argon2::Params::try_from(&h) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(h.algorithm) else {
        return false;
    };
    let version = match h.version.map(argon2::Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let n = params.block_count();
    if blocks.len() < n {
        blocks.resize(n, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let ok = Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut blocks[..n])
        .is_ok();
    // `Output` compares in constant time.
    ok && argon2::password_hash::Output::new(&out).is_ok_and(|o| o == expected)
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

/// Longest user name and password a login form may carry; longer fields are refused
/// before anything else looks at them.
pub const MAX_USER_NAME: usize = 128;
pub const MAX_PASSWORD: usize = 1024;

/// Events (failed logins, drafts) counted per key in one-minute windows, in a table of
/// bounded size: when it is full the oldest entry goes, so no stream of new names or
/// addresses can grow it.
pub struct WindowCounter {
    max_keys: usize,
    window: std::time::Duration,
    map: Mutex<HashMap<String, (std::time::Instant, u32)>>,
}

impl WindowCounter {
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys,
            window: std::time::Duration::from_secs(60),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Failures of `key` in the current window.
    pub fn count(&self, key: &str) -> u32 {
        let map = self.map.lock().expect("failures lock");
        map.get(key)
            .filter(|(start, _)| start.elapsed() < self.window)
            .map_or(0, |(_, n)| *n)
    }

    pub fn record(&self, key: &str) {
        let mut map = self.map.lock().expect("failures lock");
        let now = std::time::Instant::now();
        if !map.contains_key(key) && map.len() >= self.max_keys {
            map.retain(|_, (start, _)| start.elapsed() < self.window);
            if map.len() >= self.max_keys {
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (t, _))| *t)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        let e = map.entry(key.to_owned()).or_insert((now, 0));
        if e.0.elapsed() >= self.window {
            *e = (now, 0);
        }
        e.1 += 1;
    }

    pub fn clear(&self, key: &str) {
        self.map.lock().expect("failures lock").remove(key);
    }

    pub fn len(&self) -> usize {
        self.map.lock().expect("failures lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type CheckJob = (String, String, tokio::sync::oneshot::Sender<bool>);

/// A fixed pool of threads that verify argon2 passwords.
struct PasswordChecker {
    jobs: std::sync::mpsc::SyncSender<CheckJob>,
}

impl PasswordChecker {
    fn new(threads: usize) -> Self {
        // Bounded queue: a flood beyond it is answered "failed" at once rather than held.
        let (tx, rx) = std::sync::mpsc::sync_channel::<CheckJob>(256);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    // One working memory per thread, reused by every check.
                    let mut blocks = Vec::new();
                    loop {
                        let job = rx.lock().expect("argon2 queue").recv();
                        let Ok((password, hash, reply)) = job else {
                            return;
                        };
                        let _ = reply.send(verify_password_with(&password, &hash, &mut blocks));
                    }
                })
                .expect("starting an argon2 thread");
        }
        Self { jobs: tx }
    }

    async fn verify(&self, password: String, hash: String) -> bool {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.jobs.try_send((password, hash, reply)).is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

/// What a login attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginOutcome {
    Ok(Principal),
    Failed,
    /// Too many failures from this address (for this user, or for any user).
    RateLimited,
}

/// Users, tokens, sessions and the failed-login counters.
///
/// Lockout policy: failures count per (user, address) and per address. Either limit
/// makes *that address* wait (429); nothing an attacker does from elsewhere locks a user
/// out at their own address. Failures for a user from all addresses only slow further
/// attempts for that user (up to 2 s each), which makes distributed guessing expensive
/// without denying anyone.
pub struct Auth {
    users: UsersFile,
    sessions: Mutex<HashMap<String, Session>>,
    failures: WindowCounter,
    per_minute: u32,
    /// argon2 runs on two dedicated threads: a login flood queues instead of starving the
    /// async workers that serve pages, and its memory (19 MiB per hash) stays with those
    /// two threads instead of spreading over a growing pool of blocking threads.
    hashing: PasswordChecker,
    session_length: Duration,
    pub secure_cookies: bool,
}

/// An argon2 hash of a random password nobody knows.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$dG9rZW50YWxseWR1bW15$Zy0c2mG2cqvH2S8b4k3Yx3f1kQ4q1aZs0nHq1m3p0oU";

pub const SESSION_COOKIE: &str = "tt_session";
pub const LOGIN_CSRF_COOKIE: &str = "tt_login_csrf";

/// Failed-login table size (entries; a few hundred bytes each).
const MAX_FAILURE_KEYS: usize = 20_000;

impl Auth {
    pub fn new(
        users: UsersFile,
        session_hours: i64,
        attempts_per_minute: u32,
        secure_cookies: bool,
    ) -> Self {
        Self {
            users,
            sessions: Mutex::new(HashMap::new()),
            failures: WindowCounter::new(MAX_FAILURE_KEYS),
            per_minute: attempts_per_minute.max(1),
            hashing: PasswordChecker::new(2),
            session_length: Duration::hours(session_hours),
            secure_cookies,
        }
    }

    /// Checks a password from `client` (see the lockout policy above).
    pub async fn login(&self, name: &str, password: &str, client: &str) -> LoginOutcome {
        let addr_key = format!("addr\0{client}");
        let pair_key = format!("pair\0{client}\0{name}");
        let user_key = format!("user\0{name}");
        if self.failures.count(&addr_key) >= self.per_minute * 5
            || self.failures.count(&pair_key) >= self.per_minute
        {
            return LoginOutcome::RateLimited;
        }
        let spread = self.failures.count(&user_key);
        if spread > 0 {
            let delay = std::time::Duration::from_millis(u64::from(spread.min(20)) * 100);
            tokio::time::sleep(delay).await;
        }
        let user = self.users.users.iter().find(|u| u.name == name);
        // Unknown names cost the same argon2 work, so timing does not reveal which exist.
        let hash = user
            .map_or(DUMMY_HASH, |u| u.password_hash.as_str())
            .to_owned();
        let password = password.to_owned();
        let ok = self.hashing.verify(password, hash).await;
        match user.filter(|_| ok) {
            Some(u) => {
                self.failures.clear(&pair_key);
                LoginOutcome::Ok(Principal {
                    name: u.name.clone(),
                    role: u.role,
                    institution: u.institution.clone(),
                })
            }
            None => {
                for k in [&addr_key, &pair_key, &user_key] {
                    self.failures.record(k);
                }
                LoginOutcome::Failed
            }
        }
    }

    /// Entries in the failed-login table (bounded by its size).
    pub fn failure_entries(&self) -> usize {
        self.failures.len()
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

/// The client's address: the peer, or — when the peer is a trusted reverse proxy — the
/// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(
    peer: std::net::IpAddr,
    headers: &HeaderMap,
    trusted: &[std::net::IpAddr],
) -> std::net::IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<std::net::IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .into_iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .unwrap_or(peer)
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

pub use crate::domain::Scope;

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
        let scope = match confine(&principal, requested.as_deref())? {
            Some(i) => Scope::One(i),
            None => Scope::All,
        };
        Ok(Scoped {
            principal,
            csrf,
            scope,
        })
    }
}

/// Who may do what beyond reading their scope: a policy per action.
pub trait Policy {
    const WHAT: &'static str;
    fn allows(p: &Principal) -> bool;
}

/// Admin and ops: the pipeline (raw rejected payloads of every institution).
pub struct SeesPipeline;
impl Policy for SeesPipeline {
    const WHAT: &'static str = "see the pipeline";
    fn allows(p: &Principal) -> bool {
        p.sees_pipeline()
    }
}

/// Finance and admin: issue invoices.
pub struct CanIssue;
impl Policy for CanIssue {
    const WHAT: &'static str = "issue invoices";
    fn allows(p: &Principal) -> bool {
        matches!(p.role, Role::Finance | Role::Admin)
    }
}

/// Ops and admin: acknowledge alerts.
pub struct CanAcknowledge;
impl Policy for CanAcknowledge {
    const WHAT: &'static str = "acknowledge alerts";
    fn allows(p: &Principal) -> bool {
        matches!(p.role, Role::Ops | Role::Admin)
    }
}

/// Admin, finance and an institution's administrator (for their own people): create,
/// rotate and revoke proxy keys.
pub struct CanManageKeys;
impl Policy for CanManageKeys {
    const WHAT: &'static str = "manage API keys";
    fn allows(p: &Principal) -> bool {
        matches!(p.role, Role::Admin | Role::Finance | Role::InstitutionAdmin)
    }
}

/// Admin (everything) and an institution's administrator (their institution): the log
/// of key operations.
pub struct SeesKeyLog;
impl Policy for SeesKeyLog {
    const WHAT: &'static str = "see the key log";
    fn allows(p: &Principal) -> bool {
        matches!(p.role, Role::Admin | Role::InstitutionAdmin)
    }
}

/// An authenticated request whose principal the policy `P` allows (403 otherwise).
pub struct Allowed<P> {
    pub principal: Principal,
    pub csrf: String,
    _policy: std::marker::PhantomData<P>,
}

impl<P: Policy> FromRequestParts<Arc<AppState>> for Allowed<P> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, AppError> {
        let Authed { principal, csrf } = Authed::from_request_parts(parts, state).await?;
        if !P::allows(&principal) {
            tracing::info!(user = %crate::format::log_safe(&principal.name, 64), action = P::WHAT, "forbidden");
            return Err(AppError::Forbidden);
        }
        Ok(Allowed {
            principal,
            csrf,
            _policy: std::marker::PhantomData,
        })
    }
}

/// A form that carries the session's CSRF token.
pub trait CsrfField {
    fn csrf(&self) -> &str;
}

/// A posted form, accepted only with the session's CSRF token (requests with a bearer
/// token have no session and send no token: forms are the browser's).
pub struct CheckedForm<T>(pub T);

impl<T> axum::extract::FromRequest<Arc<AppState>> for CheckedForm<T>
where
    T: serde::de::DeserializeOwned + CsrfField + Send,
{
    type Rejection = AppError;

    async fn from_request(
        req: axum::extract::Request,
        state: &Arc<AppState>,
    ) -> Result<Self, AppError> {
        let (mut parts, body) = req.into_parts();
        let authed = Authed::from_request_parts(&mut parts, state).await?;
        let req = axum::extract::Request::from_parts(parts, body);
        let axum::extract::Form(form) = axum::extract::Form::<T>::from_request(req, state)
            .await
            .map_err(|e| AppError::BadRequest(e.body_text()))?;
        if !authed.csrf.is_empty() && form.csrf() != authed.csrf {
            return Err(AppError::Forbidden);
        }
        Ok(CheckedForm(form))
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
        let mut blocks = Vec::new();
        assert!(verify_password_with("correct horse", &h, &mut blocks));
        assert!(!verify_password_with("wrong", &h, &mut blocks));
        assert!(!verify_password_with("x", DUMMY_HASH, &mut blocks));
        assert!(!verify_password_with("x", "not a hash", &mut blocks));
        assert_eq!(token_hash("abc").len(), 64);
    }

    fn one_user() -> UsersFile {
        UsersFile {
            users: vec![UserEntry {
                name: "f".into(),
                role: Role::Finance,
                institution: None,
                password_hash: hash_password("pw-right").unwrap(),
            }],
            tokens: vec![],
        }
    }

    #[tokio::test]
    async fn failures_elsewhere_never_lock_the_user_out_at_their_own_address() {
        let auth = Auth::new(one_user(), 1, 3, false);
        // An attacker guesses from many addresses, and hammers from one.
        for i in 0..10 {
            assert_eq!(
                auth.login("f", "bad", &format!("10.0.0.{i}")).await,
                LoginOutcome::Failed
            );
        }
        for _ in 0..3 {
            auth.login("f", "bad", "10.9.9.9").await;
        }
        assert_eq!(
            auth.login("f", "bad", "10.9.9.9").await,
            LoginOutcome::RateLimited
        );
        // The user, at their own address, gets in (slowed, not refused).
        assert!(matches!(
            auth.login("f", "pw-right", "192.0.2.7").await,
            LoginOutcome::Ok(_)
        ));
    }

    #[test]
    fn the_failure_table_is_bounded() {
        let c = WindowCounter::new(100);
        for i in 0..10_000 {
            c.record(&format!("user-{i}"));
        }
        assert_eq!(c.len(), 100);
        assert_eq!(c.count("user-9999"), 1);
        assert_eq!(c.count("user-0"), 0);
    }

    #[test]
    fn the_client_address_comes_from_a_trusted_proxy_only() {
        let proxy: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "198.51.100.1, 203.0.113.9".parse().unwrap(),
        );
        assert_eq!(client_ip(proxy, &h, &[]), proxy);
        assert_eq!(client_ip(proxy, &h, &[proxy]).to_string(), "203.0.113.9");
        let other: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            client_ip(other, &h, &[proxy]),
            other,
            "spoofed header from a non-proxy"
        );
    }

    #[test]
    fn roles_and_institutions_must_agree() {
        assert!(check_role(Role::Institution, None).is_err());
        assert!(check_role(Role::Finance, Some("x")).is_err());
        assert!(check_role(Role::Institution, Some("x")).is_ok());
    }
}
