//! The load's HTTP client: one request and its outcome, and the tally of what a server's
//! clients saw.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::app::Answer;

/// The failure of a request that got no answer in time.
pub const TIMED_OUT: &str = "request timed out";

/// One HTTP request's outcome.
pub enum Outcome {
    Ok(Answer),
    Wrong,
    /// The worker answered with an error; the pid it named, if it did.
    ErrorAnswer {
        message: String,
        pid: Option<u32>,
    },
    /// No answer (a timeout, a closed connection).
    Failed(String),
}

/// An HTTP client; with `keep_alive`, it keeps its connection between requests.
pub fn agent(timeout: Duration, keep_alive: bool) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_idle_connections(if keep_alive { 4 } else { 0 })
        .max_idle_connections_per_host(if keep_alive { 4 } else { 0 })
        .build();
    config.into()
}

/// `GET /?n=<n>`, and whether the answer is the right one.
pub fn request(agent: &ureq::Agent, port: u16, n: u64, table_mib: usize) -> Outcome {
    let response = agent.get(&format!("http://127.0.0.1:{port}/?n={n}")).call();
    let mut response = match response {
        Ok(response) => response,
        Err(ureq::Error::Timeout(_)) => return Outcome::Failed(String::from(TIMED_OUT)),
        Err(error) => return Outcome::Failed(format!("http: {error}")),
    };
    let status = response.status().as_u16();
    let body = match response.body_mut().read_to_string() {
        Ok(body) => body,
        Err(ureq::Error::Timeout(_)) => return Outcome::Failed(String::from(TIMED_OUT)),
        Err(error) => return Outcome::Failed(format!("http: {error}")),
    };
    if status != 200 {
        // "query: <driver error> pid=123": keep the error, drop the pid, so messages group.
        let (message, pid) = match body.trim().rsplit_once(" pid=") {
            Some((message, pid)) => (message, pid.parse().ok()),
            None => (body.trim(), None),
        };
        // On one line, although drivers (libpq) spread their messages over several.
        let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
        return Outcome::ErrorAnswer {
            message: format!("HTTP {status}: {message}"),
            pid,
        };
    }
    match Answer::parse(&body) {
        Some(answer) if answer.is_for(n, table_mib) => Outcome::Ok(answer),
        _ => Outcome::Wrong,
    }
}

/// What a server's clients saw.
#[derive(Default)]
pub struct Tally {
    /// Every sent request's latency.
    pub latencies: Vec<Duration>,
    pub ok: u64,
    pub wrong: u64,
    /// Each error, with when the request that met it was sent.
    pub errors: Vec<(Instant, String)>,
}

impl Tally {
    pub fn record(&mut self, sent: Instant, outcome: &Outcome) {
        self.latencies.push(sent.elapsed());
        match outcome {
            Outcome::Ok(_) => self.ok += 1,
            Outcome::Wrong => self.wrong += 1,
            Outcome::ErrorAnswer { message, .. } | Outcome::Failed(message) => {
                self.errors.push((sent, message.clone()));
            }
        }
    }

    pub fn add(&mut self, other: Tally) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.wrong += other.wrong;
        self.errors.extend(other.errors);
    }

    /// The error messages, each with its count, in the order they first appeared.
    pub fn errors_in_order(&self) -> Vec<(String, u64)> {
        let mut errors: BTreeMap<&str, (u64, Instant)> = BTreeMap::new();
        for (at, message) in &self.errors {
            let (count, first) = errors.entry(message).or_insert((0, *at));
            *count += 1;
            *first = (*first).min(*at);
        }
        let mut errors: Vec<(&str, (u64, Instant))> = errors.into_iter().collect();
        errors.sort_by_key(|(_, (_, first))| *first);
        errors
            .into_iter()
            .map(|(message, (count, _))| (message.to_owned(), count))
            .collect()
    }

    /// The 99th percentile of the latencies, in ms; 0 without any.
    pub fn p99_ms(&self) -> f64 {
        let mut latencies = self.latencies.clone();
        latencies.sort();
        if latencies.is_empty() {
            return 0.0;
        }
        let rank = ((latencies.len() as f64) * 0.99).ceil() as usize;
        latencies[rank.clamp(1, latencies.len()) - 1].as_secs_f64() * 1000.0
    }
}
