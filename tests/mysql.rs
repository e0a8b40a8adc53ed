//! MariaDB/MySQL through diesel's `MysqlConnection` and `diesel::r2d2::ConnectionManager`,
//! forked for real against a real server (`FORKSAFE_MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306/test`; over the Unix socket `FORKSAFE_MYSQL_SOCKET_URL`, default
//! `mysql://root@localhost/test?unix_socket=/run/mysqld/mysqld.sock`).
//!
//! A `harness = false` binary: the cases fork, so they run one after another in this process,
//! and every child is reaped with a deadline (a child still running then is killed and fails
//! its case). Without a reachable server the binary prints why and skips, unless `CI` is set:
//! then it fails.
//!
//! The scenarios it shares with Redis are in `support/backend.rs`; the ones here are MySQL's own.

#[macro_use]
mod support;

use std::collections::BTreeSet;

use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{BigInt, Text};
use forksafe_pool::PooledConnection;
use support::backend::{self, Backend, POOL_SIZE};
use support::runner::{skip_unless_ci, Check};

type Manager = ConnectionManager<MysqlConnection>;

/// The server's Unix socket (`FORKSAFE_MYSQL_SOCKET_URL`).
fn socket_url() -> String {
    std::env::var("FORKSAFE_MYSQL_SOCKET_URL").unwrap_or_else(|_| {
        String::from("mysql://root@localhost/test?unix_socket=/run/mysqld/mysqld.sock")
    })
}

#[derive(QueryableByName)]
struct Echo {
    #[diesel(sql_type = Text)]
    value: String,
    #[diesel(sql_type = BigInt)]
    session: i64,
}

#[derive(QueryableByName)]
struct Session {
    #[diesel(sql_type = BigInt)]
    session: i64,
}

impl Backend for Manager {
    type Observer = MysqlConnection;

    fn url() -> String {
        std::env::var("FORKSAFE_MYSQL_URL")
            .unwrap_or_else(|_| String::from("mysql://root@127.0.0.1:3306/test"))
    }

    fn manager(url: &str) -> Result<Manager, String> {
        Ok(ConnectionManager::new(url))
    }

    /// `CONNECTION_ID()` names the session.
    fn echo(conn: &mut PooledConnection<Manager>, value: &str) -> Result<i64, String> {
        let answer: Echo = diesel::sql_query(
            "SELECT CAST(? AS CHAR) AS value, CAST(CONNECTION_ID() AS SIGNED) AS session",
        )
        .bind::<Text, _>(value)
        .get_result(conn)
        .map_err(|error| format!("query for {value:?}: {error}"))?;
        ensure!(
            answer.value == value,
            "asked for {value:?}, got {:?} (another process's answer?)",
            answer.value
        );
        Ok(answer.session)
    }

    fn observer() -> Result<MysqlConnection, String> {
        MysqlConnection::establish(&Manager::url()).map_err(|error| format!("observer: {error}"))
    }

    /// `information_schema.PROCESSLIST`.
    fn live_sessions(observer: &mut MysqlConnection) -> Result<BTreeSet<i64>, String> {
        let rows: Vec<Session> = diesel::sql_query(
            "SELECT CAST(ID AS SIGNED) AS session FROM information_schema.PROCESSLIST",
        )
        .load(observer)
        .map_err(|error| format!("processlist: {error}"))?;
        Ok(rows.into_iter().map(|row| row.session).collect())
    }
}

/// Over the Unix socket nothing ties a session to one of our descriptors, so the inherited
/// sockets are leaked in the child, and counted as such; the child still gets its own
/// connections and the master keeps its sessions.
fn unix_socket_connections_are_counted_as_leaked() -> Check {
    if let Err(error) = MysqlConnection::establish(&socket_url()) {
        let reason = format!(
            "the server's Unix socket ({}) is unreachable: {error}",
            socket_url()
        );
        return skip_unless_ci(&reason, "set FORKSAFE_MYSQL_SOCKET_URL");
    }
    let pool = backend::warm_pool_at::<Manager>(&socket_url())
        .map_err(|error| format!("{} ({error})", socket_url()))?;
    let master = backend::session_ids(&pool)?;
    backend::in_child(|| {
        backend::run_requests(&pool, 50, &master)?;
        let inherited = u64::from(POOL_SIZE);
        backend::expect_fork_stats(&pool.fork_stats(), inherited, 0, inherited)
    })?;
    backend::check_master_intact(&pool, &master)
}

/// Bad configuration fails fast with r2d2's error and the cause, never hangs: in the process
/// that built the pool, and in a forked child that rebuilds it.
fn bad_input_fails_within_connection_timeout() -> Check {
    let good = Manager::url();
    let (base, database) = good
        .rsplit_once('/')
        .ok_or("FORKSAFE_MYSQL_URL has no database")?;
    let with_password = base.replacen("mysql://root@", "mysql://root:wrong-password@", 1);
    backend::bad_input_fails_within_connection_timeout::<Manager>(|silent_port| {
        vec![
            (
                "not a URL",
                String::from("not-a-url"),
                "connection URLs must be in the form",
            ),
            (
                "wrong password",
                format!("{with_password}/{database}"),
                "Access denied",
            ),
            (
                "unknown database",
                format!("{base}/forksafe_no_such_database"),
                "Unknown database",
            ),
            (
                "unreachable port",
                String::from("mysql://root@127.0.0.1:1/test"),
                "Can't connect",
            ),
            (
                "a server that never answers",
                format!("mysql://root@127.0.0.1:{silent_port}/test"),
                "timed out waiting for connection",
            ),
        ]
    })
}

fn main() {
    let reachable = MysqlConnection::establish(&Manager::url())
        .map(drop)
        .map_err(|error| {
            format!(
                "MariaDB/MySQL at {} is unreachable: {error}",
                Manager::url()
            )
        });
    backend::run::<Manager>(
        "MariaDB/MySQL",
        reachable,
        "set FORKSAFE_MYSQL_URL",
        [
            (
                "unix_socket_connections_are_counted_as_leaked",
                unix_socket_connections_are_counted_as_leaked as fn() -> Check,
            ),
            (
                "bad_input_fails_within_connection_timeout",
                bad_input_fails_within_connection_timeout,
            ),
        ],
    );
}
