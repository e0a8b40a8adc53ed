//! Fork torture at CI length: eight scenarios that fork for real while parent
//! threads use the pool; every child is reaped with a deadline and a hung child fails the run.
//!
//! A `harness = false` binary, so that no test harness threads or atfork registrations are in
//! the way. `examples/fork_torture.rs` runs the same scenarios at full length.
//!
//! Scenario 1 needs PostgreSQL (`FORKSAFE_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`); without it the scenario is skipped with its
//! reason, unless `CI` is set, when it fails. Run one scenario with `-- 2` (or several: `-- 2 6`).

#[path = "torture/scenarios.rs"]
mod scenarios;

use scenarios::{Scale, TABLE_HEADER};

fn main() {
    let only: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    println!("fork torture, CI length: {:?}", Scale::CI);
    println!("{TABLE_HEADER}");
    let outcomes = scenarios::run_all(&Scale::CI, &only, |outcome| println!("{outcome}"));
    let mut failed = false;
    for outcome in &outcomes {
        if let Some(why) = &outcome.skipped {
            println!("SKIPPED {}: {why}", outcome.scenario);
            continue;
        }
        for problem in &outcome.problems {
            println!("  {}: {problem}", outcome.scenario);
        }
        if !outcome.passed() {
            failed = true;
        }
        if outcome.forks == 0 {
            println!("FAILED {}: nothing was forked", outcome.scenario);
            failed = true;
        }
    }
    if failed {
        println!("fork torture FAILED: every count of hung, failed and parent errors must be 0");
        std::process::exit(1);
    }
    println!("fork torture passed: no child hung, no child failed, no parent error");
}
