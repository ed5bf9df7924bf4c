//! What the later upstream operator promised and we make work: priority with capacity, the module registry
//! over MQTT, and proplet auto-discovery.
use std::time::Duration;

use kube::ResourceExt;
use propeller_operator::api::Task;
use propeller_operator::api::task::TaskPhase;
use serde_json::json;

use crate::support::Env;

/// The addition module of the real proplet's repository (export `add`).
const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";

fn scheduled_reason(t: &Task) -> Option<String> {
    t.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Scheduled")?
        .reason
        .clone()
}

#[tokio::test]
async fn waiting_tasks_go_by_priority_then_age() -> anyhow::Result<()> {
    let mut env = Env::start("priority", &[]).await?;
    // Every task takes 2 s, so the four below are all waiting while the first one runs.
    let sim = env
        .proplet("busy-1", |c| c.faults.task_delay = Duration::from_secs(2))
        .await?;
    env.external_proplet("busy", "busy-1", json!({"maxConcurrentTasks": 1}))
        .await?;
    env.wait_for(&env.proplets(), "busy", "busy Running", |p| {
        p.phase() == propeller_operator::api::proplet::PropletPhase::Running
    })
    .await?;
    let task = |name: &str, priority: i32| {
        json!({"metadata": {"name": name},
               "spec": {"name": name, "functionName": "add", "file": ADD, "inputs": [40, 2], "priority": priority}})
    };
    env.create::<Task>(task("first", 0)).await?;
    env.wait_for(&env.tasks(), "first", "first running", |t: &Task| {
        t.phase() == TaskPhase::Running
    })
    .await?;
    // Equal priorities keep creation order (within one second of creation: name order).
    for (name, priority) in [("low", 10), ("mid-a", 50), ("high", 90), ("mid-b", 50)] {
        env.create::<Task>(task(name, priority)).await?;
    }
    let low = env
        .wait_for(&env.tasks(), "low", "low queued", |t: &Task| {
            scheduled_reason(t).as_deref() == Some("Queued")
        })
        .await?;
    assert_eq!(low.phase(), TaskPhase::Pending);
    env.wait_for(&env.tasks(), "low", "low completed", |t: &Task| {
        t.phase() == TaskPhase::Completed
    })
    .await?;
    let mut uid_to_name = std::collections::BTreeMap::new();
    for t in env.tasks().list(&Default::default()).await? {
        assert_eq!(t.phase(), TaskPhase::Completed, "{}", t.name_any());
        uid_to_name.insert(t.uid().unwrap_or_default(), t.name_any());
    }
    let order: Vec<String> = sim
        .starts_seen
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|s| s["id"].as_str().and_then(|id| uid_to_name.get(id)).cloned())
        .collect();
    assert_eq!(order, ["first", "high", "mid-a", "mid-b", "low"]);
    sim.shutdown().await;
    env.finish().await
}
