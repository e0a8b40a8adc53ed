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
//!
//! # Layout
//!
//! One binary, two programs: the demo (this process: the driver, its load generator, the
//! reports) and `prefork-demo serve` (the server under test, a master and its workers), which
//! the demo starts once per mode and round. Each file imports only from files below it here;
//! in a folder, `mod.rs` imports its files, and they import each other only downwards too.
//!
//! ```text
//! main.rs              this map; runs the demo, or `serve`
//! demo.rs              the demo run: the machine, the database, the rounds, the outputs
//! args.rs              the usage text; the demo's and `serve`'s arguments, checked
//! report/              the printed table, summary and errors (mod.rs); the --json document
//!                      (json.rs); the --plot chart (chart.rs)
//! verdict/             the conclusion (mod.rs); one figure's target against lazy (target.rs)
//! driver/              one round (mod.rs): the load, servers in turns (load.rs); probes, CPU
//!                      time and memory (measure.rs); one request and the tally (client.rs);
//!                      a `serve` process, started, read and stopped (serve_process.rs)
//! private_postgres.rs  a throwaway PostgreSQL server for the run
//! cleanup.rs           what the demo stops and removes at exit, however it ends
//! progress.rs          a progress bar on a terminal, lines elsewhere
//! results.rs           one mode's figures for a round; its rounds combined
//! median.rs            a median and its confidence interval
//! figure.rs            the one number format
//! server/              `serve`: the master (mod.rs); a worker's life (worker.rs); the threads
//!                      watching the workers (master_threads.rs); the slots they share
//!                      (slots.rs); HTTP/1.1 (http.rs)
//! config.rs            the settings of a demo run and of one server
//! cpus.rs              the CPUs of the load generator, and those of the servers
//! app/                 the application a worker serves (mod.rs): its pool by mode and backend
//!                      (pool.rs), modes (mode.rs), the answer a request must get (answer.rs),
//!                      the database (database.rs), the read-only state (state.rs)
//! ```

mod app;
mod args;
mod cleanup;
mod config;
mod cpus;
mod demo;
mod driver;
mod figure;

mod median;
mod private_postgres;
mod progress;
mod report;
mod results;
mod server;
mod verdict;

use crate::args::{Args, DemoSettings, HELP};

fn main() {
    let mut args = Args::from_env();
    if args.ask_for_help() {
        print!("{HELP}");
        return;
    }
    if args.take_command("serve") {
        serve(args);
        return;
    }
    let settings = DemoSettings::parse(args);
    if let Err(error) = cleanup::on_interrupt_clean_up_and_exit() {
        eprintln!("prefork-demo: {error}");
        std::process::exit(1);
    }
    // Whatever happens in the run, even a panic, the servers stop and the files go.
    let outcome = std::panic::catch_unwind(|| demo::run(settings));
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

fn serve(args: Args) {
    if let Err(error) = cleanup::unblock_interrupt_signals() {
        println!("error {error}");
        std::process::exit(1);
    }
    let config = args::serve_config(args);
    if let Err(error) = server::serve(config) {
        println!("error {error}");
        std::process::exit(1);
    }
}
