//! What every scenario needs: the pools under test (deadpool and bb8, over plain TCP and TLS)
//! behind one trait, and the checks written once against it.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use forksafe_pool::deadpool_postgres::tokio_postgres::{self, NoTls};
use forksafe_pool::{bb8_postgres, deadpool_postgres, ForkStats, Runtime};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;

use crate::support::runner::Check;

pub(crate) const POOL_SIZE: usize = 4;
pub(crate) const WORKERS: usize = 4;
pub(crate) const QUERIES: usize = 50;
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);
/// How long one query may take before the scenario calls it lost.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn url() -> String {
    std::env::var("FORKSAFE_PG_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"))
}

pub(crate) fn pg_config(sslmode: &str) -> Result<tokio_postgres::Config, String> {
    let separator = if url().contains('?') { '&' } else { '?' };
    format!("{}{separator}sslmode={sslmode}", url())
        .parse()
        .map_err(|error| format!("FORKSAFE_PG_URL: {error}"))
}

/// How the pools reach the server.
pub(crate) trait Transport: 'static {
    type Tls: deadpool_postgres::MakeTls;
    fn tls() -> Self::Tls;
    fn config() -> Result<tokio_postgres::Config, String>;
}

pub(crate) struct Plain;
impl Transport for Plain {
    type Tls = NoTls;
    fn tls() -> NoTls {
        NoTls
    }
    fn config() -> Result<tokio_postgres::Config, String> {
        pg_config("disable")
    }
}

pub(crate) struct Tls;
impl Transport for Tls {
    type Tls = MakeTlsConnector;
    fn tls() -> MakeTlsConnector {
        let mut builder = SslConnector::builder(SslMethod::tls()).expect("openssl");
        builder.set_verify(SslVerifyMode::NONE);
        MakeTlsConnector::new(builder.build())
    }
    fn config() -> Result<tokio_postgres::Config, String> {
        pg_config("require")
    }
}

/// What a scenario needs of a pool.
pub(crate) trait AsyncPool: Clone + Send + Sync + Sized + 'static {
    type Guard: Send + 'static;
    fn build(runtime: &Runtime) -> Result<Self, String>;
    fn get(&self) -> impl Future<Output = Result<Self::Guard, String>> + Send;
    fn client(guard: &Self::Guard) -> &tokio_postgres::Client;
    fn fork_stats(&self) -> ForkStats;
}

pub(crate) struct Deadpool<T>(
    pub(crate) deadpool_postgres::Pool,
    std::marker::PhantomData<fn() -> T>,
);

impl<T> Clone for Deadpool<T> {
    fn clone(&self) -> Self {
        Deadpool(self.0.clone(), std::marker::PhantomData)
    }
}

impl<T: Transport> AsyncPool for Deadpool<T> {
    type Guard = deadpool_postgres::Object;
    fn build(_runtime: &Runtime) -> Result<Self, String> {
        let pool = deadpool_postgres::Pool::builder(T::config()?, T::tls())
            .max_size(POOL_SIZE)
            .wait_timeout(Some(QUERY_TIMEOUT))
            .create_timeout(Some(QUERY_TIMEOUT))
            .build()
            .map_err(|error| format!("build: {error}"))?;
        Ok(Deadpool(pool, std::marker::PhantomData))
    }
    async fn get(&self) -> Result<Self::Guard, String> {
        self.0.get().await.map_err(|error| format!("get: {error}"))
    }
    fn client(guard: &Self::Guard) -> &tokio_postgres::Client {
        guard
    }
    fn fork_stats(&self) -> ForkStats {
        self.0.fork_stats()
    }
}

pub(crate) type Bb8Manager<T> = bb8_postgres::PostgresConnectionManager<<T as Transport>::Tls>;

pub(crate) struct Bb8<T: Transport>(pub(crate) bb8_postgres::Pool<Bb8Manager<T>>);

impl<T: Transport> Clone for Bb8<T> {
    fn clone(&self) -> Self {
        Bb8(self.0.clone())
    }
}

impl<T: Transport> AsyncPool for Bb8<T> {
    type Guard = bb8_postgres::PooledConnection<'static, Bb8Manager<T>>;
    fn build(runtime: &Runtime) -> Result<Self, String> {
        let manager = bb8_postgres::PostgresConnectionManager::new(T::config()?, T::tls());
        let pool = runtime
            .block_on(
                bb8_postgres::Pool::builder()
                    .max_size(POOL_SIZE as u32)
                    .connection_timeout(QUERY_TIMEOUT)
                    .build(manager),
            )
            .map_err(|error| format!("build: {error}"))?;
        Ok(Bb8(pool))
    }
    async fn get(&self) -> Result<Self::Guard, String> {
        self.0
            .get_owned()
            .await
            .map_err(|error| format!("get: {error}"))
    }
    fn client(guard: &Self::Guard) -> &tokio_postgres::Client {
        guard
    }
    fn fork_stats(&self) -> ForkStats {
        self.0.fork_stats()
    }
}

/// Asks the server to echo `token` and returns the session's backend pid.
pub(crate) async fn echo<P: AsyncPool>(pool: &P, token: &str) -> Result<i32, String> {
    let answer = tokio::time::timeout(QUERY_TIMEOUT, async {
        let guard = pool.get().await?;
        P::client(&guard)
            .query_one("SELECT $1::text, pg_backend_pid()", &[&token])
            .await
            .map_err(|error| format!("query: {error}"))
    })
    .await
    .map_err(|_| format!("no answer to {token} within {QUERY_TIMEOUT:?}"))??;
    let echoed: String = answer.get(0);
    ensure!(
        echoed == token,
        "asked {token}, got {echoed}: another process's answer"
    );
    Ok(answer.get(1))
}

/// Checks out `POOL_SIZE` clients at once and returns their sessions.
pub(crate) async fn sessions<P: AsyncPool>(pool: &P) -> Result<BTreeSet<i32>, String> {
    let mut guards = Vec::new();
    for _ in 0..POOL_SIZE {
        guards.push(pool.get().await?);
    }
    let mut pids = BTreeSet::new();
    for guard in &guards {
        let row = P::client(guard)
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|error| format!("query: {error}"))?;
        pids.insert(row.get::<_, i32>(0));
    }
    ensure!(
        pids.len() == POOL_SIZE,
        "clients held at once share sessions: {pids:?}"
    );
    Ok(pids)
}

/// A master's pool: built, then every client opened (as a server's would be by the fork).
pub(crate) fn warm<P: AsyncPool>() -> Result<(Runtime, P, BTreeSet<i32>), String> {
    let runtime = Runtime::new().map_err(|error| format!("runtime: {error}"))?;
    let pool = P::build(&runtime)?;
    let pids = runtime.block_on(sessions(&pool))?;
    Ok((runtime, pool, pids))
}

/// `QUERIES` echoes, none answered by one of `foreign`'s sessions.
pub(crate) async fn serve<P: AsyncPool>(
    pool: &P,
    foreign: &BTreeSet<i32>,
) -> Result<BTreeSet<i32>, String> {
    let me = std::process::id();
    let mut own = BTreeSet::new();
    for n in 0..QUERIES {
        let pid = echo(pool, &format!("{me}-{n}")).await?;
        ensure!(
            !foreign.contains(&pid),
            "process {me} was answered by session {pid} of another"
        );
        own.insert(pid);
    }
    Ok(own)
}

pub(crate) fn expect_rebuilt(stats: ForkStats, forks: u64, discarded: u64) -> Check {
    ensure!(
        stats.forks_crossed == forks
            && stats.connections_discarded == discarded
            && stats.sockets_released == discarded
            && stats.connections_leaked == 0,
        "fork stats {stats:?}: expected {forks} fork(s), {discarded} connections discarded and their sockets released"
    );
    Ok(())
}

/// The server's client sessions now.
pub(crate) fn live_sessions() -> Result<BTreeSet<i32>, String> {
    let mut observer =
        r2d2_postgres::postgres::Client::connect(&url(), r2d2_postgres::postgres::NoTls)
            .map_err(|error| format!("observer: {error}"))?;
    let rows = observer
        .query(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[],
        )
        .map_err(|error| format!("pg_stat_activity: {error}"))?;
    Ok(rows.iter().map(|row| row.get::<_, i32>(0)).collect())
}

pub(crate) fn words(ids: &BTreeSet<i32>) -> String {
    ids.iter().map(i32::to_string).collect::<Vec<_>>().join(" ")
}

pub(crate) fn parse(words: &[&str]) -> BTreeSet<i32> {
    words.iter().filter_map(|word| word.parse().ok()).collect()
}
