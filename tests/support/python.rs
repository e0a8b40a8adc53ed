//! Python servers serving the PyO3 examples (`examples/python-extension`,
//! `examples/python-async-extension`): the virtual environment `scripts/test` builds, a server
//! run as a process group that is always killed and reaped, HTTP clients with deadlines, and
//! the load of unique tokens the workers must echo.
//!
//! A binary using it calls [`become_subreaper`] first: the workers of a killed master are
//! reparented to it, and [`RunningServer::stop`] reaps them.

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

use super::runner::Check;

pub const WORKERS: usize = 4;
pub const CLIENTS: usize = 8;
pub const REQUESTS_PER_CLIENT: usize = 500;
/// Longer than the example modules' 5 s bounds on a checkout and a query, so a worker that
/// waits for a connection answers with the pool's error before the client gives up on it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Importing the app, building its pool and forking the workers, on a busy machine.
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// The whole load: 4000 requests take a few seconds when they are answered.
pub const LOAD_DEADLINE: Duration = Duration::from_secs(120);
pub const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// A server expected to fail has shown it once this many requests failed: the load stops
/// there rather than waiting out every remaining request's timeout.
pub const FAILURES_ENOUGH: usize = 8;

/// The workers of a killed master are reparented to this process, to be reaped by
/// [`RunningServer::stop`]. Prints a failed test result and exits when it cannot be.
pub fn become_subreaper() {
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        println!("test result: FAILED. 0 passed; 1 failed (PR_SET_CHILD_SUBREAPER: {error})");
        std::process::exit(1);
    }
}

/// How the pool reaches PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `sslmode=prefer`, which negotiates TLS with this server.
    Tls,
    Plain,
}

impl Transport {
    pub fn url(self) -> String {
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

    pub fn name(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Plain => "plain",
        }
    }
}

/// The virtual environment (`target/python-venv` or `FORKSAFE_PYTHON_VENV`) and an example's
/// directory.
pub struct Venv {
    pub venv: PathBuf,
    pub example: PathBuf,
}

impl Venv {
    /// The environment with `programs` in its `bin`, where `module` imports (with
    /// `module_env` set): or why not.
    pub fn find(
        example: &str,
        programs: &[&str],
        module: &str,
        module_env: &[(&str, &str)],
    ) -> Result<Venv, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let venv = std::env::var_os("FORKSAFE_PYTHON_VENV")
            .map_or_else(|| root.join("target/python-venv"), PathBuf::from);
        let found = Venv {
            venv,
            example: root.join("examples").join(example),
        };
        for program in ["python"].iter().chain(programs) {
            let path = found.bin(program);
            if !path.exists() {
                return Err(format!("{} is missing", path.display()));
            }
        }
        let import = Command::new(found.bin("python"))
            .args(["-c", &format!("import {module}")])
            .env("DATABASE_URL", Transport::Plain.url())
            .envs(module_env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("running {}: {error}", found.bin("python").display()))?;
        if !import.status.success() {
            return Err(format!(
                "the example module {module} does not import ({}): {}",
                import.status,
                String::from_utf8_lossy(&import.stderr).trim()
            ));
        }
        Ok(found)
    }

    pub fn bin(&self, program: &str) -> PathBuf {
        self.venv.join("bin").join(program)
    }
}

/// A server process group: started with its master as the leader, ended by killing the group.
pub struct RunningServer {
    master: Pid,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
    stopped: bool,
}

impl RunningServer {
    pub fn start(mut command: Command) -> Result<RunningServer, String> {
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
                // and Celery's workers exit when their master is gone).
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

    pub fn master(&self) -> Pid {
        self.master
    }

    /// The last lines the server printed, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n    ")
    }

    /// Fails if the master has exited.
    pub fn check_running(&self) -> Check {
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
    pub fn stop(&mut self) -> Check {
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

pub fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|error| error.to_string())?;
    Ok(listener
        .local_addr()
        .map_err(|error| error.to_string())?
        .port())
}

/// A right answer: the worker that gave it, the PostgreSQL session that echoed the token and
/// whether that session used TLS.
#[derive(Debug)]
pub struct Answer {
    pub worker: u32,
    pub backend: u32,
    pub tls: bool,
    /// The session the worker's module ran its import-time query on, where the app says
    /// (`imported_on=`): in a worker forked after the import, the master's.
    pub imported_on: Option<u32>,
}

/// Sends `token`; a right answer, or what went wrong.
pub fn request(port: u16, token: &str) -> Result<Answer, String> {
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
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
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

/// `ok <token> worker=<pid> backend=<pid> tls=<True|False> pool=<kind>`, for this `token`,
/// optionally followed by `imported_on=<pid>`.
pub fn parse_answer(body: &str, token: &str) -> Option<Answer> {
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
        imported_on: match fields.get("imported_on") {
            Some(pid) => Some(pid.parse().ok()?),
            None => None,
        },
    })
}

/// Waits until the server answers HTTP at all on `path` (any status: a failing pool still
/// answers).
pub fn wait_until_listening(server: &RunningServer, port: u16, path: &str) -> Check {
    let started = Instant::now();
    loop {
        server.check_running()?;
        match http_get(port, path) {
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
pub struct Load {
    pub answers: Vec<Answer>,
    /// Every failed request's message, in the order they came.
    pub failures: Vec<String>,
    pub unsent: usize,
    pub elapsed: Duration,
}

impl Load {
    pub fn workers(&self) -> BTreeSet<u32> {
        self.answers.iter().map(|answer| answer.worker).collect()
    }

    /// The first `count` distinct failure messages, with how often each came.
    pub fn first_failures(&self, count: usize) -> String {
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

    /// For a server that must fail: at least one request failed. Prints what failed.
    pub fn check_failed(&self) -> Check {
        ensure!(
            !self.failures.is_empty(),
            "{} requests all answered right: the workers did not share the master's \
             connections (workers seen: {:?})",
            self.answers.len(),
            self.workers()
        );
        println!(
            "  {} right answers, then {} failures; the first:\n    {}",
            self.answers.len(),
            self.failures.len(),
            self.first_failures(5)
        );
        Ok(())
    }

    /// For a server that must work: all `expected` requests answered right, each session's TLS
    /// as `transport` asks.
    pub fn check_all_right(&self, expected: usize, transport: Transport) -> Check {
        ensure!(
            self.failures.is_empty() && self.unsent == 0,
            "{} failed, {} unsent (load deadline {LOAD_DEADLINE:?}), {} right; the first \
             failures:\n    {}",
            self.failures.len(),
            self.unsent,
            self.answers.len(),
            self.first_failures(5)
        );
        ensure!(
            self.answers.len() == expected,
            "{} answers, expected {expected}",
            self.answers.len()
        );
        let tls = transport == Transport::Tls;
        ensure!(
            self.answers.iter().all(|answer| answer.tls == tls),
            "a session's TLS did not match sslmode ({transport:?})"
        );
        Ok(())
    }

    /// Exactly `WORKERS` workers answered, and each PostgreSQL session answered one worker
    /// only: every worker had connections of its own.
    pub fn check_own_sessions(&self) -> Check {
        let workers = self.workers();
        ensure!(
            workers.len() == WORKERS,
            "{} workers answered, expected {WORKERS}: {workers:?}",
            workers.len()
        );
        let mut worker_of_backend = BTreeMap::new();
        for answer in &self.answers {
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
        Ok(())
    }
}

/// `CLIENTS` threads send `REQUESTS_PER_CLIENT` requests each, every token unique; stops early
/// after `stop_after_failures` failures, or when `LOAD_DEADLINE` passes.
pub fn run_load(port: u16, tag: &str, stop_after_failures: Option<usize>) -> Load {
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
                            let message = comparable(&message, &token);
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

/// A failure message without its token (tokens differ per request), on one line (libpq's
/// messages span several), so that equal failures compare equal.
pub fn comparable(message: &str, token: &str) -> String {
    let message = message.replace(token, "<token>");
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}
