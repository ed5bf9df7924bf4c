//! The leader's sharder: it keeps a [`Fleet`] of every Proplet (only while leading), and applies
//! [`super::plan`] when the ring or what the plan reads of a Proplet changed (at most twice a retry period,
//! and every [`RESYNC`] regardless): labels new Proplets, reassigns those of dead or released shards together
//! with their Tasks, and starts or cancels drains of live shards' Proplets.
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::fleet::{Fleet, FleetProplet, Placed};
use super::labels::{Guard, WRITES_AT_ONCE, patch_meta};
use super::plan::{MoveKind, Step, plan};
use crate::api::task::Task;
use crate::context::Context;
use crate::controllers::runtime::Shutdown;
use crate::error::Result;
use crate::sharding::takeover::Takeover;
use crate::sharding::{DRAIN_LABEL, DRAIN_READY_LABEL, SHARD_LABEL, own_selector};

/// A round even when nothing the plan reads was seen to change: a safety net, not the way changes arrive.
const RESYNC: Duration = Duration::from_secs(30);

pub fn spawn(ctx: Arc<Context>, shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown);
        let period = ctx.config.retry_period.0;
        // Until this replica leads, it keeps no cache of other shards' Proplets.
        while !ctx.ownership.is_leader() {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = &mut shutdown => return,
            }
        }
        info!("leading: the sharder starts");
        let api: Api<FleetProplet> = if ctx.config.watch_namespace.is_empty() {
            Api::all(ctx.client.clone())
        } else {
            Api::namespaced(ctx.client.clone(), &ctx.config.watch_namespace)
        };
        let fleet = Arc::new(Mutex::new(Fleet::default()));
        let listed = Arc::new(AtomicBool::new(false));
        // Consumed on its own task: a round writing thousands of labels must not leave the watch unread
        // (the API server would drop it as too slow, and the next round would plan on a stale cache).
        let seen = Arc::clone(&listed);
        let dirty = Arc::new(AtomicBool::new(true));
        let changed = Arc::clone(&dirty);
        let held = Arc::clone(&fleet);
        let watch = tokio::spawn(
            watcher(api, watcher::Config::default())
                .backoff(crate::controllers::runtime::watch_backoff())
                .for_each(move |ev| {
                    if let Ok(ev) = ev {
                        let done = matches!(ev, watcher::Event::InitDone);
                        if held.lock().is_ok_and(|mut f| f.apply(ev)) {
                            changed.store(true, Ordering::SeqCst);
                        }
                        if done {
                            seen.store(true, Ordering::SeqCst);
                        }
                    }
                    futures::future::ready(())
                }),
        );
        let _stop_watch = AbortOnDrop(watch);
        let mut orphaned: BTreeSet<String> = BTreeSet::new();
        let mut fenced = Fenced::default();
        let mut every = tokio::time::interval(period / 2);
        let mut ring = ctx.ownership.state_changes();
        // Another round is due even with no change seen: the last one planned steps or failed.
        let mut again = true;
        let mut last_round = tokio::time::Instant::now();
        loop {
            let ring_changed = tokio::select! {
                _ = every.tick() => false,
                // A shard fenced, gone or back: act now, not at the next tick.
                Some(Ok(())) = async {
                    match ring.as_mut() {
                        Some(r) => Some(r.changed().await),
                        None => None,
                    }
                } => true,
                _ = &mut shutdown => return,
            };
            if !ctx.ownership.is_leader() || !listed.load(Ordering::SeqCst) {
                continue;
            }
            let due = dirty.swap(false, Ordering::SeqCst)
                || ring_changed
                || again
                || !orphaned.is_empty()
                || last_round.elapsed() >= RESYNC;
            if !due {
                continue;
            }
            last_round = tokio::time::Instant::now();
            let proplets = match fleet.lock() {
                Ok(f) => f.snapshot(),
                Err(_) => return,
            };
            again = match round(&ctx, &proplets, &mut orphaned, &mut fenced).await {
                Ok(planned) => planned,
                Err(e) => {
                    warn!(error = %e, "sharding round failed; retrying");
                    true
                }
            };
        }
    })
}

/// Aborts the task when dropped (the sharder's own watch ends with it).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// When each fenced shard with a takeover record was first seen: its proplets are relabelled
/// `--takeover-relabel-after` later.
#[derive(Default)]
struct Fenced(HashMap<String, tokio::time::Instant>);

impl Fenced {
    /// Whether the relabel of `shard`'s proplets waits (it is taken over and was fenced too recently).
    fn waits(&mut self, ctx: &Context, takeovers: &HashMap<String, Takeover>, shard: &str) -> bool {
        self.0.retain(|s, _| takeovers.contains_key(s));
        if !takeovers.contains_key(shard) {
            return false;
        }
        let since = *self
            .0
            .entry(shard.to_string())
            .or_insert_with(tokio::time::Instant::now);
        since.elapsed() < ctx.config.takeover_relabel_after.0
    }
}

/// One plan applied; true when it had steps (their outcome is looked at by the next round).
async fn round(
    ctx: &Context,
    proplets: &[Arc<Placed>],
    orphaned: &mut BTreeSet<String>,
    fenced: &mut Fenced,
) -> Result<bool> {
    let states: HashMap<_, _> = ctx.ownership.states().into_iter().collect();
    // Read after the states: every dead shard in them has its takeover record here (membership sets them
    // the other way round).
    let takeovers = ctx.ownership.takeovers();
    let mut p = plan(
        proplets,
        &states,
        &takeovers,
        ctx.config.max_concurrent_moves,
        ctx.config.shard_by,
    );
    let steps = p.steps.len();
    p.steps.retain(|s| match s {
        Step::Assign {
            from: Some(from),
            kind: MoveKind::Dead,
            ..
        } => !fenced.waits(ctx, &takeovers, from),
        _ => true,
    });
    ctx.metrics.shards.unowned.set(p.unowned as i64);
    // Relabels that wait count as planned: the next round looks again.
    let planned = steps > 0;
    let mut owner_of: HashMap<String, String> = proplets
        .iter()
        .filter_map(|p| p.shard.clone().map(|s| (p.key.clone(), s)))
        .collect();
    let mut draining = p.drains_in_flight;
    // Up to WRITES_AT_ONCE writes in flight, a new one as soon as one ends (a dead shard's thousands of
    // Proplets move at the API server's pace, not at that of the slowest write of each batch).
    let applied: Vec<(Step, Result<bool>)> = futures::stream::iter(p.steps.iter().cloned())
        .map(|step| async move {
            let done = apply(ctx, &step).await;
            (step, done)
        })
        .buffer_unordered(WRITES_AT_ONCE)
        .collect()
        .await;
    for (step, done) in applied {
        let done = done?;
        match step {
            Step::Assign {
                proplet,
                from,
                to,
                kind,
            } if done => {
                ctx.metrics
                    .shards
                    .moves_total
                    .with_label_values(&[kind.as_str()])
                    .inc();
                owner_of.insert(proplet.key.clone(), to.clone());
                if kind == MoveKind::Dead
                    && let Some(from) = from
                {
                    info!(proplet = %proplet.name, %from, %to, "proplet of a gone shard reassigned");
                    orphaned.insert(from);
                }
            }
            Step::Drain { .. } if done => draining += 1,
            _ => {}
        }
    }
    ctx.metrics.shards.drains_in_flight.set(draining as i64);
    let live: BTreeSet<String> = ctx.ownership.members().into_iter().collect();
    for shard in orphaned.clone() {
        if live.contains(&shard) {
            // It came back: what is still labelled with it is its own again.
            orphaned.remove(&shard);
        } else if adopt_tasks(ctx, &shard, &owner_of).await? {
            orphaned.remove(&shard);
        }
    }
    Ok(planned)
}

/// Writes one step; false when its guard no longer held (the next round looks again).
async fn apply(ctx: &Context, step: &Step) -> Result<bool> {
    match step {
        Step::Assign {
            proplet, from, to, ..
        } => {
            // From a gone shard: only if still labelled with it. New: only if nobody wrote it since (an
            // unowned Proplet's status does not change, so this rarely races).
            let was = [(SHARD_LABEL, from.as_deref().unwrap_or_default())];
            let guard = if from.is_some() {
                Guard::Labels(&was)
            } else {
                Guard::Version
            };
            patch_meta(
                &ctx.client,
                &ctx.metrics,
                &proplet.object(),
                &[
                    (SHARD_LABEL, Some(to)),
                    (DRAIN_LABEL, None),
                    (DRAIN_READY_LABEL, None),
                ],
                &[],
                guard,
            )
            .await
        }
        Step::Drain { proplet, to } => {
            let owner = proplet.shard.clone().unwrap_or_default();
            patch_meta(
                &ctx.client,
                &ctx.metrics,
                &proplet.object(),
                &[(DRAIN_LABEL, Some(to))],
                &[],
                Guard::Labels(&[(SHARD_LABEL, &owner)]),
            )
            .await
        }
        Step::CancelDrain { proplet } => {
            let target = proplet.drain.clone().unwrap_or_default();
            patch_meta(
                &ctx.client,
                &ctx.metrics,
                &proplet.object(),
                &[(DRAIN_LABEL, None), (DRAIN_READY_LABEL, None)],
                &[],
                Guard::Labels(&[(DRAIN_LABEL, &target)]),
            )
            .await
        }
    }
}

/// Relabels the Tasks of a gone shard: those on a proplet follow it; the others go back to be claimed.
/// Returns true when none is left.
async fn adopt_tasks(
    ctx: &Context,
    shard: &str,
    owner_of: &HashMap<String, String>,
) -> Result<bool> {
    let api: Api<Task> = if ctx.config.watch_namespace.is_empty() {
        Api::all(ctx.client.clone())
    } else {
        Api::namespaced(ctx.client.clone(), &ctx.config.watch_namespace)
    };
    let listed = api
        .list(
            &ListParams::default()
                .labels(&own_selector(shard))
                .limit(500),
        )
        .await?;
    let more = listed
        .metadata
        .continue_
        .as_ref()
        .is_some_and(|c| !c.is_empty());
    let proplet_owner = |t: &Task| {
        t.status
            .as_ref()
            .and_then(|s| s.assigned_client_id.as_ref())
            .and_then(|c| owner_of.get(c))
            .cloned()
    };
    let mut relabels = Vec::new();
    for chunk in listed.items.chunks(WRITES_AT_ONCE) {
        relabels.extend(
            futures::future::join_all(chunk.iter().map(|t| {
                let to = proplet_owner(t);
                async move {
                    patch_meta(
                        &ctx.client,
                        &ctx.metrics,
                        t,
                        &[(SHARD_LABEL, to.as_deref())],
                        &[],
                        Guard::None,
                    )
                    .await
                }
            }))
            .await,
        );
    }
    for r in relabels {
        r?;
    }
    if !listed.items.is_empty() {
        info!(%shard, tasks = listed.items.len(), "tasks of a gone shard reassigned");
    }
    Ok(!more && listed.items.is_empty())
}
