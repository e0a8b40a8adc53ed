//! A tokio-postgres connect whose socket the crate opens itself, so that its descriptor is
//! known and recorded.
//!
//! `tokio_postgres::Config::connect` opens the socket inside the driver and never shows its
//! descriptor; finding it afterwards by comparing descriptor lists would be ambiguous on a
//! multi-thread runtime, where other tasks open sockets at the same moment. So the connect
//! resolves and opens the TCP connection here, records the descriptor in the generation's
//! table, and hands the stream to `Config::connect_raw`, which does the rest (TLS as `sslmode`
//! says, start-up, authentication) as `connect` would. What `connect` does beyond that and
//! this does not: Unix-socket hosts, `hostaddr`, `target_session_attrs`, keepalive timings
//! other than the system's, and `Client::cancel_token().cancel_query` (which needs the socket
//! settings `connect` records; `cancel_query_raw` works).

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, Error, NoTls};

use super::InDriverSections;
use crate::descriptors::DescriptorTable;

/// The task that drives one connection's I/O: spawn it on the runtime the client is used on.
/// It holds the socket's entry in the descriptor table until the connection ends.
pub(crate) type ConnectionTask = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What the async pools accept as TLS: what deadpool-postgres and bb8-postgres accept, for a
/// stream the crate opened (`tokio::net::TcpStream`). `NoTls`, postgres-openssl's and
/// postgres-native-tls's connectors are generic over the stream and fit.
pub trait MakeTls:
    MakeTlsConnect<
        TcpStream,
        Stream: Send + Sync + 'static,
        TlsConnect: Send + Sync + TlsConnect<TcpStream, Future: Send>,
        Error: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> MakeTls for T
where
    T: MakeTlsConnect<TcpStream> + Clone + Send + Sync + 'static,
    T::Stream: Send + Sync + 'static,
    T::TlsConnect: Send + Sync,
    T::Error: Send,
    <T::TlsConnect as TlsConnect<TcpStream>>::Future: Send,
{
}

/// Connects to the first of `config`'s hosts that answers, recording the socket in
/// `descriptors`. Every poll of the connect, and of the returned task, is a driver section.
pub(crate) async fn connect<T: MakeTls>(
    config: &Config,
    tls: &T,
    descriptors: &Arc<DescriptorTable>,
) -> Result<(Client, ConnectionTask), Error> {
    InDriverSections::new(connect_any_host(config, tls, descriptors)).await
}

async fn connect_any_host<T: MakeTls>(
    config: &Config,
    tls: &T,
    descriptors: &Arc<DescriptorTable>,
) -> Result<(Client, ConnectionTask), Error> {
    let ports = config.get_ports();
    let mut last_error = None;
    for (index, host) in config.get_hosts().iter().enumerate() {
        // As tokio-postgres: one port for every host, or one per host, or the default.
        let port = match ports {
            [] => 5432,
            [port] => *port,
            ports => ports.get(index).copied().unwrap_or(5432),
        };
        let attempt = match host {
            Host::Tcp(name) => connect_host(config, tls, name, port, descriptors).await,
            #[allow(unreachable_patterns)]
            _ => Err(io_error(io::Error::new(
                io::ErrorKind::Unsupported,
                "forksafe-pool: the async pools connect over TCP only (a Unix-socket host was \
                 given)",
            ))),
        };
        match attempt {
            Ok(connected) => return Ok(connected),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "forksafe-pool: the PostgreSQL configuration names no host",
        ))
    }))
}

async fn connect_host<T: MakeTls>(
    config: &Config,
    tls: &T,
    name: &str,
    port: u16,
    descriptors: &Arc<DescriptorTable>,
) -> Result<(Client, ConnectionTask), Error> {
    let opening = open_socket(name, port);
    let stream = match config.get_connect_timeout() {
        Some(timeout) => tokio::time::timeout(*timeout, opening)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting to the server timed out",
                ))
            }),
        None => opening.await,
    }
    .map_err(io_error)?;
    // As tokio-postgres does for its own sockets.
    stream.set_nodelay(true).map_err(io_error)?;
    if config.get_keepalives() {
        use nix::sys::socket::{setsockopt, sockopt::KeepAlive};
        setsockopt(&stream, KeepAlive, &true).map_err(|errno| io_error(errno.into()))?;
    }
    // Recorded before the first byte is sent: a fork from here on finds it in the table.
    let registration = descriptors.register(Some(vec![stream.as_raw_fd()]));
    let tls_connect = tls
        .clone()
        .make_tls_connect(name)
        .map_err(|error| io_error(io::Error::other(error)))?;
    let (client, connection) = config.connect_raw(stream, tls_connect).await?;
    let task = async move {
        // Dropped after the connection (and so after its socket is closed): until then a
        // forked child finds the socket in the table.
        let _registration = registration;
        if let Err(error) = connection.await {
            tracing::warn!(target: "forksafe_pool", "PostgreSQL connection error: {error}");
        }
    };
    Ok((client, Box::pin(InDriverSections::new(task))))
}

async fn open_socket(name: &str, port: u16) -> io::Result<TcpStream> {
    let mut last_error = None;
    for address in tokio::net::lookup_host((name, port)).await? {
        match TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no address found for {name}"),
        )
    }))
}

/// `error` as tokio-postgres's own error type, which the pool libraries' connects return.
///
/// `tokio_postgres::Error` has no public constructor. The driver makes one from an I/O error
/// of its stream, so the error is handed to it as the first answer of a stream that fails:
/// the start-up message's write fails at once, and the driver returns its I/O error ("error
/// communicating with the server: ..."), with `error` as its source.
fn io_error(error: io::Error) -> Error {
    let mut config = Config::new();
    config.user("forksafe-pool").ssl_mode(SslMode::Disable);
    let attempt = config.connect_raw(FailingStream(Some(error)), NoTls);
    let mut attempt = pin!(attempt);
    match attempt
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(Err(error)) => error,
        // The first write fails, so the attempt ends on its first poll.
        Poll::Ready(Ok(_)) | Poll::Pending => {
            unreachable!("a connect over a failing stream ends in an error at once")
        }
    }
}

/// A stream whose every read and write fails (the first with the error it was given).
struct FailingStream(Option<io::Error>);

impl FailingStream {
    fn error(&mut self) -> io::Error {
        self.0
            .take()
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for FailingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(self.get_mut().error()))
    }
}

impl AsyncWrite for FailingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(self.get_mut().error()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Err(self.get_mut().error()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_becomes_the_drivers_error_with_its_source() {
        let error = io_error(io::Error::new(io::ErrorKind::TimedOut, "took too long"));
        let source = std::error::Error::source(&error)
            .and_then(|source| source.downcast_ref::<io::Error>())
            .expect("the I/O error is the source");
        assert_eq!(source.kind(), io::ErrorKind::TimedOut);
        assert_eq!(source.to_string(), "took too long");
    }
}
