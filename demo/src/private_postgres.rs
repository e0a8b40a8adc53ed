//! A throwaway PostgreSQL server, so that the demo runs on a network database by default.
//!
//! Naive pre-forking fails where processes share a protocol stream: a PostgreSQL connection's
//! socket (with TLS, as libpq's default `sslmode=prefer` negotiates it, the failures are the
//! ones users search for). Embedded SQLite shares no stream, so on SQLite naive mode works
//! and the demo would show nothing.
//!
//! The server gets its own data directory in a temporary directory, listens on a free port of
//! 127.0.0.1 only (its Unix socket lives in that directory too), and has TLS on with a
//! certificate made at start by the `openssl` command (Debian's PostgreSQL packages depend on
//! it through `ssl-cert`; without it the server runs without TLS and says so). It runs as a
//! child of the demo and is stopped, and its directory removed, when the demo ends in any way
//! (see [`crate::cleanup`]). PostgreSQL refuses to run as root, so a demo run by root runs
//! `initdb` and `postgres` as the `postgres` system user (or `nobody`), owner of the directory.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection};
use nix::sys::signal::Signal;
use nix::unistd::{chown, Uid, User};

use crate::cleanup;
use crate::cpus::Cpus;

/// How long a fresh server may take to accept connections.
const READY_LIMIT: Duration = Duration::from_secs(60);

/// A running private server.
pub struct PrivatePostgres {
    pub url: String,
    pub version: String,
    pub tls: bool,
}

/// The directory holding `initdb` and `postgres`: the newest `/usr/lib/postgresql/*/bin`
/// (Debian keeps them off `PATH`), else the one on `PATH`.
pub fn find_binaries() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_both(dir))
        .collect();
    debian.sort();
    if let Some((_, dir)) = debian.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_both(dir))
}

/// The user the server runs as: this one, or an unprivileged one when this is root.
fn server_user() -> Result<Option<User>, String> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Ok(Some(user)) = User::from_name(name) {
            return Ok(Some(user));
        }
    }
    Err(String::from(
        "PostgreSQL refuses to run as root and there is no `postgres` or `nobody` user to run it as",
    ))
}

fn command(program: &Path, user: Option<&User>, dir: &Path) -> Command {
    let mut command = Command::new(program);
    // The server's user may not be able to enter the directory this process runs in.
    command.current_dir(dir);
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        command.env("HOME", dir).env("USER", &user.name);
    }
    command
}

fn run(what: &str, command: &mut Command) -> Result<(), String> {
    let output = cleanup::run_helper(command).map_err(|error| format!("{what}: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr);
    let last = said.lines().rev().find(|line| !line.trim().is_empty());
    Err(format!(
        "{what} failed ({}): {}",
        output.status,
        last.unwrap_or("no message")
    ))
}

/// A port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|error| error.to_string())?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| error.to_string())
}

/// Makes the cluster and starts its server, on the servers' CPUs if given; registered with
/// [`cleanup`] before it runs.
pub fn start(binaries: &Path, cpus: Option<&Cpus>) -> Result<PrivatePostgres, String> {
    let user = server_user()?;
    let root = cleanup::remove_at_exit(
        tempfile::Builder::new()
            .prefix("prefork-demo-postgres-")
            .tempdir()
            .map_err(|error| format!("temporary directory: {error}"))?,
    );
    if let Some(user) = &user {
        chown(&root, Some(user.uid), Some(user.gid))
            .map_err(|error| format!("chown {}: {error}", root.display()))?;
    }
    let data = root.join("data");
    run(
        "initdb",
        command(&binaries.join("initdb"), user.as_ref(), &root)
            .arg("--pgdata")
            .arg(&data)
            .args(["--username=postgres", "--auth=trust", "--encoding=UTF8"])
            .args(["--no-locale", "--no-sync"]),
    )?;
    let tls = make_certificate(&data, user.as_ref(), &root)?;
    let version = std::fs::read_to_string(data.join("PG_VERSION"))
        .unwrap_or_default()
        .trim()
        .to_owned();

    // A port found free can be taken before the server binds it: then try another.
    let mut last_error = String::new();
    for _ in 0..3 {
        let port = free_port()?;
        let log = std::fs::File::create(root.join("server.log"))
            .map_err(|error| format!("server log: {error}"))?;
        if let Some(user) = &user {
            chown(&root.join("server.log"), Some(user.uid), Some(user.gid))
                .map_err(|error| format!("chown server.log: {error}"))?;
        }
        let mut server = command(&binaries.join("postgres"), user.as_ref(), &root);
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", root.display()))
            .args(["-c", &format!("ssl={}", if tls { "on" } else { "off" })])
            // Throwaway data: nothing to make durable.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(cpus) = cpus {
            cpus.for_servers(&mut server);
        }
        let server = server
            .spawn()
            .map_err(|error| format!("cannot start postgres: {error}"))?;
        // SIGINT is PostgreSQL's fast shutdown: sessions are ended, the server exits at once.
        cleanup::stop_at_exit(server, Signal::SIGINT);
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        match wait_until_ready(&url) {
            Ok(()) if tls => {
                // What the demo shows depends on TLS being what `sslmode=prefer` gets.
                PgConnection::establish(&format!("{url}?sslmode=require"))
                    .map_err(|error| format!("the private server refuses TLS: {error}"))?;
                return Ok(PrivatePostgres { url, version, tls });
            }
            Ok(()) => return Ok(PrivatePostgres { url, version, tls }),
            Err(error) => {
                let log = std::fs::read_to_string(root.join("server.log")).unwrap_or_default();
                last_error = log
                    .lines()
                    .rev()
                    .find(|line| line.contains("FATAL") || line.contains("ERROR"))
                    .map_or(error, str::to_owned);
                cleanup::stop_server();
                if !last_error.contains("could not bind") && !last_error.contains("in use") {
                    break;
                }
            }
        }
    }
    Err(format!(
        "the private PostgreSQL server did not start: {last_error}"
    ))
}

/// Writes a self-signed certificate and its key into the data directory, as the server's user
/// with the key readable by it alone (the server refuses a key others can read). `false` when
/// there is no `openssl` command.
fn make_certificate(data: &Path, user: Option<&User>, root: &Path) -> Result<bool, String> {
    let Some(openssl) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("openssl"))
        .find(|path| path.is_file())
    else {
        println!(
            "prefork-demo: no `openssl` command to make a certificate: PostgreSQL runs without TLS"
        );
        return Ok(false);
    };
    let key = data.join("server.key");
    run(
        "openssl",
        command(&openssl, user, root)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(data.join("server.crt")),
    )?;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
        .map_err(|error| format!("chmod {}: {error}", key.display()))?;
    Ok(true)
}

/// Waits until the server accepts a session, or has exited, or the limit passes.
fn wait_until_ready(url: &str) -> Result<(), String> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        let error = match PgConnection::establish(url) {
            Ok(_) => return Ok(()),
            Err(error) => error.to_string(),
        };
        if !cleanup::server_running() {
            return Err(format!("the server exited: {}", error.trim()));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not ready within {READY_LIMIT:?}: {}",
                error.trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
