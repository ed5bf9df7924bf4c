//! The operator's /metrics after the seed walkthrough: reconcile, work-queue and MQTT counters move.
use std::time::Duration;

use propeller_operator::api::Task;
use propeller_operator::api::task::TaskPhase;
use serde_json::json;

use crate::support::Env;

const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";

fn scrape(port: u16, path: &str) -> anyhow::Result<String> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let body = ureq::get(&url).call()?.body_mut().read_to_string()?;
    Ok(body)
}

/// The value of the sample `name{labels…}` (0 when absent: a counter not yet incremented).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_move_with_the_seed_walkthrough() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bind = format!("127.0.0.1:{port}");
    let mut env = Env::start("metrics", &["--health-probe-bind-address", &bind]).await?;
    let ready = propeller_operator::testbed::wait_for(
        env.cluster,
        "/readyz",
        crate::support::WAIT,
        || async {
            tokio::task::spawn_blocking(move || scrape(port, "/readyz").ok())
                .await
                .ok()
                .flatten()
        },
    )
    .await?;
    assert_eq!(ready, "ok");
    let before = tokio::task::spawn_blocking(move || scrape(port, "/metrics")).await??;

    let sim = env.proplet("obs-1", |_| {}).await?;
    env.external_proplet("obs", "obs-1", json!({})).await?;
    env.create::<Task>(json!({"metadata": {"name": "addition"},
        "spec": {"name": "addition", "functionName": "add", "file": ADD, "inputs": [40, 2],
                 "propletSelector": {"propletId": "obs"}}}))
        .await?;
    env.wait_for(&env.tasks(), "addition", "42", |t: &Task| {
        t.phase() == TaskPhase::Completed
    })
    .await?;
    // The tasks-by-phase gauge refreshes every 5 s from the watch cache, so a
    // slow machine may need a few refreshes before it counts the completed task.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let after = loop {
        let text = tokio::task::spawn_blocking(move || scrape(port, "/metrics")).await??;
        if sample(&text, "propeller_tasks", &[("phase", "completed")]) >= 1.0
            || tokio::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let moved = |name: &str, labels: &[(&str, &str)]| {
        let (b, a) = (sample(&before, name, labels), sample(&after, name, labels));
        assert!(a > b, "{name}{labels:?}: {b} -> {a}");
    };
    moved(
        "controller_runtime_reconcile_total",
        &[("controller", "task"), ("result", "success")],
    );
    moved(
        "controller_runtime_reconcile_total",
        &[("controller", "proplet")],
    );
    moved(
        "controller_runtime_reconcile_time_seconds_count",
        &[("controller", "task")],
    );
    moved("workqueue_adds_total", &[("name", "task")]);
    moved(
        "workqueue_queue_duration_seconds_count",
        &[("name", "task")],
    );
    moved(
        "propeller_mqtt_messages_total",
        &[("kind", "results"), ("outcome", "ok")],
    );
    moved(
        "propeller_mqtt_messages_total",
        &[("kind", "alive"), ("outcome", "ok")],
    );
    moved(
        "propeller_api_writes_total",
        &[("resource", "tasks"), ("verb", "patch_status")],
    );
    moved("propeller_task_dispatch_seconds_count", &[]);
    moved("propeller_task_completion_seconds_count", &[]);
    assert!(sample(&after, "propeller_tasks", &[("phase", "completed")]) >= 1.0);
    assert!(after.contains("# TYPE workqueue_depth gauge"));
    sim.shutdown().await;
    env.finish().await
}
