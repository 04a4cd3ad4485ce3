//! The event contract v1 (docs/events.md), below everything that produces or consumes
//! events: the gateway (which publishes them), HTTP ingest (`/v1/usage-events`) and Kafka
//! ingest all use it alike.
//!
//! - `decode`: one message's bytes → a valid `UsageEvent`, or a rejection with a reason;
//!   the tag rules (`MAX_TAGS`, `MAX_TAG_KEY_LEN`, the gateway's `GROUP_TAG`);
//! - `normalize`: each provider's own usage object → canonical, disjoint token counts;
//! - `Status`: what became of a request (`domain::Status`, one type for every side).

pub mod decode;
pub mod normalize;

pub use crate::domain::Status;
pub use decode::{decode, DecodeOptions, RejectReason, Rejection, MAX_TAGS, MAX_TAG_KEY_LEN};

/// The tag the gateway sets, on every request made with a member's key, to the member's
/// group at that moment (over whatever the client sent): what dashboards and the usage
/// CSV group spend by.
pub const GROUP_TAG: &str = "group";
