//! The async pools against the libraries' own, side by side in one run, on one
//! `forksafe_pool::Runtime`, against PostgreSQL on loopback (`FORKSAFE_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`, `sslmode=disable`):
//!
//! - `deadpool-postgres` against `forksafe_pool::deadpool_postgres`: what the per-process pool,
//!   the guard and the driver sections around the connection task's polls cost;
//! - `bb8` (with this crate's manager) against `forksafe_pool::bb8_postgres`: the per-process
//!   pool and the guard (the manager, and so the connection task, is the same on both sides).
//!
//! Each is measured for a checkout and return alone, and for a checkout, `SELECT 1` and return.
//! Batches of each side alternate; the best batch of each is printed, with the ratio.
//!
//! `cargo bench --features deadpool-postgres,bb8-postgres --bench async_pools`

use std::future::Future;
use std::time::{Duration, Instant};

use forksafe_pool::bb8_postgres::{self, PostgresConnectionManager};
use forksafe_pool::deadpool_postgres::tokio_postgres::{self, NoTls};
use forksafe_pool::Runtime;

const POOL_SIZE: usize = 4;
const BATCHES: usize = 15;
const CHECKOUTS_PER_BATCH: u32 = 20_000;
const QUERIES_PER_BATCH: u32 = 1_000;

fn config() -> tokio_postgres::Config {
    let url = std::env::var("FORKSAFE_PG_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| String::from("postgres://postgres@127.0.0.1:5432/test"));
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode=disable")
        .parse()
        .expect("FORKSAFE_PG_URL")
}

/// The best time per operation of `BATCHES` batches of `per_batch` runs of `op`, for each of
/// two sides, their batches alternating.
fn best_of<A, B, FA, FB>(runtime: &Runtime, per_batch: u32, mut a: A, mut b: B) -> (f64, f64)
where
    A: FnMut() -> FA,
    B: FnMut() -> FB,
    FA: Future<Output = ()>,
    FB: Future<Output = ()>,
{
    let (mut best_a, mut best_b) = (Duration::MAX, Duration::MAX);
    for _ in 0..BATCHES {
        best_a = best_a.min(time_batch(runtime, per_batch, &mut a));
        best_b = best_b.min(time_batch(runtime, per_batch, &mut b));
    }
    let per_op = |best: Duration| best.as_nanos() as f64 / f64::from(per_batch);
    (per_op(best_a), per_op(best_b))
}

fn time_batch<F, Fut>(runtime: &Runtime, per_batch: u32, op: &mut F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let started = Instant::now();
    runtime.block_on(async {
        for _ in 0..per_batch {
            op().await;
        }
    });
    started.elapsed()
}

fn report(what: &str, library: &str, ours: &str, (theirs_ns, ours_ns): (f64, f64)) {
    println!(
        "{what:<28} {library:<18} {theirs_ns:>9.0} ns   {ours:<34} {ours_ns:>9.0} ns   ratio {:.2}",
        ours_ns / theirs_ns
    );
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        return; // `cargo test --benches` asks for the list of benchmarks; there is none to run
    }
    let runtime = Runtime::new().expect("runtime");

    let plain_deadpool =
        deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(config(), NoTls))
            .max_size(POOL_SIZE)
            .build()
            .expect("deadpool-postgres");
    let our_deadpool = forksafe_pool::deadpool_postgres::Pool::builder(config(), NoTls)
        .max_size(POOL_SIZE)
        .build()
        .expect("forksafe deadpool");
    let manager = PostgresConnectionManager::new(config(), NoTls);
    let plain_bb8 = runtime
        .block_on(
            bb8::Pool::builder()
                .max_size(POOL_SIZE as u32)
                .build(manager.clone()),
        )
        .expect("bb8");
    let our_bb8 = runtime
        .block_on(
            bb8_postgres::Pool::builder()
                .max_size(POOL_SIZE as u32)
                .build(manager),
        )
        .expect("forksafe bb8");

    let deadpool_checkout = best_of(
        &runtime,
        CHECKOUTS_PER_BATCH,
        || async { drop(plain_deadpool.get().await.expect("get")) },
        || async { drop(our_deadpool.get().await.expect("get")) },
    );
    let deadpool_query = best_of(
        &runtime,
        QUERIES_PER_BATCH,
        || async {
            let client = plain_deadpool.get().await.expect("get");
            client.query_one("SELECT 1", &[]).await.expect("query");
        },
        || async {
            let client = our_deadpool.get().await.expect("get");
            client.query_one("SELECT 1", &[]).await.expect("query");
        },
    );
    let bb8_checkout = best_of(
        &runtime,
        CHECKOUTS_PER_BATCH,
        || async { drop(plain_bb8.get().await.expect("get")) },
        || async { drop(our_bb8.get().await.expect("get")) },
    );
    let bb8_query = best_of(
        &runtime,
        QUERIES_PER_BATCH,
        || async {
            let conn = plain_bb8.get().await.expect("get");
            conn.query_one("SELECT 1", &[]).await.expect("query");
        },
        || async {
            let conn = our_bb8.get().await.expect("get");
            conn.query_one("SELECT 1", &[]).await.expect("query");
        },
    );
    report(
        "checkout + return",
        "deadpool-postgres",
        "forksafe_pool::deadpool_postgres",
        deadpool_checkout,
    );
    report(
        "checkout + SELECT 1",
        "deadpool-postgres",
        "forksafe_pool::deadpool_postgres",
        deadpool_query,
    );
    report(
        "checkout + return",
        "bb8",
        "forksafe_pool::bb8_postgres",
        bb8_checkout,
    );
    report(
        "checkout + SELECT 1",
        "bb8",
        "forksafe_pool::bb8_postgres",
        bb8_query,
    );
}
