//! Fork torture: nine scenarios that fork for real while parent threads use the pool; every
//! child is reaped with a deadline and a hung child fails the run.
//!
//! A `harness = false` binary, so that no test harness threads or atfork registrations are in
//! the way. `cargo test` runs it at CI length; the full length and a subset are arguments:
//!
//! ```text
//! cargo test --release --all-features --test torture -- --full                # all nine, full length
//! cargo test --release --all-features --test torture -- --full --pg-forks 300 # scenario 1 shorter
//! cargo test --release --all-features --test torture -- --only 2,6            # some scenarios
//! ```
//!
//! `-- 2 6` is short for `--only 2,6`; `--fake-forks N` sets scenario 2's count. Scenario 1 needs PostgreSQL (`FORKSAFE_PG_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`); without it the scenario is skipped with
//! its reason, unless `CI` is set, when it fails. `FORKSAFE_TORTURE_GDB=1` writes a hung
//! child's backtraces to `/tmp/forksafe-hung-PID.txt` before it is killed.

#[macro_use]
mod support;

mod torture {
    pub mod scenarios;
}

use torture::scenarios::{self, Scale, TABLE_HEADER};

fn main() {
    let mut scale = Scale::CI;
    let mut only = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--full" => scale = Scale::FULL,
            "--pg-forks" => scale.postgres_storm = number(&mut args, "--pg-forks"),
            "--fake-forks" => scale.fake_storm = number(&mut args, "--fake-forks"),
            "--only" => {
                let list = args.next().expect("--only needs a list like 1,2");
                only = list
                    .split(',')
                    .map(|n| n.trim().parse().expect("scenario number"))
                    .collect();
            }
            // `-- 2 6` runs scenarios 2 and 6.
            number if number.parse::<u32>().is_ok() => only.push(number.parse().unwrap_or(0)),
            // A test-name filter or a harness flag cargo passes to every test binary.
            other => println!("fork torture: ignoring argument {other:?}"),
        }
    }
    println!("fork torture: {scale:?}");
    println!("{TABLE_HEADER}");
    let outcomes = scenarios::run_all(&scale, &only, |outcome| println!("{outcome}"));
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

fn number(args: &mut impl Iterator<Item = String>, name: &str) -> u64 {
    args.next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} needs a number"))
}
