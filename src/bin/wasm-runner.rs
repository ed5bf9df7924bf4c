//! Runs one task's Wasm module inside a Kubernetes Job pod (see `propeller_operator::runner`).
use clap::Parser;
use propeller_operator::runner::{self, RunnerArgs};

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = RunnerArgs::parse();
    std::process::exit(runner::run(&args));
}
