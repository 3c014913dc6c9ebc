//! jobhost: a job platform whose job phases are sandboxed WebAssembly
//! components.
//!
//! - [`model`] is what every other module shares and depends on nothing:
//!   jobs, phases and their states, typed events, webhook status.
//! - [`runtime`] loads plugin components against the WIT contract in `wit/`
//!   and runs one phase at a time in a fresh, capped sandbox.
//! - [`plugins`] keeps versioned plugins: validated on upload, stored,
//!   loaded once per version, hot-swapped by moving the active version.
//! - [`queue`] runs multi-phase jobs, deciding every outcome (retries,
//!   cancellation, recovery, retention, shutdown); [`storage`] records them
//!   behind one interface, with SQLite as its embedded backend.
//! - [`webhooks`] delivers signed, durable webhooks when jobs end.
//! - [`events`] fans the event log out to in-process subscribers.
//! - [`http`] is the API (axum) and [`app`] wires everything for `jobhost serve`.
//! - [`cli`] is the `jobhost` command line (its benchmarks live in the binary).

pub mod app;
pub mod cli;
pub mod config;
pub mod data_dir;
pub mod events;
pub mod http;
pub mod metrics;
pub mod model;
pub mod outbound;
pub mod plugins;
pub mod queue;
pub mod runtime;
pub mod storage;
pub mod tls;
pub mod webhooks;
