//! The README's demo command, shrunk: on its default private PostgreSQL server (naive breaks,
//! forksafe does not), on SQLite in every mode and with every kind of state memory, interrupted,
//! and given bad input; checked through its verdict lines and its `--json` report, and for
//! what it leaves behind (nothing) in its temporary directory.
//!
//! Each run is a separate process tree that the demo reaps itself, and is killed if it outlives
//! its deadline.
//!
//! `run` starts the demo and reads what it prints; `report` checks its `--json` report and
//! verdict; the tests are in `sqlite`, `private_postgres`, `serve` and `bad_input`.

mod bad_input;
mod private_postgres;
mod report;
mod run;
mod serve;
mod sqlite;
