//! Who is asking, and what they may see. Users and API tokens come from the users file
//! (argon2 password hashes, SHA-256 token hashes); sessions live in memory.
//!
//! Every handler takes `Scoped` (or `Authed` where no institution is involved): the one
//! place where an institution user is confined to their own institution.

use std::collections::HashMap;
use std::net::SocketAddr;

use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, FromRequestParts, Path as UrlPath, Query};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;

use super::error::AppError;
use super::AppState;
use crate::people::verify_password_with;
pub use crate::people::{
    check_role, hash_password, random_hex, token_hash, Principal, Role, TokenEntry, UserEntry,
    UsersFile, MAX_PASSWORD, MAX_USER_NAME,
};

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

struct Session {
    principal: Principal,
    csrf: String,
    expires: DateTime<Utc>,
    sso: Option<SsoSession>,
    /// What the page after an action says, until that page is shown (post/redirect/get).
    flash: Option<Flash>,
}

/// The result of an action (a form's POST), kept in the session and shown once by the
/// page the POST redirects to: a reload shows that page again instead of repeating the
/// action. Refusals that keep what was typed are rendered by the POST itself instead.
#[derive(Debug, Clone, Default)]
pub struct Flash {
    /// Where the browser is sent (path and query); the page at its path shows it.
    pub to: String,
    pub message: String,
    /// The message is an error (or a partial failure).
    pub failed: bool,
    /// A key just created (id, secret): shown once, kept nowhere else.
    pub created: Option<(String, String)>,
}

impl Flash {
    pub fn done(to: impl Into<String>, message: impl Into<String>) -> Self {
        Flash {
            to: to.into(),
            message: message.into(),
            ..Flash::default()
        }
    }

    fn path(&self) -> &str {
        self.to.split('?').next().unwrap_or_default()
    }
}

/// What a session signed in through a provider keeps, to sign out there too.
#[derive(Debug, Clone)]
pub struct SsoSession {
    pub provider: String,
    /// The ID token (the end-session endpoint's `id_token_hint`).
    pub id_token: String,
}

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
                    person: None,
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
        self.create_session_until(principal, Utc::now() + self.session_length, None)
    }

    /// A session that ends at `until` or after `web.session_hours`, whichever is first
    /// (a provider's ID token says until when it vouches for the person).
    pub fn create_session_until(
        &self,
        principal: Principal,
        until: DateTime<Utc>,
        sso: Option<SsoSession>,
    ) -> (String, String) {
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
                expires: until.min(now + self.session_length),
                sso,
                flash: None,
            },
        );
        (id, csrf)
    }

    /// Keeps `flash` for the session's next view of the page it names (replacing any
    /// earlier one not yet shown).
    pub fn put_flash(&self, id: &str, flash: Flash) {
        if let Some(s) = self.sessions.lock().expect("sessions lock").get_mut(id) {
            s.flash = Some(flash);
        }
    }

    /// The session's flash, if it is for the page at `path`; taken, so shown once.
    pub fn take_flash(&self, id: &str, path: &str) -> Option<Flash> {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let s = sessions.get_mut(id)?;
        if s.flash.as_ref()?.path() != path {
            return None;
        }
        s.flash.take()
    }

    /// Ends a session; what it kept of a provider sign-in, to sign out there too.
    pub fn end_session(&self, id: &str) -> Option<SsoSession> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .remove(id)
            .and_then(|s| s.sso)
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
                person: None,
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
        let next = if parts.method == axum::http::Method::GET {
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let unauthenticated = || AppError::Unauthenticated {
            api,
            next: next.clone(),
        };
        if let Some(v) = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        {
            let token = v.strip_prefix("Bearer ").ok_or_else(unauthenticated)?;
            let principal = state.auth.token(token.trim()).ok_or_else(unauthenticated)?;
            return Ok(Authed {
                principal,
                csrf: String::new(),
            });
        }
        let id = cookie(&parts.headers, SESSION_COOKIE).ok_or_else(unauthenticated)?;
        let (principal, csrf) = state.auth.session(&id).ok_or_else(unauthenticated)?;
        Ok(Authed { principal, csrf })
    }
}

/// The message an action left for this page (post/redirect/get), taken from the session:
/// `None` on an ordinary visit, on API routes and for bearer tokens.
pub struct Flashed(pub Option<Flash>);

impl FromRequestParts<Arc<AppState>> for Flashed {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if parts.method != axum::http::Method::GET || parts.uri.path().starts_with("/api/") {
            return Ok(Flashed(None));
        }
        Ok(Flashed(cookie(&parts.headers, SESSION_COOKIE).and_then(
            |id| state.auth.take_flash(&id, parts.uri.path()),
        )))
    }
}

/// Ends a successful action from a page: its result is kept for the page that shows it,
/// and the browser is sent there (303), so that reloading does not post the form again.
pub fn after_action(
    state: &AppState,
    headers: &HeaderMap,
    flash: Flash,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let to = flash.to.clone();
    if let Some(id) = cookie(headers, SESSION_COOKIE) {
        state.auth.put_flash(&id, flash);
    }
    axum::response::Redirect::to(&to).into_response()
}

pub use crate::domain::Scope;

/// The `institution` query parameter as given (empty: "All institutions"); a repeated
/// one never gets here (`reject_repeated_parameters` refuses it first).
fn picked_institution(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "institution")
        .map(|(_, v)| v.trim().to_owned())
}

/// Where a page at `uri` (about institution `from`, in its path) goes when its picker
/// names `to`: the same page of `to`, or the overview for every institution (`to`
/// empty); the other parameters kept. `None` when the path does not name `from` plainly.
fn repicked(uri: &axum::http::Uri, from: &str, to: &str) -> Option<String> {
    let prefix = format!("/institutions/{from}");
    let rest = uri.path().strip_prefix(&prefix)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let path = if to.is_empty() {
        // Only the institution page itself has an every-institution twin.
        if !rest.is_empty() {
            return None;
        }
        "/".to_owned()
    } else {
        format!("/institutions/{}{rest}", crate::format::urlencode(to))
    };
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .filter(|(k, v)| k != "institution" && !v.is_empty()),
        )
        .finish();
    Some(if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    })
}

#[derive(Deserialize)]
struct InstitutionParam {
    institution: Option<String>,
}

/// An authenticated request plus the institutions it may see: the institution named in
/// the path (`/institutions/{institution}`) or the `institution` query parameter, checked
/// against the principal. An institution user asking for another one gets 403; asking
/// for none gets their own. A member gets 403 everywhere (their pages take `Me`).
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
        // A member sees their own usage ("My usage", `me`) and nothing of their
        // institution's: no institution-wide page or API answers them.
        if principal.role == Role::Member {
            let path = parts.uri.path();
            return Err(if path == "/" || path == "/overview" {
                AppError::Redirect("/me".into())
            } else {
                AppError::Forbidden
            });
        }
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
        // The institution picker on an institution's page names another (or "All
        // institutions", empty): a page goes where the picker points; the API refuses
        // two institutions (an empty parameter there is no parameter).
        let picked = parts.uri.query().and_then(picked_institution);
        if let (Some(a), Some(b)) = (&from_path, picked) {
            if b != *a {
                let api = parts.uri.path().starts_with("/api/");
                match repicked(&parts.uri, a, &b).filter(|_| !api) {
                    Some(to) => return Err(AppError::Redirect(to)),
                    None if b.is_empty() => {}
                    None => {
                        return Err(AppError::BadRequest(
                            "conflicting institutions in path and query".into(),
                        ))
                    }
                }
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

/// Finance and admin: the providers' bills against recorded usage, and fetching them.
pub struct CanReconcile;
impl Policy for CanReconcile {
    const WHAT: &'static str = "reconcile provider bills";
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
        assert!(crate::people::verify_password("correct horse", &h));
        assert!(!crate::people::verify_password("wrong", &h));
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
