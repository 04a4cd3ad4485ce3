//! `/pipeline` (admin and ops): consumer lag, ingest instances, rejected messages by
//! reason with their raw payloads, unpriced models.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::Uri;
use axum::response::Response;
use chrono::{Duration, Utc};

use crate::domain::Scope;
use crate::web::auth::{Allowed, SeesPipeline};
use crate::web::error::AppError;
use crate::web::page::{respond, Cell, PageData, Table};
use crate::web::query::{selection, Filters};
use crate::web::AppState;

pub async fn pipeline(
    State(state): State<Arc<AppState>>,
    authed: Allowed<SeesPipeline>,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let sel = selection(&filters, Scope::All, state.cfg.web.max_range_days)?;
    let store = &state.store;
    let (start, end) = (sel.start_ts(), sel.end_ts());
    let (reasons, recent, unpriced, rate) = tokio::try_join!(
        store.rejected_by_reason(start, end),
        store.recent_rejected(start, end, 50),
        store.unpriced_models(&sel),
        store.stored_per_second(),
    )?;
    let lag = crate::kafka::consumer_lag(
        &state.cfg.kafka,
        &state.cfg.kafka.topic,
        &state.cfg.kafka.group,
    )
    .await;

    let instances = state
        .store
        .ingest_instances(
            &state.cfg.kafka.topic,
            &state.cfg.kafka.group,
            (Utc::now() - Duration::days(1)).timestamp(),
        )
        .await?;
    let mut page = PageData::new("Pipeline health");
    page.figure(
        "Events/s stored (last 5 min)",
        Cell::Text(format!("{rate:.1}")),
    );
    page.figure(
        "Rejected in range",
        Cell::Int(reasons.iter().map(|r| r.n as i64).sum()),
    );
    page.figure(
        "Unpriced events in range",
        Cell::Int(unpriced.iter().map(|u| u.events).sum()),
    );
    match &lag {
        Ok(parts) => page.figure(
            "Consumer lag (messages)",
            Cell::Int(parts.iter().map(|p| p.lag).sum()),
        ),
        Err(e) => page.notes.push(format!("Consumer lag unavailable: {e}")),
    }
    page.tables.push(Table {
        name: "lag",
        title: format!(
            "Consumer lag of group {} on {}",
            state.cfg.kafka.group, state.cfg.kafka.topic
        ),
        columns: vec!["partition", "committed_offset", "end_offset", "lag"],
        rows: lag
            .unwrap_or_default()
            .iter()
            .map(|p| {
                vec![
                    Cell::Int(p.partition.into()),
                    Cell::Int(p.committed),
                    Cell::Int(p.high),
                    Cell::Int(p.lag),
                ]
            })
            .collect(),
    });
    let when = |t: u32| {
        chrono::DateTime::from_timestamp(i64::from(t), 0)
            .filter(|_| t > 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into())
    };
    let book = state.book.current();
    for i in instances.iter().filter(|i| i.state != "stopped") {
        if i.price_book_version != book.version() {
            page.notes.push(format!(
                "Ingest instance {} prices with price book {}, the dashboard reads {}: one of them has not reloaded a change yet (ingest checks every 10 s).",
                i.instance_id, i.price_book_version, book.version()
            ));
        }
    }
    page.tables.push(Table {
        name: "instances",
        title: "Ingest instances heard from in the last day (UTC)".into(),
        columns: vec![
            "instance",
            "host",
            "pid",
            "state",
            "partitions",
            "last_commit",
            "last_heard",
            "lag",
            "price_book",
            "detail",
        ],
        rows: instances
            .iter()
            .map(|i| {
                vec![
                    Cell::Text(i.instance_id.clone()),
                    Cell::Text(i.host.clone()),
                    Cell::Int(i.pid.into()),
                    Cell::Text(i.state.clone()),
                    Cell::Text(
                        i.partitions
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    Cell::Text(when(i.last_commit_at)),
                    Cell::Text(when(i.at)),
                    Cell::Int(i.lag),
                    Cell::Text(i.price_book_version.clone()),
                    Cell::Text(i.detail.clone()),
                ]
            })
            .collect(),
    });
    page.tables.push(Table {
        name: "rejected_reasons",
        title: "Rejected events by reason".into(),
        columns: vec!["reason", "events"],
        rows: reasons
            .iter()
            .map(|r| vec![Cell::Text(r.reason.clone()), Cell::Int(r.n as i64)])
            .collect(),
    });
    page.tables.push(Table {
        name: "rejected_recent",
        title: "Latest rejected events".into(),
        columns: vec!["received_at", "partition", "offset", "reason", "detail"],
        rows: recent
            .iter()
            .map(|r| {
                vec![
                    Cell::Text(
                        chrono::DateTime::from_timestamp(r.received_at.into(), 0)
                            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                            .unwrap_or_default(),
                    ),
                    Cell::Int(r.kafka_partition.into()),
                    Cell::Link {
                        text: r.kafka_offset.to_string(),
                        href: format!(
                            "/pipeline/rejected/{}/{}",
                            r.kafka_partition, r.kafka_offset
                        ),
                    },
                    Cell::Text(r.reason.clone()),
                    Cell::Text(r.detail.clone()),
                ]
            })
            .collect(),
    });
    page.tables.push(Table {
        name: "unpriced_models",
        title: "Unpriced models".into(),
        columns: vec!["provider", "model", "events"],
        rows: unpriced
            .iter()
            .map(|u| {
                vec![
                    Cell::Text(u.provider.clone()),
                    Cell::Text(u.model.clone()),
                    Cell::Int(u.events),
                ]
            })
            .collect(),
    });
    respond(
        &page,
        &filters,
        uri.path(),
        &authed.principal,
        &authed.csrf,
        &state,
    )
    .await
}

pub async fn rejected(
    State(state): State<Arc<AppState>>,
    authed: Allowed<SeesPipeline>,
    Path((partition, offset)): Path<(i32, i64)>,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let r = state
        .store
        .rejected_message(&state.cfg.kafka.topic, partition, offset)
        .await?
        .ok_or(AppError::NotFound)?;
    let mut page = PageData::new(format!("Rejected message {partition}:{offset}"));
    page.figure("Reason", Cell::Text(r.reason));
    page.tables.push(Table {
        name: "message",
        title: "Message".into(),
        columns: vec!["detail", "payload"],
        rows: vec![vec![
            Cell::Text(r.detail),
            Cell::Text(String::from_utf8_lossy(&r.payload).into_owned()),
        ]],
    });
    respond(
        &page,
        &filters,
        uri.path(),
        &authed.principal,
        &authed.csrf,
        &state,
    )
    .await
}
