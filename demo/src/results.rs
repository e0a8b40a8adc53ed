//! What a run measured: one mode's figures for one round, and a mode's rounds combined.

/// Everything measured for one mode; the table's columns.
#[derive(Clone, Debug, Default)]
pub struct ModeResult {
    pub mode: &'static str,
    pub workers: usize,
    pub requests_ok: u64,
    /// Requests sent that got an error or no answer in time.
    pub failed: u64,
    /// Requests not sent: the load time limit passed, or the server stopped answering.
    pub not_sent: u64,
    /// Whether the load stopped because every request in a row timed out.
    pub server_stopped_answering: bool,
    pub wrong_answers: u64,
    pub hung_workers: usize,
    pub req_per_s: f64,
    /// Each slice's req/s, in turn order (see `load`).
    pub slice_req_per_s: Vec<f64>,
    pub p99_latency_ms: f64,
    pub cpu_seconds_starting: f64,
    /// Workers that answered before the start-up deadline (all of them, normally).
    pub workers_serving_at_start: usize,
    pub respawn_time_ms: Option<f64>,
    /// When the master had forked the replacement (its `spawned` line arrived), for context.
    pub respawn_forked_ms: Option<f64>,
    pub total_pss_mib: f64,
    pub pss_ratio_to_lazy: Option<f64>,
    /// How many of the load's connections each worker took, most first (see `load`).
    pub connections_per_worker: Vec<usize>,
    /// The error answers, with counts, in the order they first appeared.
    pub errors: Vec<(String, u64)>,
    /// Set when the server could not be run at all.
    pub server_error: Option<String>,
}
