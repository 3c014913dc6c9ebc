//! jobhost: a job platform whose job phases are sandboxed WebAssembly
//! components.
//!
//! - [`runtime`] loads plugin components against the WIT contract in `wit/`
//!   and runs one phase at a time in a fresh, capped sandbox.
//! - [`cli`] is the `jobhost` command line; [`bench`] its benchmarks.

pub mod bench;
pub mod cli;
pub mod runtime;
