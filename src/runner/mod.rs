//! The Wasm runner of the Kubernetes Job backend: one module, one call, the outcome written as a
//! proplet results message (`{task_id, proplet_id, results, error}`) to the container's termination
//! message, where the operator reads it. Exits 0 on success, 1 when the task failed, 2 when the module
//! could not be loaded or the arguments are wrong.
pub mod wasmtime_cli;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::GoDuration;
use crate::mqtt::wire::TaskResult;

/// Kubernetes keeps at most this much of a termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Exit status when the task itself failed (a trap, a missing export, bad inputs).
pub const EXIT_TASK_FAILED: i32 = 1;
/// Exit status when the runner could not start the task (arguments, module download).
pub const EXIT_SETUP_FAILED: i32 = 2;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "wasm-runner",
    version,
    about = "Runs one Propeller task's Wasm module and reports the result as a termination message"
)]
pub struct RunnerArgs {
    /// The module as a file (e.g. mounted from a ConfigMap).
    #[arg(long, env = "MODULE_FILE", conflicts_with = "module_url")]
    pub module_file: Option<PathBuf>,
    /// The module at an http(s) URL.
    #[arg(long, env = "MODULE_URL")]
    pub module_url: Option<String>,
    /// Export to call; `_start` or a name starting with `fl-round-` runs a WASI command.
    #[arg(long, env = "FUNCTION")]
    pub function: String,
    /// One argument of the export, in order (repeat the flag).
    #[arg(long = "input", allow_hyphen_values = true)]
    pub inputs: Vec<String>,
    /// Environment variables of this container to hand to the module (repeat the flag).
    #[arg(long = "pass-env")]
    pub pass_env: Vec<String>,
    /// The task's id, copied into the result.
    #[arg(long, env = "TASK_ID")]
    pub task_id: String,
    /// The proplet's clientId, copied into the result.
    #[arg(long, env = "PROPLET_ID", default_value = "")]
    pub proplet_id: String,
    /// Where Kubernetes reads the termination message.
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
    /// Largest module accepted from a URL.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_module_bytes: u64,
    /// Time allowed for downloading the module.
    #[arg(long, default_value = "60s")]
    pub fetch_timeout: GoDuration,
    /// Command-line arguments of a WASI command.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// Runs the task and writes the termination message; returns the exit status.
pub fn run(args: &RunnerArgs) -> i32 {
    let (outcome, status) = match load_module(args) {
        Err(e) => (Err(e), EXIT_SETUP_FAILED),
        Ok(module) => {
            let env: Vec<(String, String)> = args
                .pass_env
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
                .collect();
            match crate::wasm::run(&module, &args.function, &args.inputs, &args.args, &env) {
                Ok(r) => (Ok(r), 0),
                Err(e) => (Err(e), EXIT_TASK_FAILED),
            }
        }
    };
    let message = termination_message(&args.task_id, &args.proplet_id, outcome);
    // Also in the log, whole, for `kubectl logs`.
    println!("{message}");
    if let Err(e) = std::fs::write(&args.termination_log, &message) {
        eprintln!(
            "wasm-runner: cannot write {}: {e}",
            args.termination_log.display()
        );
        return EXIT_SETUP_FAILED;
    }
    status
}

fn load_module(args: &RunnerArgs) -> Result<Vec<u8>, String> {
    match (&args.module_file, &args.module_url) {
        (Some(path), _) => std::fs::read(path)
            .map_err(|e| format!("Failed to read module {}: {e}", path.display())),
        (None, Some(url)) => fetch(url, args.max_module_bytes, args.fetch_timeout.0),
        (None, None) => Err("no module: give --module-file or --module-url".into()),
    }
}

fn fetch(url: &str, limit: u64, timeout: Duration) -> Result<Vec<u8>, String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "Failed to fetch module: {url:?} is not an http(s) URL"
        ));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| format!("Failed to fetch module from {url}: {e}"))?;
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("Failed to fetch module from {url}: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "Module at {url} is larger than --max-module-bytes ({limit})"
        ));
    }
    Ok(bytes)
}

/// The results message, cut so that it fits in a termination message (the result text is shortened;
/// the error keeps its beginning).
pub fn termination_message(
    task_id: &str,
    proplet_id: &str,
    outcome: Result<String, String>,
) -> String {
    let (mut results, mut error) = match outcome {
        Ok(r) => (r, String::new()),
        Err(e) => (String::new(), e),
    };
    loop {
        let message = TaskResult {
            task_id: task_id.to_string(),
            proplet_id: (!proplet_id.is_empty()).then(|| proplet_id.to_string()),
            results: serde_json::Value::String(results.clone()),
            error: Some(error.clone()),
        };
        let text = serde_json::to_string(&message).unwrap_or_default();
        if text.len() <= TERMINATION_MESSAGE_LIMIT {
            return text;
        }
        let excess = text.len() - TERMINATION_MESSAGE_LIMIT;
        let field = if results.len() >= error.len() {
            &mut results
        } else {
            &mut error
        };
        // Escapes make the JSON longer than the text: cut in proportion, on a char boundary.
        let encoded = serde_json::to_string(field.as_str()).map_or(field.len(), |e| e.len());
        let keep_encoded = encoded.saturating_sub(excess + 8);
        let mut keep = field.len() * keep_encoded / encoded.max(1);
        while !field.is_char_boundary(keep) {
            keep -= 1;
        }
        field.truncate(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_results_are_cut_to_fit_a_termination_message() {
        let long = "\"x\u{e9}".repeat(5000);
        let msg = termination_message("t", "p", Ok(long));
        assert!(msg.len() <= TERMINATION_MESSAGE_LIMIT, "{}", msg.len());
        let parsed = crate::mqtt::wire::decode_result(msg.as_bytes()).expect("valid result");
        assert!(parsed.results.as_str().is_some_and(|r| r.len() > 3000));
        let msg = termination_message("t", "", Err("e".repeat(10_000)));
        let parsed = crate::mqtt::wire::decode_result(msg.as_bytes()).expect("valid result");
        assert!(parsed.failure().is_some_and(|e| e.len() > 3000));
        assert_eq!(parsed.proplet_id, None);
    }
}
