//! The command line: the usage text, and the arguments of the demo and of `serve`, checked
//! before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use crate::app::{Database, Mode, StateMemory};
use crate::config::{RunConfig, ServeConfig};

/// More workers than this is refused: each forks with a copy of the master's page tables, and
/// thousands of them exhaust a machine's memory before `fork` reports anything.
const MAX_WORKERS: usize = 512;

pub const HELP: &str = "\
prefork-demo: a pre-fork HTTP server in three modes, side by side

  naive     plain r2d2::Pool built in the master before fork()
  forksafe  forksafe_pool::Pool built in the master before fork()
  lazy      every worker builds its own application after fork() (uWSGI --lazy-apps)

USAGE:
  prefork-demo [OPTIONS]          run every mode, print the table and the verdict
  prefork-demo serve [OPTIONS]    run one server (master + workers) until `quit` on stdin

OPTIONS (both):
  --database URL|PATH   postgres:// or postgresql:// URL, sqlite:// or file: name, or an
                        existing SQLite file [default: $DATABASE_URL, else a private
                        PostgreSQL server started for the run (TLS, 127.0.0.1, a free port,
                        removed at exit) when its binaries are installed, else SQLite]
  --workers N           worker processes, at most 512 [4]
  --state-mib N         read-only application state per application, MiB [256]
  --state-memory heap|huge|shared
                        where that state lives: a Vec on the heap (private, shared with the
                        master copy-on-write); private memory in transparent huge pages, for
                        which a fork copies one page-table entry per 2 MiB; or a read-only
                        shared mapping, for which a fork copies no page tables [heap]
  --pool-size N         connections per pool (max_size = min_idle) [2]
OPTIONS (demo):
  --modes LIST          comma-separated: naive,forksafe,lazy [all three]
  --requests N          requests per mode and round [4000]
  --rounds N            rounds of forksafe and lazy side by side, taking turns at the load;
                        naive runs once, before them. The table's figures are medians, its
                        counts totals; the verdict's ratios are medians of the rounds' ratios,
                        with a confidence interval from 2 rounds on (90 % or more from 5) [11]
  --clients N           parallel keep-alive client connections [8]
  --timeout-ms N        per-request timeout [2000]
  --load-time-limit-s N stop sending after this long; the rest count as not sent [10]
  --hang-after-ms N     a worker still busy on one request this long after the load is hung [2000]
  --json PATH           write the figures as JSON, and the chart beside it (PATH with .svg)
  --plot PATH           draw the figures as an SVG chart
  --server-log PATH     append the servers' standard error there
OPTIONS (serve):
  --mode naive|forksafe|lazy  [forksafe]
  --port N              [0: any free port, printed on stdout]
";

/// The command line's words not yet taken.
pub struct Args {
    words: Vec<String>,
}

impl Args {
    /// This process's arguments.
    pub fn from_env() -> Args {
        Args {
            words: std::env::args().skip(1).collect(),
        }
    }

    /// Whether any word asks for the usage text.
    pub fn ask_for_help(&self) -> bool {
        self.words
            .iter()
            .any(|word| word == "--help" || word == "-h")
    }

    /// Whether the first word is `command`; if it is, it is taken.
    pub fn take_command(&mut self, command: &str) -> bool {
        let first = self.words.first().map(String::as_str) == Some(command);
        if first {
            self.words.remove(0);
        }
        first
    }

    fn take(&mut self, flag: &str) -> Option<String> {
        let at = self.words.iter().position(|word| word == flag)?;
        if at + 1 >= self.words.len() {
            usage_error(&format!("{flag} needs a value"));
        }
        let value = self.words.remove(at + 1);
        self.words.remove(at);
        Some(value)
    }

    fn number<T: std::str::FromStr>(&mut self, flag: &str, default: T) -> T {
        match self.take(flag) {
            Some(value) => value
                .parse()
                .unwrap_or_else(|_| usage_error(&format!("{flag}: not a number: {value}"))),
            None => default,
        }
    }

    /// `--database`, else `$DATABASE_URL`, checked.
    fn database(&mut self) -> Option<Database> {
        self.take("--database")
            .or_else(|| std::env::var("DATABASE_URL").ok())
            .map(|arg| Database::from_arg(&arg).unwrap_or_else(|e| usage_error(&e)))
    }

    fn finish(self) {
        if let Some(word) = self.words.first() {
            usage_error(&format!("unknown argument {word:?}"));
        }
    }
}

/// A mistake in the arguments: the message, then the usage text. Nothing has started yet.
fn usage_error(message: &str) -> ! {
    eprintln!("prefork-demo: {message}\n\n{HELP}");
    std::process::exit(2);
}

/// `serve`'s arguments, checked.
pub fn serve_config(mut args: Args) -> ServeConfig {
    let config = ServeConfig {
        mode: Mode::parse(
            &args
                .take("--mode")
                .unwrap_or_else(|| String::from("forksafe")),
        )
        .unwrap_or_else(|e| usage_error(&e)),
        database: args
            .database()
            .unwrap_or_else(|| usage_error("serve needs --database")),
        workers: args.number("--workers", 4),
        table_mib: args.number("--state-mib", 256),
        state_memory: state_memory(&mut args),
        pool_size: args.number("--pool-size", 2),
        port: args.number("--port", 0),
    };
    args.finish();
    check_workers_and_pool(config.workers, config.pool_size);
    config
}

fn check_workers_and_pool(workers: usize, pool_size: u32) {
    if workers == 0 || pool_size == 0 {
        usage_error("--workers and --pool-size must be at least 1");
    }
    if workers > MAX_WORKERS {
        usage_error(&format!(
            "--workers {workers}: at most {MAX_WORKERS} (each worker copies the master's page tables)"
        ));
    }
}

fn state_memory(args: &mut Args) -> StateMemory {
    args.take("--state-memory")
        .map_or(Ok(StateMemory::Heap), |name| StateMemory::parse(&name))
        .unwrap_or_else(|e| usage_error(&e))
}

/// The demo's arguments, checked before anything starts.
pub struct DemoSettings {
    pub modes: Vec<Mode>,
    /// `None`: the demo picks one (see `choose_database` in demo.rs).
    pub database: Option<Database>,
    pub config: RunConfig,
    pub rounds: usize,
    pub json_path: Option<PathBuf>,
    pub plot_path: Option<PathBuf>,
}

impl DemoSettings {
    pub fn parse(mut args: Args) -> DemoSettings {
        let modes: Vec<Mode> = match args.take("--modes") {
            Some(list) => list
                .split(',')
                .map(|name| Mode::parse(name.trim()).unwrap_or_else(|e| usage_error(&e)))
                .collect(),
            None => Mode::ALL.to_vec(),
        };
        let database = args.database();
        let config = RunConfig {
            // Replaced by the database chosen once the run starts.
            database: Database::Sqlite(String::new()),
            workers: args.number("--workers", 4),
            table_mib: args.number("--state-mib", 256),
            state_memory: state_memory(&mut args),
            pool_size: args.number("--pool-size", 2),
            requests: args.number("--requests", 4000),
            clients: args.number("--clients", 8),
            request_timeout: Duration::from_millis(args.number("--timeout-ms", 2000)),
            load_time_limit: Duration::from_secs(args.number("--load-time-limit-s", 10)),
            hang_after: Duration::from_millis(args.number("--hang-after-ms", 2000)),
            server_log: args.take("--server-log").map(PathBuf::from),
            // Chosen once the run starts.
            cpus: None,
        };
        let rounds: usize = args.number("--rounds", 11);
        let json_path = args.take("--json").map(PathBuf::from);
        let plot_path = args
            .take("--plot")
            .map(PathBuf::from)
            .or_else(|| json_path.as_ref().map(|json| json.with_extension("svg")));
        args.finish();
        check_workers_and_pool(config.workers, config.pool_size);
        if config.clients == 0 || rounds == 0 {
            usage_error("--clients and --rounds must be at least 1");
        }
        DemoSettings {
            modes,
            database,
            config,
            rounds,
            json_path,
            plot_path,
        }
    }
}
