//! The sharding scenarios that move a shard's proplets: failover after a SIGKILL (fence, takeover,
//! relabel) and a graceful handover after a SIGTERM (drain → acknowledge → reassign), each timed per
//! proplet by a watch.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use propeller_operator::api::Proplet;
use propeller_operator::sharding::takeover::TAKEOVER_ANNOTATION;
use propeller_operator::sharding::{DRAIN_LABEL, SHARD_LABEL};
use serde_json::json;

use crate::Bench;
use crate::measure::{metric_sum, percentile, sorted};
use crate::operator::Operator;
use crate::shards::{census, identity, leader, settle, start_shard};

/// The Proplets a shard held, each with when it was first seen draining and labelled with another shard.
type Moves = Arc<Mutex<HashMap<String, (Option<Instant>, Option<Instant>)>>>;

/// The fleet the shards hold: its namespace, the shards' Lease namespace, the shards, its size.
#[derive(Clone, Copy)]
pub struct Fleet<'a> {
    pub ns: &'a str,
    pub lease_ns: &'a str,
    pub live: &'a [String],
    pub n: usize,
}

/// Failover: a follower killed (SIGKILL) with default Lease timings; each of its proplets' move (kill →
/// labelled with a live shard) timed by a watch, the first one being when its Lease was taken. Then the
/// follower is started again and the ring rebalanced.
pub async fn failover(
    b: &mut Bench,
    fleet: &Fleet<'_>,
    ops: &mut [Operator],
) -> anyhow::Result<()> {
    let (ns, lease_ns, live, n) = (fleet.ns, fleet.lease_ns, fleet.live, fleet.n);
    let (victim, moves, mover) = watch_a_follower(b, ns, ops).await;
    ops[victim].kill();
    let killed = Instant::now();
    let victim_id = identity(victim);
    let (fence, (taken, survivors)) = tokio::join!(
        fenced(&b.client, lease_ns, &victim_id, killed),
        taken_over(ops, victim, n, killed)
    );
    moved_off(b, ns, n, live, victim).await?;
    let settled = killed.elapsed().as_secs_f64();
    mover.abort();
    let relabelled = moved_since(&moves, killed);
    let first = relabelled.first().copied().unwrap_or(f64::NAN);
    let relabelled_by = relabelled.last().copied().unwrap_or(settled);
    ops[victim] = start_shard(b, lease_ns, victim)?;
    ops[victim].ready().await?;
    let rejoin = settle(b, ns, n, live, true, Duration::from_secs(300))
        .await?
        .as_secs_f64();
    eprintln!(
        "failover: its Lease fenced {fence:.1} s after the kill; every proplet owned by a survivor at {taken:.1} s (takeover); {} proplets relabelled from {first:.1} s to {relabelled_by:.1} s; a census saw all settled at {settled:.1} s; rejoined in {rejoin:.1} s",
        relabelled.len()
    );
    for s in &survivors {
        eprintln!("failover: survivor {s}");
    }
    b.results.insert("shard_failover_s", json!(taken));
    b.results.insert("shard_failover_fenced_s", json!(fence));
    b.results
        .insert("shard_failover_survivors", json!(survivors));
    b.results
        .insert("shard_failover_relabelled_s", json!(relabelled_by));
    b.results.insert("shard_failover_first_s", json!(first));
    b.results
        .insert("shard_failover_moves", json!(relabelled.len()));
    b.results.insert("shard_failover_settled_s", json!(settled));
    b.results.insert("shard_rejoin_s", json!(rejoin));
    Ok(())
}

/// A follower (the replica after the leader), with its Proplets' moves recorded from now on.
async fn watch_a_follower(
    b: &Bench,
    ns: &str,
    ops: &[Operator],
) -> (usize, Moves, tokio::task::JoinHandle<()>) {
    let lead = leader(ops).await.unwrap_or(0);
    let victim = (lead + 1) % ops.len();
    let moves: Moves = Arc::default();
    let mover = watch_moves(&b.client, ns, identity(victim), Arc::clone(&moves));
    // The watch has listed before anything moves.
    tokio::time::sleep(Duration::from_secs(2)).await;
    (victim, moves, mover)
}

/// Graceful handover: a follower stopped with SIGTERM; each proplet's move (SIGTERM → labelled with its
/// new shard) timed by a watch. Then the follower is started again (the caller waits for the rebalance).
pub async fn graceful(
    b: &mut Bench,
    fleet: &Fleet<'_>,
    ops: &mut [Operator],
) -> anyhow::Result<()> {
    let (ns, lease_ns, live, n) = (fleet.ns, fleet.lease_ns, fleet.live, fleet.n);
    let (victim, moves, mover) = watch_a_follower(b, ns, ops).await;
    let held = census(b, ns, live)
        .await?
        .by_shard
        .get(&identity(victim))
        .copied()
        .unwrap_or(0);
    let t0 = Instant::now();
    ops[victim].terminate(Duration::from_secs(120)).await;
    let exited = t0.elapsed().as_secs_f64();
    moved_off(b, ns, n, live, victim).await?;
    let all_moved = t0.elapsed().as_secs_f64();
    mover.abort();
    let per_move = moved_since(&moves, t0);
    let drain_to_moved = sorted(
        moves
            .lock()
            .map(|m| {
                m.values()
                    .filter_map(|(a, z)| Some(z.as_ref()?.saturating_duration_since(*a.as_ref()?)))
                    .map(|d| d.as_secs_f64())
                    .collect()
            })
            .unwrap_or_default(),
    );
    b.results.insert(
        "shard_drain_to_moved_p50_s",
        json!(percentile(&drain_to_moved, 50.0)),
    );
    b.results.insert(
        "shard_drain_to_moved_p99_s",
        json!(percentile(&drain_to_moved, 99.0)),
    );
    eprintln!(
        "graceful: drain → new owner p50 {:.2} s p99 {:.2} s over {} moves",
        percentile(&drain_to_moved, 50.0),
        percentile(&drain_to_moved, 99.0),
        drain_to_moved.len()
    );
    eprintln!(
        "graceful: {held} proplets moved, the replica exited after {exited:.1} s, all moved after {all_moved:.1} s; per proplet p50 {:.2} s p99 {:.2} s",
        percentile(&per_move, 50.0),
        percentile(&per_move, 99.0)
    );
    b.results.insert("shard_graceful_proplets", json!(held));
    b.results.insert("shard_graceful_exit_s", json!(exited));
    b.results
        .insert("shard_graceful_all_moved_s", json!(all_moved));
    b.results
        .insert("shard_graceful_moves_timed", json!(per_move.len()));
    b.results
        .insert("shard_handover_p50_s", json!(percentile(&per_move, 50.0)));
    b.results
        .insert("shard_handover_p99_s", json!(percentile(&per_move, 99.0)));
    ops[victim] = start_shard(b, lease_ns, victim)?;
    ops[victim].ready().await?;
    Ok(())
}

/// Waits until none of `n` Proplets is labelled with shard `gone` (each on another of `live`).
async fn moved_off(
    b: &Bench,
    ns: &str,
    n: usize,
    live: &[String],
    gone: usize,
) -> anyhow::Result<Duration> {
    let others: Vec<String> = live
        .iter()
        .filter(|s| **s != identity(gone))
        .cloned()
        .collect();
    settle(b, ns, n, &others, false, Duration::from_secs(300)).await
}

/// Seconds from the kill until the survivors own the whole fleet between them (their owned-proplets
/// gauges, taken-over ones included, sampled every 100 ms; NaN if not within 5 minutes), and each
/// survivor's timeline: when it first owned a taken-over proplet and when it came to own what it owned at
/// the end.
async fn taken_over(
    ops: &[Operator],
    gone: usize,
    n: usize,
    killed: Instant,
) -> (f64, Vec<serde_json::Value>) {
    let survivors: Vec<usize> = (0..ops.len()).filter(|i| *i != gone).collect();
    let mut first_taken = vec![f64::NAN; ops.len()];
    let mut counts: Vec<Vec<(f64, f64)>> = vec![Vec::new(); ops.len()];
    let mut done = f64::NAN;
    while killed.elapsed() < Duration::from_secs(300) {
        let mut owned = 0.0;
        for &i in &survivors {
            let text = ops[i].metrics().await;
            let at = killed.elapsed().as_secs_f64();
            let mine = metric_sum(&text, "propeller_shard_proplets", &[]);
            if first_taken[i].is_nan()
                && metric_sum(&text, "propeller_shard_taken_over_proplets", &[]) > 0.0
            {
                first_taken[i] = at;
            }
            counts[i].push((at, mine));
            owned += mine;
        }
        if owned >= n as f64 {
            done = killed.elapsed().as_secs_f64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let timelines = survivors
        .iter()
        .map(|&i| {
            let last = counts[i].last().map_or(f64::NAN, |c| c.1);
            // The first sample from which the gauge stayed at its final value.
            let reached = counts[i]
                .iter()
                .rev()
                .take_while(|c| c.1 == last)
                .last()
                .map_or(f64::NAN, |c| c.0);
            json!({
                "identity": identity(i),
                "first_taken_over_s": first_taken[i],
                "final_share_s": reached,
                "owned": last,
                "owned_before": counts[i].first().map_or(f64::NAN, |c| c.1),
                // When its gauge changed: [seconds after the kill, proplets owned].
                "changes": counts[i]
                    .windows(2)
                    .filter(|w| w[0].1 != w[1].1)
                    .map(|w| [w[1].0, w[1].1])
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    (done, timelines)
}

/// Seconds from the kill until the killed shard's Lease carries a takeover record (the leader fenced it);
/// NaN if not within 5 minutes.
async fn fenced(client: &Client, lease_ns: &str, shard: &str, killed: Instant) -> f64 {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), lease_ns);
    let name = propeller_operator::sharding::shard_lease_name(shard);
    while killed.elapsed() < Duration::from_secs(300) {
        if let Ok(Some(l)) = leases.get_opt(&name).await
            && l.annotations().contains_key(TAKEOVER_ANNOTATION)
        {
            return killed.elapsed().as_secs_f64();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f64::NAN
}

/// Seconds from `since` until each Proplet in `moves` was labelled with another shard, sorted.
fn moved_since(moves: &Moves, since: Instant) -> Vec<f64> {
    sorted(
        moves
            .lock()
            .map(|m| {
                m.values()
                    .filter_map(|(_, z)| {
                        z.map(|z| z.saturating_duration_since(since).as_secs_f64())
                    })
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// Records the Proplets labelled `from`, when each is first seen draining, and when it is first seen
/// labelled with another shard.
fn watch_moves(
    client: &Client,
    ns: &str,
    from: String,
    moves: Moves,
) -> tokio::task::JoinHandle<()> {
    let api: Api<Proplet> = Api::namespaced(client.clone(), ns);
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        while let Some(Ok(p)) = stream.next().await {
            let now = Instant::now();
            let Ok(mut m) = moves.lock() else { return };
            let shard = p.labels().get(SHARD_LABEL);
            if shard == Some(&from) {
                let entry = m.entry(p.name_any()).or_insert((None, None));
                if p.labels().contains_key(DRAIN_LABEL) {
                    entry.0.get_or_insert(now);
                }
            } else if shard.is_some()
                && let Some(entry) = m.get_mut(&p.name_any())
            {
                entry.1.get_or_insert(now);
            }
        }
    })
}
