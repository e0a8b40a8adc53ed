//! The `--json` document: the run's settings and machine, the verdict, each mode's combined
//! figures and each round's own.

use serde_json::{json, Value};

use crate::config::RunConfig;
use crate::results::ModeResult;
use crate::verdict::Verdict;

/// The JSON document: the run's settings, one object per mode under `"modes"` (each round
/// combined), and each round's main figures under `"each_round"`.
pub fn json(
    results: &[ModeResult],
    runs: &[Vec<ModeResult>],
    config: &RunConfig,
    machine: &Value,
    verdict: &Verdict,
) -> Value {
    let modes: Vec<Value> = results
        .iter()
        .map(|result| {
            json!({
                "mode": result.mode,
                "requests_ok": result.requests_ok,
                "failed": result.failed,
                "not_sent": result.not_sent,
                "server_stopped_answering": result.server_stopped_answering,
                "wrong_answers": result.wrong_answers,
                "hung_workers": result.hung_workers,
                "req_per_s": result.req_per_s,
                "p99_latency_ms": result.p99_latency_ms,
                "cpu_seconds_starting": result.cpu_seconds_starting,
                "workers_serving_at_start": result.workers_serving_at_start,
                "respawn_time_ms": result.respawn_time_ms,
                "respawn_forked_ms": result.respawn_forked_ms,
                "total_pss_mib": result.total_pss_mib,
                "pss_ratio_to_lazy": result.pss_ratio_to_lazy,
                "workers": result.workers,
                "errors": result.errors.iter().map(|(message, count)| json!({"message": message, "count": count})).collect::<Vec<_>>(),
                "server_error": result.server_error,
            })
        })
        .collect();
    json!({
        "database": config.database.describe(),
        "workers": config.workers,
        "state_mib": config.table_mib,
        "state_memory": config.state_memory.name(),
        "pool_size": config.pool_size,
        "requests": config.requests,
        "clients": config.clients,
        "request_timeout_ms": config.request_timeout.as_millis() as u64,
        "machine": machine,
        "verdict": verdict.json(),
        "rounds": runs.iter().map(Vec::len).max().unwrap_or(0),
        "modes": modes,
        "each_round": runs
            .iter()
            .map(|rounds| {
                rounds
                    .iter()
                    .map(|round| {
                        json!({
                            "mode": round.mode,
                            "requests_ok": round.requests_ok,
                            "req_per_s": round.req_per_s,
                            "slice_req_per_s": round.slice_req_per_s,
                            "cpu_seconds_starting": round.cpu_seconds_starting,
                            "respawn_time_ms": round.respawn_time_ms,
                            "total_pss_mib": round.total_pss_mib,
                            "connections_per_worker": round.connections_per_worker,
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>(),
    })
}
