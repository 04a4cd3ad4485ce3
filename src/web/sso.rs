//! Sign-in with the institution's account (OpenID Connect, authorization code flow with
//! PKCE): `/sso/{provider}/login` sends the browser to the provider, the provider sends
//! it back to `/sso/{provider}/callback`, where the code is exchanged and the ID token is
//! validated (signature against the provider's JWKS, issuer, audience, expiry, nonce)
//! before anything of it is believed. The claims then go through the provider's rules
//! (`people::sso`) to an institution, a group and a role.
//!
//! A sign-in started here is remembered by its `state` (once: a callback replayed finds
//! nothing) and bound to the browser by a cookie. The session ends when the ID token
//! would, or earlier (`web.session_hours`); signing out also ends the provider's session
//! where it offers an end-session endpoint.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod, CoreGrantType,
    CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm,
    CoreResponseMode, CoreResponseType, CoreSubjectIdentifierType,
};
use openidconnect::{
    AdditionalProviderMetadata, AuthenticationFlow, AuthorizationCode, ClientId, ClientSecret,
    CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, ProviderMetadata,
    RedirectUrl, Scope,
};
use serde::{Deserialize, Serialize};

use super::auth::{cookie, set_cookie, SESSION_COOKIE};
use super::error::AppError;
use super::AppState;
use crate::people::sso::SsoProvider;
use crate::people::Principal;

/// The provider's metadata, with the end-session endpoint (RP-initiated logout) if it has
/// one.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LogoutMetadata {
    #[serde(default)]
    end_session_endpoint: Option<String>,
}
impl AdditionalProviderMetadata for LogoutMetadata {}

type Metadata = ProviderMetadata<
    LogoutMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// The cookie that binds a sign-in in progress to the browser that started it. Lax: the
/// provider's redirect back is a cross-site navigation.
pub const STATE_COOKIE: &str = "tt_sso_state";
/// How long a sign-in may take at the provider.
const PENDING_FOR: Duration = Duration::from_secs(600);
/// Most sign-ins in progress at once (older ones are forgotten first).
const MAX_PENDING: usize = 10_000;

struct Pending {
    provider: String,
    verifier: String,
    nonce: String,
    next: String,
    started: Instant,
}

/// One configured provider and what discovery read of it.
struct Provider {
    cfg: SsoProvider,
    secret: crate::secret::Secret,
    metadata: tokio::sync::RwLock<Option<Metadata>>,
}

/// Every configured provider, the sign-ins in progress and the HTTP client they use.
pub struct Sso {
    providers: Vec<Provider>,
    pending: Mutex<HashMap<String, Pending>>,
    http: Http,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

/// `openidconnect`'s HTTP, through our client.
struct Http(reqwest::Client);

type HttpFuture<'c> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<openidconnect::HttpResponse, HttpError>>
            + Send
            + 'c,
    >,
>;

impl<'c> openidconnect::AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = HttpFuture<'c>;

    fn call(&'c self, req: openidconnect::HttpRequest) -> Self::Future {
        let client = self.0.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let res = client
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| HttpError(crate::gateway::describe(e)))?;
            let mut out = openidconnect::http::Response::builder().status(res.status());
            for (k, v) in res.headers() {
                out = out.header(k, v);
            }
            let body = res
                .bytes()
                .await
                .map_err(|e| HttpError(crate::gateway::describe(e)))?;
            out.body(body.to_vec())
                .map_err(|e| HttpError(e.to_string()))
        })
    }
}

impl Sso {
    pub fn new(providers: Vec<SsoProvider>) -> anyhow::Result<Self> {
        let mut out = Vec::new();
        for p in providers {
            p.validate().map_err(anyhow::Error::msg)?;
            let secret = p.secret().map_err(anyhow::Error::msg)?;
            out.push(Provider {
                cfg: p,
                secret,
                metadata: tokio::sync::RwLock::new(None),
            });
        }
        Ok(Self {
            providers: out,
            pending: Mutex::new(HashMap::new()),
            // Following redirects would let a provider's document send us anywhere.
            http: Http(
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(Duration::from_secs(10))
                    .build()?,
            ),
        })
    }

    /// (id, label) of every provider, for the sign-in page.
    pub fn buttons(&self) -> Vec<(String, String)> {
        self.providers
            .iter()
            .map(|p| (p.cfg.id.clone(), p.cfg.label.clone()))
            .collect()
    }

    fn provider(&self, id: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.cfg.id == id)
    }

    /// The provider's metadata and keys: read at the first sign-in (and again after a
    /// failure), so a provider that is down at start does not stop the dashboard.
    async fn metadata(&self, p: &Provider) -> Result<Metadata, String> {
        if let Some(m) = p.metadata.read().await.as_ref() {
            return Ok(m.clone());
        }
        let issuer =
            IssuerUrl::new(p.cfg.issuer.clone()).map_err(|e| format!("issuer URL: {e}"))?;
        let m = Metadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| {
                format!(
                    "cannot read {}'s OpenID configuration: {}",
                    p.cfg.label,
                    chain(&e)
                )
            })?;
        *p.metadata.write().await = Some(m.clone());
        Ok(m)
    }

    /// Forgets what was read of a provider (its keys may have rotated).
    async fn forget(&self, p: &Provider) {
        *p.metadata.write().await = None;
    }

    fn client(
        &self,
        p: &Provider,
        m: Metadata,
        redirect: &str,
    ) -> Result<CoreClientWithRedirect, String> {
        let secret =
            (!p.secret.is_empty()).then(|| ClientSecret::new(p.secret.expose().to_owned()));
        Ok(
            CoreClient::from_provider_metadata(m, ClientId::new(p.cfg.client_id.clone()), secret)
                .set_redirect_uri(
                    RedirectUrl::new(redirect.to_owned()).map_err(|e| e.to_string())?,
                ),
        )
    }
}

type CoreClientWithRedirect = openidconnect::Client<
    openidconnect::EmptyAdditionalClaims,
    CoreAuthDisplay,
    openidconnect::core::CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    openidconnect::core::CoreAuthPrompt,
    openidconnect::StandardErrorResponse<openidconnect::core::CoreErrorResponseType>,
    openidconnect::core::CoreTokenResponse,
    openidconnect::core::CoreTokenIntrospectionResponse,
    openidconnect::core::CoreRevocableToken,
    openidconnect::core::CoreRevocationErrorResponse,
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn callback_url(state: &AppState, provider: &str) -> String {
    format!("{}/sso/{provider}/callback", state.base_url())
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
}

/// `GET /sso/{provider}/login`: off to the provider, with PKCE, state and nonce.
pub async fn login(
    State(state): State<Arc<AppState>>,
    Path(provider): Path<String>,
    Query(q): Query<LoginQuery>,
) -> Result<Response, AppError> {
    let sso = state.sso.as_ref().ok_or(AppError::NotFound)?;
    let p = sso.provider(&provider).ok_or(AppError::NotFound)?;
    let m = match sso.metadata(p).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(provider = %p.cfg.id, error = %e, "sign-in provider unavailable");
            return failed(
                &state,
                &format!(
                    "{} cannot be reached right now; try again in a moment.",
                    p.cfg.label
                ),
            );
        }
    };
    let client = sso
        .client(p, m, &callback_url(&state, &p.cfg.id))
        .map_err(|e| AppError::Internal(anyhow::anyhow!(e)))?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = client
        .authorize_url(
            AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .set_pkce_challenge(challenge);
    for s in p.cfg.scopes.iter().filter(|s| *s != "openid") {
        req = req.add_scope(Scope::new(s.clone()));
    }
    let (url, csrf, nonce) = req.url();
    {
        let mut pending = sso.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, v| v.started.elapsed() < PENDING_FOR);
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, v)| v.started)
                .map(|(k, _)| k.clone())
            {
                pending.remove(&oldest);
            }
        }
        pending.insert(
            csrf.secret().clone(),
            Pending {
                provider: p.cfg.id.clone(),
                verifier: verifier.secret().clone(),
                nonce: nonce.secret().clone(),
                next: super::signin::safe_next(q.next.as_deref()),
                started: Instant::now(),
            },
        );
    }
    let mut cookie = format!(
        "{STATE_COOKIE}={}; Path=/sso; HttpOnly; SameSite=Lax; Max-Age={}",
        csrf.secret(),
        PENDING_FOR.as_secs()
    );
    if state.auth.secure_cookies {
        cookie.push_str("; Secure");
    }
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(url.as_str())).into_response())
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The sign-in page again, with why signing in failed (401, no session).
fn failed(state: &AppState, why: &str) -> Result<Response, AppError> {
    let mut res = super::signin::login_page(
        state,
        StatusCode::UNAUTHORIZED,
        &format!("Sign-in failed: {why}"),
        "/",
    )?;
    res.headers_mut().append(
        header::SET_COOKIE,
        format!("{STATE_COOKIE}=; Path=/sso; HttpOnly; SameSite=Lax; Max-Age=0")
            .parse()
            .expect("static cookie"),
    );
    Ok(res)
}

/// `GET /sso/{provider}/callback`: the provider's answer.
pub async fn callback(
    State(state): State<Arc<AppState>>,
    Path(provider): Path<String>,
    Query(q): Query<CallbackQuery>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let sso = state.sso.as_ref().ok_or(AppError::NotFound)?;
    let p = sso.provider(&provider).ok_or(AppError::NotFound)?;
    if let Some(e) = &q.error {
        let why = q.error_description.as_deref().unwrap_or(e);
        return failed(
            &state,
            &format!(
                "{} answered: {}",
                p.cfg.label,
                crate::format::log_safe(why, 200)
            ),
        );
    }
    let (Some(code), Some(st)) = (q.code.as_deref(), q.state.as_deref()) else {
        return failed(&state, "the provider's answer is incomplete.");
    };
    // The state must be the one this browser was given, and be used once.
    if cookie(&headers, STATE_COOKIE).as_deref() != Some(st) {
        tracing::warn!(provider = %p.cfg.id, "sign-in refused: state does not match this browser's");
        return failed(
            &state,
            "this sign-in was not started in this browser (state mismatch); start again.",
        );
    }
    let pending = sso
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(st)
        .filter(|v| v.provider == p.cfg.id && v.started.elapsed() < PENDING_FOR);
    let Some(pending) = pending else {
        return failed(
            &state,
            "this sign-in has expired or was already used; start again.",
        );
    };
    match verify(&state, sso, p, code, &pending).await {
        Ok((principal, expires, id_token)) => {
            let (id, _) = state.auth.create_session_until(
                principal,
                expires,
                Some(super::auth::SsoSession {
                    provider: p.cfg.id.clone(),
                    id_token,
                }),
            );
            let page = format!(
                "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=\"0;url={}\"><title>Signed in</title><p>Signed in. <a href=\"{}\">Continue</a></p>",
                html_attr(&pending.next),
                html_attr(&pending.next)
            );
            Ok((
                axum::response::AppendHeaders([
                    (
                        header::SET_COOKIE,
                        set_cookie(SESSION_COOKIE, &id, state.auth.secure_cookies, None),
                    ),
                    (
                        header::SET_COOKIE,
                        format!("{STATE_COOKIE}=; Path=/sso; HttpOnly; SameSite=Lax; Max-Age=0"),
                    ),
                ]),
                Html(page),
            )
                .into_response())
        }
        Err(why) => {
            tracing::warn!(provider = %p.cfg.id, reason = %crate::format::log_safe(&why, 300), "sign-in refused");
            failed(&state, &why)
        }
    }
}

/// Why an ID token was refused, in words a person (and the log) can act on.
fn explain(e: &openidconnect::ClaimsVerificationError) -> String {
    use openidconnect::{ClaimsVerificationError as C, SignatureVerificationError as S};
    match e {
        C::Expired(_) => "the ID token has expired.".into(),
        C::InvalidAudience(_) => {
            "the ID token was issued for another application (wrong audience).".into()
        }
        C::InvalidIssuer(_) => {
            "the ID token comes from another issuer than the configured one.".into()
        }
        C::InvalidNonce(_) => {
            "the ID token's nonce is not this sign-in's (a replayed token); start again.".into()
        }
        C::SignatureVerification(S::NoSignature) => {
            "the ID token is not signed (signature algorithm `none` is not accepted).".into()
        }
        C::SignatureVerification(S::DisallowedAlg(a) | S::UnsupportedAlg(a)) => format!(
            "the ID token's signature algorithm `{}` is not accepted.",
            crate::format::log_safe(a, 20)
        ),
        C::SignatureVerification(S::NoMatchingKey) => {
            "the ID token is signed with a key the provider's key set (JWKS) does not hold.".into()
        }
        C::SignatureVerification(S::CryptoError(_) | S::InvalidKey(_)) => {
            "the ID token's signature is not valid.".into()
        }
        other => format!("the ID token is not valid ({}).", chain(other)),
    }
}

fn html_attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Exchanges the code, validates the ID token, maps the person: their principal, when
/// their session must end, and the raw ID token (for signing out at the provider).
async fn verify(
    state: &AppState,
    sso: &Sso,
    p: &Provider,
    code: &str,
    pending: &Pending,
) -> Result<(Principal, chrono::DateTime<chrono::Utc>, String), String> {
    let m = sso.metadata(p).await?;
    let client = sso.client(p, m, &callback_url(state, &p.cfg.id))?;
    let token = client
        .exchange_code(AuthorizationCode::new(code.to_owned()))
        .map_err(|e| format!("the provider has no token endpoint: {e}"))?
        .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.clone()))
        .request_async(&sso.http)
        .await
        .map_err(|e| format!("the provider refused the code: {}", chain(&e)))?;
    use openidconnect::TokenResponse as _;
    let id_token = token.id_token().ok_or("the provider sent no ID token")?;
    let verifier = client.id_token_verifier();
    let claims = match id_token.claims(&verifier, &Nonce::new(pending.nonce.clone())) {
        Ok(c) => c.clone(),
        Err(e) => {
            // A key the JWKS does not hold may be a rotation: read the keys once more
            // next time.
            if matches!(
                e,
                openidconnect::ClaimsVerificationError::SignatureVerification(_)
            ) {
                sso.forget(p).await;
            }
            tracing::warn!(provider = %p.cfg.id, error = %chain(&e), "ID token refused");
            return Err(explain(&e));
        }
    };
    // Verified: its payload may be read for the claims the rules look at.
    let raw = id_token.to_string();
    let payload = raw
        .split('.')
        .nth(1)
        .and_then(|b| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b)
                .ok()
        })
        .and_then(|b| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&b).ok())
        .ok_or("the ID token's claims cannot be read")?;
    let mapped = p.cfg.map(&payload)?;
    let member = crate::people::directory::sign_in(&state.writer, &mapped, chrono::Utc::now())
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "recording a sign-in failed");
            "your sign-in could not be recorded; try again in a moment".to_owned()
        })?;
    tracing::info!(provider = %p.cfg.id, institution = %member.institution_id, group = %member.group_id, "sign-in");
    Ok((
        Principal {
            name: member.person_id.clone(),
            role: member.role.as_role(),
            institution: Some(member.institution_id.clone()),
            person: Some(member.person_id.clone()),
        },
        claims.expiration(),
        raw,
    ))
}

/// Where signing out sends the browser: the provider's end-session endpoint (which
/// comes back to the sign-in page), or the sign-in page.
pub async fn logout_target(state: &AppState, session: &super::auth::SsoSession) -> String {
    let login = format!("{}/login", state.base_url());
    let Some(sso) = state.sso.as_ref() else {
        return "/login".into();
    };
    let Some(p) = sso.provider(&session.provider) else {
        return "/login".into();
    };
    let Ok(m) = sso.metadata(p).await else {
        return "/login".into();
    };
    match m.additional_metadata().end_session_endpoint.as_deref() {
        Some(end) => {
            let q: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("id_token_hint", &session.id_token)
                .append_pair("post_logout_redirect_uri", &login)
                .append_pair("client_id", &p.cfg.client_id)
                .finish();
            let sep = if end.contains('?') { '&' } else { '?' };
            format!("{end}{sep}{q}")
        }
        None => "/login".into(),
    }
}
