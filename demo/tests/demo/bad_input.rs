//! Bad arguments and an unreachable database: one clear line, no password, nothing left behind.

use crate::run::{demo_command, entries, finish, scratch};

#[test]
fn bad_arguments_are_refused_with_a_clear_message() {
    const AT_LEAST_1: &str = "--workers and --pool-size must be at least 1";
    const NOT_A_DATABASE: &str = "neither a postgres:// or postgresql:// URL, nor a sqlite:// or \
                                  file: name, nor an existing SQLite file";
    let refused: [(&[&str], &str); 14] = [
        (&["--workers", "0"], AT_LEAST_1),
        (&["--pool-size", "0"], AT_LEAST_1),
        (
            &["--workers", "100000"],
            "--workers 100000: at most 512 (each worker copies the master's page tables)",
        ),
        (
            &["--rounds", "0"],
            "--clients and --rounds must be at least 1",
        ),
        (
            &["--clients", "0"],
            "--clients and --rounds must be at least 1",
        ),
        (&["--requests", "many"], "--requests: not a number: many"),
        (
            &["--state-memory", "disk"],
            "unknown state memory \"disk\" (heap, huge or shared)",
        ),
        (&["--modes", "eager"], "unknown mode \"eager\""),
        (&["--frobnicate"], "unknown argument \"--frobnicate\""),
        (
            &["--database", "mysql://root:secret@127.0.0.1/test"],
            &format!("--database \"mysql://root:***@127.0.0.1/test\": {NOT_A_DATABASE}"),
        ),
        (
            &["--database", "this is not a url"],
            &format!("--database \"this is not a url\": {NOT_A_DATABASE}"),
        ),
        (
            &[
                "serve",
                "--workers",
                "0",
                "--database",
                "sqlite://unused.db",
            ],
            AT_LEAST_1,
        ),
        (
            &[
                "serve",
                "--pool-size",
                "0",
                "--database",
                "sqlite://unused.db",
            ],
            AT_LEAST_1,
        ),
        (
            &["serve", "--database", "unused.db"],
            &format!("--database \"unused.db\": {NOT_A_DATABASE}"),
        ),
    ];
    for (args, message) in refused {
        // Run where a file created by mistake would show.
        let cwd = scratch();
        let tmp = scratch();
        let mut command = demo_command(args, tmp.path());
        let mut child = command
            .current_dir(cwd.path())
            .spawn()
            .expect("start prefork-demo");
        let (status, _, stderr) = finish(&mut child, "prefork-demo");
        assert_eq!(status.code(), Some(2), "{args:?}: {status}; {stderr}");
        assert_eq!(
            stderr.lines().next(),
            Some(format!("prefork-demo: {message}").as_str()),
            "{args:?}"
        );
        assert!(!stderr.contains("secret"), "{stderr}");
        assert_eq!(
            entries(cwd.path()),
            Vec::<String>::new(),
            "{args:?} made files"
        );
        assert_eq!(
            entries(tmp.path()),
            Vec::<String>::new(),
            "{args:?} left files"
        );
    }
}

#[test]
fn a_run_time_error_is_one_line_without_the_password() {
    let tmp = scratch();
    // Nothing listens on port 1 of the loopback address: the connection is refused at once.
    let mut child = demo_command(
        &[
            "--database",
            "postgres://demo:secret@127.0.0.1:1/demo?password=secret2",
        ],
        tmp.path(),
    )
    .spawn()
    .expect("start prefork-demo");
    let (status, stdout, stderr) = finish(&mut child, "prefork-demo");
    assert_eq!(status.code(), Some(1), "{status}; {stdout}; {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(lines[0].contains("Connection refused"), "{stdout}");
    assert!(
        lines[0].starts_with(
            "prefork-demo: cannot prepare PostgreSQL \
             (postgres://demo:***@127.0.0.1:1/demo?password=***): "
        ),
        "{stdout}"
    );
    assert!(
        !stdout.contains("secret") && !stderr.contains("secret"),
        "{stdout}{stderr}"
    );
    assert!(
        !stdout.contains("USAGE") && !stderr.contains("USAGE"),
        "{stdout}{stderr}"
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "left behind");
}
