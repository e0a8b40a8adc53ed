//! What a run measured: one mode's figures for one round, and a mode's rounds combined.

use crate::median::median;

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
    /// Each slice's req/s, in turn order (see `driver::load`).
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
    /// How many of the load's connections each worker took, most first (see `driver::load`).
    pub connections_per_worker: Vec<usize>,
    /// The error answers, with counts, in the order they first appeared.
    pub errors: Vec<(String, u64)>,
    /// Set when the server could not be run at all.
    pub server_error: Option<String>,
}

/// One mode's rounds as one result: the median of every figure, the total of every count, the
/// most hung workers and the fewest serving at start any round saw. One round is itself.
pub fn combine(rounds: &[ModeResult]) -> ModeResult {
    if let [only] = rounds {
        return only.clone();
    }
    let median_of = |value: fn(&ModeResult) -> Option<f64>| {
        median(&rounds.iter().filter_map(value).collect::<Vec<f64>>())
    };
    let mut errors: Vec<(String, u64)> = Vec::new();
    for (message, count) in rounds.iter().flat_map(|round| &round.errors) {
        match errors.iter_mut().find(|(seen, _)| seen == message) {
            Some((_, total)) => *total += count,
            None => errors.push((message.clone(), *count)),
        }
    }
    errors.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    ModeResult {
        mode: rounds[0].mode,
        workers: rounds[0].workers,
        requests_ok: rounds.iter().map(|round| round.requests_ok).sum(),
        failed: rounds.iter().map(|round| round.failed).sum(),
        not_sent: rounds.iter().map(|round| round.not_sent).sum(),
        wrong_answers: rounds.iter().map(|round| round.wrong_answers).sum(),
        hung_workers: rounds
            .iter()
            .map(|round| round.hung_workers)
            .max()
            .unwrap_or(0),
        req_per_s: median_of(|round| Some(round.req_per_s)).unwrap_or(0.0),
        // Each round's own; see `each_round` in the JSON.
        slice_req_per_s: Vec::new(),
        p99_latency_ms: median_of(|round| Some(round.p99_latency_ms)).unwrap_or(0.0),
        cpu_seconds_starting: median_of(|round| Some(round.cpu_seconds_starting)).unwrap_or(0.0),
        workers_serving_at_start: rounds
            .iter()
            .map(|round| round.workers_serving_at_start)
            .min()
            .unwrap_or(0),
        respawn_time_ms: median_of(|round| round.respawn_time_ms),
        respawn_forked_ms: median_of(|round| round.respawn_forked_ms),
        total_pss_mib: median_of(|round| Some(round.total_pss_mib)).unwrap_or(0.0),
        pss_ratio_to_lazy: None,
        // Each round's own; see `each_round` in the JSON.
        connections_per_worker: Vec::new(),
        errors,
        server_error: rounds.iter().find_map(|round| round.server_error.clone()),
        server_stopped_answering: rounds.iter().any(|round| round.server_stopped_answering),
    }
}
