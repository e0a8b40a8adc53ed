//! diesel code written for `r2d2::Pool` compiles and works unchanged against
//! `forksafe_pool::Pool`: `&mut conn`, `conn.transaction(..)`, `batch_execute`, `load`.
#![cfg(feature = "diesel-sqlite")]

use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
// The one line a service changes: `use diesel::r2d2::Pool;` becomes this.
use forksafe_pool::Pool;

diesel::table! {
    users (id) {
        id -> Integer,
        name -> Text,
    }
}

#[derive(Queryable, Debug, PartialEq)]
struct User {
    id: i32,
    name: String,
}

fn pool() -> Pool<ConnectionManager<SqliteConnection>> {
    // One connection: every checkout sees the same `:memory:` database.
    Pool::builder()
        .max_size(1)
        .build(ConnectionManager::<SqliteConnection>::new(":memory:"))
        .unwrap()
}

#[test]
fn load_insert_and_transaction_take_the_pooled_connection_as_is(
) -> Result<(), Box<dyn std::error::Error>> {
    let pool = pool();
    let mut conn = pool.get()?;
    diesel::connection::SimpleConnection::batch_execute(
        &mut conn,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
    )?;
    diesel::insert_into(users::table)
        .values((users::id.eq(1), users::name.eq("ada")))
        .execute(&mut conn)?;

    let committed: QueryResult<()> = conn.transaction(|conn| {
        diesel::insert_into(users::table)
            .values((users::id.eq(2), users::name.eq("grace")))
            .execute(conn)?;
        Ok(())
    });
    committed?;
    let rolled_back: QueryResult<()> = conn.transaction(|conn| {
        diesel::insert_into(users::table)
            .values((users::id.eq(3), users::name.eq("lost")))
            .execute(conn)?;
        Err(diesel::result::Error::RollbackTransaction)
    });
    assert_eq!(rolled_back, Err(diesel::result::Error::RollbackTransaction));

    let all = users::table.order(users::id).load::<User>(&mut conn)?;
    assert_eq!(
        all,
        vec![
            User {
                id: 1,
                name: "ada".into()
            },
            User {
                id: 2,
                name: "grace".into()
            }
        ]
    );
    Ok(())
}

#[test]
fn a_function_generic_over_diesel_connections_accepts_the_guard() {
    fn count_users<C>(conn: &mut C) -> i64
    where
        C: Connection<Backend = diesel::sqlite::Sqlite> + diesel::connection::LoadConnection,
    {
        diesel::sql_query(
            "CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL)",
        )
        .execute(conn)
        .unwrap();
        users::table.count().get_result(conn).unwrap()
    }
    let pool = pool();
    let mut conn = pool.get().unwrap();
    assert_eq!(count_users(&mut conn), 0);
}

#[test]
fn the_guard_is_static_and_send_like_r2d2s() {
    fn assert_static_send<T: Send + 'static>(_: &T) {}
    let pool = pool();
    let conn = pool.get().unwrap();
    assert_static_send(&conn);
    let joined = std::thread::spawn(move || {
        let mut conn = conn;
        diesel::sql_query("SELECT 1").execute(&mut conn).is_ok()
    });
    assert!(joined.join().unwrap());
}
