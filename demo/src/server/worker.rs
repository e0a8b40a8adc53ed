//! A worker's life after the fork: its application, then requests one at a time.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::{getppid, Pid};

use super::http;
use super::slots::{stamp, Slot};
use crate::app::App;
use crate::config::ServeConfig;

pub fn worker(
    config: &ServeConfig,
    slot: &Slot,
    listener: &TcpListener,
    app: Option<&Arc<App>>,
    start: Instant,
    master: Pid,
) -> Result<(), String> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(|error| error.to_string())?;
    if getppid() != master {
        return Err(String::from("the master died before this worker started"));
    }
    slot.busy_since.store(0, Ordering::Release);
    let built;
    let app = match app {
        Some(app) => &**app,
        None => {
            built = App::build(
                config.mode,
                &config.database,
                config.pool_size,
                config.table_mib,
                config.state_memory,
            )?;
            &built
        }
    };
    // One request at a time, like a gunicorn sync worker; each keep-alive connection has a
    // thread that waits for its next request.
    let serving = Mutex::new(());
    std::thread::scope(|scope| loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(format!("accept: {error}")),
        };
        let serving = &serving;
        scope.spawn(move || {
            // A client that gave up has closed its connection; nothing to do about it.
            let _ = http::serve_connection(stream, |path| {
                let _one_at_a_time = serving
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                slot.busy_since.store(stamp(start), Ordering::Release);
                let answer = answer(app, path);
                slot.served.fetch_add(1, Ordering::AcqRel);
                slot.busy_since.store(0, Ordering::Release);
                answer
            });
        });
    })
}

/// `GET /?n=<number>`: the application's answer, or an error naming this worker.
fn answer(app: &App, path: &str) -> (u16, String) {
    let n = path
        .split_once("n=")
        .and_then(|(_, rest)| rest.split('&').next())
        .and_then(|n| n.parse::<u64>().ok());
    match n.map(|n| app.handle(n)) {
        Some(Ok(body)) => (200, body),
        Some(Err(error)) => (500, format!("{error} pid={}\n", std::process::id())),
        None => (400, String::from("usage: GET /?n=<number>\n")),
    }
}
