//! The fork torture scenarios of `tests/torture.rs` at full length, printed as a table.
//!
//! ```text
//! cargo run --release --example fork_torture                   # all eight, full length
//! cargo run --release --example fork_torture -- --pg-forks 300 # scenario 1 shorter
//! cargo run --release --example fork_torture -- --only 2,6     # some scenarios
//! cargo run --release --example fork_torture -- --ci           # the CI counts
//! ```
//!
//! Scenario 1 needs PostgreSQL (`FORKSAFE_PG_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Exits with 1 when any count is not zero.

#[path = "../tests/torture/scenarios.rs"]
mod scenarios;

use scenarios::{Scale, TABLE_HEADER};

fn main() {
    let mut scale = Scale::FULL;
    let mut only = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--ci" => scale = Scale::CI,
            "--pg-forks" => scale.postgres_storm = number(&mut args, "--pg-forks"),
            "--fake-forks" => scale.fake_storm = number(&mut args, "--fake-forks"),
            "--only" => {
                let list = args.next().expect("--only needs a list like 1,2");
                only = list
                    .split(',')
                    .map(|n| n.trim().parse().expect("scenario number"))
                    .collect();
            }
            other => panic!("unknown argument {other:?}; see the example's docs"),
        }
    }
    println!("fork torture: {scale:?}");
    println!("{TABLE_HEADER}");
    let outcomes = scenarios::run_all(&scale, &only, |outcome| println!("{outcome}"));
    for outcome in &outcomes {
        for problem in &outcome.problems {
            println!("  {}: {problem}", outcome.scenario);
        }
    }
    if outcomes.iter().any(|outcome| !outcome.passed()) {
        std::process::exit(1);
    }
}

fn number(args: &mut impl Iterator<Item = String>, name: &str) -> u64 {
    args.next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} needs a number"))
}
