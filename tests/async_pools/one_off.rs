//! The cases that run once rather than per pool and transport: the naive control, bad input,
//! connections taken out of the pools.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forksafe_pool::deadpool_postgres::tokio_postgres::{self, NoTls};
use forksafe_pool::{bb8_postgres, deadpool_postgres, Runtime};

use crate::pools::{
    AsyncPool, Bb8, Deadpool, Plain, Tls, Transport, DEADLINE, POOL_SIZE, QUERY_TIMEOUT,
};
use crate::support::fork::{run_child, ChildEnd};
use crate::support::runner::{child_result, expect_exit, Check};

/// The control: tokio's runtime and deadpool-postgres's pool on `manager`, built and warmed in
/// the master and inherited, serve nothing in a worker.
fn naive_runtime_and_pool_fail_in_a_worker(
    manager: Result<::deadpool_postgres::Manager, String>,
) -> Check {
    let runtime = tokio::runtime::Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    let pool = ::deadpool_postgres::Pool::builder(manager?)
        .max_size(POOL_SIZE)
        .build()
        .map_err(|error| format!("build: {error}"))?;
    runtime.block_on(async {
        let client = pool.get().await.map_err(|error| format!("get: {error}"))?;
        client
            .query_one("SELECT 1", &[])
            .await
            .map_err(|error| format!("query: {error}"))
    })?;
    let end = run_child(QUERY_TIMEOUT * 2, || {
        let answered = runtime.block_on(async {
            let client = pool.get().await.ok()?;
            client.query_one("SELECT 1", &[]).await.ok()
        });
        if answered.is_some() {
            0
        } else {
            1
        }
    });
    ensure!(
        end != ChildEnd::Exited(0),
        "a worker answered on the inherited runtime and pool; the control expects it to fail"
    );
    Ok(())
}

pub(crate) fn naive_plain() -> Check {
    naive_runtime_and_pool_fail_in_a_worker(
        Plain::config().map(|config| ::deadpool_postgres::Manager::new(config, NoTls)),
    )
}

pub(crate) fn naive_tls() -> Check {
    naive_runtime_and_pool_fail_in_a_worker(
        Tls::config().map(|config| ::deadpool_postgres::Manager::new(config, Tls::tls())),
    )
}

/// bb8's `connection_timeout` in [`bad_input_fails_clearly`].
const BB8_GIVES_UP: Duration = Duration::from_secs(2);

/// A port on which nothing listens, and a Unix-socket host: each `get` fails with a clear error
/// well within the pool's timeout, in the master and in a forked child.
pub(crate) fn bad_input_fails_clearly() -> Check {
    let refused: tokio_postgres::Config = "host=127.0.0.1 port=1 user=postgres"
        .parse()
        .map_err(|error| format!("{error}"))?;
    let unix: tokio_postgres::Config = "host=/var/run/postgresql user=postgres"
        .parse()
        .map_err(|error| format!("{error}"))?;
    let runtime = Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    let deadpools = [(&refused, "refused"), (&unix, "TCP only")].map(|(config, says)| {
        let pool = deadpool_postgres::Pool::builder(config.clone(), NoTls)
            .max_size(1)
            .create_timeout(Some(QUERY_TIMEOUT))
            .build();
        (pool, says)
    });
    let manager = |config: &tokio_postgres::Config| {
        bb8_postgres::PostgresConnectionManager::new(config.clone(), NoTls)
    };
    let sink = ErrorLog::default();
    let bb8s = [(&refused, "refused"), (&unix, "TCP only")].map(|(config, says)| {
        let pool = runtime.block_on(
            bb8_postgres::Pool::builder()
                .max_size(1)
                .connection_timeout(BB8_GIVES_UP)
                .error_sink(Box::new(sink.clone()))
                .build(manager(config)),
        );
        (pool, says)
    });
    let check = || -> Check {
        for (pool, says) in &deadpools {
            let pool = pool.as_ref().map_err(|error| format!("build: {error}"))?;
            let started = Instant::now();
            let error = match runtime.block_on(pool.get()) {
                Ok(_) => return Err(String::from("a deadpool get succeeded")),
                Err(error) => format!("{error}: {:?}", std::error::Error::source(&error)),
            };
            ensure!(
                error.contains(says) && started.elapsed() < QUERY_TIMEOUT,
                "deadpool: {error:?} after {:?}, expected {says:?} at once",
                started.elapsed()
            );
        }
        for (pool, says) in &bb8s {
            // bb8's `build` opens no connection without `min_idle`, so it succeeds. A `get`
            // times out after `connection_timeout`, and the connect's errors go to the error
            // sink (bb8's own way).
            let pool = pool.as_ref().map_err(|error| format!("build: {error}"))?;
            let started = Instant::now();
            let error = match runtime.block_on(pool.get()) {
                Ok(_) => return Err(String::from("a bb8 get succeeded")),
                Err(error) => error,
            };
            let took = started.elapsed();
            ensure!(
                matches!(error, bb8_postgres::RunError::TimedOut)
                    && took < BB8_GIVES_UP + Duration::from_secs(2),
                "bb8: {error:?} after {took:?}"
            );
            let logged = sink.take();
            ensure!(
                logged.iter().any(|error| error.contains(says)),
                "bb8's error sink got {logged:?}, expected {says:?}"
            );
        }
        Ok(())
    };
    check()?;
    expect_exit(
        "the child",
        run_child(DEADLINE, || child_result(check())),
        0,
    )
}

/// deadpool's `Object::take` and bb8's `dedicated_connection`: connections taken out of the
/// pool work in the process that took them; a client checked out before a fork cannot be taken
/// in the child.
pub(crate) fn taken_and_dedicated_connections() -> Check {
    let runtime = Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    let deadpool = Deadpool::<Plain>::build(&runtime)?.0;
    let bb8 = Bb8::<Plain>::build(&runtime)?.0;
    let mut held = Some(
        runtime
            .block_on(deadpool.get())
            .map_err(|e| e.to_string())?,
    );
    let end = run_child(DEADLINE, || {
        child_result((|| {
            std::panic::set_hook(Box::new(|_| {}));
            let inherited = held.take().ok_or("no guard")?;
            let taken = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                deadpool_postgres::Object::take(inherited)
            }));
            ensure!(taken.is_err(), "the child took the parent's client");
            Ok(())
        })())
    });
    expect_exit("the child", end, 0)?;
    let taken = deadpool_postgres::Object::take(held.ok_or("the master lost its guard")?);
    runtime.block_on(async {
        taken
            .query_one("SELECT 1", &[])
            .await
            .map_err(|error| format!("the taken client: {error}"))?;
        ensure!(
            deadpool.status().size == 0,
            "the taken client is still counted: {:?}",
            deadpool.status()
        );
        let dedicated = bb8
            .dedicated_connection()
            .await
            .map_err(|error| format!("dedicated_connection: {error}"))?;
        dedicated
            .query_one("SELECT 1", &[])
            .await
            .map_err(|error| format!("the dedicated connection: {error}"))?;
        Ok(())
    })
}

/// A bb8 error sink that keeps what it was given, with each error's source.
#[derive(Clone, Debug, Default)]
struct ErrorLog(Arc<std::sync::Mutex<Vec<String>>>);

impl ErrorLog {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|poison| poison.into_inner()))
    }
}

impl bb8_postgres::ErrorSink<tokio_postgres::Error> for ErrorLog {
    fn sink(&self, error: tokio_postgres::Error) {
        let text = format!("{error}: {:?}", std::error::Error::source(&error));
        self.0
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .push(text);
    }
    fn boxed_clone(&self) -> Box<dyn bb8_postgres::ErrorSink<tokio_postgres::Error>> {
        Box::new(self.clone())
    }
}
