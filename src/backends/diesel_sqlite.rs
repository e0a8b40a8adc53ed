//! diesel `SqliteConnection`: the descriptors of each connection's database files (see
//! `sqlite_files` for how, and what is left open).

use std::os::fd::RawFd;

use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};

use super::sqlite_files::{database_descriptors, DATABASE_FILES};
use crate::connect_window::CreatedSockets;

/// One database of the connection: its file (empty for memory and temp).
#[derive(QueryableByName)]
struct Database {
    #[diesel(sql_type = Text)]
    file: String,
}

/// The database descriptors of a freshly opened `SqliteConnection`, when they can be told for
/// certain; `Some(vec![])` for a connection that has no database file. `created` is what the
/// connect window saw.
pub(crate) fn locate(
    conn: &mut SqliteConnection,
    created: Option<&CreatedSockets>,
) -> Option<Vec<RawFd>> {
    let databases: Vec<Database> = diesel::sql_query(DATABASE_FILES).load(conn).ok()?;
    database_descriptors(
        databases.iter().map(|database| database.file.as_str()),
        created,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::Connection;
    use nix::sys::stat::fstat;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "forksafe-sqlite-unit-{}-{name}.db",
            std::process::id()
        ))
    }

    #[test]
    fn memory_databases_own_no_descriptor() {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        assert_eq!(locate(&mut conn, None), Some(vec![]));
    }

    #[test]
    fn a_file_database_is_found_only_while_its_descriptor_is_the_only_one() {
        let path = temp_path("only");
        let _ = fs::remove_file(&path);
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        let fds = locate(&mut conn, None).expect("the only descriptor of the file");
        assert_eq!(fds.len(), 1);
        let meta = fs::metadata(&path).unwrap();
        let stat = fstat(fds[0]).unwrap();
        assert_eq!((stat.st_dev, stat.st_ino), (meta.dev(), meta.ino()));
        // A second descriptor on the same file makes it uncertain, for both connections.
        let other = fs::File::open(&path).unwrap();
        assert_eq!(locate(&mut conn, None), None);
        drop(other);
        let mut second = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        assert_eq!(locate(&mut second, None), None);
        assert_eq!(locate(&mut conn, None), None);
        drop(second);
        assert_eq!(locate(&mut conn, None), Some(fds));
        drop(conn);
        let _ = fs::remove_file(&path);
    }
}
