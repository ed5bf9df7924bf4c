//! What survives an operator's absence: results published while it is away (its MQTT session is
//! persistent), the stop of a task deleted around a restart; and what a task costs in API writes.
use std::time::Duration;

use kube::ResourceExt;
use kube::api::DeleteParams;
use propeller_operator::api::Task;
use propeller_operator::api::task::TaskPhase;
use serde_json::json;

use crate::support::{Env, WAIT, wait_running};

const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";

fn addition(name: &str) -> serde_json::Value {
    json!({"metadata": {"name": name},
           "spec": {"name": name, "functionName": "add", "file": ADD, "inputs": [40, 2]}})
}

async fn phase_is(env: &Env, name: &str, phase: TaskPhase) -> anyhow::Result<Task> {
    env.wait_for(&env.tasks(), name, phase.as_str(), |t: &Task| {
        t.phase() == phase
    })
    .await
}

#[tokio::test]
async fn results_published_while_the_operator_is_away_are_recorded() -> anyhow::Result<()> {
    let mut env = Env::start("away", &[]).await?;
    let sim = env
        .proplet("aw-1", |c| c.faults.task_delay = Duration::from_secs(3))
        .await?;
    env.external_proplet("pa", "aw-1", json!({})).await?;
    wait_running(&env, "pa").await?;
    for i in 0..10 {
        env.create::<Task>(addition(&format!("t{i}"))).await?;
    }
    for i in 0..10 {
        phase_is(&env, &format!("t{i}"), TaskPhase::Running).await?;
    }
    // A rollout: the operator is gone while every result is published.
    env.stop_operator().await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    env.resume_operator().await?;
    for i in 0..10 {
        let t = phase_is(&env, &format!("t{i}"), TaskPhase::Completed).await?;
        assert_eq!(t.status.and_then(|s| s.results), Some(json!("42")));
    }
    // Their queued results came before any start could be sent again: not one went out twice.
    let starts = sim.starts_seen.lock().map(|s| s.len()).unwrap_or_default();
    assert_eq!(starts, 10, "no task was started again");
    let runs = sim.runs.lock().map(|s| s.len()).unwrap_or_default();
    assert_eq!(runs, 10);
    sim.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn a_start_published_while_its_proplet_is_cut_off_is_sent_again_once_it_is_back()
-> anyhow::Result<()> {
    let mut env = Env::start("outage-start", &[]).await?;
    env.broker.make_persistent()?;
    let sim = env.proplet("os-1", |_| {}).await?;
    env.external_proplet("po", "os-1", json!({})).await?;
    wait_running(&env, "po").await?;
    // The broker goes down, and the proplet stays away longer than the operator (a slow reconnect).
    sim.kill();
    env.broker.stop();
    env.create::<Task>(addition("during")).await?;
    phase_is(&env, "during", TaskPhase::Running).await?;
    env.broker.restart()?;
    // The operator is back and its queued start goes out — to nobody: a proplet's session is clean.
    let metrics = env.metrics();
    propeller_operator::testbed::eventually("the operator to reconnect", WAIT, || async {
        (metrics.mqtt_reconnects.get() >= 1 && metrics.mqtt_connected.get() == 1).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let back = env.proplet("os-1", |_| {}).await?;
    let t = phase_is(&env, "during", TaskPhase::Completed).await?;
    assert_eq!(t.status.and_then(|s| s.results), Some(json!("42")));
    let starts = back.starts_seen.lock().map(|s| s.len()).unwrap_or_default();
    assert_eq!(
        starts, 1,
        "sent again once the proplet was heard, and only once"
    );
    let runs = back.runs.lock().map(|s| s.len()).unwrap_or_default();
    assert_eq!(runs, 1);
    back.shutdown().await;
    env.finish().await
}

#[tokio::test]
async fn a_task_that_runs_and_ends_costs_two_writes() -> anyhow::Result<()> {
    let mut env = Env::start("two-writes", &[]).await?;
    let sim = env.proplet("tw-1", |_| {}).await?;
    env.external_proplet("pw", "tw-1", json!({})).await?;
    wait_running(&env, "pw").await?;
    let writes = |verb: &str| {
        env.metrics()
            .api_writes_total
            .with_label_values(&["tasks", verb])
            .get()
    };
    let (status_before, patch_before) = (writes("patch_status"), writes("patch"));
    for i in 0..5 {
        env.create::<Task>(addition(&format!("w{i}"))).await?;
    }
    for i in 0..5 {
        let t = phase_is(&env, &format!("w{i}"), TaskPhase::Completed).await?;
        let st = t.status.unwrap_or_default();
        assert!(st.updated_at.is_some(), "updatedAt is set with every write");
        assert!(
            t.metadata.finalizers.unwrap_or_default().is_empty(),
            "no finalizer for a short task"
        );
    }
    assert_eq!(
        writes("patch_status") - status_before,
        10,
        "running + result, per task"
    );
    assert_eq!(writes("patch") - patch_before, 0, "no finalizer writes");
    sim.shutdown().await;
    env.finish().await
}

async fn stopped(sim: &propeller_operator::sim::SimHandle, uid: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if sim
            .stops_seen
            .lock()
            .is_ok_and(|s| s.iter().any(|id| id == uid))
        {
            return Ok(());
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no stop for {uid}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn deleting_a_running_task_sends_its_stop_around_a_restart() -> anyhow::Result<()> {
    let mut env = Env::start("delete-stop", &[]).await?;
    let sim = env
        .proplet("ds-1", |c| c.faults.task_delay = Duration::from_secs(60))
        .await?;
    env.external_proplet("pd", "ds-1", json!({})).await?;
    wait_running(&env, "pd").await?;

    // Deleted at once: no finalizer yet, the delete event sends the stop.
    let young = env.create::<Task>(addition("young")).await?;
    phase_is(&env, "young", TaskPhase::Running).await?;
    env.tasks()
        .delete("young", &DeleteParams::default())
        .await?;
    stopped(&sim, &young.uid().unwrap_or_default()).await?;

    // Running long enough to earn the finalizer, then deleted while no operator runs: the next one stops it.
    let old = env.create::<Task>(addition("old")).await?;
    env.wait_for(&env.tasks(), "old", "the finalizer", |t: &Task| {
        t.finalizers()
            .iter()
            .any(|f| f == propeller_operator::controllers::task::FINALIZER)
    })
    .await?;
    env.stop_operator().await?;
    env.tasks().delete("old", &DeleteParams::default()).await?;
    env.resume_operator().await?;
    stopped(&sim, &old.uid().unwrap_or_default()).await?;
    propeller_operator::testbed::wait_for(env.cluster, "old gone", WAIT, || async {
        env.tasks()
            .get_opt("old")
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await?;
    sim.shutdown().await;
    env.finish().await
}

/// Upstream defect (upstream-spec §7): its MQTT callbacks pushed into a channel of 256 and dropped what did
/// not fit. Ours stops reading from the broker while its receive queue is full: a burst far larger than the
/// queue waits at the broker (unacknowledged, in the session) and arrives whole.
#[tokio::test]
async fn a_burst_larger_than_the_receive_queue_loses_nothing() -> anyhow::Result<()> {
    use propeller_operator::mqtt::{MqttClient, MqttSettings};
    const BURST: usize = 500;
    let broker = propeller_operator::testbed::start_broker()?;
    let mut settings = MqttSettings::new(&broker.address(), "burst-reader");
    settings.username = Some(broker.username.clone());
    settings.password = Some(broker.password.clone());
    settings.receive_queue = 8;
    let metrics = propeller_operator::telemetry::Metrics::new()?;
    let (reader, mut received) = MqttClient::start(&settings, metrics.mqtt_connected.clone())?;
    let topic = "m/d/c/ch/control/proplet/results".to_string();
    reader
        .set_subscriptions(std::collections::BTreeSet::from([topic.clone()]))
        .await;
    propeller_operator::testbed::eventually("subscribed", WAIT, || async {
        reader.subscribed(std::slice::from_ref(&topic)).await
    })
    .await?;

    let mut opts = rumqttc::MqttOptions::new("burst-writer", "127.0.0.1", broker.port);
    opts.set_credentials(&broker.username, &broker.password);
    let (writer, mut el) = rumqttc::AsyncClient::new(opts, BURST + 10);
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    for n in 0..BURST {
        writer
            .publish(
                topic.as_str(),
                rumqttc::QoS::AtLeastOnce,
                false,
                format!("{{\"n\":{n}}}"),
            )
            .await?;
    }
    // A slow reader: the queue of 8 is full almost all the time.
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < BURST {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(30), received.recv()).await
        else {
            anyhow::bail!("{} of {BURST} messages arrived", seen.len());
        };
        let v: serde_json::Value = serde_json::from_slice(&m.payload)?;
        seen.insert(v["n"].as_u64().unwrap_or(u64::MAX));
        tokio::time::sleep(Duration::from_millis(2)).await;
        drop(m);
    }
    assert_eq!(seen.len(), BURST);
    assert_eq!(seen.iter().max(), Some(&(BURST as u64 - 1)));
    pump.abort();
    reader.disconnect().await;
    Ok(())
}
