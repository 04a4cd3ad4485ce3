//! The Keys page against keys kept in memory: who may create, list and revoke which
//! institution's keys, that a secret is shown once, and that every change is in the key
//! log. What reaching the gateway means for a key (accepted, then refused) is tested
//! against the real servers (`tests/it/web.rs`).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use chrono::Utc;
use tower::ServiceExt as _;

use super::{get, router, state, text};
use crate::keys::store::Memory;
use crate::keys::{self, Key, KeyKind, KeySpec, KeyStore as _};
use crate::web::auth::{Principal, Role};
use crate::web::AppState;

/// The dashboard's state with its keys in memory (and nothing listening for the rest).
fn with_memory_keys() -> (Arc<AppState>, Arc<Memory>) {
    let mut state = state();
    let memory = Arc::new(Memory::default());
    Arc::get_mut(&mut state).expect("not shared yet").keys = memory.clone();
    (state, memory)
}

/// A signed-in session of `name`: its cookie and CSRF token.
fn session(
    state: &AppState,
    name: &str,
    role: Role,
    institution: Option<&str>,
) -> (String, String) {
    let (id, csrf) = state.auth.create_session(Principal {
        name: name.into(),
        role,
        institution: institution.map(str::to_owned),
        person: None,
    });
    (format!("tt_session={id}"), csrf)
}

async fn post(app: &Router, path: &str, cookie: &str, body: &str) -> Response {
    let req = Request::post(path)
        .header(header::COOKIE, cookie)
        .header(header::ACCEPT, "text/html")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body.to_owned()))
        .unwrap();
    app.clone().oneshot(req).await.unwrap()
}

/// A form's POST as a browser follows it: a 303 to the page that shows the result
/// (post/redirect/get), then that page, read once.
async fn post_and_follow(app: &Router, path: &str, cookie: &str, body: &str) -> String {
    let res = post(app, path, cookie, body).await;
    assert_eq!(res.status(), StatusCode::SEE_OTHER, "{path}");
    let to = res.headers()[header::LOCATION].to_str().unwrap().to_owned();
    assert_eq!(to, "/keys", "{path}");
    text(get(app, &to, Some(cookie)).await).await
}

/// The text of the element with this `id` (the page's own markup: `id="…">text<`).
fn element(html: &str, id: &str) -> String {
    html.split(&format!("id=\"{id}\""))
        .nth(1)
        .and_then(|r| r.split_once('>'))
        .and_then(|(_, r)| r.split('<').next())
        .unwrap_or_else(|| panic!("no #{id} in {html}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn an_institution_admin_manages_only_their_institutions_keys_and_a_secret_is_shown_once() {
    let (state, memory) = with_memory_keys();
    let spec = |institution: &str, user: &str| KeySpec {
        institution_id: institution.into(),
        user_id: user.into(),
        name: String::new(),
        models: vec![],
        expires: None,
        rpm: 0,
        tpm: 0,
    };
    let (other, _) = keys::create(
        memory.as_ref(),
        KeyKind::Proxy,
        &spec("inst-b", "zed"),
        "cli:ops",
    )
    .await
    .unwrap();
    let (anna, anna_csrf) = session(&state, "anna", Role::InstitutionAdmin, Some("inst-a"));
    let (bert, bert_csrf) = session(&state, "bert", Role::InstitutionAdmin, Some("inst-b"));
    let (alice, alice_csrf) = session(&state, "alice", Role::Institution, Some("inst-a"));
    let (fin, _) = session(&state, "fin", Role::Finance, None);
    let (admin, _) = session(&state, "root", Role::Admin, None);
    let app = router(state);

    // Anna's page: a create form without an institution field, and not inst-b's key.
    let page = text(get(&app, "/keys", Some(&anna)).await).await;
    assert!(page.contains("id=\"create\""), "{page}");
    assert!(!page.contains("name=\"institution\""), "{page}");
    assert!(!page.contains(&other.key_id), "{page}");

    let page = post_and_follow(
        &app,
        "/keys/create",
        &anna,
        &format!("csrf={anna_csrf}&user=student1%40inst-a&name=thesis&models=gpt-4o-mini&rpm=10"),
    )
    .await;
    let secret = element(&page, "secret");
    let message = element(&page, "message");
    let key_id = message.split_whitespace().nth(2).unwrap().to_owned();
    assert_eq!(
        message,
        format!("Created key {key_id} for student1@inst-a at inst-a.")
    );
    // What was stored is what the form said, and the secret shown is the key's.
    let row = memory.key(&key_id).await.unwrap().expect("stored");
    assert_eq!(
        (
            row.institution_id.as_str(),
            row.user_id.as_str(),
            row.name.as_str(),
            row.models.clone(),
            row.rpm,
            row.revoked,
            row.created_by.as_str()
        ),
        (
            "inst-a",
            "student1@inst-a",
            "thesis",
            vec!["gpt-4o-mini".to_owned()],
            10,
            0,
            "web:anna"
        )
    );
    let key = Key::from_row(&row).unwrap();
    assert!(
        key.admit(&secret, Utc::now()).is_ok(),
        "the shown secret works"
    );
    assert!(!row.secret_hash.contains(&secret[secret.len() - 20..]));

    // Never shown again, to anyone, in any form; reloading the page (a GET, not the
    // POST again) shows neither the secret nor the message, and creates nothing.
    let tail = &secret[secret.len() - 20..];
    let reloaded = text(get(&app, "/keys", Some(&anna)).await).await;
    assert!(!reloaded.contains("Created key"), "{reloaded}");
    assert_eq!(memory.current_keys().await.unwrap().len(), 2);
    for who in [&anna, &alice, &fin, &admin] {
        for path in ["/keys", "/api/v1/keys"] {
            let body = text(get(&app, path, Some(who)).await).await;
            assert!(body.contains(&key_id) && !body.contains(tail), "{path}");
            assert!(!body.contains(&row.secret_hash), "{path}: a hash");
        }
    }

    // Confinement: another institution, another role, no token.
    let refused = [
        (
            &anna,
            "/keys/create".to_owned(),
            format!("csrf={anna_csrf}&institution=inst-b&user=x"),
            StatusCode::FORBIDDEN,
        ),
        (
            &anna,
            format!("/keys/{}/revoke", other.key_id),
            format!("csrf={anna_csrf}"),
            StatusCode::NOT_FOUND,
        ),
        (
            &bert,
            format!("/keys/{key_id}/revoke"),
            format!("csrf={bert_csrf}"),
            StatusCode::NOT_FOUND,
        ),
        (
            &alice,
            "/keys/create".to_owned(),
            format!("csrf={alice_csrf}&user=x"),
            StatusCode::FORBIDDEN,
        ),
        (
            &alice,
            format!("/keys/{key_id}/revoke"),
            format!("csrf={alice_csrf}"),
            StatusCode::FORBIDDEN,
        ),
        (
            &anna,
            format!("/keys/{key_id}/revoke"),
            "csrf=x".to_owned(),
            StatusCode::FORBIDDEN,
        ),
    ];
    for (who, path, body, status) in refused {
        assert_eq!(
            post(&app, &path, who, &body).await.status(),
            status,
            "{path}"
        );
    }
    assert_eq!(
        memory.current_keys().await.unwrap().len(),
        2,
        "nothing created"
    );
    assert!(memory
        .current_keys()
        .await
        .unwrap()
        .iter()
        .all(|k| k.revoked == 0));

    // Alice sees her institution's key, without a revoke button or a create form.
    let page = text(get(&app, "/keys", Some(&alice)).await).await;
    assert!(page.contains(&key_id) && !page.contains(&other.key_id));
    assert!(!page.contains("Revoke") && !page.contains("id=\"create\""));
    // Finance sees both institutions'.
    let all = text(get(&app, "/api/v1/keys", Some(&fin)).await).await;
    assert!(
        all.contains(&key_id) && all.contains(&other.key_id),
        "{all}"
    );

    // Anna revokes her key: stored as revoked, refused at admission, once only.
    let page = post_and_follow(
        &app,
        &format!("/keys/{key_id}/revoke"),
        &anna,
        &format!("csrf={anna_csrf}"),
    )
    .await;
    assert_eq!(
        element(&page, "message"),
        format!("Revoked key {key_id}; every gateway refuses it within seconds.")
    );
    let row = memory.key(&key_id).await.unwrap().unwrap();
    assert_eq!(row.revoked, 1);
    assert!(Key::from_row(&row)
        .unwrap()
        .admit(&secret, Utc::now())
        .is_err());
    let again = post(
        &app,
        &format!("/keys/{key_id}/revoke"),
        &anna,
        &format!("csrf={anna_csrf}"),
    )
    .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);

    // The key log: anna sees her institution's two changes, the admin all three.
    let log = memory.key_events(Some("inst-a"), 10).await.unwrap();
    let actions: Vec<(&str, &str)> = log
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str()))
        .collect();
    assert_eq!(actions, [("revoke", "web:anna"), ("create", "web:anna")]);
    let log_of = |page: &str| page.split("id=\"log\"").nth(1).map(str::to_owned);
    let row = |action: &str| format!("<td>web:anna</td><td>{action}</td><td>{key_id}</td>");
    let anna_log = log_of(&text(get(&app, "/keys", Some(&anna)).await).await).expect("anna's log");
    assert!(
        anna_log.contains(&row("create")) && anna_log.contains(&row("revoke")),
        "{anna_log}"
    );
    assert!(!anna_log.contains(&other.key_id) && !anna_log.contains("cli:ops"));
    let all_log = log_of(&text(get(&app, "/keys", Some(&admin)).await).await).expect("the log");
    assert!(all_log.contains(&row("revoke")) && all_log.contains("<td>cli:ops</td>"));
    // Finance and institution users manage or read keys, but have no key log.
    for who in [&fin, &alice] {
        assert_eq!(
            log_of(&text(get(&app, "/keys", Some(who)).await).await),
            None
        );
    }
}
