//! diesel `PgConnection`: the session's socket, found from the server's view of it (see
//! `postgres_session`), since neither diesel nor libpq through it exposes the socket.

use std::os::fd::RawFd;

use diesel::sql_types::{Integer, Nullable, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use super::postgres_session::{SessionEnds, SESSION_ENDS};

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Nullable<Text>)]
    client_addr: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    client_port: Option<i32>,
    #[diesel(sql_type = Nullable<Text>)]
    server_addr: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    server_port: Option<i32>,
}

/// The socket of a freshly opened `PgConnection`, when it can be told for certain.
pub(crate) fn locate(conn: &mut PgConnection) -> Option<Vec<RawFd>> {
    let rows: Vec<Row> = diesel::sql_query(SESSION_ENDS).load(conn).ok()?;
    let [row] = rows.as_slice() else { return None };
    SessionEnds {
        client_addr: row.client_addr.clone(),
        client_port: row.client_port,
        server_addr: row.server_addr.clone(),
        server_port: row.server_port,
    }
    .locate()
}
