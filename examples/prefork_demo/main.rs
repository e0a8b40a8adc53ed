//! What forksafe-pool is for, in one run: a pre-fork HTTP server with its database pool built
//! before the fork (`naive`, plain r2d2), the same with `forksafe_pool::Pool` (`forksafe`), and
//! every worker building its own application after the fork (`lazy`, uWSGI `--lazy-apps`),
//! driven by the same load, side by side.
//!
//! ```text
//! cargo run --release --example prefork_demo                    # embedded SQLite
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo run --release --example prefork_demo -- --json report.json --plot report.svg
//! cargo run --release --example prefork_demo -- --help
//! cargo run --release --example prefork_demo -- serve --mode forksafe --port 8080 --database /tmp/demo.db
//! ```

mod app;
mod driver;
mod http;
mod report;
mod server;

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::app::{Database, Mode, StateMemory};
use crate::driver::{ModeResult, RunConfig};
use crate::server::ServeConfig;

const HELP: &str = "\
prefork_demo: a pre-fork HTTP server in three modes, side by side

USAGE:
  prefork_demo [OPTIONS]          run every mode and print the table
  prefork_demo serve [OPTIONS]    run one server (master + workers) until `quit` on stdin

OPTIONS (both):
  --database URL|PATH   postgres://… URL, or an SQLite file [default: $DATABASE_URL, else an
                        SQLite file in a temporary directory]
  --workers N           worker processes [4]
  --state-mib N         read-only application state per application, MiB [256]
  --state-memory heap|huge|shared
                        where that state lives: a Vec on the heap (private, shared with the
                        master copy-on-write); private memory in transparent huge pages, for
                        which a fork copies one page-table entry per 2 MiB; or a read-only
                        shared mapping, for which a fork copies no page tables [heap]
  --pool-size N         connections per pool (max_size = min_idle) [2]
OPTIONS (demo):
  --modes LIST          comma-separated: naive,forksafe,lazy [all three]
  --requests N          requests per mode [20000]
  --clients N           parallel keep-alive client connections [8]
  --timeout-ms N        per-request timeout [2000]
  --load-time-limit-s N stop sending after this long; the rest count as failed [15]
  --hang-after-ms N     a worker still busy on one request this long after the load is hung [2000]
  --rounds N            run every mode N times, alternating their order, and report the
                        median of each figure and the total of each count [1]
  --json PATH           write the figures as JSON
  --plot PATH           draw the figures as an SVG chart
  --server-log PATH     keep the servers' standard error there [a temporary file]
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
            fail(&format!("{flag} needs a value"));
        }
        let value = self.words.remove(at + 1);
        self.words.remove(at);
        Some(value)
    }

    fn number<T: std::str::FromStr>(&mut self, flag: &str, default: T) -> T {
        match self.take(flag) {
            Some(value) => value
                .parse()
                .unwrap_or_else(|_| fail(&format!("{flag}: not a number: {value}"))),
            None => default,
        }
    }

    fn finish(self) {
        if let Some(word) = self.words.first() {
            fail(&format!("unknown argument {word:?}"));
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("prefork_demo: {message}\n\n{HELP}");
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
    } else {
        demo(args);
    }
}

fn serve(mut args: Args) {
    let config = ServeConfig {
        mode: Mode::parse(
            &args
                .take("--mode")
                .unwrap_or_else(|| String::from("forksafe")),
        )
        .unwrap_or_else(|e| fail(&e)),
        database: Database::from_arg(
            &args
                .take("--database")
                .or_else(|| std::env::var("DATABASE_URL").ok())
                .unwrap_or_else(|| fail("serve needs --database")),
        ),
        workers: args.number("--workers", 4),
        table_mib: args.number("--state-mib", 256),
        state_memory: state_memory(&mut args),
        pool_size: args.number("--pool-size", 2),
        port: args.number("--port", 0),
    };
    args.finish();
    if config.workers == 0 || config.pool_size == 0 {
        fail("--workers and --pool-size must be at least 1");
    }
    if let Err(error) = server::serve(config) {
        println!("error {error}");
        std::process::exit(1);
    }
}

fn state_memory(args: &mut Args) -> StateMemory {
    args.take("--state-memory")
        .map_or(Ok(StateMemory::Heap), |name| StateMemory::parse(&name))
        .unwrap_or_else(|e| fail(&e))
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

fn demo(mut args: Args) {
    let modes: Vec<Mode> = match args.take("--modes") {
        Some(list) => list
            .split(',')
            .map(|name| Mode::parse(name.trim()).unwrap_or_else(|e| fail(&e)))
            .collect(),
        None => Mode::ALL.to_vec(),
    };
    let temp = tempfile::Builder::new()
        .prefix("prefork-demo-")
        .tempdir()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let database = match args
        .take("--database")
        .or_else(|| std::env::var("DATABASE_URL").ok())
    {
        Some(arg) => Database::from_arg(&arg),
        None => Database::Sqlite(temp.path().join("demo.db").display().to_string()),
    };
    let config = RunConfig {
        database,
        workers: args.number("--workers", 4),
        table_mib: args.number("--state-mib", 256),
        state_memory: state_memory(&mut args),
        pool_size: args.number("--pool-size", 2),
        requests: args.number("--requests", 20_000),
        clients: args.number("--clients", 8),
        request_timeout: Duration::from_millis(args.number("--timeout-ms", 2000)),
        load_time_limit: Duration::from_secs(args.number("--load-time-limit-s", 15)),
        hang_after: Duration::from_millis(args.number("--hang-after-ms", 2000)),
        server_log: args
            .take("--server-log")
            .map_or_else(|| temp.path().join("server-stderr.log"), PathBuf::from),
    };
    let rounds: usize = args.number("--rounds", 1);
    let json_path = args.take("--json").map(PathBuf::from);
    let plot_path = args.take("--plot").map(PathBuf::from);
    args.finish();
    if config.workers == 0 || config.pool_size == 0 || config.clients == 0 || rounds == 0 {
        fail("--workers, --pool-size, --clients and --rounds must be at least 1");
    }

    // Workers whose master died are reparented here, so this process reaps every descendant.
    if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("prefork_demo: cannot become a subreaper ({error}); orphans go to init");
    }
    if let Err(error) = config.database.prepare() {
        fail(&format!(
            "cannot prepare {}: {error}",
            config.database.describe()
        ));
    }
    let machine = machine();
    println!(
        "prefork_demo: {} workers, {} MiB of application state ({}), {} requests per mode{} over {} keep-alive connections, database: {}",
        config.workers,
        config.table_mib,
        config.state_memory.name(),
        config.requests,
        if rounds > 1 {
            format!(" in each of {rounds} rounds (figures: medians; counts: totals)")
        } else {
            String::new()
        },
        config.clients,
        config.database.describe()
    );
    println!(
        "machine: {} cores, {}, Linux {}\n",
        machine["cores"],
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?")
    );

    let style =
        ProgressStyle::with_template("{prefix:>9} [{bar:32}] {pos}/{len} {msg} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> ");
    // Every round runs every mode, in the opposite order to the round before, so that neither
    // always runs first on a machine still busy with the other's aftermath.
    let mut runs: Vec<Vec<ModeResult>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..modes.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for at in order {
            let mode = modes[at];
            let bar = ProgressBar::new(config.requests)
                .with_style(style.clone())
                .with_prefix(mode.name());
            bar.enable_steady_tick(Duration::from_millis(200));
            let index = (round * modes.len() + at) as u64;
            runs[at].push(driver::run_mode(mode, index, &config, &bar));
            bar.finish_and_clear();
        }
    }
    driver::reap_orphans(Duration::from_secs(1));
    let mut results: Vec<ModeResult> = runs.iter().map(|runs| report::combine(runs)).collect();
    let lazy_pss = results
        .iter()
        .find(|result| result.mode == "lazy" && result.server_error.is_none())
        .map(|result| result.total_pss_mib);
    for result in &mut results {
        result.pss_ratio_to_lazy = lazy_pss
            .filter(|&pss| pss > 0.0)
            .map(|pss| result.total_pss_mib / pss);
    }

    print!("{}", report::table(&results));
    let errors = report::errors(&results);
    if !errors.is_empty() {
        println!("\nerrors seen (most frequent first):\n{errors}");
    }
    let ratios = report::ratios(&results);
    if !ratios.is_empty() {
        println!("\n{ratios}");
    }
    if let Some(path) = json_path {
        let document = report::json(&results, &runs, &config, &machine);
        let text = serde_json::to_string_pretty(&document).expect("JSON of plain values");
        match std::fs::write(&path, text + "\n") {
            Ok(()) => println!("wrote {}", path.display()),
            Err(error) => eprintln!("prefork_demo: cannot write {}: {error}", path.display()),
        }
    }
    if let Some(path) = plot_path {
        let backend = match config.database {
            Database::Postgres(_) => "PostgreSQL",
            Database::Sqlite(_) => "SQLite",
        };
        let title = format!(
            "prefork_demo on {backend}: {} workers, {} MiB state ({}), {} requests ({} cores, Linux {})",
            config.workers,
            config.table_mib,
            config.state_memory.name(),
            config.requests,
            machine["cores"],
            machine["kernel"].as_str().unwrap_or("?")
        );
        match report::plot(&results, &title, &path) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(error) => eprintln!("prefork_demo: cannot draw {}: {error}", path.display()),
        }
    }
}
