//! The application every worker serves: a connection pool plus a large read-only lookup table.
//!
//! A request `GET /?n=N` runs one database query that echoes `N` and reads the row
//! `N % ROWS + 1`, looks `N` up in the table, and answers `n=<echo> label=<label> v=<value>
//! pid=<worker pid>`. The client knows what every field must be, so an answer that belongs
//! to another request (a reply read off a shared socket) is caught.
//!
//! One concept per file: `mode` (which pool, built when), `database` (where the data lives, the
//! demo table), `pool` (the pool by mode and backend, the request's query), `state` (the lookup
//! table and the memory it lives in), `answer` (what the answer to a request must be). This
//! file holds the application itself, which builds on all of them.

mod answer;
mod database;
mod mode;
mod pool;
mod state;

#[cfg(test)]
pub use answer::expected_label;
pub use answer::Answer;
pub use database::Database;
pub use mode::Mode;
use pool::DbPool;
#[cfg(test)]
pub use state::table_value;
use state::Table;
pub use state::{map_shared_anonymous, table_len, StateMemory};

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
