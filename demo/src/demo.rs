//! The demo run: the machine, the database, every mode's rounds, then the table, the verdict
//! and the files asked for.

use crate::app::{Database, Mode};
use crate::args::DemoSettings;
use crate::cleanup;
use crate::cpus::Cpus;
use crate::driver;
use crate::private_postgres;
use crate::progress::Progress;
use crate::report;
use crate::results::{self, ModeResult};
use crate::verdict;

/// What the run ran on: the kernel, the CPU model, the cores.
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

/// Runs the demo; the error that stopped it, if one did.
pub fn run(settings: DemoSettings) -> Result<(), String> {
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
