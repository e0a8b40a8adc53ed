//! The Python extension example (`examples/python-extension`: a PyO3 module whose pool is a
//! module global built at import, and a WSGI app on it) served by uWSGI and gunicorn, the
//! pre-forking servers whose masters import the app before forking their workers.
//!
//! Each case starts a real server on a free loopback port, sends it 8 clients × 500 requests,
//! each with its own token that PostgreSQL must echo back (checked by the app and again here),
//! then kills the server's whole process group and reaps every process in it. Over TLS
//! (`sslmode=prefer`) and with `sslmode=disable`:
//! - uWSGI's default (eager) `--master --processes 4` and `gunicorn --preload --workers 4`:
//!   with `r2d2::Pool` the workers must fail (the cases assert it, so the scenario is real),
//!   with `forksafe_pool::Pool` every request is answered right;
//! - uWSGI `--lazy-apps` with r2d2, the usual cure, as the control;
//! - uWSGI with `--threads 4`, and with workers recycled under load by `--max-requests`.
//!
//! Nothing can hang the suite: every request has a timeout, the load and the server's start
//! have deadlines, and this binary is the subreaper of the servers it starts, so the workers
//! of a killed master are reaped here too.
//!
//! Needs the virtual environment `scripts/test` makes (uWSGI, gunicorn and the example module
//! built by maturin), at `target/python-venv` or `FORKSAFE_PYTHON_VENV`, and PostgreSQL at
//! `FORKSAFE_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`). Without them the
//! binary prints why and skips, unless `CI` is set: then it fails.

#[macro_use]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use support::runner::{require_server, run_cases, Check};

const WORKERS: usize = 4;
const CLIENTS: usize = 8;
const REQUESTS_PER_CLIENT: usize = 500;
/// Longer than the example pool's 5 s `connection_timeout`, so a worker that waits for a
/// connection answers with r2d2's error before the client gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Importing the app, building its pool and forking the workers, on a busy machine.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// The whole load: 4000 requests take a few seconds when they are answered.
const LOAD_DEADLINE: Duration = Duration::from_secs(120);
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// A server expected to fail has shown it once this many requests failed: the load stops
/// there rather than waiting out every remaining request's timeout.
const FAILURES_ENOUGH: usize = 8;
/// `--max-requests` in the recycling case: every worker is replaced several times.
const MAX_REQUESTS: usize = 150;

/// How the pool reaches PostgreSQL.
#[derive(Clone, Copy, Debug)]
enum Transport {
    /// libpq's default `sslmode=prefer`, which negotiates TLS with this server.
    Tls,
    Plain,
}

impl Transport {
    fn url(self) -> String {
        let url = std::env::var("FORKSAFE_PG_URL")
            .ok()
            .filter(|url| !url.is_empty())
            .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"));
        let separator = if url.contains('?') { '&' } else { '?' };
        match self {
            Transport::Tls => format!("{url}{separator}sslmode=prefer"),
            Transport::Plain => format!("{url}{separator}sslmode=disable"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Plain => "plain",
        }
    }
}

/// The pool type the example module builds at import (`POOLED_ECHO_POOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolKind {
    R2d2,
    ForkSafe,
}

impl PoolKind {
    fn name(self) -> &'static str {
        match self {
            PoolKind::R2d2 => "r2d2",
            PoolKind::ForkSafe => "forksafe",
        }
    }
}

/// A server and the way it loads the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    /// uWSGI's default: the master imports the app, then forks `--processes 4`.
    UwsgiEager,
    /// uWSGI `--lazy-apps`: each worker imports the app after the fork.
    UwsgiLazy,
    /// Eager, each worker with `--threads 4`.
    UwsgiThreads,
    /// Eager, workers replaced under load by `--max-requests`.
    UwsgiRecycling,
    /// `gunicorn --preload --workers 4`, sync workers.
    GunicornPreload,
}

/// Where the tools are: the virtual environment and the example's directory (`app.py`).
struct Tools {
    venv: PathBuf,
    example: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let venv = std::env::var_os("FORKSAFE_PYTHON_VENV")
            .map_or_else(|| root.join("target/python-venv"), PathBuf::from);
        let tools = Tools {
            venv,
            example: root.join("examples/python-extension"),
        };
        for program in ["python", "uwsgi", "gunicorn"] {
            let path = tools.bin(program);
            if !path.exists() {
                return Err(format!("{} is missing", path.display()));
            }
        }
        let import = Command::new(tools.bin("python"))
            .args(["-c", "import pooled_echo"])
            .env("DATABASE_URL", Transport::Plain.url())
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("running {}: {error}", tools.bin("python").display()))?;
        if !import.status.success() {
            return Err(format!(
                "the example module does not import ({}): {}",
                import.status,
                String::from_utf8_lossy(&import.stderr).trim()
            ));
        }
        Ok(tools)
    }

    fn bin(&self, program: &str) -> PathBuf {
        self.venv.join("bin").join(program)
    }

    fn command(&self, server: Server, port: u16) -> Command {
        let address = format!("127.0.0.1:{port}");
        if server == Server::GunicornPreload {
            let mut command = Command::new(self.bin("gunicorn"));
            command
                .args(["--preload", "--workers", "4", "--worker-class", "sync"])
                .args(["--bind", &address, "--chdir"])
                .arg(&self.example)
                .arg("app:application");
            return command;
        }
        let mut command = Command::new(self.bin("uwsgi"));
        command
            .args(["--master", "--processes", "4", "--http-socket", &address])
            .args(["--need-app", "--no-orphans", "--disable-logging", "--home"])
            .arg(&self.venv)
            .arg("--wsgi-file")
            .arg(self.example.join("app.py"));
        match server {
            Server::UwsgiLazy => {
                command.arg("--lazy-apps");
            }
            Server::UwsgiThreads => {
                command.args(["--threads", "4"]);
            }
            Server::UwsgiRecycling => {
                // Without `--min-worker-lifetime 0` uWSGI lets a worker live 10 s whatever
                // its request count.
                let max_requests = MAX_REQUESTS.to_string();
                command.args([
                    "--max-requests",
                    &max_requests,
                    "--min-worker-lifetime",
                    "0",
                ]);
            }
            Server::UwsgiEager | Server::GunicornPreload => {}
        }
        command
    }
}

/// A server process group: started with its master as the leader, ended by killing the group.
struct RunningServer {
    master: Pid,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
    stopped: bool,
}

impl RunningServer {
    fn start(mut command: Command) -> Result<RunningServer, String> {
        let log_dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        let log = log_dir.path().join("server.log");
        let output = File::create(&log).map_err(|error| error.to_string())?;
        let errors = output.try_clone().map_err(|error| error.to_string())?;
        // SAFETY: the closure runs in the forked child before exec and only makes the
        // async-signal-safe `prctl` system call: it touches no lock and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                // Should this test process die without stopping the server (killed, say),
                // the master dies with it, and its workers follow (`--no-orphans`; gunicorn's
                // workers exit when their master is gone).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .spawn()
            .map_err(|error| format!("starting {command:?}: {error}"))?;
        Ok(RunningServer {
            master: Pid::from_raw(child.id() as i32),
            log,
            _log_dir: log_dir,
            stopped: false,
        })
    }

    /// The last lines the server printed, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n    ")
    }

    /// Fails if the master has exited.
    fn check_running(&self) -> Check {
        match waitpid(self.master, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => Ok(()),
            ended => Err(format!(
                "the server ended early ({ended:?}); its log ends:\n    {}",
                self.log_tail()
            )),
        }
    }

    /// Kills every process of the group and reaps them all (the master's workers are ours to
    /// reap once it is gone: this process is a subreaper), or fails after `STOP_DEADLINE`.
    fn stop(&mut self) -> Check {
        self.stopped = true;
        match killpg(self.master, Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => return Err(format!("killing the server group: {error}")),
        }
        let group = Pid::from_raw(-self.master.as_raw());
        let started = Instant::now();
        loop {
            match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    ensure!(
                        started.elapsed() < STOP_DEADLINE,
                        "server processes still alive {STOP_DEADLINE:?} after SIGKILL"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(_) => {}
                Err(Errno::ECHILD) => break,
                Err(error) => return Err(format!("reaping the server group: {error}")),
            }
        }
        ensure!(
            kill(group, None) == Err(Errno::ESRCH),
            "a process of the server group {} outlived it",
            self.master
        );
        Ok(())
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if !self.stopped {
            if let Err(message) = self.stop() {
                eprintln!("{message}");
            }
        }
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
    Ok(listener
        .local_addr()
        .map_err(|error| error.to_string())?
        .port())
}

/// A right answer: the worker that gave it, the PostgreSQL session that echoed the token and
/// whether that session used TLS.
#[derive(Debug)]
struct Answer {
    worker: u32,
    backend: u32,
    tls: bool,
}

/// Sends `token`; a right answer, or what went wrong.
fn request(port: u16, token: &str) -> Result<Answer, String> {
    let (status, body) = http_get(port, &format!("/?token={token}"))?;
    let body = body.trim();
    if status != 200 {
        return Err(format!("HTTP {status}: {body}"));
    }
    parse_answer(body, token).ok_or_else(|| format!("wrong answer to {token}: {body}"))
}

/// One HTTP/1.0 GET on a new connection (the server closes it after the answer, and hands the
/// next connection to any worker), all of it within `REQUEST_TIMEOUT`: the status and body.
/// Plain std I/O, cheap enough that the clients never slow down the servers they measure.
fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let timed_out = || format!("no answer within {REQUEST_TIMEOUT:?}");
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, REQUEST_TIMEOUT)
        .map_err(|error| format!("connect: {error}"))?;
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"))
        .map_err(|error| format!("send: {error}"))?;
    let mut response = Vec::new();
    let mut buffer = [0; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|error| error.to_string())?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => response.extend_from_slice(&buffer[..read]),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(timed_out())
            }
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(format!("receive: {error}")),
        }
    }
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {response:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no HTTP status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// `ok <token> worker=<pid> backend=<pid> tls=<True|False> pool=<kind>`, for this `token`.
fn parse_answer(body: &str, token: &str) -> Option<Answer> {
    let mut words = body.split(' ');
    if words.next()? != "ok" || words.next()? != token {
        return None;
    }
    let mut fields = BTreeMap::new();
    for word in words {
        let (key, value) = word.split_once('=')?;
        fields.insert(key, value);
    }
    Some(Answer {
        worker: fields.get("worker")?.parse().ok()?,
        backend: fields.get("backend")?.parse().ok()?,
        tls: match *fields.get("tls")? {
            "True" => true,
            "False" => false,
            _ => return None,
        },
    })
}

/// Waits until the server answers HTTP at all (any status: a failing pool still answers).
fn wait_until_listening(server: &RunningServer, port: u16) -> Check {
    let started = Instant::now();
    loop {
        server.check_running()?;
        match http_get(port, "/?token=ready") {
            Ok(_) => return Ok(()),
            Err(error) => ensure!(
                started.elapsed() < START_DEADLINE,
                "no HTTP answer within {START_DEADLINE:?} (last: {error}); the log ends:\n    {}",
                server.log_tail()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the load saw.
#[derive(Default)]
struct Load {
    answers: Vec<Answer>,
    /// Every failed request's message, in the order they came.
    failures: Vec<String>,
    unsent: usize,
    elapsed: Duration,
}

impl Load {
    fn workers(&self) -> BTreeSet<u32> {
        self.answers.iter().map(|answer| answer.worker).collect()
    }

    /// The first `count` distinct failure messages, with how often each came.
    fn first_failures(&self, count: usize) -> String {
        let mut seen: Vec<(&str, usize)> = Vec::new();
        for failure in &self.failures {
            match seen.iter_mut().find(|(message, _)| message == failure) {
                Some((_, times)) => *times += 1,
                None => seen.push((failure, 1)),
            }
        }
        seen.iter()
            .take(count)
            .map(|(message, times)| format!("{times}× {message}"))
            .collect::<Vec<_>>()
            .join("\n    ")
    }
}

/// `CLIENTS` threads send `REQUESTS_PER_CLIENT` requests each, every token unique; stops early
/// after `stop_after_failures` failures, or when `LOAD_DEADLINE` passes.
fn run_load(port: u16, tag: &str, stop_after_failures: Option<usize>) -> Load {
    let started = Instant::now();
    let failures = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let load = Mutex::new(Load::default());
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let (failures, stop, load) = (&failures, &stop, &load);
            scope.spawn(move || {
                let mut answers = Vec::new();
                let mut sent = 0;
                for n in 0..REQUESTS_PER_CLIENT {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_DEADLINE {
                        break;
                    }
                    sent += 1;
                    let token = format!("{tag}-{}-{client}-{n}", std::process::id());
                    match request(port, &token) {
                        Ok(answer) => answers.push(answer),
                        Err(message) => {
                            let failed = failures.fetch_add(1, Ordering::Relaxed) + 1;
                            if stop_after_failures.is_some_and(|enough| failed >= enough) {
                                stop.store(true, Ordering::Relaxed);
                            }
                            // Tokens differ per request; keep messages comparable, and
                            // libpq's multi-line messages on one line.
                            let message = message.replace(&token, "<token>");
                            let message = message.split_whitespace().collect::<Vec<_>>().join(" ");
                            load.lock().unwrap().failures.push(message);
                        }
                    }
                }
                let mut load = load.lock().unwrap();
                load.answers.append(&mut answers);
                load.unsent += REQUESTS_PER_CLIENT - sent;
            });
        }
    });
    let mut load = load.into_inner().unwrap();
    load.elapsed = started.elapsed();
    load
}

/// One scenario: a server, a pool type, a transport, and whether the workers must fail.
struct Scenario {
    server: Server,
    pool: PoolKind,
    transport: Transport,
    must_fail: bool,
}

impl Scenario {
    fn name(&self) -> String {
        let server = match self.server {
            Server::UwsgiEager => "uwsgi_eager",
            Server::UwsgiLazy => "uwsgi_lazy_apps",
            Server::UwsgiThreads => "uwsgi_threads_4",
            Server::UwsgiRecycling => "uwsgi_max_requests",
            Server::GunicornPreload => "gunicorn_preload",
        };
        let outcome = if self.must_fail {
            "workers_fail"
        } else {
            "every_answer_right"
        };
        format!(
            "{}_{server}_{}_{outcome}",
            self.transport.name(),
            self.pool.name()
        )
    }

    fn run(&self, tools: &Tools) -> Check {
        let port = free_port()?;
        let mut command = tools.command(self.server, port);
        command
            .env("DATABASE_URL", self.transport.url())
            .env("POOLED_ECHO_POOL", self.pool.name())
            .env("PYTHONUNBUFFERED", "1");
        let mut server = RunningServer::start(command)?;
        let checked = wait_until_listening(&server, port).and_then(|()| {
            let load = run_load(
                port,
                &self.name(),
                self.must_fail.then_some(FAILURES_ENOUGH),
            );
            server.check_running()?;
            self.check(&load)
        });
        let stopped = server.stop();
        checked.and(stopped)
    }

    fn check(&self, load: &Load) -> Check {
        if self.must_fail {
            ensure!(
                !load.failures.is_empty(),
                "{} requests all answered right: the workers did not share the master's \
                 connections (workers seen: {:?})",
                load.answers.len(),
                load.workers()
            );
            println!(
                "  {} right answers, then {} failures; the first:\n    {}",
                load.answers.len(),
                load.failures.len(),
                load.first_failures(5)
            );
            return Ok(());
        }
        ensure!(
            load.failures.is_empty() && load.unsent == 0,
            "{} failed, {} unsent (load deadline {LOAD_DEADLINE:?}), {} right; the first \
             failures:\n    {}",
            load.failures.len(),
            load.unsent,
            load.answers.len(),
            load.first_failures(5)
        );
        ensure!(
            load.answers.len() == CLIENTS * REQUESTS_PER_CLIENT,
            "{} answers",
            load.answers.len()
        );
        let tls = matches!(self.transport, Transport::Tls);
        ensure!(
            load.answers.iter().all(|answer| answer.tls == tls),
            "a session's TLS did not match sslmode ({:?})",
            self.transport
        );
        let workers = load.workers();
        if self.server == Server::UwsgiRecycling {
            ensure!(
                workers.len() > WORKERS,
                "--max-requests {MAX_REQUESTS} replaced no worker: {} workers answered",
                workers.len()
            );
        } else {
            ensure!(
                workers.len() == WORKERS,
                "{} workers answered, expected {WORKERS}: {workers:?}",
                workers.len()
            );
            // Each worker has connections of its own: no session answered two workers.
            let mut worker_of_backend = BTreeMap::new();
            for answer in &load.answers {
                let owner = *worker_of_backend
                    .entry(answer.backend)
                    .or_insert(answer.worker);
                ensure!(
                    owner == answer.worker,
                    "PostgreSQL session {} answered workers {owner} and {}",
                    answer.backend,
                    answer.worker
                );
            }
        }
        println!(
            "  {} right answers from {} workers in {:.1?}",
            load.answers.len(),
            workers.len(),
            load.elapsed
        );
        Ok(())
    }
}

fn scenarios() -> Vec<Scenario> {
    let mut scenarios = Vec::new();
    for transport in [Transport::Tls, Transport::Plain] {
        for (server, pool, must_fail) in [
            (Server::UwsgiEager, PoolKind::R2d2, true),
            (Server::UwsgiEager, PoolKind::ForkSafe, false),
            (Server::UwsgiLazy, PoolKind::R2d2, false),
            (Server::UwsgiThreads, PoolKind::ForkSafe, false),
            (Server::UwsgiRecycling, PoolKind::ForkSafe, false),
            (Server::GunicornPreload, PoolKind::R2d2, true),
            (Server::GunicornPreload, PoolKind::ForkSafe, false),
        ] {
            scenarios.push(Scenario {
                server,
                pool,
                transport,
                must_fail,
            });
        }
    }
    scenarios
}

fn main() {
    let tools = Tools::find();
    require_server(
        "Python server",
        tools.as_ref().map(|_| ()).map_err(String::clone),
        "scripts/test builds the virtual environment and the example module",
    );
    let tools = tools.expect("require_server returned, so the tools were found");
    // The workers of a killed master are reparented here, to be reaped by `stop`.
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        println!("test result: FAILED. 0 passed; 1 failed (PR_SET_CHILD_SUBREAPER: {error})");
        std::process::exit(1);
    }
    run_cases(scenarios().into_iter().map(|scenario| {
        let tools = &tools;
        (scenario.name(), move || scenario.run(tools))
    }));
}
