//! A fake database server on a Unix socket and the manager whose connections talk to it: the
//! server records which process wrote what on which connection, so a test can prove that no
//! process ever wrote on another's connection.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One line a fake connection wrote: the writer's pid and the operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub pid: u32,
    pub op: String,
}

/// A fake server on a Unix socket. Every connection it accepts gets a number; it records every
/// line written on every connection, whichever process wrote it.
pub struct FakeServer {
    pub path: PathBuf,
    lines: Arc<Mutex<HashMap<u64, Vec<Line>>>>,
    closed: Arc<Mutex<Vec<u64>>>,
}

impl FakeServer {
    pub fn start() -> FakeServer {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "forksafe-fake-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind fake server");
        let lines: Arc<Mutex<HashMap<u64, Vec<Line>>>> = Arc::default();
        let closed: Arc<Mutex<Vec<u64>>> = Arc::default();
        let (lines2, closed2) = (Arc::clone(&lines), Arc::clone(&closed));
        let server_pid = std::process::id();
        std::thread::spawn(move || {
            for (id, stream) in listener.incoming().enumerate() {
                // A forked child has no copy of this thread; only the test process serves.
                if std::process::id() != server_pid {
                    return;
                }
                let Ok(stream) = stream else { return };
                let (lines, closed) = (Arc::clone(&lines2), Arc::clone(&closed2));
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    let mut buf = String::new();
                    loop {
                        buf.clear();
                        match reader.read_line(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let (pid, op) = buf.trim_end().split_once(' ').unwrap_or(("0", ""));
                                let line = Line {
                                    pid: pid.parse().unwrap_or(0),
                                    op: op.to_string(),
                                };
                                let reply = format!("{} {}\n", id, line.op);
                                lines
                                    .lock()
                                    .unwrap()
                                    .entry(id as u64)
                                    .or_default()
                                    .push(line);
                                if writer.write_all(reply.as_bytes()).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    closed.lock().unwrap().push(id as u64);
                });
            }
        });
        FakeServer {
            path,
            lines,
            closed,
        }
    }

    pub fn manager(&self) -> FakeManager {
        FakeManager {
            path: self.path.clone(),
            connects: Arc::default(),
        }
    }

    /// Every line, by connection number.
    pub fn lines(&self) -> HashMap<u64, Vec<Line>> {
        self.lines.lock().unwrap().clone()
    }

    /// Connections whose client end is closed in every process.
    pub fn closed(&self) -> Vec<u64> {
        self.closed.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A manager whose connections talk to a [`FakeServer`].
#[derive(Clone, Debug)]
pub struct FakeManager {
    path: PathBuf,
    pub connects: Arc<AtomicU64>,
}

/// A fake connection: remembers who opened it, writes "<pid> <op>" for every operation and
/// "<pid> goodbye" when dropped, like a driver's Terminate.
#[derive(Debug)]
pub struct FakeConnection {
    pub opened_by: u32,
    pub server_id: u64,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl FakeConnection {
    /// Sends `op` and returns the server's echo: "<connection number> <op>".
    pub fn query(&mut self, op: &str) -> std::io::Result<String> {
        writeln!(self.stream, "{} {}", std::process::id(), op)?;
        let mut reply = String::new();
        self.reader.read_line(&mut reply)?;
        Ok(reply.trim_end().to_string())
    }

    /// Sends `value` and checks the server's echo is exactly "<its connection number> <value>".
    pub fn echo(&mut self, value: &str) -> Result<(), String> {
        let reply = self
            .query(value)
            .map_err(|error| format!("query {value:?}: {error}"))?;
        ensure!(
            reply == format!("{} {value}", self.server_id),
            "asked {value}, got {reply}"
        );
        Ok(())
    }

    /// Checks `who` (say "child") got a connection of its own: opened by this process, and none
    /// of `others` (`whose`, say "the parent's").
    pub fn check_own(&self, who: &str, others: &BTreeSet<u64>, whose: &str) -> Result<(), String> {
        ensure!(
            self.opened_by == std::process::id(),
            "{who} got a connection opened by {}",
            self.opened_by
        );
        ensure!(
            !others.contains(&self.server_id),
            "{who} got {whose} connection {}",
            self.server_id
        );
        Ok(())
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl Drop for FakeConnection {
    fn drop(&mut self) {
        let _ = writeln!(self.stream, "{} goodbye", std::process::id());
    }
}

impl r2d2::ManageConnection for FakeManager {
    type Connection = FakeConnection;
    type Error = std::io::Error;

    fn connect(&self) -> std::io::Result<FakeConnection> {
        self.connects.fetch_add(1, Ordering::Relaxed);
        let stream = UnixStream::connect(&self.path)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut conn = FakeConnection {
            opened_by: std::process::id(),
            server_id: u64::MAX,
            stream,
            reader,
        };
        let reply = conn.query("hello")?;
        conn.server_id = reply
            .split(' ')
            .next()
            .and_then(|id| id.parse().ok())
            .unwrap_or(u64::MAX);
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut FakeConnection) -> std::io::Result<()> {
        conn.query("ping").map(drop)
    }

    fn has_broken(&self, _: &mut FakeConnection) -> bool {
        false
    }
}

/// A pool of fake connections whose descriptors are known to the pool.
pub fn fake_pool(manager: FakeManager, size: u32) -> forksafe_pool::Pool<FakeManager> {
    forksafe_pool::Pool::builder()
        .max_size(size)
        .min_idle(Some(size))
        .connection_timeout(Duration::from_secs(5))
        .descriptor_locator(|conn: &mut FakeConnection| Some(vec![conn.fd()]))
        .build(manager)
        .expect("fake pool")
}

/// Checks out `n` connections of a fake pool at once and returns them: their server numbers
/// and fds.
pub fn warm_connections(
    pool: &forksafe_pool::Pool<FakeManager>,
    n: u32,
) -> Result<(BTreeSet<u64>, Vec<RawFd>), String> {
    let conns: Vec<_> = (0..n)
        .map(|_| pool.get().map_err(|error| format!("warm get: {error}")))
        .collect::<Result<_, _>>()?;
    Ok((
        conns.iter().map(|conn| conn.server_id).collect(),
        conns.iter().map(|conn| conn.fd()).collect(),
    ))
}

/// Nobody but this process wrote on the connections in `ids` of `server` (each of which the
/// server has seen).
pub fn only_we_wrote_on(server: &FakeServer, ids: &BTreeSet<u64>) -> Result<(), String> {
    let me = std::process::id();
    let lines = server.lines();
    for id in ids {
        let lines = lines
            .get(id)
            .ok_or(format!("the server never saw connection {id}"))?;
        let foreign: Vec<_> = lines.iter().filter(|line| line.pid != me).collect();
        ensure!(
            foreign.is_empty(),
            "another process wrote on connection {id}: {foreign:?}"
        );
    }
    Ok(())
}

/// In a child whose pool must refuse it a connection: `get` fails at once (within 1 s) with an
/// error naming every one of `needles`.
pub fn refused_at_once<C, E>(
    get: impl FnOnce() -> Result<C, E>,
    needles: &[&str],
) -> Result<(), String>
where
    C: std::ops::Deref<Target = FakeConnection>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let error = match get() {
        Ok(conn) => {
            return Err(format!(
                "child got a connection opened by {}",
                conn.opened_by
            ))
        }
        Err(error) => error.to_string(),
    };
    ensure!(
        started.elapsed() < Duration::from_secs(1),
        "the error took {:?}",
        started.elapsed()
    );
    for needle in needles {
        ensure!(
            error.contains(needle),
            "error {error:?} does not mention {needle:?}"
        );
    }
    Ok(())
}
