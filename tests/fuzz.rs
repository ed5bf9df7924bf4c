//! Fuzzing on stable Rust, with proptest: every parser of input from outside the operator gets arbitrary
//! bytes, generated JSON (keys drawn from the wire vocabulary, so that deep paths are reached) and
//! mutations of the seeds in `tests/fuzz-corpus/<target>/`, and must answer with a value or an error —
//! never a panic. Where two parsers must agree (the cheap `proplet_id` peek a shard drops messages by, and
//! the full decode), the fuzzer checks that they do.
//!
//! `FUZZ_CASES` sets the inputs per target: 2,000 by default (the pass `make test` runs), 1,000,000 with
//! `make fuzz` (release mode, bounded time; prints the inputs and time per target). A failing input is
//! shrunk and saved by proptest under `tests/fuzz.proptest-regressions` (commit it: it runs first next time).
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use serde_json::{Value, json};

use propeller_operator::fl::params::Params;
use propeller_operator::fl::update::Update;
use propeller_operator::mqtt::{topics, wire};
use propeller_operator::scheduling::cron;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2_000)
}

/// Runs `check` on `cases()` inputs of `strategy`; reports the count and time (seen with `make fuzz`).
fn fuzz<S: Strategy>(
    target: &str,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        // Inputs are cheap: most rejections would only waste the budget.
        max_global_rejects: n,
        ..Config::default()
    });
    let start = Instant::now();
    if let Err(e) = runner.run(&strategy, check) {
        panic!("fuzz target {target}: {e}");
    }
    eprintln!(
        "fuzz {target}: {n} inputs in {:.1} s, no panic",
        start.elapsed().as_secs_f64()
    );
}

fn corpus(target: &str) -> &'static [Vec<u8>] {
    static ALL: OnceLock<std::collections::BTreeMap<String, Vec<Vec<u8>>>> = OnceLock::new();
    let all = ALL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
        let mut out = std::collections::BTreeMap::new();
        for t in ["mqtt", "fl", "cron", "kubeconfig"] {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(t))
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            files.sort();
            let seeds: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
            assert!(!seeds.is_empty(), "tests/fuzz-corpus/{t} has no seeds");
            out.insert(t.to_string(), seeds);
        }
        out
    });
    all.get(target).map(Vec::as_slice).unwrap_or_default()
}

/// Keys of the messages we parse: generated objects use them, so parsers see their own fields with
/// wrong types, odd values and odd nesting.
const KEYS: &[&str] = &[
    "proplet_id",
    "task_id",
    "status",
    "namespace",
    "channel_id",
    "results",
    "state",
    "error",
    "metadata",
    "total_memory_bytes",
    "cpu_metrics",
    "memory_metrics",
    "percent",
    "rss_bytes",
    "timestamp",
    "metrics",
    "app_name",
    "round_id",
    "num_samples",
    "update",
    "update_b64",
    "format",
    "w",
    "b",
    "loss",
    "apiVersion",
    "clusters",
    "cluster",
    "server",
    "users",
    "user",
    "token",
    "contexts",
    "context",
    "current-context",
    "bearerToken",
    "tlsClientConfig",
    "caData",
    "insecure",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,24}".prop_map(Value::String),
        prop::sample::select(KEYS).prop_map(|k| Value::String(k.to_string())),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(KEYS).prop_map(str::to_string),
                        ".{0,8}"
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A seed of `target` with up to 8 byte mutations (flip, insert, delete, truncate).
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(target);
    (
        0..seeds.len(),
        prop::collection::vec((0u8..4, any::<usize>(), any::<u8>()), 0..8),
    )
        .prop_map(move |(i, edits)| {
            let mut b = seeds[i].clone();
            for (op, at, byte) in edits {
                let at = if b.is_empty() { 0 } else { at % b.len() };
                match op {
                    0 if !b.is_empty() => b[at] ^= byte | 1,
                    1 => b.insert(at, byte),
                    2 if !b.is_empty() => {
                        b.remove(at);
                    }
                    _ => b.truncate(at),
                }
            }
            b
        })
}

/// Bytes as a parser of `target` may receive them: raw, generated JSON, or a mutated seed.
fn input(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        mutated(target),
    ]
}

#[test]
fn mqtt_payloads() {
    fuzz("mqtt payloads", input("mqtt"), |p| {
        let alive = wire::decode_alive(&p);
        let metrics = wire::decode_metrics(&p);
        let _ = wire::decode_discovery(&p);
        let _ = wire::decode_result(&p);
        let _ = wire::decode_registry_request(&p);
        let _ = wire::decode_task_metrics(&p);
        // A shard drops a heartbeat by the peeked id: it must be the id the message really carries.
        if let Some(peeked) = wire::peek_proplet_id(&p) {
            if let Ok(a) = &alive {
                prop_assert_eq!(peeked, a.proplet_id.as_str());
            }
            if let Ok(m) = &metrics {
                prop_assert_eq!(peeked, m.proplet_id.as_str());
            }
        }
        Ok(())
    });
}

#[test]
fn mqtt_topics() {
    let part = prop_oneof![
        Just("m".to_string()),
        Just("c".to_string()),
        Just("control".to_string()),
        Just("proplet".to_string()),
        Just("alive".to_string()),
        Just("results".to_string()),
        Just("registry".to_string()),
        Just("fl".to_string()),
        Just("rounds".to_string()),
        Just("updates".to_string()),
        Just("+".to_string()),
        Just("#".to_string()),
        "[^/]{0,6}",
    ];
    fuzz(
        "mqtt topics",
        prop::collection::vec(part, 0..10).prop_map(|p| p.join("/")),
        |topic| {
            let _ = topics::parse(&topic);
            let _ = propeller_operator::fl::parse_update_topic(&topic);
            Ok(())
        },
    );
}

#[test]
fn fl_updates_and_http_bodies() {
    fuzz("fl updates", input("fl"), |body| {
        // The body of POST …/update and of the MQTT fallback topic.
        if let Ok(u) = Update::parse(&body) {
            // What is stored parses back to the same update.
            let again = Update::from_value(&u.to_json());
            prop_assert_eq!(again.as_ref(), Ok(&u));
            prop_assert!(u.num_samples > 0);
        }
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            // The result envelope, and a model as initialModel or a member's model.
            let _ = Update::from_result_envelope(&v);
            if let Ok(p) = Params::from_json(&v) {
                prop_assert!(Params::from_json(&p.to_json()).is_ok());
            }
        }
        Ok(())
    });
}

#[test]
fn cron_expressions() {
    let field = prop_oneof![
        Just("*".to_string()),
        "[0-9]{1,3}",
        "[0-9]{1,2}-[0-9]{1,2}",
        "\\*/[0-9]{1,3}",
        "[0-9]{1,2}(,[0-9]{1,2}){0,3}",
        "(MON|TUE|SUN|JAN|DEC|L|W|#|\\?)[-,#/0-9A-Z]{0,4}",
        ".{0,4}",
    ];
    let expr = prop_oneof![
        prop::collection::vec(field, 0..7).prop_map(|f| f.join(" ")),
        "@(hourly|daily|weekly|monthly|yearly|reboot|[a-z]{0,6})",
        mutated("cron").prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    let zone = prop_oneof![
        Just(None),
        Just(Some("Europe/Paris".to_string())),
        Just(Some("America/New_York".to_string())),
        ".{0,16}".prop_map(Some),
    ];
    let at = jiff::Timestamp::from_second(1_790_000_000).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    fuzz("cron", (expr, zone), |(expr, zone)| {
        if let Ok(s) = cron::parse(&expr, zone.as_deref()) {
            // A parsed schedule answers, and what it answers lies ahead.
            if let Some(next) = s.next_after(at) {
                prop_assert!(next > at, "{expr}: {next} is not after {at}");
            }
        }
        Ok(())
    });
}

const SECRET: &str = "FUZZ-SECRET-TOKEN";

#[test]
fn kubeconfigs_and_member_secrets() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("a runtime: {e}"));
    let text = prop_oneof![
        mutated("kubeconfig"),
        json_value().prop_map(|v| {
            // Generated configs carry the token somewhere, so that errors can be checked for it.
            json!({"kubeconfig": v, "token": SECRET})
                .to_string()
                .into_bytes()
        }),
        prop::collection::vec(any::<u8>(), 0..128),
    ];
    // Building a client costs more than a parse: a tenth of the inputs (still ≥ 100,000 with `make fuzz`).
    let n = (cases() / 10).max(200);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    });
    let start = Instant::now();
    let result = runner.run(&(text, any::<bool>()), |(bytes, argocd)| {
        let body = String::from_utf8_lossy(&bytes).into_owned();
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(if argocd {
            json!({"metadata": {"name": "fuzz", "namespace": "hub",
                                "labels": {"argocd.argoproj.io/secret-type": "cluster"}},
                   "stringData": {"name": "fuzz", "server": "https://127.0.0.1:6443", "config": body}})
        } else {
            json!({"metadata": {"name": "fuzz", "namespace": "hub",
                                "labels": {"propeller.propeller.abstractmachines.fr/member": "true"}},
                   "stringData": {"kubeconfig": body}})
        })
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let outcome = rt.block_on(propeller_operator::multicluster::registration::client_for(&secret));
        if let Err(e) = outcome {
            let msg = format!("{e} {e:?}");
            prop_assert!(!msg.contains(SECRET), "the credential leaked into an error: {msg}");
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz target kubeconfig: {e}");
    }
    eprintln!(
        "fuzz kubeconfig and member Secrets: {n} inputs in {:.1} s, no panic, no credential in an error",
        start.elapsed().as_secs_f64()
    );
}
