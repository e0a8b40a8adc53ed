//! MariaDB/MySQL through r2d2_mysql (`mysql::Conn`) over TCP and over the Unix socket, forked
//! for real against a real server (`FORKSAFE_MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306/test`; the socket `FORKSAFE_MYSQL_SOCKET`, default
//! `/run/mysqld/mysqld.sock`).
//!
//! A `harness = false` binary: the cases fork, so they run one after another in this process,
//! and every child is reaped with a deadline. Without a reachable server the binary prints why
//! and skips, unless `CI` is set: then it fails.
//!
//! `mysql::Conn` names its socket (`AsRawFd`), so inherited connections are released over both
//! transports. Every shared scenario of `support/backend.rs` runs once per transport (`tcp::`,
//! `socket::`).

#[macro_use]
mod support;

use std::collections::BTreeSet;

use forksafe_pool::PooledConnection;
use r2d2_mysql::mysql::prelude::Queryable;
use r2d2_mysql::mysql::{Conn, Opts, OptsBuilder};
use r2d2_mysql::MySqlConnectionManager;
use support::backend::{self, At, Backend, Variant};
use support::runner::{Case, Check};

/// TCP, for real: the driver's `prefer_socket` would otherwise move a local TCP connection to
/// the server's Unix socket.
struct Tcp;
/// The server's Unix socket.
struct Socket;

impl Variant for Tcp {
    fn url() -> String {
        let url = std::env::var("FORKSAFE_MYSQL_URL")
            .unwrap_or_else(|_| String::from("mysql://root@127.0.0.1:3306/test"));
        with_param(&url, "prefer_socket=false")
    }
}

impl Variant for Socket {
    fn url() -> String {
        let socket = std::env::var("FORKSAFE_MYSQL_SOCKET")
            .unwrap_or_else(|_| String::from("/run/mysqld/mysqld.sock"));
        format!("mysql://root@localhost/test?socket={socket}")
    }
}

fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

fn opts(url: &str) -> Result<Opts, String> {
    Opts::from_url(url).map_err(|error| format!("mysql URL {url:?}: {error}"))
}

impl<V: Variant> Backend for At<V, MySqlConnectionManager> {
    type Observer = Conn;

    fn url() -> String {
        V::url()
    }

    fn manager(url: &str) -> Result<Self, String> {
        Ok(At::new(MySqlConnectionManager::new(
            OptsBuilder::from_opts(opts(url)?),
        )))
    }

    /// `CONNECTION_ID()` names the session.
    fn echo(conn: &mut PooledConnection<Self>, value: &str) -> Result<i64, String> {
        let (answer, session): (String, i64) = conn
            .exec_first(
                "SELECT CAST(? AS CHAR), CAST(CONNECTION_ID() AS SIGNED)",
                (value,),
            )
            .map_err(|error| format!("query for {value:?}: {error}"))?
            .ok_or("no row")?;
        ensure!(
            answer == value,
            "asked for {value:?}, got {answer:?} (another process's answer?)"
        );
        Ok(session)
    }

    fn observer() -> Result<Conn, String> {
        Conn::new(opts(&Tcp::url())?).map_err(|error| format!("observer: {error}"))
    }

    /// `information_schema.PROCESSLIST`.
    fn live_sessions(observer: &mut Conn) -> Result<BTreeSet<i64>, String> {
        let ids: Vec<i64> = observer
            .query("SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST")
            .map_err(|error| format!("processlist: {error}"))?;
        Ok(ids.into_iter().collect())
    }
}

type TcpManager = At<Tcp, MySqlConnectionManager>;
type SocketManager = At<Socket, MySqlConnectionManager>;

/// Bad configuration gives the driver's error within the timeout, in the building process and
/// in a forked child; a string that is no URL is refused by the driver before there is a pool.
fn bad_input_gives_the_drivers_error_in_time() -> Check {
    let not_a_url = TcpManager::manager("not-a-url").err();
    ensure!(
        not_a_url
            .as_deref()
            .is_some_and(|error| error.contains("URL")),
        "a string that is no URL gave {not_a_url:?}"
    );
    backend::bad_input_fails_within_connection_timeout::<TcpManager>(|silent_port| {
        vec![
            (
                "wrong password",
                String::from("mysql://root:wrong-password@127.0.0.1:3306/test?prefer_socket=false"),
                "Access denied",
            ),
            (
                "unknown database",
                String::from(
                    "mysql://root@127.0.0.1:3306/forksafe_no_such_database?prefer_socket=false",
                ),
                "Unknown database",
            ),
            (
                "closed port",
                String::from("mysql://root@127.0.0.1:1/test?prefer_socket=false"),
                "onnection refused",
            ),
            (
                "a missing Unix socket",
                String::from("mysql://root@localhost/test?socket=/nonexistent/mysqld.sock"),
                "No such file",
            ),
            (
                "a server that never answers",
                format!("mysql://root@127.0.0.1:{silent_port}/test?prefer_socket=false"),
                "timed out waiting for connection",
            ),
        ]
    })
}

/// The server sees the TCP variant's sessions from a TCP port and the socket variant's from
/// `localhost` without one, so each scenario ran over the transport it is named after.
fn each_variant_uses_its_transport() -> Check {
    fn host<V: Variant>() -> Result<String, String> {
        let pool = backend::warm_pool_at::<At<V, MySqlConnectionManager>>(&V::url())?;
        let mut conn = pool.get().map_err(|error| format!("get: {error}"))?;
        conn.query_first(
            "SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()",
        )
        .map_err(|error| format!("processlist: {error}"))?
        .ok_or_else(|| String::from("no processlist row"))
    }
    let tcp = host::<Tcp>()?;
    ensure!(
        tcp.rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok()),
        "TCP session's host: {tcp:?}"
    );
    let socket = host::<Socket>()?;
    ensure!(socket == "localhost", "socket session's host: {socket:?}");
    Ok(())
}

fn main() {
    let reachable = opts(&Tcp::url())
        .and_then(|opts| Conn::new(opts).map_err(|error| error.to_string()))
        .map(drop)
        .map_err(|error| format!("MariaDB/MySQL at {} is unreachable: {error}", Tcp::url()));
    let own: [Case; 2] = [
        (
            "each_variant_uses_its_transport",
            each_variant_uses_its_transport,
        ),
        (
            "bad_input_gives_the_drivers_error_in_time",
            bad_input_gives_the_drivers_error_in_time,
        ),
    ];
    let cases = backend::scenarios::<TcpManager>("tcp::")
        .into_iter()
        .chain(backend::scenarios::<SocketManager>("socket::"))
        .chain(own.map(|(name, case)| (name.to_string(), case)));
    backend::run_all(
        "MariaDB/MySQL (mysql::Conn)",
        reachable,
        "set FORKSAFE_MYSQL_URL",
        cases,
    );
}
