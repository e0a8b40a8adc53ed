//! A `prefork-demo serve` process the driver started: what its master said on its standard
//! output, the last of its standard error, and stopping it with every worker it forked.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::app::Mode;
use crate::config::RunConfig;

/// One worker slot as the master reported it.
#[derive(Clone, Copy, Debug)]
pub struct SlotStatus {
    /// When its request in progress started (master's clock, µs); 0 when idle.
    pub busy_since: u64,
}

/// What the master has said so far.
#[derive(Default)]
pub struct View {
    pub port: Option<u16>,
    pub master: Option<u32>,
    pub workers: BTreeMap<usize, u32>,
    pub ever: HashSet<u32>,
    /// When each worker's `spawned` line was read.
    pub spawned_at: BTreeMap<u32, Instant>,
    statuses: u64,
    status: Vec<SlotStatus>,
    status_now: u64,
    pub error: Option<String>,
    closed: bool,
    /// The last lines the server wrote to its standard error.
    stderr_tail: VecDeque<String>,
}

/// How many lines of the server's standard error a failed run reports.
const STDERR_TAIL: usize = 3;

/// A running `prefork_demo serve` process.
pub struct Server {
    child: Child,
    stdin: Option<ChildStdin>,
    view: Arc<(Mutex<View>, Condvar)>,
}

impl Server {
    pub fn start(mode: Mode, config: &RunConfig) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|error| error.to_string())?;
        let mut log = match &config.server_log {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|error| format!("{}: {error}", path.display()))?,
            ),
            None => None,
        };
        let mut command = Command::new(exe);
        if let Some(cpus) = &config.cpus {
            cpus.for_servers(&mut command);
        }
        let mut child = command
            .args([
                "serve",
                "--mode",
                mode.name(),
                "--database",
                config.database.arg(),
            ])
            .args([
                "--workers",
                &config.workers.to_string(),
                "--state-mib",
                &config.table_mib.to_string(),
                "--state-memory",
                config.state_memory.name(),
            ])
            .args(["--pool-size", &config.pool_size.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("cannot start the server: {error}"))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let view = Arc::new((Mutex::new(View::default()), Condvar::new()));
        // The server's complaints: kept (the last few) for the report, and in the log if asked.
        let tail_view = Arc::clone(&view);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(log) = &mut log {
                    let _ = writeln!(log, "{line}");
                }
                let mut view = tail_view.0.lock().unwrap();
                if view.stderr_tail.len() == STDERR_TAIL {
                    view.stderr_tail.pop_front();
                }
                view.stderr_tail.push_back(line);
            }
        });
        let reader_view = Arc::clone(&view);
        std::thread::spawn(move || {
            let (lock, changed) = &*reader_view;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut view = lock.lock().unwrap();
                read_line(&mut view, &line);
                changed.notify_all();
            }
            lock.lock().unwrap().closed = true;
            changed.notify_all();
        });
        let stdin = child.stdin.take();
        Ok(Server { child, stdin, view })
    }

    /// Waits until `ready` finds what it wants in the view, or the deadline passes.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&View) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.view;
        let mut view = lock.lock().unwrap();
        loop {
            if let Some(found) = ready(&view) {
                return Some(found);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if view.closed {
                return None;
            }
            view = changed.wait_timeout(view, left).unwrap().0;
        }
    }

    pub fn with_view<T>(&self, read: impl FnOnce(&View) -> T) -> T {
        read(&self.view.0.lock().unwrap())
    }

    /// Asks the master for its clock (µs) and its workers' slots.
    pub fn status(&mut self) -> Option<(u64, Vec<SlotStatus>)> {
        let before = self.with_view(|view| view.statuses);
        writeln!(self.stdin.as_mut()?, "status").ok()?;
        self.wait_for(Duration::from_secs(5), |view| {
            (view.statuses > before).then(|| (view.status_now, view.status.clone()))
        })
    }

    /// Stops the master and its workers; kills them if they do not stop in time. Always reaps.
    pub fn stop(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    // The workers die with it (PR_SET_PDEATHSIG); this process reaps them as
                    // the subreaper.
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // The master has exited, so each of its workers is gone, or reaped by the master, or
        // now a child of this process (a subreaper): killed and reaped here. Only the workers'
        // own pids are waited for: this process has other children (a private database).
        let workers: Vec<u32> = self.with_view(|view| view.ever.iter().copied().collect());
        for pid in workers {
            let pid = Pid::from_raw(pid as i32);
            if waitpid(pid, Some(WaitPidFlag::WNOHANG)) == Ok(WaitStatus::StillAlive) {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
        }
    }

    /// Stops the server as [`stop`](Self::stop) does; the last lines it wrote to its standard
    /// error, joined by " / ".
    pub fn stop_for_last_words(self) -> String {
        let view = Arc::clone(&self.view);
        self.stop();
        let last = view
            .0
            .lock()
            .unwrap()
            .stderr_tail
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(" / ");
        last
    }
}

fn read_line(view: &mut View, line: &str) {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("listening") => {
            view.port = words.next().and_then(|port| port.parse().ok());
            view.master = words.next().and_then(|pid| pid.parse().ok());
        }
        Some("spawned") => {
            if let (Some(Ok(slot)), Some(Ok(pid))) =
                (words.next().map(str::parse), words.next().map(str::parse))
            {
                view.workers.insert(slot, pid);
                view.ever.insert(pid);
                view.spawned_at.insert(pid, Instant::now());
            }
        }
        Some("status") => {
            view.status_now = words.next().and_then(|now| now.parse().ok()).unwrap_or(0);
            view.status = words
                .filter_map(|slot| {
                    // slot:pid:busy_since:served
                    let busy_since = slot.split(':').nth(2)?.parse().ok()?;
                    Some(SlotStatus { busy_since })
                })
                .collect();
            view.statuses += 1;
        }
        Some("error") => view.error = Some(line["error ".len()..].to_owned()),
        _ => {}
    }
}
