//! What forksafe-pool is for, in one run: a pre-fork HTTP server with its database pool built
//! before the fork (`naive`, plain r2d2), the same with `forksafe_pool::Pool` (`forksafe`), and
//! every worker building its own application after the fork (`lazy`, uWSGI `--lazy-apps`),
//! driven by the same load, side by side, ending with a verdict.
//!
//! With no database named, the demo starts a private PostgreSQL server (see
//! [`private_postgres`]): naive pre-forking breaks on a network database's shared sockets, not
//! on embedded SQLite.
//!
//! ```text
//! cargo run --release -p prefork-demo
//! cargo run --release -p prefork-demo -- --json report.json     # also writes report.svg
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test cargo run --release -p prefork-demo
//! cargo run --release -p prefork-demo -- --help
//! ```

mod app;
mod cleanup;
mod config;
mod cpus;
mod driver;
mod figure;

mod median;
mod private_postgres;
mod progress;
mod report;
mod results;
mod server;
mod verdict;

use std::path::PathBuf;
use std::time::Duration;

use crate::app::{Database, Mode, StateMemory};
use crate::config::{RunConfig, ServeConfig};
use crate::cpus::Cpus;
use crate::progress::Progress;
use crate::results::ModeResult;

/// More workers than this is refused: each forks with a copy of the master's page tables, and
/// thousands of them exhaust a machine's memory before `fork` reports anything.
const MAX_WORKERS: usize = 512;

const HELP: &str = "\
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

struct Args {
    words: Vec<String>,
}

impl Args {
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

fn main() {
    let mut args = Args {
        words: std::env::args().skip(1).collect(),
    };
    if args
        .words
        .iter()
        .any(|word| word == "--help" || word == "-h")
    {
        print!("{HELP}");
        return;
    }
    if args.words.first().map(String::as_str) == Some("serve") {
        args.words.remove(0);
        serve(args);
        return;
    }
    let settings = DemoSettings::parse(args);
    if let Err(error) = cleanup::on_interrupt_clean_up_and_exit() {
        eprintln!("prefork-demo: {error}");
        std::process::exit(1);
    }
    // Whatever happens in the run, even a panic, the servers stop and the files go.
    let outcome = std::panic::catch_unwind(|| demo(settings));
    cleanup::clean_up();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            // One line, although drivers (libpq) spread their messages over several.
            let error = error.split_whitespace().collect::<Vec<_>>().join(" ");
            println!("prefork-demo: {error}");
            std::process::exit(1);
        }
        Err(_) => std::process::exit(101),
    }
}

fn serve(mut args: Args) {
    if let Err(error) = cleanup::unblock_interrupt_signals() {
        println!("error {error}");
        std::process::exit(1);
    }
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
    if let Err(error) = server::serve(config) {
        println!("error {error}");
        std::process::exit(1);
    }
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

fn machine() -> serde_json::Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    serde_json::json!({ "kernel": kernel, "cpu": cpu, "cores": cores })
}

/// The demo's arguments, checked before anything starts.
struct DemoSettings {
    modes: Vec<Mode>,
    /// `None`: the demo picks one (see [`choose_database`]).
    database: Option<Database>,
    config: RunConfig,
    rounds: usize,
    json_path: Option<PathBuf>,
    plot_path: Option<PathBuf>,
}

impl DemoSettings {
    fn parse(mut args: Args) -> DemoSettings {
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

/// The database named, else a private PostgreSQL server, else (saying why that is a lesser
/// demo) an SQLite file in a temporary directory.
fn choose_database(named: Option<Database>, cpus: Option<&Cpus>) -> Result<Database, String> {
    if let Some(database) = named {
        return Ok(database);
    }
    if let Some(binaries) = private_postgres::find_binaries() {
        println!(
            "prefork-demo: starting a private PostgreSQL server ({}) for this run",
            binaries.display()
        );
        let server = private_postgres::start(&binaries, cpus)?;
        println!(
            "prefork-demo: PostgreSQL {} on {}, TLS {}; stopped and removed at exit",
            server.version,
            server.url,
            if server.tls { "on" } else { "off" }
        );
        return Ok(Database::Postgres(server.url));
    }
    println!(
        "prefork-demo: naive mode's failure needs a network database: install the PostgreSQL \
         server (Debian: apt-get install postgresql) or set DATABASE_URL=postgres://…; \
         running on embedded SQLite"
    );
    let dir = cleanup::remove_at_exit(
        tempfile::Builder::new()
            .prefix("prefork-demo-")
            .tempdir()
            .map_err(|error| format!("temporary directory: {error}"))?,
    );
    Ok(Database::Sqlite(dir.join("demo.db").display().to_string()))
}

fn demo(settings: DemoSettings) -> Result<(), String> {
    let DemoSettings {
        modes,
        database,
        mut config,
        rounds,
        json_path,
        plot_path,
    } = settings;
    // Workers whose master died are reparented here, so this process reaps every descendant.
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        println!("prefork-demo: cannot become a subreaper ({error}); orphans go to init");
    }
    // Before this process is pinned to some of them.
    let mut machine = machine();
    // The load generator (this process's threads) on one half of the CPUs, the servers and a
    // private database on the other (see `cpus`).
    config.cpus = Cpus::split().filter(|cpus| match cpus.pin_load_generator() {
        Ok(()) => true,
        Err(error) => {
            println!("prefork-demo: {error}; the servers share the CPUs with the load generator");
            false
        }
    });
    machine["cpus"] = config
        .cpus
        .as_ref()
        .map_or(serde_json::Value::Null, Cpus::json);
    config.database = choose_database(database, config.cpus.as_ref())?;
    config
        .database
        .prepare()
        .map_err(|error| format!("cannot prepare {}: {error}", config.database.describe()))?;
    println!(
        "prefork-demo: {} workers, {} MiB of application state ({}), {} requests per mode and round \
         over {} keep-alive connections, {}; database: {}",
        config.workers,
        config.table_mib,
        config.state_memory.name(),
        config.requests,
        config.clients,
        if rounds > 1 {
            format!("{rounds} rounds of forksafe and lazy side by side, naive once")
        } else {
            String::from("1 round")
        },
        config.database.describe()
    );
    println!(
        "machine: {} cores, {}, Linux {}; {}\n",
        machine["cores"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?"),
        config.cpus.as_ref().map_or_else(
            || String::from("servers and load generator on the same CPUs"),
            Cpus::describe
        )
    );

    // Naive runs alone, once: its failure needs no median, and a broken run waits out its
    // timeouts. Every round runs the other modes side by side (see `driver::load`), in the
    // opposite order to the round before, so that neither always starts first or takes the
    // first turn.
    let mut runs: Vec<Vec<ModeResult>> = vec![Vec::new(); modes.len()];
    let (naive, others): (Vec<usize>, Vec<usize>) =
        (0..modes.len()).partition(|&at| modes[at] == Mode::Naive);
    let mut index = 0;
    let mut run = |group: &[usize], label: String, runs: &mut Vec<Vec<ModeResult>>| {
        let group_modes: Vec<Mode> = group.iter().map(|&at| modes[at]).collect();
        let progress = Progress::new(label, config.requests * group.len() as u64);
        let results = driver::run_round(&group_modes, index, &config, &progress);
        index += group.len() as u64;
        progress.finish(
            &results
                .iter()
                .map(|result| {
                    if group.len() > 1 {
                        format!("{}: {}", result.mode, report::summary(result))
                    } else {
                        report::summary(result)
                    }
                })
                .collect::<Vec<_>>()
                .join("; "),
        );
        for (&at, result) in group.iter().zip(results) {
            runs[at].push(result);
        }
    };
    if !naive.is_empty() {
        run(&naive, String::from("naive"), &mut runs);
    }
    if !others.is_empty() {
        for round in 0..rounds {
            let mut group = others.clone();
            if round % 2 == 1 {
                group.reverse();
            }
            let names: Vec<&str> = group.iter().map(|&at| modes[at].name()).collect();
            let label = if rounds > 1 {
                format!("{} {}/{rounds}", names.join("+"), round + 1)
            } else {
                names.join("+")
            };
            run(&group, label, &mut runs);
        }
    }
    let mut results: Vec<ModeResult> = runs.iter().map(|runs| results::combine(runs)).collect();
    let lazy_pss = results
        .iter()
        .find(|result| result.mode == "lazy" && result.server_error.is_none())
        .map(|result| result.total_pss_mib);
    for result in &mut results {
        result.pss_ratio_to_lazy = lazy_pss
            .filter(|&pss| pss > 0.0)
            .map(|pss| result.total_pss_mib / pss);
    }

    println!();
    print!("{}", report::table(&results));
    let errors = report::errors(&results);
    if !errors.is_empty() {
        print!("\nerrors, in the order they first appeared:\n{errors}");
    }
    let verdict = verdict::Verdict::judge(&results, &runs, &config);
    println!("\nverdict:\n{}", verdict.lines().join("\n"));
    if let Some(path) = &json_path {
        let document = report::json(&results, &runs, &config, &machine, &verdict);
        let text = serde_json::to_string_pretty(&document).expect("JSON of plain values");
        std::fs::write(path, text + "\n")
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &plot_path {
        let backend = match config.database {
            Database::Postgres(_) => "PostgreSQL",
            Database::Sqlite(_) => "SQLite",
        };
        let title = format!(
            "prefork-demo on {backend}: {} workers, {} MiB state ({}), {} requests × {} rounds \
             ({} cores, Linux {})",
            config.workers,
            config.table_mib,
            config.state_memory.name(),
            config.requests,
            rounds,
            machine["cores"],
            machine["kernel"].as_str().unwrap_or("?")
        );
        report::plot(&results, &title, path)
            .map_err(|error| format!("cannot draw {}: {error}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
