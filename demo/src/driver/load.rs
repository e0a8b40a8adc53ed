//! The load: keep-alive clients spread evenly over a server's workers, then requests in
//! slices, the servers of a round taking turns slice by slice.
//!
//! Two choices keep the figures of one run close to those of the next:
//!
//! - **Connections spread evenly.** A worker serves one request at a time, and a keep-alive
//!   connection stays with the worker that accepted it. Clients that connect all at once let
//!   the first worker woken take several connections before the others wake (measured: in 8
//!   server starts no split of 8 connections over 4 workers was even, and in 2 one or two
//!   workers got none), so how many workers served at all, and the throughput, changed from
//!   run to run. The kernel hands connections to the workers waiting in `accept` in turn, so
//!   clients that connect one after the other, each sending its first request before the next
//!   connects, land one per worker in turn; a client whose first answer names a worker that
//!   has its share already connects again.
//! - **Servers in turns.** A machine's background load (another build, a database's own
//!   work) changes over seconds. The servers of a round run side by side and take turns of a
//!   slice each (A B B A A B …), so each server's figures come from the same stretch of time,
//!   and throughput is measured only in the slices, once every client is connected.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::client::{agent, request, Outcome, Tally, TIMED_OUT};
use crate::config::RunConfig;
use crate::progress::Progress;

/// Turns each server of a round takes at the load.
const SLICES: u64 = 8;

/// One server's part of a round's load.
pub struct Load<'a> {
    port: u16,
    workers: usize,
    /// Request numbers start here, a range of their own for every server of a run.
    base: u64,
    bar: &'a Progress,
    /// One keep-alive client per connection.
    clients: Vec<ureq::Agent>,
    /// Requests sent so far.
    pub sent: u64,
    pub tally: Tally,
    /// Right answers in the slices, and the time the slices took: the throughput.
    pub ok_in_slices: u64,
    pub time_in_slices: Duration,
    /// Each slice's right answers per second, in turn order.
    pub slice_req_per_s: Vec<f64>,
    /// Sending time so far, connecting included, against the load time limit.
    spent: Duration,
    timeouts_in_a_row: u64,
    /// Set once `2 × clients` requests in a row went unanswered: then nothing more is sent.
    pub stopped_answering: bool,
    /// How many of the clients' connections each worker took, most first, as far as the
    /// first answers told.
    pub connections_per_worker: Vec<usize>,
}

impl<'a> Load<'a> {
    pub fn new(port: u16, workers: usize, index: u64, bar: &'a Progress) -> Load<'a> {
        Load {
            port,
            workers,
            base: (index + 1) * 1_000_000_000_000,
            bar,
            clients: Vec::new(),
            sent: 0,
            tally: Tally::default(),
            ok_in_slices: 0,
            time_in_slices: Duration::ZERO,
            slice_req_per_s: Vec::new(),
            spent: Duration::ZERO,
            timeouts_in_a_row: 0,
            stopped_answering: false,
            connections_per_worker: Vec::new(),
        }
    }

    /// Right answers per second of the slices; 0 if none ran.
    pub fn req_per_s(&self) -> f64 {
        if self.time_in_slices.is_zero() {
            0.0
        } else {
            self.ok_in_slices as f64 / self.time_in_slices.as_secs_f64()
        }
    }

    fn may_send(&self, config: &RunConfig) -> bool {
        self.sent < config.requests
            && !self.stopped_answering
            && self.spent < config.load_time_limit
    }

    fn note_timeouts(&mut self, outcome: &Outcome, config: &RunConfig) {
        if matches!(outcome, Outcome::Failed(error) if error == TIMED_OUT) {
            self.timeouts_in_a_row += 1;
        } else {
            self.timeouts_in_a_row = 0;
        }
        if self.timeouts_in_a_row >= 2 * config.clients as u64 {
            self.stopped_answering = true;
        }
    }

    /// Opens the clients' connections one after the other, each with one request (counted
    /// like any other), until every worker holds its share, at most one more than another's.
    /// Once a request goes wrong the server is broken and how its connections spread no
    /// longer matters: the rest connect with their first request of the slices.
    fn connect(&mut self, config: &RunConfig) {
        let started = Instant::now();
        let share = config.clients.div_ceil(self.workers);
        let mut held: HashMap<u32, usize> = HashMap::new();
        // Every worker answering a connection of its own needs at most a few tries each; a
        // server that hands them out otherwise keeps what it gives after these.
        let mut tries_left = 4 * config.clients;
        while self.clients.len() < config.clients && self.may_send(config) {
            let client = agent(config.request_timeout, true);
            let sent = Instant::now();
            let outcome = request(&client, self.port, self.base + self.sent, config.table_mib);
            self.sent += 1;
            self.tally.record(sent, &outcome);
            self.note_timeouts(&outcome, config);
            self.bar.advance(1);
            let Outcome::Ok(answer) = outcome else {
                self.clients.push(client);
                break;
            };
            let count = held.entry(answer.pid).or_insert(0);
            if *count < share || tries_left == 0 {
                *count += 1;
                self.clients.push(client);
            } else {
                // Dropping the client closes its connection.
                tries_left -= 1;
            }
        }
        while self.clients.len() < config.clients {
            self.clients.push(agent(config.request_timeout, true));
        }
        self.spent += started.elapsed();
        self.connections_per_worker = held.into_values().collect();
        self.connections_per_worker
            .sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Sends `count` requests (fewer if the budget runs out) over every client at once.
    fn slice(&mut self, count: u64, config: &RunConfig) {
        if count == 0 || !self.may_send(config) {
            return;
        }
        let count = count.min(config.requests - self.sent);
        let first = self.base + self.sent;
        let next = AtomicU64::new(0);
        let timeouts_in_a_row = AtomicU64::new(self.timeouts_in_a_row);
        let unanswered_limit = 2 * config.clients as u64;
        let started = Instant::now();
        let deadline = started + config.load_time_limit.saturating_sub(self.spent);
        let (port, bar) = (self.port, self.bar);
        let tallies: Vec<Tally> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .clients
                .iter()
                .map(|client| {
                    let (next, timeouts_in_a_row) = (&next, &timeouts_in_a_row);
                    scope.spawn(move || {
                        let mut tally = Tally::default();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= count
                                || Instant::now() >= deadline
                                || timeouts_in_a_row.load(Ordering::Relaxed) >= unanswered_limit
                            {
                                break;
                            }
                            let sent = Instant::now();
                            let outcome = request(client, port, first + i, config.table_mib);
                            if matches!(&outcome, Outcome::Failed(error) if error == TIMED_OUT) {
                                timeouts_in_a_row.fetch_add(1, Ordering::Relaxed);
                            } else {
                                timeouts_in_a_row.store(0, Ordering::Relaxed);
                            }
                            tally.record(sent, &outcome);
                            bar.advance(1);
                        }
                        tally
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("client thread"))
                .collect()
        });
        let took = started.elapsed();
        self.spent += took;
        self.time_in_slices += took;
        self.timeouts_in_a_row = timeouts_in_a_row.into_inner();
        self.stopped_answering |= self.timeouts_in_a_row >= unanswered_limit;
        let ok: u64 = tallies.iter().map(|tally| tally.ok).sum();
        self.slice_req_per_s.push(ok as f64 / took.as_secs_f64());
        self.ok_in_slices += ok;
        for tally in tallies {
            self.sent += tally.latencies.len() as u64;
            self.tally.add(tally);
        }
    }
}

/// Runs the round's load: connects each server's clients, then the servers take turns, a
/// slice each, in the order given and then the reverse (A B B A A B …), until each has sent
/// its requests, met its time limit, or stopped answering.
pub fn run(loads: &mut [Load<'_>], config: &RunConfig) {
    for load in loads.iter_mut() {
        load.connect(config);
    }
    for turn in 0..SLICES {
        let order: Vec<usize> = if turn % 2 == 0 {
            (0..loads.len()).collect()
        } else {
            (0..loads.len()).rev().collect()
        };
        for at in order {
            let load = &mut loads[at];
            // What is left, shared by the turns left, so that the last turn sends the rest.
            let left = config.requests - load.sent.min(config.requests);
            let count = left.div_ceil(SLICES - turn);
            load.slice(count, config);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::app::{expected_label, table_len, table_value};

    const TABLE_MIB: usize = 1;

    /// A server that answers every request right; its i-th connection is served by "worker"
    /// `pids[i]` (from the start again once they run out), as if the kernel had handed the
    /// connections out that way. Each request's `mark` goes to `log`.
    fn fake_server(pids: Vec<u32>, mark: char, log: Arc<Mutex<Vec<char>>>) -> u16 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("a port");
        let port = listener.local_addr().expect("an address").port();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { continue };
                let pid = pids[i % pids.len()];
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let _ = crate::server::http::serve_connection(stream, |path| {
                        log.lock().unwrap().push(mark);
                        let n: u64 = path
                            .split_once("n=")
                            .and_then(|(_, n)| n.parse().ok())
                            .expect("a request number");
                        let value = table_value(n % table_len(TABLE_MIB));
                        (
                            200,
                            format!("n={n} label={} v={value} pid={pid}\n", expected_label(n)),
                        )
                    });
                });
            }
        });
        port
    }

    fn config(requests: u64) -> RunConfig {
        RunConfig {
            table_mib: TABLE_MIB,
            requests,
            ..RunConfig::for_tests()
        }
    }

    fn connect(pids: Vec<u32>, requests: u64) -> (Vec<usize>, u64, u64) {
        let bar = Progress::new(String::from("test"), requests);
        let port = fake_server(pids, 'a', Arc::default());
        let mut load = Load::new(port, 4, 0, &bar);
        load.connect(&config(requests));
        assert_eq!(load.clients.len(), 8);
        (load.connections_per_worker, load.sent, load.tally.ok)
    }

    /// Connections handed out the way a greedy first worker takes them: the clients that land
    /// on a worker holding its share (2 of 8 over 4) connect again.
    #[test]
    fn a_client_that_lands_on_a_worker_with_its_share_connects_again() {
        let pids = vec![1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 1];
        let (spread, sent, ok) = connect(pids, 100);
        assert_eq!(spread, [2, 2, 2, 2]);
        // Eleven connections, each with one request, counted like any other.
        assert_eq!((sent, ok), (11, 11));
    }

    /// A server that gives every connection to one worker is not tried forever: after four
    /// tries per client the clients keep what they get.
    #[test]
    fn the_tries_to_spread_the_connections_are_bounded() {
        let (spread, sent, _) = connect(vec![1], 100);
        assert_eq!(spread, [8]);
        assert_eq!(sent, 2 + 4 * 8 + 6);
    }

    /// Two servers take turns, a slice each, in the order A B B A A B …, each sending its own
    /// requests after its clients connected.
    #[test]
    fn servers_take_turns_in_alternating_order_and_send_every_request() {
        let log: Arc<Mutex<Vec<char>>> = Arc::default();
        let config = config(400);
        let bar = Progress::new(String::from("test"), 800);
        let mut loads = vec![
            Load::new(
                fake_server(vec![1, 2, 3, 4], 'a', Arc::clone(&log)),
                4,
                0,
                &bar,
            ),
            Load::new(
                fake_server(vec![5, 6, 7, 8], 'b', Arc::clone(&log)),
                4,
                1,
                &bar,
            ),
        ];
        run(&mut loads, &config);
        for load in &loads {
            assert_eq!((load.sent, load.tally.ok), (400, 400));
            assert_eq!(load.ok_in_slices, 400 - 8);
            assert_eq!(load.connections_per_worker, [2, 2, 2, 2]);
            assert!(load.req_per_s() > 0.0);
        }
        let mut turns: Vec<char> = log.lock().unwrap().clone();
        turns.dedup();
        // Connecting (a, b), then a | b b | a a | b b | … | a: the same server twice in a row
        // at every turn but the first.
        assert_eq!(turns.iter().collect::<String>(), "abababababa");
    }
}
