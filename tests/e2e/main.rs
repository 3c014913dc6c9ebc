//! End-to-end tests: the real `jobhost` binary on an ephemeral port, driven
//! over HTTP with a real client and SSE parser. One binary, a module per topic.

mod api_errors;
mod bench;
mod capabilities;
mod cli;
mod cluster;
mod concurrency;
mod crash;
mod jobs_api;
mod observability;
mod openapi;
mod plugin_limits;
mod polyglot;
mod queue_admin;
mod receiver;
mod scaffold;
mod schedules;
mod server;
mod streaming;
#[path = "../support/test_database.rs"]
mod test_database;
mod trust;
mod user_path;
mod webhooks;
