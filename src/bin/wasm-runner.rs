//! Runs one task's Wasm module inside a Kubernetes Job pod (see `propeller_operator::runner`), or, as
//! `wasm-runner run …`, as a proplet's external runtime (see `propeller_operator::runner::wasmtime_cli`).
use clap::Parser;
use propeller_operator::runner::{self, RunnerArgs, wasmtime_cli};

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("run") {
        std::process::exit(wasmtime_cli::main(&argv[2..]));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = RunnerArgs::parse();
    std::process::exit(runner::run(&args));
}
