//! Integration tests against the real broker (tansu or Kafka) and ClickHouse.
//! `scripts/test` starts both; each test gets a fresh database and topic.

mod alerts;
mod bills;
mod budgets;
mod cluster;
mod compose;
mod gateway;
mod guarantees;
mod harness;
mod invoices;
mod limits;
mod people;
mod pipeline;
mod web;
mod workload;
