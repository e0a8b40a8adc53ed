//! The application every worker serves: a connection pool plus a large read-only lookup table.
//!
//! A request `GET /?n=N` runs one database query that echoes `N` and reads the row
//! `N % ROWS + 1`, looks `N` up in the table, and answers `n=<echo> label=<label> v=<value>
//! pid=<worker pid>`. The client knows what every field must be, so an answer that belongs
//! to another request (a reply read off a shared socket) is caught.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, QueryableByName, RunQueryDsl};

/// Rows in the demo table; request `n` reads row `n % ROWS + 1`.
pub const ROWS: u64 = 1000;
const TABLE: &str = "prefork_demo_items";

/// Which pool the application is built with, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain `r2d2::Pool`, built in the master before the fork (today's broken setup).
    Naive,
    /// `forksafe_pool::Pool`, built in the master before the fork.
    ForkSafe,
    /// uWSGI `--lazy-apps`: every worker builds the whole application after the fork.
    Lazy,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Naive, Mode::ForkSafe, Mode::Lazy];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Naive => "naive",
            Mode::ForkSafe => "forksafe",
            Mode::Lazy => "lazy",
        }
    }

    pub fn parse(name: &str) -> Result<Mode, String> {
        Mode::ALL
            .into_iter()
            .find(|mode| mode.name() == name)
            .ok_or_else(|| format!("unknown mode {name:?}"))
    }

    /// Whether the master builds the application before forking.
    pub fn eager(self) -> bool {
        self != Mode::Lazy
    }
}

/// Where the data lives: a PostgreSQL URL, or an SQLite file.
#[derive(Clone, Debug)]
pub enum Database {
    Postgres(String),
    Sqlite(String),
}

impl Database {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; `sqlite://…`, `file:…` or the path of
    /// an existing file is SQLite. Anything else is refused rather than taken for the name of
    /// a new SQLite file.
    pub fn from_arg(arg: &str) -> Result<Database, String> {
        if arg.starts_with("postgres://") || arg.starts_with("postgresql://") {
            Ok(Database::Postgres(arg.to_owned()))
        } else if arg.starts_with("sqlite://")
            || arg.starts_with("file:")
            || std::path::Path::new(arg).is_file()
        {
            Ok(Database::Sqlite(arg.to_owned()))
        } else {
            Err(format!(
                "--database {:?}: neither a postgres:// or postgresql:// URL, nor a sqlite:// or \
                 file: name, nor an existing SQLite file",
                without_password(arg)
            ))
        }
    }

    pub fn arg(&self) -> &str {
        match self {
            Database::Postgres(url) | Database::Sqlite(url) => url,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Database::Postgres(url) => format!("PostgreSQL ({})", without_password(url)),
            Database::Sqlite(path) => format!("embedded SQLite (file {path})"),
        }
    }

    /// Creates and fills the demo table (idempotent); run once by the driver.
    pub fn prepare(&self) -> Result<(), String> {
        let fill = format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (id BIGINT PRIMARY KEY, label TEXT NOT NULL);
             WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < {ROWS})
             INSERT INTO {TABLE} (id, label) SELECT i, 'item-' || i FROM seq WHERE true
             ON CONFLICT (id) DO NOTHING;"
        );
        match self {
            Database::Postgres(url) => PgConnection::establish(url)
                .map_err(|error| error.to_string())?
                .batch_execute(&fill)
                .map_err(|error| error.to_string()),
            Database::Sqlite(path) => SqliteConnection::establish(path)
                .map_err(|error| error.to_string())?
                .batch_execute(&format!("PRAGMA journal_mode = WAL; {fill}"))
                .map_err(|error| error.to_string()),
        }
    }
}

/// `url` with any password in it (`user:password@`, `password=`) replaced by `***`, for
/// printing.
pub fn without_password(url: &str) -> String {
    let mut shown = url.to_owned();
    if let Some(scheme_end) = shown.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = shown[authority_start..]
            .find(['/', '?'])
            .map_or(shown.len(), |at| authority_start + at);
        if let Some(at) = shown[authority_start..authority_end].rfind('@') {
            let user_info = authority_start..authority_start + at;
            if let Some(colon) = shown[user_info.clone()].find(':') {
                shown.replace_range(user_info.start + colon + 1..user_info.end, "***");
            }
        }
    }
    // Key/value parameters: `?password=…&…`, or a libpq `password=…` word.
    let mut out = String::with_capacity(shown.len());
    let mut rest = shown.as_str();
    while let Some(at) = rest.find("password=") {
        let value_start = at + "password=".len();
        out.push_str(&rest[..value_start]);
        out.push_str("***");
        let value_len = rest[value_start..]
            .find(['&', ' '])
            .unwrap_or(rest.len() - value_start);
        rest = &rest[value_start + value_len..];
    }
    out.push_str(rest);
    out
}

/// The label row `n` carries.
pub fn expected_label(n: u64) -> String {
    format!("item-{}", n % ROWS + 1)
}

/// The lookup table's entry `index`: a cheap hash, so filling the table costs CPU like loading
/// real application data, and the client can check every value.
pub fn table_value(index: u64) -> u64 {
    let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Entries in a table of `mib` MiB.
pub fn table_len(mib: usize) -> u64 {
    (mib * 1024 * 1024 / 8).max(1) as u64
}

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
    fn build(mode: Mode, database: &Database, pool_size: u32) -> Result<DbPool, String> {
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
    fn query(&self, n: u64) -> Result<(i64, String), String> {
        let row = match self {
            DbPool::R2d2Pg(pool) => query_on!(pool, PG_QUERY, n),
            DbPool::ForkSafePg(pool) => query_on!(pool, PG_QUERY, n),
            DbPool::R2d2Sqlite(pool) => query_on!(pool, SQLITE_QUERY, n),
            DbPool::ForkSafeSqlite(pool) => query_on!(pool, SQLITE_QUERY, n),
        }?;
        Ok((row.echo, row.label))
    }
}

/// Where the application's read-only state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateMemory {
    /// A `Vec` on the heap, as most applications hold what they load: private memory that a
    /// fork shares copy-on-write, so `fork()` copies a page-table entry per 4 KiB page (5–8 ms
    /// for 256 MiB on the machines in the README) and a worker's exit tears them down again.
    Heap,
    /// Private memory like the heap's, in transparent huge pages (`madvise(MADV_HUGEPAGE)`):
    /// still shared copy-on-write, but a fork copies one entry per 2 MiB, 512 times fewer,
    /// and a worker's exit tears down as few.
    Huge,
    /// A shared anonymous mapping, made read-only once filled: a fork copies no page-table
    /// entries for it (a worker maps the pages it reads on first touch), so forking and
    /// reaping a worker cost the same whatever the state's size.
    Shared,
}

impl StateMemory {
    const ALL: [StateMemory; 3] = [StateMemory::Heap, StateMemory::Huge, StateMemory::Shared];

    pub fn name(self) -> &'static str {
        match self {
            StateMemory::Heap => "heap",
            StateMemory::Huge => "huge",
            StateMemory::Shared => "shared",
        }
    }

    pub fn parse(name: &str) -> Result<StateMemory, String> {
        StateMemory::ALL
            .into_iter()
            .find(|memory| memory.name() == name)
            .ok_or_else(|| format!("unknown state memory {name:?} (heap, huge or shared)"))
    }
}

/// The lookup table, in the memory the run asked for.
enum Table {
    Heap(Vec<u64>),
    Mapped(MappedTable),
}

impl Table {
    fn build(memory: StateMemory, len: u64) -> Result<Table, String> {
        Ok(match memory {
            StateMemory::Heap => Table::Heap((0..len).map(table_value).collect()),
            StateMemory::Huge => Table::Mapped(MappedTable::build(len as usize, Mapping::Huge)?),
            StateMemory::Shared => {
                Table::Mapped(MappedTable::build(len as usize, Mapping::Shared)?)
            }
        })
    }

    fn entries(&self) -> &[u64] {
        match self {
            Table::Heap(entries) => entries,
            Table::Mapped(table) => table.entries(),
        }
    }
}

/// `bytes` of fresh, zeroed, writable memory shared with every process later forked from this
/// one (`MAP_SHARED | MAP_ANONYMOUS`), page-aligned; never freed unless the caller unmaps it.
pub fn map_shared_anonymous(bytes: usize) -> Result<std::ptr::NonNull<libc::c_void>, String> {
    map_anonymous(bytes, libc::MAP_SHARED)
}

fn map_anonymous(
    bytes: usize,
    sharing: libc::c_int,
) -> Result<std::ptr::NonNull<libc::c_void>, String> {
    // SAFETY: an anonymous mapping with no address hint has no preconditions; the result is
    // checked against MAP_FAILED before use.
    let start = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            sharing | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if start == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    std::ptr::NonNull::new(start).ok_or_else(|| String::from("mmap returned null"))
}

/// The two mappings a [`MappedTable`] can live in.
#[derive(Clone, Copy)]
enum Mapping {
    /// `MAP_SHARED`: forks copy no page-table entries.
    Shared,
    /// `MAP_PRIVATE` with `MADV_HUGEPAGE`: forks copy one entry per 2 MiB.
    Huge,
}

/// `len` table entries in an anonymous mapping of their own, read-only once filled.
struct MappedTable {
    start: std::ptr::NonNull<u64>,
    len: usize,
}

// SAFETY: the mapping is read-only after `build` and only freed by `Drop`, so sharing `&[u64]`
// views of it between threads is sound, as for a `Vec<u64>` nobody mutates.
unsafe impl Send for MappedTable {}
// SAFETY: as above.
unsafe impl Sync for MappedTable {}

impl MappedTable {
    fn build(len: usize, mapping: Mapping) -> Result<MappedTable, String> {
        let bytes = (len * 8).max(1);
        let start = match mapping {
            Mapping::Shared => map_anonymous(bytes, libc::MAP_SHARED)?,
            Mapping::Huge => {
                let start = map_anonymous(bytes, libc::MAP_PRIVATE)?;
                // SAFETY: advice on the whole of the mapping just made; it changes how pages
                // are backed, never their contents.
                if unsafe { libc::madvise(start.as_ptr(), bytes, libc::MADV_HUGEPAGE) } != 0 {
                    return Err(format!(
                        "madvise(MADV_HUGEPAGE): {} (is /sys/kernel/mm/transparent_hugepage/enabled \"never\"?)",
                        std::io::Error::last_os_error()
                    ));
                }
                start
            }
        };
        let table = MappedTable {
            start: start.cast(),
            len,
        };
        // SAFETY: the mapping is `bytes` long, page-aligned, writable, and referenced by
        // nothing else yet; the slice lives only until `mprotect` below.
        let entries = unsafe { std::slice::from_raw_parts_mut(table.start.as_ptr(), len) };
        for (index, entry) in entries.iter_mut().enumerate() {
            *entry = table_value(index as u64);
        }
        // SAFETY: the same mapping; no `&mut` to it outlives this point.
        if unsafe { libc::mprotect(start.as_ptr().cast(), bytes, libc::PROT_READ) } != 0 {
            return Err(format!("mprotect: {}", std::io::Error::last_os_error()));
        }
        Ok(table)
    }

    fn entries(&self) -> &[u64] {
        // SAFETY: `len` initialised entries, read-only and mapped until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }
}

impl Drop for MappedTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `build`, of that size; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.start.as_ptr().cast(), (self.len * 8).max(1)) };
    }
}

/// The application: what a gunicorn `preload_app` or a uWSGI master would load.
pub struct App {
    pool: DbPool,
    table: Table,
}

impl App {
    /// Builds the pool (waiting for its connections), warms it with one query, and fills the
    /// lookup table.
    pub fn build(
        mode: Mode,
        database: &Database,
        pool_size: u32,
        table_mib: usize,
        state_memory: StateMemory,
    ) -> Result<App, String> {
        let pool = DbPool::build(mode, database, pool_size)?;
        pool.query(0)?;
        let table = Table::build(state_memory, table_len(table_mib))?;
        Ok(App { pool, table })
    }

    /// Answers one request: the body, or an error message for a 500.
    pub fn handle(&self, n: u64) -> Result<String, String> {
        let (echo, label) = self.pool.query(n)?;
        // Read the table at the index the database echoed, as an app would use a query result.
        let table = self.table.entries();
        let value = table[(echo as u64 % table.len() as u64) as usize];
        Ok(format!(
            "n={echo} label={label} v={value} pid={}\n",
            std::process::id()
        ))
    }
}

/// The parsed answer of one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub echo: u64,
    pub label: String,
    pub value: u64,
    pub pid: u32,
}

impl Answer {
    pub fn parse(body: &str) -> Option<Answer> {
        let mut echo = None;
        let mut label = None;
        let mut value = None;
        let mut pid = None;
        for field in body.split_whitespace() {
            let (key, val) = field.split_once('=')?;
            match key {
                "n" => echo = val.parse().ok(),
                "label" => label = Some(val.to_owned()),
                "v" => value = val.parse().ok(),
                "pid" => pid = val.parse().ok(),
                _ => return None,
            }
        }
        Some(Answer {
            echo: echo?,
            label: label?,
            value: value?,
            pid: pid?,
        })
    }

    /// Whether this is the answer to request `n` from a server with a `table_mib` table.
    pub fn is_for(&self, n: u64, table_mib: usize) -> bool {
        self.echo == n
            && self.label == expected_label(n)
            && self.value == table_value(n % table_len(table_mib))
    }
}
