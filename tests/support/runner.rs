//! The case runner of the `harness = false` test binaries: named cases returning [`Check`], run
//! one after another in this process with libtest-style lines, the rule for a missing server
//! (skip with a printed reason only while `CI` is unset; with `CI` set, fail), and the helpers
//! forked children report with.

use std::time::Instant;

use super::fork::ChildEnd;

/// The outcome of a case or of one of its checks: an error says what went wrong.
pub type Check = Result<(), String>;
/// A named test case.
pub type Case = (&'static str, fn() -> Check);
/// A test case whose name is made at run time (e.g. a backend variant's prefix).
pub type NamedCase = (String, fn() -> Check);

/// Runs the cases whose names contain one of the command-line filters (all without filters),
/// prints a line per case and then `test result: ok. N passed; M failed` (`FAILED` when any
/// failed, and then exits 1).
pub fn run_cases<N, F>(cases: impl IntoIterator<Item = (N, F)>)
where
    N: AsRef<str>,
    F: FnOnce() -> Check,
{
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases {
        let name = name.as_ref();
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        match case() {
            Ok(()) => {
                println!("test {name} ... ok ({:.1?})", started.elapsed());
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

/// With `CI` set a missing server fails the tests instead of skipping them.
pub fn ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Called before the cases of a binary whose `tests` need a server; `reachable` is why the
/// server cannot be reached, if it cannot. Then, without `CI`, prints why the tests are skipped
/// (and how to point them at a server: `hint`) and ends the binary; with `CI` set, prints a
/// failed test result and exits 1.
pub fn require_server(tests: &str, reachable: Result<(), String>, hint: &str) {
    let Err(reason) = reachable else {
        return;
    };
    if ci() {
        println!(
            "test result: FAILED. 0 passed; 1 failed ({reason}; CI is set, so the server is required)"
        );
        std::process::exit(1);
    }
    println!("skipping the {tests} tests: {reason} ({hint}; with CI set this fails)");
    std::process::exit(0);
}

/// A case whose server (or tool) is missing (`reason`): without `CI`, prints why it is skipped
/// and passes; with `CI` set, fails.
pub fn skip_unless_ci(reason: &str, hint: &str) -> Check {
    if ci() {
        return Err(format!("{reason} (CI is set, so it is required)"));
    }
    println!("skipping: {reason} ({hint}; with CI set this fails)");
    Ok(())
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

/// `who` (a reaped child) exited with `code`.
pub fn expect_exit(who: &str, end: ChildEnd, code: i32) -> Check {
    ensure!(
        end == ChildEnd::Exited(code),
        "{who} ended {end:?}, expected exit {code}"
    );
    Ok(())
}
