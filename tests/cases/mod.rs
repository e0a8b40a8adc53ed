//! The case runner of the `harness = false` test binaries of `ForkLocal`, `GuardedPool` and
//! the pool's lifecycle methods: named cases returning `Check`, run one after another.
#![allow(dead_code)]

use crate::support::ChildEnd;

pub type Check = Result<(), String>;
pub type Case = (&'static str, fn() -> Check);

/// Fails the enclosing case with a formatted message unless `$cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Child code returns 0 on success; a failed check is printed and exits 1.
pub fn child_result(check: Check) -> i32 {
    match check {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("child {}: {message}", std::process::id());
            1
        }
    }
}

pub fn expect_exit(end: ChildEnd, code: i32) -> Check {
    if end == ChildEnd::Exited(code) {
        Ok(())
    } else {
        Err(format!("child ended {end:?}, expected exit {code}"))
    }
}

/// Runs the cases whose names contain one of the command-line filters (all without filters),
/// prints libtest-style lines, and exits 1 if any failed.
pub fn run_cases(cases: &[Case]) {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        match case() {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(message) => {
                println!("test {name} ... FAILED: {message}");
                failed += 1;
            }
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
