//! What became of a request: the `status` of an event (contract v1). The gateway writes
//! the known ones; other producers may send their own, kept as given.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Status {
    /// The provider answered with success and the answer reached its end.
    #[default]
    Ok,
    /// The provider answered with an error status, or its answer broke off.
    UpstreamError,
    /// The provider could not be reached or did not answer in time (nothing served).
    UpstreamUnreachable,
    /// The client went away before the answer ended.
    ClientCancelled,
    RejectedRateLimit,
    RejectedModel,
    /// A limit in mode `block` would have been passed.
    RejectedBudget,
    BlockedModeration,
    /// The key is paused by its institution's spend-spike brake (`on_spike`).
    RejectedPaused,
    /// Any other status a producer sent (kept as given).
    Other(String),
}

const KNOWN: [(Status, &str); 9] = [
    (Status::Ok, "ok"),
    (Status::UpstreamError, "upstream_error"),
    (Status::UpstreamUnreachable, "upstream_unreachable"),
    (Status::ClientCancelled, "client_cancelled"),
    (Status::RejectedRateLimit, "rejected_rate_limit"),
    (Status::RejectedModel, "rejected_model"),
    (Status::RejectedBudget, "rejected_budget"),
    (Status::BlockedModeration, "blocked_moderation"),
    (Status::RejectedPaused, "rejected_paused"),
];

impl Status {
    /// The status a producer sent (none: empty, stored as given).
    pub fn parse(s: &str) -> Self {
        KNOWN
            .iter()
            .find(|(_, name)| *name == s)
            .map(|(st, _)| st.clone())
            .unwrap_or_else(|| Status::Other(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Status::Other(s) => s,
            known => KNOWN
                .iter()
                .find(|(st, _)| st == known)
                .map(|(_, name)| *name)
                .expect("every known status is listed"),
        }
    }

    /// Whether the request reached a provider. A request the gateway refused (rate
    /// limit, moderation, a model the key may not use) has status `rejected_…` or
    /// `blocked_…`, one whose provider could not be reached `upstream_unreachable`: it
    /// is recorded, with zero tokens, but never charged a per-request fee, and does not
    /// count against a requests limit.
    pub fn was_served(&self) -> bool {
        let s = self.as_str();
        !(s.starts_with("rejected_") || s.starts_with("blocked_") || s == "upstream_unreachable")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Status {
    fn from(s: &str) -> Self {
        Status::parse(s)
    }
}

impl serde::Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for Status {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_unknown_ones_are_kept() {
        for (st, name) in KNOWN {
            assert_eq!(Status::parse(name), st);
            assert_eq!(st.as_str(), name);
        }
        assert_eq!(Status::parse("").as_str(), "");
        assert!(Status::parse("").was_served());
        assert_eq!(Status::parse("partial").as_str(), "partial");
        assert!(!Status::parse("rejected_something_new").was_served());
        assert!(Status::parse("partial").was_served());
        assert!(!Status::UpstreamUnreachable.was_served());
    }
}
