//! diesel `PgConnection`: the session's socket, found from the server's view of it or by the
//! connect window (see `postgres_session`), since neither diesel nor libpq through it exposes
//! the socket.

use std::os::fd::RawFd;

use diesel::sql_types::{Integer, Nullable, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};

use super::postgres_session::{self, SessionEnds, SESSION_ENDS};
use crate::connect_window::CreatedSockets;

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

/// The socket of a freshly opened `PgConnection`, when it can be told for certain; `created`
/// is what the connect window saw.
pub(crate) fn locate(
    conn: &mut PgConnection,
    created: Option<&CreatedSockets>,
) -> Option<Vec<RawFd>> {
    let ends = diesel::sql_query(SESSION_ENDS)
        .load::<Row>(conn)
        .ok()
        .and_then(|rows| match <[Row; 1]>::try_from(rows) {
            Ok([row]) => Some(SessionEnds {
                client_addr: row.client_addr,
                client_port: row.client_port,
                server_addr: row.server_addr,
                server_port: row.server_port,
            }),
            Err(_) => None,
        });
    postgres_session::socket(ends, created)
}
