//! The async Python extension example (`examples/python-async-extension`: a PyO3 module that
//! builds a tokio runtime and a deadpool-postgres pool at import and `block_on`s queries
//! through them) under the pre-forking servers whose masters import it before forking:
//! `gunicorn --preload --workers 4`, uWSGI's default (eager) `--master --processes 4`, and
//! Celery's prefork pool (`celery worker --pool prefork -c 4`, Redis as broker and result
//! backend).
//!
//! HTTP servers get 8 clients × 500 requests, Celery 1000 tasks, each with its own token that
//! PostgreSQL must echo back (checked by the app or task, and again here). Over TLS
//! (`sslmode=prefer`) and with `sslmode=disable`:
//! - a plain `tokio::runtime::Runtime` and `deadpool_postgres::Pool` (`ASYNC_ECHO_POOL=naive`):
//!   the workers must fail (the cases assert it, so the scenario is real);
//! - `forksafe_pool::Runtime` and `forksafe_pool::deadpool_postgres::Pool`: every request and
//!   every task is answered right, by 4 workers each on sessions of its own, none of them the
//!   session the master opened at import, which is still open when the load ends;
//! - uWSGI `--lazy-apps` with the naive pair, as the control: the same module works when each
//!   worker imports it after the fork;
//! - uWSGI eager with `--threads 4` and forksafe-pool: several threads of a worker block on its
//!   runtime and pool at once, from its first requests on (which may race to build them).
//!
//! Nothing can hang the suite: every request has a timeout, the Celery client has deadlines and
//! is killed past them, the load and the server's start have deadlines, and this binary is the
//! subreaper of the servers it starts, so the workers of a killed master are reaped here too.
//!
//! Needs the virtual environment `scripts/test` makes (uWSGI, gunicorn, Celery and the example
//! module built by maturin), at `target/python-venv` or `FORKSAFE_PYTHON_VENV`, PostgreSQL at
//! `FORKSAFE_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and Redis at
//! `FORKSAFE_CELERY_BROKER` (default `redis://127.0.0.1:6379/7`). Without them the binary
//! prints why and skips, unless `CI` is set: then it fails.

#[macro_use]
mod support;

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::python::{
    become_subreaper, comparable, free_port, parse_answer, run_load, wait_until_listening, Load,
    RunningServer, Transport, Venv, CLIENTS, FAILURES_ENOUGH, LOAD_DEADLINE, REQUESTS_PER_CLIENT,
    START_DEADLINE, STOP_DEADLINE,
};
use support::runner::{require_server, run_cases, Check};

/// Tasks per Celery case.
const TASKS: usize = 1000;
/// How long the Celery client waits for the results of a case whose workers must fail: long
/// enough for the module's 5 s timeout to fire, were it able to.
const FAILING_TASKS_DEADLINE: Duration = Duration::from_secs(15);
const DEFAULT_BROKER: &str = "redis://127.0.0.1:6379/7";

/// The runtime and pool types the example module builds at import (`ASYNC_ECHO_POOL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolKind {
    Naive,
    ForkSafe,
}

impl PoolKind {
    fn name(self) -> &'static str {
        match self {
            PoolKind::Naive => "naive",
            PoolKind::ForkSafe => "forksafe",
        }
    }
}

/// A server and the way it loads the module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    /// uWSGI's default: the master imports the app, then forks `--processes 4`.
    UwsgiEager,
    /// uWSGI `--lazy-apps`: each worker imports the app after the fork.
    UwsgiLazy,
    /// Eager, each worker with `--threads 4`: several threads of a worker block on its runtime
    /// and pool at once, from its first requests on.
    UwsgiThreads,
    /// `gunicorn --preload --workers 4`, sync workers.
    GunicornPreload,
    /// `celery -A tasks worker --pool prefork -c 4`: the main process imports `tasks`.
    CeleryPrefork,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::UwsgiEager => "uwsgi_eager",
            Server::UwsgiLazy => "uwsgi_lazy_apps",
            Server::UwsgiThreads => "uwsgi_threads_4",
            Server::GunicornPreload => "gunicorn_preload",
            Server::CeleryPrefork => "celery_prefork",
        }
    }
}

fn broker() -> String {
    std::env::var("FORKSAFE_CELERY_BROKER")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_BROKER.to_owned())
}

/// Fails unless Redis answers a PING at `broker()`'s address.
fn redis_reachable() -> Check {
    use std::io::{Read, Write};
    let url = broker();
    let address = url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("FORKSAFE_CELERY_BROKER={url}: not redis://HOST:PORT/N"))?;
    let mut stream = std::net::TcpStream::connect(address)
        .map_err(|error| format!("Redis at {address}: {error}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|error| error.to_string())?;
    stream
        .write_all(b"PING\r\n")
        .map_err(|error| format!("Redis at {address}: {error}"))?;
    let mut reply = [0; 7];
    stream
        .read_exact(&mut reply)
        .map_err(|error| format!("Redis at {address}: {error}"))?;
    ensure!(
        &reply == b"+PONG\r\n",
        "Redis at {address} answered {reply:?}"
    );
    Ok(())
}

fn find_tools() -> Result<Venv, String> {
    let venv = Venv::find(
        "python-async-extension",
        &["uwsgi", "gunicorn", "celery"],
        "async_echo",
        &[("ASYNC_ECHO_POOL", "naive")],
    )?;
    redis_reachable()?;
    Ok(venv)
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
        let outcome = if self.must_fail {
            "workers_fail"
        } else {
            "every_answer_right"
        };
        format!(
            "{}_{}_{}_{outcome}",
            self.transport.name(),
            self.server.name(),
            self.pool.name()
        )
    }

    /// A queue of this case's own: tasks a failed case left in Redis never reach another.
    fn queue(&self) -> String {
        format!("async_echo_{}_{}", self.name(), std::process::id())
    }

    fn command(&self, venv: &Venv, port: u16) -> Command {
        let address = format!("127.0.0.1:{port}");
        let mut command = match self.server {
            Server::GunicornPreload => {
                let mut command = Command::new(venv.bin("gunicorn"));
                command
                    .args(["--preload", "--workers", "4", "--worker-class", "sync"])
                    .args(["--bind", &address, "--chdir"])
                    .arg(&venv.example)
                    .arg("app:application");
                command
            }
            Server::UwsgiEager | Server::UwsgiLazy | Server::UwsgiThreads => {
                let mut command = Command::new(venv.bin("uwsgi"));
                command
                    .args(["--master", "--processes", "4", "--http-socket", &address])
                    .args(["--need-app", "--no-orphans", "--disable-logging", "--home"])
                    .arg(&venv.venv)
                    .arg("--wsgi-file")
                    .arg(venv.example.join("app.py"));
                if self.server == Server::UwsgiLazy {
                    command.arg("--lazy-apps");
                }
                if self.server == Server::UwsgiThreads {
                    command.args(["--threads", "4"]);
                }
                command
            }
            Server::CeleryPrefork => {
                let mut command = Command::new(venv.bin("celery"));
                command
                    .args(["-A", "tasks", "worker", "--pool", "prefork", "-c", "4"])
                    .args(["--loglevel", "INFO", "--without-gossip", "--without-mingle"])
                    .args(["--without-heartbeat", "-Q", &self.queue(), "-n"])
                    .arg(format!("{}@%h", self.queue()))
                    .current_dir(&venv.example);
                command
            }
        };
        command
            .env("DATABASE_URL", self.transport.url())
            .env("ASYNC_ECHO_POOL", self.pool.name())
            .env("ASYNC_ECHO_CELERY_BROKER", broker())
            .env("ASYNC_ECHO_CELERY_QUEUE", self.queue())
            .env("PYTHONUNBUFFERED", "1");
        command
    }

    fn run(&self, venv: &Venv) -> Check {
        let port = free_port()?;
        let mut server = RunningServer::start(self.command(venv, port))?;
        let checked = if self.server == Server::CeleryPrefork {
            self.send_tasks(venv, &server)
        } else {
            wait_until_listening(&server, port, "/ready").map(|()| {
                run_load(
                    port,
                    &self.name(),
                    self.must_fail.then_some(FAILURES_ENOUGH),
                )
            })
        }
        .and_then(|load| {
            server.check_running()?;
            self.check(&load)?;
            if self.pool == PoolKind::ForkSafe {
                check_master_session(&load)?;
            }
            Ok(())
        });
        let stopped = server.stop();
        checked.and(stopped)
    }

    /// Runs the Celery client (`celery_client.py`), killed should it outlive its deadlines,
    /// and reads its report into a `Load`.
    fn send_tasks(&self, venv: &Venv, server: &RunningServer) -> Result<Load, String> {
        let deadline = if self.must_fail {
            FAILING_TASKS_DEADLINE
        } else {
            LOAD_DEADLINE
        };
        let prefix = format!("{}-{}", self.name(), std::process::id());
        let report_dir = tempfile::tempdir().map_err(|error| error.to_string())?;
        let report_path = report_dir.path().join("client.out");
        let report = File::create(&report_path).map_err(|error| error.to_string())?;
        // A file, not a pipe: a pipe nobody reads while waiting could fill and stall the client.
        let errors_path = report_dir.path().join("client.err");
        let errors = File::create(&errors_path).map_err(|error| error.to_string())?;
        let started = Instant::now();
        let mut client = Command::new(venv.bin("python"))
            .arg(venv.example.join("celery_client.py"))
            .args(["--tasks", &TASKS.to_string(), "--prefix", &prefix])
            .args(["--start-deadline", &START_DEADLINE.as_secs().to_string()])
            .args(["--deadline", &deadline.as_secs().to_string()])
            .env("ASYNC_ECHO_CELERY_BROKER", broker())
            .env("ASYNC_ECHO_CELERY_QUEUE", self.queue())
            .stdin(Stdio::null())
            .stdout(report)
            .stderr(errors)
            .spawn()
            .map_err(|error| format!("starting the Celery client: {error}"))?;
        // Start, the tasks' deadline, and reading what is left once it has passed.
        let client_deadline = START_DEADLINE + deadline + STOP_DEADLINE + STOP_DEADLINE;
        let status = loop {
            match client.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < client_deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(None) => {
                    let _ = client.kill();
                    let _ = client.wait();
                    return Err(format!(
                        "the Celery client ran past {client_deadline:?}; the worker's log \
                         ends:\n    {}",
                        server.log_tail()
                    ));
                }
                Err(error) => return Err(format!("waiting for the Celery client: {error}")),
            }
        };
        let elapsed = started.elapsed();
        let errors = std::fs::read_to_string(&errors_path).unwrap_or_default();
        let report = std::fs::read_to_string(&report_path).map_err(|error| error.to_string())?;
        ensure!(
            status.success() && report.starts_with("ready\n"),
            "the Celery client ended {status}: {}\n    {}\n    the worker's log ends:\n    {}",
            report.trim(),
            errors.trim(),
            server.log_tail()
        );
        let mut load = Load {
            elapsed,
            ..Load::default()
        };
        let mut reported = 0;
        for line in report.lines().skip(1) {
            let Some((token, outcome)) = line
                .strip_prefix("task ")
                .and_then(|rest| rest.split_once(' '))
            else {
                return Err(format!("the Celery client printed {line:?}"));
            };
            reported += 1;
            if outcome.starts_with("ok ") {
                match parse_answer(outcome, token) {
                    Some(answer) => load.answers.push(answer),
                    None => load.failures.push(format!(
                        "wrong answer to <token>: {}",
                        comparable(outcome, token)
                    )),
                }
            } else if outcome == "timeout" {
                load.failures
                    .push(format!("no result within {deadline:?} of sending"));
            } else {
                load.failures.push(comparable(outcome, token));
            }
        }
        load.unsent = TASKS - reported.min(TASKS);
        Ok(load)
    }

    fn check(&self, load: &Load) -> Check {
        if self.must_fail {
            return load.check_failed();
        }
        let expected = if self.server == Server::CeleryPrefork {
            TASKS
        } else {
            CLIENTS * REQUESTS_PER_CLIENT
        };
        load.check_all_right(expected, self.transport)?;
        load.check_own_sessions()?;
        println!(
            "  {} right answers from {} workers in {:.1?}",
            load.answers.len(),
            load.workers().len(),
            load.elapsed
        );
        Ok(())
    }
}

/// The workers were forked after the import: every answer names the one session the master's
/// import-time query ran on, no worker ever used it, and the master's session is still open
/// (a worker that closed or wrote on its copy of the socket would have ended it).
fn check_master_session(load: &Load) -> Check {
    let mut imported_on = std::collections::BTreeSet::new();
    for answer in &load.answers {
        let master = answer
            .imported_on
            .ok_or_else(|| format!("an answer without imported_on: {answer:?}"))?;
        ensure!(
            answer.backend != master,
            "worker {} used the master's session {master}",
            answer.worker
        );
        imported_on.insert(master);
    }
    ensure!(
        imported_on.len() == 1,
        "the workers name {} import sessions ({imported_on:?}): they were not all forked from \
         one master that had imported the module",
        imported_on.len()
    );
    let master = *imported_on.first().expect("one session");
    let mut client = r2d2_postgres::postgres::Client::connect(
        &Transport::Plain.url(),
        r2d2_postgres::postgres::NoTls,
    )
    .map_err(|error| format!("connecting to look at pg_stat_activity: {error}"))?;
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&(master as i32)],
        )
        .map_err(|error| format!("querying pg_stat_activity: {error}"))?
        .get(0);
    ensure!(
        open == 1,
        "the master's session {master} is gone while the master runs"
    );
    Ok(())
}

fn scenarios() -> Vec<Scenario> {
    let mut scenarios = Vec::new();
    for transport in [Transport::Tls, Transport::Plain] {
        for (server, pool, must_fail) in [
            (Server::GunicornPreload, PoolKind::Naive, true),
            (Server::GunicornPreload, PoolKind::ForkSafe, false),
            (Server::UwsgiEager, PoolKind::Naive, true),
            (Server::UwsgiEager, PoolKind::ForkSafe, false),
            (Server::UwsgiLazy, PoolKind::Naive, false),
            (Server::UwsgiThreads, PoolKind::ForkSafe, false),
            (Server::CeleryPrefork, PoolKind::Naive, true),
            (Server::CeleryPrefork, PoolKind::ForkSafe, false),
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
    let tools = find_tools();
    require_server(
        "async Python server",
        tools.as_ref().map(|_| ()).map_err(String::clone),
        "scripts/test builds the virtual environment and the example module, and starts Redis",
    );
    let venv = tools.expect("require_server returned, so the tools were found");
    become_subreaper();
    run_cases(scenarios().into_iter().map(|scenario| {
        let venv = &venv;
        (scenario.name(), move || scenario.run(venv))
    }));
}
