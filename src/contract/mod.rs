//! The event contract v1 (docs/events.md), below everything that produces or consumes
//! events: the gateway (which publishes them), HTTP ingest (`/v1/usage-events`) and Kafka
//! ingest all use it alike.
//!
//! - `decode`: one message's bytes → a valid `UsageEvent`, or a rejection with a reason;
//!   the tag rules (`MAX_TAGS`, `MAX_TAG_KEY_LEN`);
//! - `normalize`: each provider's own usage object → canonical, disjoint token counts;
//! - `Status`: what became of a request (`domain::Status`, one type for every side).

pub mod decode;
pub mod normalize;

pub use crate::domain::Status;
pub use decode::{decode, DecodeOptions, RejectReason, Rejection, MAX_TAGS, MAX_TAG_KEY_LEN};
