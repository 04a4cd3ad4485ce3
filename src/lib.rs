//! tokentally: usage billing and spend analytics for LLM API gateways.

pub mod alerts;
pub mod app;
pub mod billing;
pub mod bills;
pub mod cli;
pub mod config;
pub mod contract;
pub mod domain;
pub mod emit;
pub mod format;
pub mod gateway;
pub mod ingest;
pub mod kafka;
pub mod keys;
pub mod limits;
pub mod people;
pub mod price;
pub mod report;
pub mod reprice;
pub mod secret;
pub mod shutdown;
pub mod simulate;
pub mod store;
pub mod web;
