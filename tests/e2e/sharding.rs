//! Several replicas sharing the fleet (docs/sharding.md): three operator processes' worth of operators in
//! this process, on one namespace and one broker, with short Lease timings. Each test audits ownership
//! while it runs: every Proplet has exactly one owner, and every task's start goes out exactly once.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::ListParams;
use propeller_operator::api::Task;
use propeller_operator::api::task::TaskPhase;
use propeller_operator::config::ShardBy;
use propeller_operator::controllers::sharding::plan::position;
use propeller_operator::sharding::{SHARD_LABEL, shard_of};
use propeller_operator::sim::SimHandle;
use serde_json::json;

use crate::support::{Env, WAIT};

const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";
/// client-go-like timings scaled down (Lease 10 s, renew deadline 7 s, retry 1 s): short enough for tests,
/// long enough that a loaded 2-core machine renews in time (4 s Leases got healthy shards fenced there).
const HA: &[&str] = &[
    "--leader-elect",
    "--lease-duration=10s",
    "--renew-deadline=7s",
    "--retry-period=1s",
];
/// The operator holding the leader Lease (read from the API server, not from its own belief).
async fn leader(env: &Env) -> anyhow::Result<Option<usize>> {
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.admin.clone(), &env.ns);
    let lease = leases.get("fa27fa49.propeller.abstractmachines.fr").await?;
    let holder = lease.spec.and_then(|s| s.holder_identity);
    Ok((0..env.operator_count()).find(|&i| {
        env.operator(i)
            .is_some_and(|o| o.context().ownership.identity().map(str::to_string) == holder)
    }))
}

/// A running operator that does not lead.
async fn a_follower(env: &Env) -> anyhow::Result<usize> {
    let lead = leader(env).await?;
    (0..env.operator_count())
        .find(|&i| env.operator(i).is_some() && Some(i) != lead)
        .ok_or_else(|| anyhow::anyhow!("no follower"))
}

/// Creates tasks named `names`, 20 at a time.
async fn create_all(env: &Env, names: &[String]) -> anyhow::Result<()> {
    use futures::StreamExt;
    let results: Vec<anyhow::Result<Task>> = futures::stream::iter(names)
        .map(|n| env.create::<Task>(addition(n)))
        .buffer_unordered(20)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

fn addition(name: &str) -> serde_json::Value {
    json!({"metadata": {"name": name},
           "spec": {"name": name, "functionName": "add", "file": ADD, "inputs": [40, 2]}})
}

/// Three replicas and `proplets` simulated proplets with their Proplets (all on one channel).
async fn replicas(
    prefix: &str,
    proplets: usize,
    tune: impl Fn(&mut propeller_operator::sim::SimConfig),
) -> anyhow::Result<(Env, Vec<SimHandle>)> {
    replicas_with(prefix, proplets, HA, tune).await
}

/// [`replicas`] with other flags (Lease timings).
async fn replicas_with(
    prefix: &str,
    proplets: usize,
    flags: &[&str],
    tune: impl Fn(&mut propeller_operator::sim::SimConfig),
) -> anyhow::Result<(Env, Vec<SimHandle>)> {
    let mut env = Env::start(prefix, flags).await?;
    env.add_operator(&format!("{prefix}-b"), &[]).await?;
    env.add_operator(&format!("{prefix}-c"), &[]).await?;
    let sims = env.proplet_fleet(prefix, proplets, tune).await?;
    Ok((env, sims))
}

/// The identity of operator `i`.
fn identity(env: &Env, i: usize) -> String {
    env.operator(i)
        .and_then(|o| o.context().ownership.identity().map(str::to_string))
        .unwrap_or_default()
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

/// Waits until every Proplet carries the shard the ring assigns it among the running operators, with no
/// move in flight, and each operator owns exactly those, auditing meanwhile.
async fn settled(
    env: &Env,
    clients: &[String],
) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    settled_by(env, clients, ShardBy::ClientId).await
}

/// [`settled`] for a ring that hashes `by`.
async fn settled_by(
    env: &Env,
    clients: &[String],
    by: ShardBy,
) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    use propeller_operator::sharding::ring::{LOAD_FACTOR, Ring, VIRTUAL_NODES};
    let deadline = Instant::now() + WAIT;
    loop {
        audit(env, clients)?;
        let proplets = env.proplets().list(&ListParams::default()).await?.items;
        let l: BTreeMap<String, Option<String>> = proplets
            .iter()
            .map(|p| (p.name_any(), shard_of(p)))
            .collect();
        let ring = Ring::new(identities(env), VIRTUAL_NODES);
        let placed: Vec<(String, String)> = proplets
            .iter()
            .filter_map(|p| {
                let client = p.spec.connection_config.client()?;
                Some((position(p, by), client.to_string()))
            })
            .collect();
        let want = ring.assign_grouped(
            placed.iter().map(|(g, k)| (g.as_str(), k.as_str())),
            LOAD_FACTOR,
        );
        let placed = proplets.iter().all(|p| {
            let client = p.spec.connection_config.client().unwrap_or_default();
            shard_of(p).as_deref() == want.get(client).copied()
                && propeller_operator::sharding::drain_of(p).is_none()
        });
        let owned: usize = (0..env.operator_count())
            .filter_map(|i| env.operator(i))
            .map(|o| o.context().ownership.owned_count())
            .sum();
        if placed && owned == clients.len() {
            return Ok(l);
        }
        let moving: Vec<(String, Option<String>, Option<String>)> = proplets
            .iter()
            .filter(|p| propeller_operator::sharding::drain_of(*p).is_some())
            .map(|p| {
                let ready = p
                    .labels()
                    .get(propeller_operator::sharding::DRAIN_READY_LABEL)
                    .cloned();
                (
                    p.name_any(),
                    propeller_operator::sharding::drain_of(p),
                    ready,
                )
            })
            .collect();
        anyhow::ensure!(
            Instant::now() < deadline,
            "shards did not settle: labels {l:?}, wanted {want:?}, moving {moving:?}, owned {owned}"
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
            "{done} of {} tasks completed; the others: {:?}; details: {:?}",
            names.len(),
            tasks
                .iter()
                .filter(|t| t.phase() != TaskPhase::Completed)
                .map(|t| (t.name_any(), t.phase().as_str(), shard_of(t)))
                .collect::<Vec<_>>(),
            tasks
                .iter()
                .filter(|t| t.phase() != TaskPhase::Completed)
                .take(2)
                .map(|t| (t.annotations().clone(), t.status.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every task ran exactly once; its start went out once, or twice when it was running on a shard that
/// went away (`may_repeat`: its new owner cannot know the start reached the proplet, which ignores the
/// second). Returns how many starts were sent again.
fn ran_once(
    sims: &[SimHandle],
    tasks: &[Task],
    may_repeat: &BTreeSet<String>,
) -> anyhow::Result<usize> {
    let (started, ran) = starts(sims);
    let mut resent = 0;
    for t in tasks {
        let uid = t.uid().unwrap_or_default();
        let s = started.get(&uid).copied().unwrap_or(0);
        let r = ran.get(&uid).copied().unwrap_or(0);
        anyhow::ensure!(r == 1, "task {} ran {r} times", t.name_any());
        if s != 1 {
            anyhow::ensure!(
                s == 2 && may_repeat.contains(&uid),
                "task {} was started {s} times",
                t.name_any()
            );
            resent += 1;
        }
    }
    Ok(resent)
}

fn exactly_once(sims: &[SimHandle], tasks: &[Task]) -> anyhow::Result<()> {
    ran_once(sims, tasks, &BTreeSet::new()).map(|_| ())
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
    create_all(&env, &names).await?;
    all_completed(&env, &names, &clients).await?;
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    exactly_once(&sims, &tasks)?;
    let by_shard: BTreeSet<String> = tasks.iter().filter_map(shard_of).collect();
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
    not_owned_heartbeats_are_dropped_on_intake(&env, &clients).await?;
    the_leader_places_what_it_hears_of_between_lists(&env, &clients).await?;
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}

/// The leader lists the fleet only now and then; in between it hears of Proplets with no shard label
/// (docs/sharding.md, What each replica watches). One unlabelled by hand, and one deleted while settled and
/// created again under its name, are placed again at once.
async fn the_leader_places_what_it_hears_of_between_lists(
    env: &Env,
    clients: &[String],
) -> anyhow::Result<()> {
    let unlabel = json!({"metadata": {"labels": {SHARD_LABEL: null}}});
    env.proplets()
        .patch(
            "p0",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&unlabel),
        )
        .await?;
    let p1 = env.proplets().get("p1").await?;
    let client = p1
        .spec
        .connection_config
        .client()
        .unwrap_or_default()
        .to_string();
    env.proplets()
        .delete("p1", &kube::api::DeleteParams::default())
        .await?;
    propeller_operator::testbed::wait_for(env.cluster, "p1 deleted", WAIT, || async {
        matches!(env.proplets().get_opt("p1").await, Ok(None)).then_some(())
    })
    .await?;
    env.external_proplet("p1", &client, json!({})).await?;
    settled(env, clients).await?;
    let lead = leader(env).await?.and_then(|i| env.operator(i));
    let lists = lead.map_or(0, |o| {
        o.context()
            .metrics
            .shards
            .fleet_reads_total
            .with_label_values(&["list_page"])
            .get()
    });
    anyhow::ensure!(lists >= 1, "the leader listed the fleet ({lists} pages)");
    Ok(())
}

/// All the proplets share one channel, so every shard hears every heartbeat: another shard's are dropped and
/// counted on intake, its own still reach its liveness tracker.
async fn not_owned_heartbeats_are_dropped_on_intake(
    env: &Env,
    clients: &[String],
) -> anyhow::Result<()> {
    for i in 0..env.operator_count() {
        let Some(ctx) = env.operator(i).map(|o| std::sync::Arc::clone(o.context())) else {
            continue;
        };
        let me = ctx.ownership.identity().unwrap_or_default().to_string();
        let dropped = || {
            ctx.metrics
                .mqtt_messages_total
                .with_label_values(&["alive", "not_owned"])
                .get()
        };
        let (before, since) = (dropped(), Instant::now());
        // Heartbeats come every 500 ms: a few seconds hear several from every proplet.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let others = clients
            .iter()
            .filter(|c| !ctx.ownership.holds_client(c))
            .count();
        anyhow::ensure!(others > 0, "{me} holds every proplet");
        anyhow::ensure!(
            dropped() - before >= others as u64,
            "{me} counted {} heartbeats of its {others} proplets' neighbours as not owned in 3 s",
            dropped() - before
        );
        let window_start = jiff::Timestamp::now() - since.elapsed();
        for c in clients.iter().filter(|c| ctx.ownership.holds_client(c)) {
            let fresh = ctx
                .liveness
                .get(c)
                .and_then(|o| o.last_seen)
                .is_some_and(|t| t >= window_start);
            anyhow::ensure!(fresh, "{me} heard no heartbeat of its own {c} in 3 s");
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_crashed_shards_proplets_move_once_its_lease_is_taken_and_no_task_runs_twice()
-> anyhow::Result<()> {
    let (mut env, sims) =
        replicas("crash", 6, |c| c.faults.task_delay = Duration::from_secs(3)).await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    settled(&env, &clients).await?;
    let names: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    create_all(&env, &names).await?;
    // Tasks are running everywhere when a shard that does not lead dies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = a_follower(&env).await?;
    let mut may_repeat = running_on(&env, &identity(&env, victim)).await?;
    let crashed_at = Instant::now();
    env.crash_operator_n(victim).await;
    settled(&env, &clients).await?;
    println!(
        "proplets reassigned {:?} after the crash",
        crashed_at.elapsed()
    );
    all_completed(&env, &names, &clients).await?;
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    let resent = ran_once(&sims, &tasks, &may_repeat)?;
    println!("{resent} starts sent again for tasks running on the crashed shard");
    // The leader dies too: another replica leads, and new work still runs once.
    let lead = leader(&env)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no leader"))?;
    may_repeat.extend(running_on(&env, &identity(&env, lead)).await?);
    env.crash_operator_n(lead).await;
    env.restart_operator_n(victim).await?;
    settled(&env, &clients).await?;
    let more: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    create_all(&env, &more).await?;
    all_completed(&env, &more, &clients).await?;
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    ran_once(&sims, &tasks, &may_repeat)?;
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}

/// A crashed shard's proplets are handled by the survivors from the fence on, by the takeover record on
/// its Lease, while they still carry its label: the leader's relabel is held back for 20 s here, so the
/// takeover alone must carry them (ownership, new tasks, tasks that were running there), once each.
#[tokio::test]
async fn a_crashed_shards_proplets_are_taken_over_before_any_relabel_and_no_task_runs_twice()
-> anyhow::Result<()> {
    let flags: Vec<&str> = HA
        .iter()
        .copied()
        .chain(["--takeover-relabel-after=20s"])
        .collect();
    let (mut env, sims) = replicas_with("takeover", 6, &flags, |c| {
        c.faults.task_delay = Duration::from_secs(2)
    })
    .await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    let labels = settled(&env, &clients).await?;
    let names: Vec<String> = (0..24).map(|i| format!("t{i}")).collect();
    create_all(&env, &names).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = a_follower(&env).await?;
    let gone = identity(&env, victim);
    let theirs: Vec<String> = env
        .proplets()
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|p| shard_of(*p).as_deref() == Some(gone.as_str()))
        .filter_map(|p| p.spec.connection_config.client().map(str::to_string))
        .collect();
    anyhow::ensure!(!theirs.is_empty(), "the victim owns no proplet: {labels:?}");
    let may_repeat = running_on(&env, &gone).await?;
    let crashed_at = Instant::now();
    env.crash_operator_n(victim).await;
    // Every one of its proplets gets exactly one survivor as owner, while still labelled with it.
    loop {
        audit(&env, &clients)?;
        let owned = theirs
            .iter()
            .filter(|c| {
                (0..env.operator_count())
                    .filter_map(|i| env.operator(i))
                    .any(|o| o.context().ownership.owns_client(c))
            })
            .count();
        if owned == theirs.len() {
            break;
        }
        anyhow::ensure!(
            crashed_at.elapsed() < WAIT,
            "{owned} of {} proplets of the crashed shard taken over",
            theirs.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken_after = crashed_at.elapsed();
    let still_labelled = env
        .proplets()
        .list(&ListParams::default().labels(&format!("{SHARD_LABEL}={gone}")))
        .await?
        .items
        .len();
    anyhow::ensure!(
        still_labelled == theirs.len(),
        "the relabel was to wait: {still_labelled} of {} still labelled with the crashed shard",
        theirs.len()
    );
    println!("taken over {taken_after:?} after the crash, none relabelled yet");
    // New work goes on meanwhile, on every proplet the survivors took over too.
    let more: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    create_all(&env, &more).await?;
    all_completed(&env, &names, &clients).await?;
    all_completed(&env, &more, &clients).await?;
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    let resent = ran_once(&sims, &tasks, &may_repeat)?;
    println!(
        "every task completed {:?} after the crash; {resent} starts sent again",
        crashed_at.elapsed()
    );
    // Then the labels follow, to the survivors that took them over.
    settled(&env, &clients).await?;
    println!("labels settled {:?} after the crash", crashed_at.elapsed());
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
    // Consistent hashing moves about 1/4 to the new shard; bounded load may shift a few more.
    assert!(
        (3..=10).contains(&to_d),
        "{to_d} of 24 went to the new shard"
    );
    assert!(
        moved <= to_d + 3,
        "{moved} moved for {to_d} that went to the new shard"
    );
    // A graceful stop drains its proplets to the others (make-before-break) before it lets go; the
    // ownership audit runs all along in `settled`, and sampling while it leaves.
    let stopped_at = Instant::now();
    let leaving = env
        .operator(3)
        .ok_or_else(|| anyhow::anyhow!("the fourth replica runs"))?
        .leave(Duration::from_secs(20));
    let audit_while = async {
        loop {
            audit(&env, &clients)?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    let left = tokio::select! {
        left = leaving => left,
        bad = audit_while => { bad?; unreachable!() }
    };
    assert_eq!(
        left, 0,
        "every proplet was handed over before the Lease was let go"
    );
    println!("graceful handover in {:?}", stopped_at.elapsed());
    let took = env.stop_operator_n(3).await?;
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
    settled(&env, &clients).await?;
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}

/// The unfinished tasks `shard` holds now: after a failover their start may go out again (a proplet
/// running one ignores it: it still runs once).
async fn running_on(env: &Env, shard: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(env
        .tasks()
        .list(&ListParams::default().labels(&format!("{SHARD_LABEL}={shard}")))
        .await?
        .items
        .iter()
        .filter(|t| !t.phase().is_terminal())
        .filter_map(|t| t.uid())
        .collect())
}

// Many proplets and three operators: on threads of their own, as separate processes would be, so that
// heartbeats are not delayed behind the test's own work. `make test` runs it alone, after the rest of the
// suite: beside the other tests it overloads 2 cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_and_a_shard_under_load_loses_and_repeats_no_task() -> anyhow::Result<()>
{
    kill_under_load("load", 100, 2000).await
}

// The same at a scale one machine carries beside the rest of the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_and_a_shard_under_moderate_load_loses_and_repeats_no_task()
-> anyhow::Result<()> {
    kill_under_load("mload", 30, 600).await
}

/// Three replicas, `PROPLETS` proplets, `TASKS` tasks created in four waves; a follower is killed after the
/// second, the leader after the third (each comes back as itself once its proplets moved).
async fn kill_under_load(prefix: &str, proplets: usize, count: usize) -> anyhow::Result<()> {
    // Under this load on one machine a Lease write can take seconds: client-go-like timings (a Lease of
    // 10 s), so that only the replicas killed lose theirs.
    let flags = [
        "--leader-elect",
        "--lease-duration=10s",
        "--renew-deadline=7s",
        "--retry-period=1s",
        "--last-seen-threshold=10s",
    ];
    let (mut env, sims) = replicas_with(prefix, proplets, &flags, |c| {
        c.faults.task_delay = Duration::from_secs(2);
        c.liveliness_interval = Duration::from_secs(1);
    })
    .await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    settled(&env, &clients).await?;
    let names: Vec<String> = (0..count).map(|i| format!("l{i}")).collect();
    let mut may_repeat = BTreeSet::new();
    let mut recoveries = Vec::new();
    for (i, chunk) in names.chunks(count / 4).enumerate() {
        create_all(&env, chunk).await?;
        let lead = leader(&env).await?;
        let kill = match i {
            1 => (0..3).find(|&i| env.operator(i).is_some() && Some(i) != lead),
            2 => lead,
            _ => None,
        };
        if let Some(victim) = kill {
            may_repeat.extend(running_on(&env, &identity(&env, victim)).await?);
            let at = Instant::now();
            env.crash_operator_n(victim).await;
            settled(&env, &clients).await?;
            recoveries.push(at.elapsed());
            env.restart_operator_n(victim).await?;
        }
    }
    all_completed(&env, &names, &clients).await?;
    println!("proplets reassigned after each kill: {recoveries:?}");
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    let resent = ran_once(&sims, &tasks, &may_repeat)?;
    println!(
        "{count} tasks over {proplets} proplets: each ran once; {resent} starts sent again for tasks that \
         were running on a killed shard"
    );
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}

// Many proplets and three operators: on threads of their own, as separate processes would be, so that
// heartbeats are not delayed behind the test's own work. `make test` runs it alone, after the rest of the
// suite: beside the other tests it overloads 2 cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_load_loses_and_repeats_no_task() -> anyhow::Result<()> {
    let (mut env, sims) = replicas("roll", 12, |c| {
        c.faults.task_delay = Duration::from_millis(500)
    })
    .await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    settled(&env, &clients).await?;
    let names: Vec<String> = (0..120).map(|i| format!("r{i}")).collect();
    let mut handovers = Vec::new();
    let mut may_repeat = BTreeSet::new();
    for (i, chunk) in names.chunks(40).enumerate() {
        create_all(&env, chunk).await?;
        // One replica after another is stopped gracefully and comes back as itself (a rollout).
        may_repeat.extend(running_on(&env, &identity(&env, i)).await?);
        let at = Instant::now();
        let left = env.leave_operator_n(i, Duration::from_secs(20)).await?;
        assert_eq!(
            left, 0,
            "replica {i} handed everything over before letting go"
        );
        settled(&env, &clients).await?;
        handovers.push(at.elapsed());
        env.restart_operator_n(i).await?;
        settled(&env, &clients).await?;
    }
    all_completed(&env, &names, &clients).await?;
    println!("graceful handovers: {handovers:?}");
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    let resent = ran_once(&sims, &tasks, &may_repeat)?;
    println!("{resent} starts sent again for tasks running on a stopped shard");
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}

/// A broadcast held by one shard reaches every proplet, each on a channel of its own and most owned by other
/// shards: the holder subscribes to their channels before the start goes out, and hears every result.
#[tokio::test]
async fn a_broadcast_reaches_the_proplets_of_every_shard_on_their_own_channels()
-> anyhow::Result<()> {
    let (env, sims) = replicas("bcast3", 6, |c| c.channel = format!("own-{}", c.client_id)).await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    let l = settled(&env, &clients).await?;
    let owners: BTreeSet<&String> = l.values().flatten().collect();
    anyhow::ensure!(
        owners.len() >= 2,
        "the proplets are on one shard only: {l:?}"
    );
    for i in 0..6 {
        crate::support::wait_running(&env, &format!("p{i}")).await?;
    }
    env.create::<Task>(json!({"metadata": {"name": "everyone"},
        "spec": {"name": "everyone", "functionName": "add", "file": ADD, "inputs": [1, 2], "broadcast": true}}))
        .await?;
    let t = env
        .wait_for(
            &env.tasks(),
            "everyone",
            "broadcast completion",
            |t: &Task| t.phase() == TaskPhase::Completed,
        )
        .await?;
    let results = t.status.as_ref().and_then(|s| s.results.clone());
    let answered: BTreeSet<String> = results
        .as_ref()
        .and_then(|r| r.as_object())
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(
        answered,
        clients.iter().cloned().collect::<BTreeSet<_>>(),
        "every proplet's result: {results:?}"
    );
    let uid = t.uid().unwrap_or_default();
    for s in &sims {
        let runs = s
            .runs
            .lock()
            .map(|v| v.iter().filter(|id| **id == uid).count())
            .unwrap_or(0);
        assert_eq!(runs, 1, "{} ran the broadcast {runs} times", s.client_id);
    }
    // Ended: no shard keeps the other shards' channels for it.
    for i in 0..3 {
        if let Some(o) = env.operator(i) {
            assert!(
                o.context().broadcasts.all().is_empty(),
                "operator {i} still listens"
            );
        }
    }
    env.finish().await
}

/// Grouped by channel (`--shard-by=channel`), a channel's proplets share a shard: each shard subscribes to
/// about its share of the channels instead of nearly all of them, and hears about its share of the
/// heartbeats. Tasks still start exactly once.
#[tokio::test]
async fn grouped_by_channel_each_shard_subscribes_to_its_share_of_the_channels()
-> anyhow::Result<()> {
    const CHANNELS: usize = 6;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let flags: Vec<&str> = HA.iter().copied().chain(["--shard-by=channel"]).collect();
    let (env, sims) = replicas_with("bychan", 24, &flags, |c| {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        c.channel = format!("grp-{}", i % CHANNELS);
    })
    .await?;
    let clients: Vec<String> = sims.iter().map(|s| s.client_id.clone()).collect();
    settled_by(&env, &clients, ShardBy::Channel).await?;
    // Subscriptions follow ownership within moments of settling.
    let deadline = Instant::now() + WAIT;
    let per_shard = loop {
        let mut per_shard: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for i in 0..env.operator_count() {
            let Some(o) = env.operator(i) else { continue };
            let ctx = o.context();
            let me = ctx.ownership.identity().unwrap_or_default().to_string();
            let topics = match &ctx.mqtt {
                Some(m) => m.subscriptions().await,
                None => Default::default(),
            };
            let channels = (0..CHANNELS)
                .map(|c| format!("grp-{c}"))
                .filter(|c| topics.iter().any(|t| t.contains(&format!("/c/{c}/"))))
                .collect();
            per_shard.insert(me, channels);
        }
        let covered: BTreeSet<&String> = per_shard.values().flatten().collect();
        if covered.len() == CHANNELS {
            break per_shard;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the shards' subscriptions do not cover every channel: {per_shard:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("channels per shard: {per_shard:?}");
    // A shard fills up (bounded load) at most once, splitting at most one channel: at most one extra
    // (shard, channel) pair per shard. By clientId the 24 proplets would put most channels on every shard.
    let pairs: usize = per_shard.values().map(BTreeSet::len).sum();
    anyhow::ensure!(
        pairs <= CHANNELS + per_shard.len(),
        "{pairs} (shard, channel) subscriptions for {CHANNELS} channels: {per_shard:?}"
    );
    for i in 0..24 {
        crate::support::wait_running(&env, &format!("p{i}")).await?;
    }
    let names: Vec<String> = (0..24).map(|i| format!("g{i}")).collect();
    create_all(&env, &names).await?;
    all_completed(&env, &names, &clients).await?;
    let tasks = env.tasks().list(&ListParams::default()).await?.items;
    exactly_once(&sims, &tasks)?;
    for s in sims {
        s.shutdown().await;
    }
    env.finish().await
}
