//! Limits: how much an institution, a user or an API key may spend (USD), request or use
//! (tokens) per day, week or month, and requests/tokens per minute per key.
//!
//! Everything about limits lives here, in layers:
//! - `types`: the domain (a limit, what it counts, its period in the institution's zone);
//! - `estimate`: the worst case of one request, before it is forwarded (pure);
//! - `budget`: admission and settlement on one instance — reserve the worst case, settle
//!   to the priced cost — and the share rule that keeps several instances under a limit
//!   when they cannot share a store (`share`, pure);
//! - `shared`: the same decisions made exact across instances through one atomic store
//!   (Redis/Valkey), with the budget as the fallback when it is unreachable;
//! - `rate`: requests and tokens per minute of a key (sliding minute);
//! - `gate`: one decision for a request (rate and limits; shared store or this instance);
//! - `refresh`: the loop that keeps limits, stored usage and the other instances' holds
//!   current on every gateway instance;
//! - `service`: limits as operators set, remove and read them (CLI, dashboard, alerts).
//!
//! Row mapping stays in `store::limits`; the pages and commands are `web::limits` and
//! `cli::limits`.

pub mod budget;
pub mod estimate;
pub mod gate;
pub mod rate;
pub mod refresh;
pub mod rows;
pub mod service;
pub mod share;
pub mod shared;
pub mod types;

pub use service::{configured, current, remove, set, standings, Standing};
pub use types::{
    Amounts, Derived, DerivedSource, Hold, Limit, LimitMode, LimitPeriod, LimitScope, Metric,
    SubjectUsage,
};
