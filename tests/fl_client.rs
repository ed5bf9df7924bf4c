//! The example FL client (examples/fl-client/fl_client.c, built by `make fl-client`) under wasmi and
//! through `wasm-runner run` with the command line the real proplet gives its external runtime.
use propeller_operator::testbed::fl_client_module;
use propeller_operator::wasm::command;
use serde_json::{Value, json};

fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn run(module: &[u8], vars: &[(String, String)]) -> Result<Value, String> {
    let out = command::run(module, "fl-round-round-1-edge-1", &[], &[], vars)?;
    serde_json::from_str(&out).map_err(|e| format!("stdout is not JSON ({e}): {out}"))
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The same training written again here: logistic regression, SGD over the samples in order.
fn train(x: &[Vec<f64>], y: &[f64], w: &mut [f64], b: &mut f64, lr: f64, epochs: usize) {
    for _ in 0..epochs {
        for (xi, yi) in x.iter().zip(y) {
            let z = *b + w.iter().zip(xi).map(|(a, c)| a * c).sum::<f64>();
            let g = sigmoid(z) - yi;
            for (wj, xj) in w.iter_mut().zip(xi) {
                *wj -= lr * g * xj;
            }
            *b -= lr * g;
        }
    }
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-9)
}

#[test]
fn one_sample_one_step_gives_the_update_worked_by_hand() {
    let Some(path) = fl_client_module("one_sample_one_step") else {
        return;
    };
    let module = std::fs::read(path).expect("module");
    // z = 0, p = 0.5, gradient −0.5: w = [0.25, 0], b = 0.25; the loss before is ln 2.
    let v = run(
        &module,
        &env(&[
            (
                "DATASET_DATA",
                json!({"x": [[1.0, 0.0]], "y": [1]}).to_string(),
            ),
            ("MODEL_DATA", json!({"w": [0.0, 0.0], "b": 0.0}).to_string()),
            ("HYPERPARAMS", json!({"epochs": 1, "lr": 0.5}).to_string()),
            ("ROUND_ID", "round-1".into()),
            ("PROPLET_ID", "edge-1".into()),
            ("MODEL_URI", "fl/models/global_model_v0".into()),
        ]),
    )
    .expect("runs");
    assert_eq!(v["round_id"], "round-1");
    assert_eq!(v["proplet_id"], "edge-1");
    assert_eq!(v["base_model_uri"], "fl/models/global_model_v0");
    assert_eq!(v["num_samples"], 1);
    assert!(close(&v["update"]["w"][0], 0.25), "{v}");
    assert!(close(&v["update"]["w"][1], 0.0), "{v}");
    assert!(close(&v["update"]["b"], 0.25), "{v}");
    assert!(close(&v["metrics"]["loss_before"], 2f64.ln()), "{v}");
    assert!(v["metrics"]["loss"].as_f64().expect("loss") < 2f64.ln());
}

#[test]
fn a_known_dataset_and_model_give_the_update_computed_independently() {
    let Some(path) = fl_client_module("a_known_dataset") else {
        return;
    };
    let module = std::fs::read(path).expect("module");
    let x: Vec<Vec<f64>> = (0..40)
        .map(|i| {
            let a = (i as f64 * 0.37).sin() * 2.0;
            let c = (i as f64 * 0.11).cos();
            vec![a, c, 1.0 - a * c]
        })
        .collect();
    let y: Vec<f64> = x
        .iter()
        .map(|r| if r[0] + 0.5 * r[1] > 0.2 { 1.0 } else { 0.0 })
        .collect();
    let (mut w, mut b) = (vec![0.1, -0.2, 0.05], 0.3);
    let model = json!({"w": w, "b": b});
    train(&x, &y, &mut w, &mut b, 0.05, 3);
    let v = run(
        &module,
        &env(&[
            ("DATASET_DATA", json!({"x": x, "y": y}).to_string()),
            ("MODEL_DATA", model.to_string()),
            ("HYPERPARAMS", json!({"epochs": 3, "lr": 0.05}).to_string()),
            ("ROUND_ID", "round-2".into()),
            ("PROPLET_ID", "edge-2".into()),
        ]),
    )
    .expect("runs");
    assert_eq!(v["num_samples"], 40);
    for (j, wj) in w.iter().enumerate() {
        assert!(close(&v["update"]["w"][j], *wj), "w[{j}]: {v} vs {wj}");
    }
    assert!(close(&v["update"]["b"], b), "{v}");
    let (before, after) = (
        v["metrics"]["loss_before"].as_f64().expect("loss_before"),
        v["metrics"]["loss"].as_f64().expect("loss"),
    );
    assert!(
        after < before,
        "training lowers the loss: {before} → {after}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let Some(path) = fl_client_module("bad_input") else {
        return;
    };
    let module = std::fs::read(path).expect("module");
    let e = run(&module, &[]).expect_err("no dataset");
    assert!(e.contains("status 1"), "{e}");
    let e = run(
        &module,
        &env(&[
            (
                "DATASET_DATA",
                json!({"x": [[1.0, 2.0]], "y": [1]}).to_string(),
            ),
            ("MODEL_DATA", json!({"w": [1.0], "b": 0}).to_string()),
        ]),
    )
    .expect_err("mismatched model");
    assert!(e.contains("status 1"), "{e}");
}

#[test]
fn wasm_runner_runs_it_as_the_proplet_s_external_runtime() {
    let Some(path) = fl_client_module("wasm_runner_external_runtime") else {
        return;
    };
    // The proplet's form: `run [--env K=V]… <module file>` for a `fl-round-…` task (no --invoke).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasm-runner"))
        .arg("run")
        .args(["--env", "ROUND_ID=round-1", "--env", "PROPLET_ID=edge-1"])
        .arg("--env")
        .arg(format!(
            "DATASET_DATA={}",
            json!({"x": [[1.0, 0.0]], "y": [1]})
        ))
        .arg("--env")
        .arg(format!("MODEL_DATA={}", json!({"w": [0.0, 0.0], "b": 0.0})))
        .args(["--env", "HYPERPARAMS={\"epochs\":1,\"lr\":0.5}"])
        .arg(&path)
        .output()
        .expect("wasm-runner starts");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("stdout is the update JSON");
    assert_eq!(v["proplet_id"], "edge-1");
    assert!(close(&v["update"]["w"][0], 0.25), "{v}");
    // A module that cannot be read: exit status 2 and a reason.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wasm-runner"))
        .args(["run", "/nonexistent/module.wasm"])
        .output()
        .expect("wasm-runner starts");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}
