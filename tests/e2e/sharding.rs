//! Several replicas sharing the fleet (docs/sharding.md): three operator processes' worth of operators in
//! this process, on one namespace and one broker, with short Lease timings. Each test audits ownership
//! while it runs: every Proplet has exactly one owner, and every task's start goes out exactly once.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::ListParams;
use propeller_operator::api::task::TaskPhase;
use propeller_operator::api::{Proplet, Task};
use propeller_operator::sharding::{SHARD_LABEL, shard_of};
use propeller_operator::sim::SimHandle;
use serde_json::json;

use crate::support::{Env, WAIT};

const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";
/// Lease 3 s, renew deadline 2 s, retry 0.5 s: a crashed shard is fenced about 6 s after its last renewal.
const HA: &[&str] = &[
    "--leader-elect",
    "--lease-duration=3s",
    "--renew-deadline=2s",
    "--retry-period=500ms",
];

fn addition(name: &str) -> serde_json::Value {
    json!({"metadata": {"name": name},
           "spec": {"name": name, "functionName": "add", "file": ADD, "inputs": [40, 2]}})
}

/// Three replicas and `proplets` simulated proplets with their Proplets (all on one channel).
async fn replicas(
    prefix: &str,
    proplets: usize,
    tune: impl Fn(&mut propeller_operator::sim::SimConfig) + Copy,
) -> anyhow::Result<(Env, Vec<SimHandle>)> {
    let mut env = Env::start(prefix, HA).await?;
    env.add_operator(&format!("{prefix}-b"), &[]).await?;
    env.add_operator(&format!("{prefix}-c"), &[]).await?;
    let mut sims = Vec::new();
    for i in 0..proplets {
        let client = format!("{prefix}-c{i}");
        sims.push(env.proplet(&client, tune).await?);
        env.external_proplet(&format!("p{i}"), &client, json!({}))
            .await?;
    }
    Ok((env, sims))
}

/// The shard label of every Proplet.
async fn labels(env: &Env) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    Ok(env
        .proplets()
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|p: &Proplet| (p.name_any(), shard_of(p)))
        .collect())
}

/// The identities of the running operators.
fn identities(env: &Env) -> Vec<String> {
    (0..env.operator_count())
        .filter_map(|i| env.operator(i))
        .filter_map(|o| o.context().ownership.identity().map(str::to_string))
        .collect()
}

/// Fails when any clientId is owned by two running operators at this instant.
fn audit(env: &Env, clients: &[String]) -> anyhow::Result<()> {
    for c in clients {
        let owners: Vec<String> = (0..env.operator_count())
            .filter_map(|i| env.operator(i))
            .filter(|o| o.context().ownership.owns_client(c))
            .filter_map(|o| o.context().ownership.identity().map(str::to_string))
            .collect();
        anyhow::ensure!(owners.len() <= 1, "{c} owned by {owners:?} at once");
    }
    Ok(())
}

/// Waits until every Proplet is labelled with a running shard and every running shard owns some, auditing
/// meanwhile.
async fn settled(
    env: &Env,
    clients: &[String],
) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    let deadline = Instant::now() + WAIT;
    loop {
        audit(env, clients)?;
        let l = labels(env).await?;
        let live: BTreeSet<String> = identities(env).into_iter().collect();
        let used: BTreeSet<String> = l.values().flatten().cloned().collect();
        let all_live = l
            .values()
            .all(|s| s.as_ref().is_some_and(|s| live.contains(s)));
        let owned: usize = (0..env.operator_count())
            .filter_map(|i| env.operator(i))
            .map(|o| o.context().ownership.owned_count())
            .sum();
        if all_live && used == live && owned == clients.len() {
            return Ok(l);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "shards did not settle: labels {l:?}, live {live:?}, owned {owned}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The starts each task got on the wire (those addressed to the proplet that saw them: every proplet of a
/// channel hears every start), and its runs, across all proplets.
fn starts(sims: &[SimHandle]) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let (mut started, mut ran) = (BTreeMap::new(), BTreeMap::new());
    for s in sims {
        for start in s.starts_seen.lock().map(|v| v.clone()).unwrap_or_default() {
            if start["proplet_id"].as_str() == Some(s.client_id.as_str()) {
                let id = start["id"].as_str().unwrap_or_default().to_string();
                *started.entry(id).or_insert(0) += 1;
            }
        }
        for id in s.runs.lock().map(|v| v.clone()).unwrap_or_default() {
            *ran.entry(id).or_insert(0) += 1;
        }
    }
    (started, ran)
}

async fn all_completed(env: &Env, names: &[String], clients: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + 2 * WAIT;
    loop {
        audit(env, clients)?;
        let tasks = env.tasks().list(&ListParams::default()).await?.items;
        let done = tasks
            .iter()
            .filter(|t: &&Task| names.contains(&t.name_any()) && t.phase() == TaskPhase::Completed)
            .count();
        if done == names.len() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{done} of {} tasks completed; the others: {:?}",
            names.len(),
            tasks
                .iter()
                .filter(|t| t.phase() != TaskPhase::Completed)
                .map(|t| (t.name_any(), t.phase().as_str(), shard_of(t)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn exactly_once(sims: &[SimHandle], env_tasks: &[Task]) -> anyhow::Result<()> {
    let (started, ran) = starts(sims);
    for t in env_tasks {
        let uid = t.uid().unwrap_or_default();
        let s = started.get(&uid).copied().unwrap_or(0);
        let r = ran.get(&uid).copied().unwrap_or(0);
        anyhow::ensure!(
            s == 1 && r == 1,
            "task {} was started {s} times and ran {r} times",
            t.name_any()
        );
    }
    Ok(())
}

#[tokio::test]
async fn three_shards_split_the_proplets_and_start_every_task_once() -> anyhow::Result<()> {
    let (env, sims) = replicas("shard3", 9, |_| {}).await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    let l = settled(&env, &clients).await?;
    println!("assignment: {l:?}");
    let leaders = (0..3)
        .filter_map(|i| env.operator(i))
        .filter(|o| o.context().ownership.is_leader())
        .count();
    assert_eq!(leaders, 1, "exactly one leader");
    for i in 0..9 {
        crate::support::wait_running(&env, &format!("p{i}")).await?;
    }
    let names: Vec<String> = (0..45).map(|i| format!("t{i}")).collect();
    for n in &names {
        env.create::<Task>(addition(n)).await?;
    }
    all_completed(&env, &names, &clients).await?;
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    exactly_once(&sims, &tasks)?;
    let by_shard: BTreeSet<String> = tasks.iter().filter_map(|t| shard_of(t)).collect();
    assert!(
        by_shard.len() >= 2,
        "tasks were claimed by {by_shard:?} only"
    );
    for t in &tasks {
        assert_eq!(
            t.status.as_ref().and_then(|s| s.results.clone()),
            Some(json!("42"))
        );
    }
    // Each shard's caches hold its own share only.
    for i in 0..3 {
        let ctx = env.operator(i).map(|o| std::sync::Arc::clone(o.context()));
        if let Some(ctx) = ctx {
            let me = ctx.ownership.identity().unwrap_or_default().to_string();
            assert!(
                ctx.proplets
                    .state()
                    .iter()
                    .all(|p| p.labels().get(SHARD_LABEL) == Some(&me)),
                "{me} caches only its own Proplets"
            );
            assert!(ctx.proplets.state().len() < 9);
        }
    }
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}

#[tokio::test]
async fn a_crashed_shards_proplets_move_once_its_lease_is_taken_and_no_task_runs_twice()
-> anyhow::Result<()> {
    let (mut env, sims) =
        replicas("crash", 6, |c| c.faults.task_delay = Duration::from_secs(3)).await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    settled(&env, &clients).await?;
    let names: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    for n in &names {
        env.create::<Task>(addition(n)).await?;
    }
    // Tasks are running everywhere when a shard that does not lead dies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = (0..3)
        .find(|&i| {
            env.operator(i)
                .is_some_and(|o| !o.context().ownership.is_leader())
        })
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let crashed_at = Instant::now();
    env.crash_operator_n(victim).await;
    settled(&env, &clients).await?;
    println!(
        "proplets reassigned {:?} after the crash",
        crashed_at.elapsed()
    );
    all_completed(&env, &names, &clients).await?;
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    exactly_once(&sims, &tasks)?;
    // The leader dies too: another replica leads, and new work still runs once.
    let leader = (0..3)
        .find(|&i| {
            env.operator(i)
                .is_some_and(|o| o.context().ownership.is_leader())
        })
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    env.crash_operator_n(leader).await;
    env.restart_operator_n(victim).await?;
    settled(&env, &clients).await?;
    let more: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    for n in &more {
        env.create::<Task>(addition(n)).await?;
    }
    all_completed(&env, &more, &clients).await?;
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    exactly_once(&sims, &tasks)?;
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}

#[tokio::test]
async fn a_fourth_replica_takes_about_a_quarter_with_no_proplet_owned_twice() -> anyhow::Result<()>
{
    let (mut env, sims) = replicas("join", 24, |_| {}).await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    let before = settled(&env, &clients).await?;
    let started = Instant::now();
    env.add_operator("join-d", &[]).await?;
    let after = settled(&env, &clients).await?;
    println!("a fourth shard settled in {:?}", started.elapsed());
    let moved = before
        .iter()
        .filter(|(name, shard)| after.get(*name) != Some(*shard))
        .count();
    let to_d = after
        .values()
        .filter(|s| s.as_deref() == Some("join-d"))
        .count();
    assert_eq!(moved, to_d, "only proplets going to the new shard moved");
    assert!((3..=10).contains(&moved), "{moved} of 24 moved");
    // A graceful stop hands its proplets over at once (its Lease is released).
    let stopped_at = Instant::now();
    let took = env.stop_operator_n(3).await?;
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
    settled(&env, &clients).await?;
    println!("graceful handover in {:?}", stopped_at.elapsed());
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}
