//! A query assembled from fixed text and bound values. Values never enter the text: each
//! is a `?` bound by the `clickhouse` crate (escaped on the client, which is what works on
//! 18.16), so a value with `?`, quotes or `?fields` in it is just a value.

use clickhouse::query::Query;
use clickhouse::Client;

/// A bound value.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Str(String),
    Int(i64),
    /// A list, for `x IN (SELECT arrayJoin(?))`.
    Strs(Vec<String>),
}

/// SQL text plus its arguments in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sql {
    text: String,
    args: Vec<Arg>,
}

impl Sql {
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            args: Vec::new(),
        }
    }

    /// Appends fixed text (never a value).
    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Appends `text` whose `?` placeholders take `args`, in order.
    pub fn bind(&mut self, text: &str, args: impl IntoIterator<Item = Arg>) -> &mut Self {
        self.text.push_str(text);
        self.args.extend(args);
        debug_assert_eq!(
            self.text.matches('?').count() - self.text.matches("?fields").count(),
            self.args.len(),
            "placeholders and arguments disagree in: {}",
            self.text
        );
        self
    }

    /// Appends another fragment.
    pub fn append(&mut self, other: Sql) -> &mut Self {
        self.text.push_str(&other.text);
        self.args.extend(other.args);
        self
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn args(&self) -> &[Arg] {
        &self.args
    }

    /// The query, ready to fetch or execute.
    pub fn query(&self, client: &Client) -> Query {
        let mut q = client.query(&self.text);
        for a in &self.args {
            q = match a {
                Arg::Str(s) => q.bind(s.as_str()),
                Arg::Int(i) => q.bind(*i),
                Arg::Strs(v) => q.bind(v.as_slice()),
            };
        }
        q
    }
}

pub fn s(v: impl Into<String>) -> Arg {
    Arg::Str(v.into())
}

pub fn i(v: i64) -> Arg {
    Arg::Int(v)
}
