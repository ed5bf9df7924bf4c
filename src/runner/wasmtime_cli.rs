//! `wasm-runner run …`: the command line the real proplet gives its `PROPLET_EXTERNAL_WASM_RUNTIME` (the
//! wasmtime CLI's form), so a proplet pointed at wasm-runner runs FL clients and returns their stdout:
//!
//! `run [--invoke <function>] [<cli_args>…] [--env K=V]… <module file> [<inputs>…]`
//!
//! Without `--invoke` the module runs as a WASI command (`_start`); stdout is the result. Other wasmtime
//! options among the cli_args (`--dir`, `-S …`, …) are accepted and ignored with a note on stderr: this
//! runner gives a module no files and no network.

/// One invocation, as the proplet builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub invoke: Option<String>,
    pub env: Vec<(String, String)>,
    pub module: String,
    pub inputs: Vec<String>,
    /// Options this runner does not implement, reported and ignored.
    pub ignored: Vec<String>,
}

/// wasmtime options that take a value as the next argument.
const WITH_VALUE: &[&str] = &["--dir", "-S", "-W", "-O", "-C", "-D", "--preload", "--fuel"];

/// Parses the arguments after `run`.
pub fn parse(args: &[String]) -> Result<Invocation, String> {
    let mut inv = Invocation {
        invoke: None,
        env: Vec::new(),
        module: String::new(),
        inputs: Vec::new(),
        ignored: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = |it: &mut std::slice::Iter<'_, String>, flag: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        if let Some(v) = a.strip_prefix("--invoke=") {
            inv.invoke = Some(v.to_string());
        } else if a == "--invoke" {
            inv.invoke = Some(value(&mut it, a)?);
        } else if let Some(v) = a.strip_prefix("--env=") {
            inv.env.push(env_pair(v)?);
        } else if a == "--env" {
            inv.env.push(env_pair(&value(&mut it, a)?)?);
        } else if a == "--" {
            inv.module = value(&mut it, "--")?;
            break;
        } else if WITH_VALUE.contains(&a.as_str()) {
            let v = value(&mut it, a)?;
            inv.ignored.push(format!("{a} {v}"));
        } else if a.starts_with('-') {
            inv.ignored.push(a.clone());
        } else {
            inv.module = a.clone();
            break;
        }
    }
    if inv.module.is_empty() {
        return Err("no module file: run [--invoke F] [--env K=V]… <module.wasm> [inputs…]".into());
    }
    inv.inputs = it.cloned().collect();
    Ok(inv)
}

/// `K=V` (a bare `K` takes this process's value of K, as wasmtime does).
fn env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("--env {s:?} has no name")),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Ok((s.to_string(), std::env::var(s).unwrap_or_default())),
    }
}

/// Runs the invocation: stdout is the module's stdout (a command) or the export's result; errors go to
/// stderr. Returns the exit status (0, 1 when the module failed, 2 when it could not be loaded).
pub fn main(args: &[String]) -> i32 {
    let inv = match parse(args) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("wasm-runner run: {e}");
            return super::EXIT_SETUP_FAILED;
        }
    };
    for opt in &inv.ignored {
        eprintln!(
            "wasm-runner run: ignoring {opt} (not supported: no files or network for modules)"
        );
    }
    let module = match std::fs::read(&inv.module) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("wasm-runner run: cannot read {}: {e}", inv.module);
            return super::EXIT_SETUP_FAILED;
        }
    };
    let function = inv.invoke.as_deref().unwrap_or("_start");
    match crate::wasm::command::run(&module, function, &inv.inputs, &[], &inv.env) {
        Ok(out) => {
            println!("{out}");
            0
        }
        Err(e) => {
            eprintln!("wasm-runner run: {e}");
            super::EXIT_TASK_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn the_proplet_s_fl_command_line() {
        // What the proplet builds for a `fl-round-…` task: no --invoke, every env entry as --env.
        let inv = parse(&args(&[
            "--env",
            "ROUND_ID=round-1",
            "--env",
            "MODEL_DATA={\"w\":[0.5],\"b\":0}",
            "/tmp/proplet_t1.wasm",
        ]))
        .expect("parses");
        assert_eq!(inv.invoke, None);
        assert_eq!(inv.module, "/tmp/proplet_t1.wasm");
        assert_eq!(
            inv.env,
            vec![
                ("ROUND_ID".to_string(), "round-1".to_string()),
                (
                    "MODEL_DATA".to_string(),
                    "{\"w\":[0.5],\"b\":0}".to_string()
                )
            ]
        );
        assert!(inv.inputs.is_empty() && inv.ignored.is_empty());
    }

    #[test]
    fn an_export_with_inputs_and_wasmtime_options() {
        let inv = parse(&args(&[
            "--invoke",
            "add",
            "--dir",
            ".",
            "-S",
            "http",
            "--env=A=1",
            "m.wasm",
            "40",
            "2",
        ]))
        .expect("parses");
        assert_eq!(inv.invoke.as_deref(), Some("add"));
        assert_eq!(inv.inputs, args(&["40", "2"]));
        assert_eq!(inv.ignored, args(&["--dir .", "-S http"]));
        assert_eq!(inv.env, vec![("A".to_string(), "1".to_string())]);
    }

    #[test]
    fn missing_pieces_are_errors() {
        assert!(parse(&args(&["--env", "A=1"])).is_err());
        assert!(parse(&args(&["--invoke"])).is_err());
        assert!(parse(&args(&["--env", "=x", "m.wasm"])).is_err());
    }
}
