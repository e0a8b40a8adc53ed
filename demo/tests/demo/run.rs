//! Running the demo and its `serve` command as child processes, each with a deadline, and
//! reading what they print.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Requests per mode and round in a [`run_demo`].
pub const REQUESTS: u64 = 300;
/// How long a child process may run before it is killed and its test fails.
pub const DEADLINE: Duration = Duration::from_secs(180);

pub fn demo_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_prefork-demo"))
}

/// A directory the demo's own temporary files go to (`TMPDIR`), to check it leaves none.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

/// What `dir` holds, by name.
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the directory")
        .map(|entry| {
            entry
                .expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// The demo, with `args`, temporary files under `tmp`, and no `DATABASE_URL`.
pub fn demo_command(args: &[&str], tmp: &Path) -> Command {
    let mut command = Command::new(demo_binary());
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A finished run: its exit status, what it printed, and its JSON report.
pub struct Run {
    pub stdout: String,
    pub report: Value,
}

impl Run {
    /// The line of the verdict (the lines after `verdict:`) that starts with `prefix`.
    pub fn verdict_line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .skip_while(|line| *line != "verdict:")
            .find(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{}", self.stdout))
    }
}

/// Runs the demo with a small setup plus `extra`, checks it succeeded and left no temporary
/// file, and returns what it printed and its JSON report.
pub fn run_demo(database: Option<&str>, extra: &[&str]) -> Run {
    let tmp = scratch();
    let out = scratch();
    let json = out.path().join("report.json");
    let json_arg = json.display().to_string();
    let requests = REQUESTS.to_string();
    let small = [
        ["--workers", "2"],
        ["--state-mib", "8"],
        ["--clients", "2"],
        ["--requests", &requests],
    ];
    let mut args = vec!["--json", &json_arg];
    for [flag, value] in small {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    if let Some(database) = database {
        args.extend(["--database", database]);
    }
    args.extend(extra);
    let mut child = demo_command(&args, tmp.path())
        .spawn()
        .expect("start prefork-demo");
    let (status, stdout, stderr) = finish(&mut child, "prefork-demo");
    assert!(
        status.success(),
        "prefork-demo failed ({status}):\n{stdout}\n{stderr}"
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "left behind");
    assert!(
        out.path().join("report.svg").is_file(),
        "no chart beside the JSON: {stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("the --json report");
    Run {
        stdout,
        report: serde_json::from_str(&text).expect("valid JSON"),
    }
}

/// Waits for `child` (reading its output meanwhile); kills it and panics if it outlives the
/// deadline.
pub fn finish(child: &mut Child, what: &str) -> (ExitStatus, String, String) {
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let status = wait_with_deadline(child, what);
    let text = |reader: std::thread::JoinHandle<String>| reader.join().expect("reader");
    (status, text(stdout), text(stderr))
}

fn read_in_background(
    stream: Option<impl std::io::Read + Send + 'static>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stream) = stream {
            let _ = stream.read_to_string(&mut text);
        }
        text
    })
}

/// Waits for `child` to exit; kills it, reaps it and panics if it outlives the deadline.
pub fn wait_with_deadline(child: &mut Child, what: &str) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `stream`'s lines as they come, read on a thread of their own.
pub fn lines_of(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// The SQLite file the demo runs on in these tests (it must exist or be named `sqlite://`).
pub fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("demo.db").display())
}
