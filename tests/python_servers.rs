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

use std::path::PathBuf;
use std::process::Command;

use support::python::{
    become_subreaper, free_port, run_load, wait_until_listening, Load, RunningServer, Transport,
    Venv, CLIENTS, FAILURES_ENOUGH, REQUESTS_PER_CLIENT, WORKERS,
};
use support::runner::{require_server, run_cases, Check};

/// `--max-requests` in the recycling case: every worker is replaced several times.
const MAX_REQUESTS: usize = 150;

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
    venv: Venv,
}

impl Tools {
    fn find() -> Result<Tools, String> {
        let venv = Venv::find(
            "python-extension",
            &["uwsgi", "gunicorn"],
            "pooled_echo",
            &[],
        )?;
        Ok(Tools { venv })
    }

    fn bin(&self, program: &str) -> PathBuf {
        self.venv.bin(program)
    }

    fn command(&self, server: Server, port: u16) -> Command {
        let address = format!("127.0.0.1:{port}");
        if server == Server::GunicornPreload {
            let mut command = Command::new(self.bin("gunicorn"));
            command
                .args(["--preload", "--workers", "4", "--worker-class", "sync"])
                .args(["--bind", &address, "--chdir"])
                .arg(&self.venv.example)
                .arg("app:application");
            return command;
        }
        let mut command = Command::new(self.bin("uwsgi"));
        command
            .args(["--master", "--processes", "4", "--http-socket", &address])
            .args(["--need-app", "--no-orphans", "--disable-logging", "--home"])
            .arg(&self.venv.venv)
            .arg("--wsgi-file")
            .arg(self.venv.example.join("app.py"));
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
        let checked = wait_until_listening(&server, port, "/?token=ready").and_then(|()| {
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
            return load.check_failed();
        }
        load.check_all_right(CLIENTS * REQUESTS_PER_CLIENT, self.transport)?;
        let workers = load.workers();
        if self.server == Server::UwsgiRecycling {
            ensure!(
                workers.len() > WORKERS,
                "--max-requests {MAX_REQUESTS} replaced no worker: {} workers answered",
                workers.len()
            );
        } else {
            load.check_own_sessions()?;
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
    become_subreaper();
    run_cases(scenarios().into_iter().map(|scenario| {
        let tools = &tools;
        (scenario.name(), move || scenario.run(tools))
    }));
}
