//! `rusqlite::Connection` (the connection of r2d2_sqlite): the descriptors of each connection's
//! database files (see `sqlite_files` for how, and what is left open).

use std::os::fd::RawFd;

use super::sqlite_files::{database_descriptors, DATABASE_FILES};
use crate::connect_window::CreatedSockets;

/// The database descriptors of a freshly opened `rusqlite::Connection`, when they can be told
/// for certain; `Some(vec![])` for a connection that has no database file. `created` is what
/// the connect window saw.
pub(crate) fn locate(
    conn: &mut rusqlite::Connection,
    created: Option<&CreatedSockets>,
) -> Option<Vec<RawFd>> {
    let mut statement = conn.prepare(DATABASE_FILES).ok()?;
    let files = statement
        .query_map([], |row| row.get::<_, String>(0))
        .ok()?
        .collect::<Result<Vec<String>, _>>()
        .ok()?;
    database_descriptors(files, created)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::fstat;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn memory_databases_own_no_descriptor() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        assert_eq!(locate(&mut conn, None), Some(vec![]));
    }

    #[test]
    fn a_file_database_is_found_only_while_its_descriptor_is_the_only_one() {
        let path = std::env::temp_dir().join(format!(
            "forksafe-rusqlite-unit-{}-only.db",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        let fds = locate(&mut conn, None).expect("the only descriptor of the file");
        let [fd] = fds[..] else {
            panic!("one database file, descriptors {fds:?}")
        };
        let meta = std::fs::metadata(&path).unwrap();
        let stat = fstat(fd).unwrap();
        assert_eq!((stat.st_dev, stat.st_ino), (meta.dev(), meta.ino()));
        // An attached file is located too.
        let attached = path.with_extension("attached.db");
        let _ = std::fs::remove_file(&attached);
        conn.execute("ATTACH DATABASE ?1 AS other", [attached.to_str().unwrap()])
            .unwrap();
        assert_eq!(locate(&mut conn, None).map(|fds| fds.len()), Some(2));
        conn.execute("DETACH DATABASE other", []).unwrap();
        // A second connection on the same file makes it uncertain, for both connections.
        let mut second = rusqlite::Connection::open(&path).unwrap();
        assert_eq!(locate(&mut second, None), None);
        assert_eq!(locate(&mut conn, None), None);
        drop(second);
        assert_eq!(locate(&mut conn, None), Some(fds));
        drop(conn);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(&attached);
    }
}
