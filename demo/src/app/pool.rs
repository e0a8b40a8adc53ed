//! The application's connection pool, by mode and backend, and the query every request runs.

use std::time::Duration;

use diesel::pg::PgConnection;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use diesel::{QueryableByName, RunQueryDsl};

use super::database::{Database, ROWS};
use super::mode::Mode;

type PgManager = ConnectionManager<PgConnection>;
type SqliteManager = ConnectionManager<SqliteConnection>;

/// The pool, by mode and backend.
pub enum DbPool {
    R2d2Pg(r2d2::Pool<PgManager>),
    R2d2Sqlite(r2d2::Pool<SqliteManager>),
    ForkSafePg(forksafe_pool::Pool<PgManager>),
    ForkSafeSqlite(forksafe_pool::Pool<SqliteManager>),
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    echo: i64,
    #[diesel(sql_type = Text)]
    label: String,
}

const PG_QUERY: &str =
    "SELECT CAST($1 AS BIGINT) AS echo, label FROM prefork_demo_items WHERE id = $2";
const SQLITE_QUERY: &str =
    "SELECT CAST(? AS BIGINT) AS echo, label FROM prefork_demo_items WHERE id = ?";

/// Runs the request's query on a connection from `$pool`.
macro_rules! query_on {
    ($pool:expr, $sql:expr, $n:expr) => {{
        let mut conn = $pool.get().map_err(|error| format!("checkout: {error}"))?;
        diesel::sql_query($sql)
            .bind::<BigInt, _>($n as i64)
            .bind::<BigInt, _>(($n % ROWS + 1) as i64)
            .get_result::<Row>(&mut conn)
            .map_err(|error| format!("query: {error}"))
    }};
}

impl DbPool {
    pub fn build(mode: Mode, database: &Database, pool_size: u32) -> Result<DbPool, String> {
        // The same settings for every mode; the connection timeout only bounds how long a
        // checkout waits, so a broken worker answers with an error instead of hanging forever.
        let timeout = Duration::from_secs(5);
        let pool = match (mode, database) {
            (Mode::ForkSafe, Database::Postgres(url)) => DbPool::ForkSafePg(
                forksafe_pool::Pool::builder()
                    .max_size(pool_size)
                    .connection_timeout(timeout)
                    .build(ConnectionManager::new(url))
                    .map_err(|error| error.to_string())?,
            ),
            (Mode::ForkSafe, Database::Sqlite(path)) => DbPool::ForkSafeSqlite(
                forksafe_pool::Pool::builder()
                    .max_size(pool_size)
                    .connection_timeout(timeout)
                    .build(ConnectionManager::new(path))
                    .map_err(|error| error.to_string())?,
            ),
            (_, Database::Postgres(url)) => DbPool::R2d2Pg(
                r2d2::Pool::builder()
                    .max_size(pool_size)
                    .connection_timeout(timeout)
                    .build(ConnectionManager::new(url))
                    .map_err(|error| error.to_string())?,
            ),
            (_, Database::Sqlite(path)) => DbPool::R2d2Sqlite(
                r2d2::Pool::builder()
                    .max_size(pool_size)
                    .connection_timeout(timeout)
                    .build(ConnectionManager::new(path))
                    .map_err(|error| error.to_string())?,
            ),
        };
        Ok(pool)
    }

    /// The request's query: `(echo, label)`.
    pub fn query(&self, n: u64) -> Result<(i64, String), String> {
        let row = match self {
            DbPool::R2d2Pg(pool) => query_on!(pool, PG_QUERY, n),
            DbPool::ForkSafePg(pool) => query_on!(pool, PG_QUERY, n),
            DbPool::R2d2Sqlite(pool) => query_on!(pool, SQLITE_QUERY, n),
            DbPool::ForkSafeSqlite(pool) => query_on!(pool, SQLITE_QUERY, n),
        }?;
        Ok((row.echo, row.label))
    }
}
