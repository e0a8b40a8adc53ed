//! Where the data lives, and the demo table every request reads a row of.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;
use diesel::Connection;

/// Rows in the demo table; request `n` reads row `n % ROWS + 1`.
pub const ROWS: u64 = 1000;
const TABLE: &str = "prefork_demo_items";

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
