//! `postgres::Client` (the connection of r2d2_postgres, plain or over TLS through
//! postgres-openssl or postgres-native-tls): the session's socket, found from the server's view
//! of it or by the connect window (see `postgres_session`), since the client exposes no socket.

use std::os::fd::RawFd;

use super::postgres_session::{self, SessionEnds, SESSION_ENDS};
use crate::connect_window::CreatedSockets;

/// The socket of a freshly opened `postgres::Client`, when it can be told for certain;
/// `created` is what the connect window saw.
pub(crate) fn locate(
    client: &mut postgres::Client,
    created: Option<&CreatedSockets>,
) -> Option<Vec<RawFd>> {
    let ends = client.query_one(SESSION_ENDS, &[]).ok().and_then(|row| {
        Some(SessionEnds {
            client_addr: row.try_get(0).ok()?,
            client_port: row.try_get(1).ok()?,
            server_addr: row.try_get(2).ok()?,
            server_port: row.try_get(3).ok()?,
        })
    });
    postgres_session::socket(ends, created)
}
