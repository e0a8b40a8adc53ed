//! `postgres::Client` (the connection of r2d2_postgres, plain or over TLS through
//! postgres-openssl or postgres-native-tls): the session's socket, found from the server's view
//! of it or by the connect window (see `postgres_session`), since the client exposes no socket.

use std::os::fd::RawFd;

use postgres::SimpleQueryMessage;

use super::postgres_session::{self, SessionEnds, SESSION_ENDS};
use crate::connect_window::CreatedSockets;

/// The socket of a freshly opened `postgres::Client`, when it can be told for certain;
/// `created` is what the connect window saw.
///
/// The server is asked with a simple query: one message, one round trip, nothing left in the
/// session. `query_one` would prepare a named statement in one round trip and run and close it
/// in later ones, which PgBouncer in transaction pooling may each send to another server
/// connection, leaving the statement behind on the first.
pub(crate) fn locate(
    client: &mut postgres::Client,
    created: Option<&CreatedSockets>,
) -> Option<Vec<RawFd>> {
    let messages = client.simple_query(SESSION_ENDS).ok();
    let ends = messages.as_deref().and_then(|messages| {
        let mut rows = messages.iter().filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let (Some(row), None) = (rows.next(), rows.next()) else {
            return None;
        };
        let text = |column: usize| Some(row.try_get(column).ok()?.map(str::to_string));
        let port = |column: usize| match row.try_get(column).ok()? {
            Some(port) => port.parse().ok().map(Some),
            None => Some(None),
        };
        Some(SessionEnds {
            client_addr: text(0)?,
            client_port: port(1)?,
            server_addr: text(2)?,
            server_port: port(3)?,
        })
    });
    postgres_session::socket(ends, created)
}
