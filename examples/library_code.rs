//! A library that owns its database pool, used by a pre-forking application.
//!
//! `notes` below stands for a library crate: it exposes a repository type and builds its own
//! diesel SQLite pool with `forksafe_pool::Pool` — the only change from `r2d2::Pool`. The
//! application (`main`) opens the repository once in the master, uses it, forks three workers
//! that use the same repository value, and keeps using it in the master. No worker ever
//! touches the master's connections; each opens its own on first use.
//!
//! ```text
//! cargo run --example library_code
//! ```

mod notes {
    //! The "library": knows nothing about fork() beyond using `forksafe_pool::Pool`.

    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::r2d2::{ConnectionManager, CustomizeConnection};
    use diesel::sql_types::{Integer, Text};

    type Manager = ConnectionManager<SqliteConnection>;

    /// Errors of the repository: the pool's (still `r2d2::Error`) and diesel's.
    #[derive(Debug)]
    pub enum Error {
        Pool(r2d2::Error),
        Query(diesel::result::Error),
    }

    impl From<r2d2::Error> for Error {
        fn from(error: r2d2::Error) -> Self {
            Error::Pool(error)
        }
    }

    impl From<diesel::result::Error> for Error {
        fn from(error: diesel::result::Error) -> Self {
            Error::Query(error)
        }
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Error::Pool(error) => write!(f, "pool: {error}"),
                Error::Query(error) => write!(f, "query: {error}"),
            }
        }
    }

    impl std::error::Error for Error {}

    /// One note and the process that wrote it.
    #[derive(Debug, QueryableByName)]
    pub struct Note {
        #[diesel(sql_type = Integer)]
        pub writer: i32,
        #[diesel(sql_type = Text)]
        pub body: String,
    }

    /// Several processes share the database file: wait for each other's write locks.
    #[derive(Debug)]
    struct SharedFile;

    impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SharedFile {
        fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
            conn.batch_execute("PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL;")
                .map_err(diesel::r2d2::Error::QueryError)
        }
    }

    /// The library's public type. Cheap to clone; safe to keep across `fork()`.
    #[derive(Clone, Debug)]
    pub struct NoteRepository {
        pool: forksafe_pool::Pool<Manager>,
    }

    impl NoteRepository {
        /// Opens (and creates) the notes database at `path`.
        pub fn open(path: &str) -> Result<NoteRepository, Error> {
            let pool = forksafe_pool::Pool::builder()
                .max_size(2)
                .connection_customizer(Box::new(SharedFile))
                .build(ConnectionManager::new(path))?;
            pool.get()?.batch_execute(
                "CREATE TABLE IF NOT EXISTS notes (writer INTEGER NOT NULL, body TEXT NOT NULL)",
            )?;
            Ok(NoteRepository { pool })
        }

        pub fn add(&self, body: &str) -> Result<(), Error> {
            let mut conn = self.pool.get()?;
            diesel::sql_query("INSERT INTO notes (writer, body) VALUES (?, ?)")
                .bind::<Integer, _>(std::process::id() as i32)
                .bind::<Text, _>(body)
                .execute(&mut conn)?;
            Ok(())
        }

        pub fn all(&self) -> Result<Vec<Note>, Error> {
            let mut conn = self.pool.get()?;
            Ok(
                diesel::sql_query("SELECT writer, body FROM notes ORDER BY rowid")
                    .load(&mut conn)?,
            )
        }

        /// How many connections this repository's pool discarded after crossing a fork.
        pub fn connections_discarded(&self) -> u64 {
            self.pool.fork_stats().connections_discarded
        }
    }
}

const WORKERS: usize = 3;
const NOTES_PER_WORKER: usize = 20;

/// A worker: uses the repository it inherited, as if nothing had happened.
fn worker(repo: &notes::NoteRepository, number: usize) -> Result<(), notes::Error> {
    for note in 0..NOTES_PER_WORKER {
        repo.add(&format!("worker {number}, note {note}"))?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notes.db");
    let repo = notes::NoteRepository::open(path.to_str().ok_or("non-UTF-8 temp path")?)?;
    repo.add("written by the master before forking")?;

    let mut workers = Vec::new();
    for number in 0..WORKERS {
        // SAFETY: the child only runs `worker` and leaves with `_exit`, never returning into
        // `main`, so nothing of the master's (its temp dir, its stdout buffer) is cleaned up twice.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Child => {
                let code = match worker(&repo, number) {
                    Ok(()) if repo.connections_discarded() > 0 => 0,
                    Ok(()) => 2,
                    Err(error) => {
                        eprintln!("worker {number}: {error}");
                        1
                    }
                };
                // SAFETY: `_exit` has no preconditions; it ends the worker at once.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => workers.push(child),
        }
    }
    // The master keeps using the same repository while the workers run.
    repo.add("written by the master while the workers run")?;
    for child in workers {
        match nix::sys::wait::waitpid(child, None)? {
            nix::sys::wait::WaitStatus::Exited(_, 0) => {}
            status => return Err(format!("worker {child} ended with {status:?}").into()),
        }
    }

    let all = repo.all()?;
    let master = std::process::id() as i32;
    let by_master = all.iter().filter(|note| note.writer == master).count();
    let by_workers = all.len() - by_master;
    println!(
        "{} notes: {by_master} by the master, {by_workers} by {WORKERS} workers",
        all.len()
    );
    println!(
        "first: {:?}, last: {:?}",
        all[0].body,
        all[all.len() - 1].body
    );
    assert_eq!(by_master, 2);
    assert_eq!(by_workers, WORKERS * NOTES_PER_WORKER);
    assert_eq!(
        repo.connections_discarded(),
        0,
        "the master discards nothing"
    );
    Ok(())
}
