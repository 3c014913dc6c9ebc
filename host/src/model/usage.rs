//! What a phase run reports about itself: its progress and its resource use.

use serde::{Deserialize, Serialize};

/// A progress report: `percent` 0-100 and a short note (at most 256 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub percent: u8,
    pub note: String,
}

/// What a run used, stored with the phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResourceUsage {
    pub wall_ms: u64,
    /// Epoch ticks during which guest code was running: CPU time in units
    /// of the runtime's tick.
    pub epoch_ticks: u64,
    pub peak_memory_bytes: u64,
    pub output_bytes: u64,
    /// Bytes of `log()` messages plus stdout plus stderr, kept or not.
    pub log_bytes: u64,
    /// Requests sent through `wasi:http` (refused ones not counted).
    #[serde(default)]
    pub http_requests: u64,
    /// Bytes of request bodies sent, and of response bodies received.
    #[serde(default)]
    pub http_bytes_out: u64,
    #[serde(default)]
    pub http_bytes_in: u64,
    /// Time spent waiting for responses' headers, all requests together.
    #[serde(default)]
    pub http_wait_ms: u64,
}
