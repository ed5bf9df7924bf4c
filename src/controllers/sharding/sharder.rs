//! The leader's sharder: it keeps a [`Fleet`] view of every Proplet (only while leading; see
//! [`super::view`] for how it is kept without hearing every status refresh), and applies [`super::plan`]
//! when the ring or what the plan reads of a Proplet changed (at most twice a retry period, and every
//! [`RESYNC`] regardless): labels new Proplets, reassigns those of dead or released shards together with
//! their Tasks, and starts or cancels drains of live shards' Proplets.
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::Api;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::fleet::{FleetProplet, Placed};
use super::labels::{Guard, WRITES_AT_ONCE, patch_meta};
use super::plan::{MoveKind, Step, plan};
use super::view::{Fleet, Key, Narrow, key_of};
use crate::api::task::Task;
use crate::context::Context;
use crate::controllers::runtime::Shutdown;
use crate::error::Result;
use crate::sharding::takeover::Takeover;
use crate::sharding::{DRAIN_LABEL, DRAIN_READY_LABEL, SHARD_LABEL, own_selector};

/// A round even when nothing the plan reads was seen to change: a safety net, not the way changes arrive
/// (each round plans the whole fleet: at 10,000 proplets, every 30 s cost the leader more than its
/// watches).
const RESYNC: Duration = Duration::from_secs(300);

/// How often the whole fleet is listed again. Between lists the view hears only Proplets with no shard or
/// moving; a list catches what it cannot hear (a settled Proplet deleted or given another clientId),
/// which only weighs on the ring's balance, never on who owns what.
const FULL_LIST: Duration = Duration::from_secs(600);

/// Objects per page of a full list. Each page is read whole before it is parsed: small pages keep the
/// leader's peak memory (which its allocator keeps) small.
const PAGE: u32 = 250;

/// Proplets read again at once when the view is unsure of them.
const READS_AT_ONCE: usize = 16;
/// A round's label writes in flight at once: each is a connection to the API server with its buffers
/// (kube's client speaks HTTP/1), and a first round (a write for every Proplet) keeps all of them busy at
/// the leader's peak of memory: 8 instead of 32 took 1.5 MiB off it at 10,000 proplets. Fewer relabel a
/// dead shard's proplets more slowly (64 did 393 a second on the 2-core test bed, 16 307), which only
/// delays their labels: its survivors own them from the takeover on (docs/sharding.md, Numbers at scale).
const ROUND_WRITES_AT_ONCE: usize = WRITES_AT_ONCE / 4;

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
        let dirty = Arc::new(AtomicBool::new(true));
        // Consumed on their own tasks: a round writing thousands of labels must not leave a watch unread
        // (the API server would drop it as too slow).
        let mut watches = Vec::new();
        let mut listening = Vec::new();
        for narrow in Narrow::ALL {
            let (watch, ready) = hear(&api, narrow, &fleet, &dirty);
            watches.push(AbortOnDrop(watch));
            listening.push(ready);
        }
        let mut orphaned: BTreeSet<String> = BTreeSet::new();
        let mut fenced = Fenced::default();
        let mut every = tokio::time::interval(period / 2);
        let mut ring = ctx.ownership.state_changes();
        // Another round is due even with no change seen: the last one planned steps or failed.
        let mut again = true;
        let mut last_round = tokio::time::Instant::now();
        let mut last_list: Option<tokio::time::Instant> = None;
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
            if !ctx.ownership.is_leader() {
                // Leading again later, it lists afresh: nothing was kept of what happened meanwhile.
                last_list = None;
                continue;
            }
            // The full list is read after both watches listed: no change between is missed.
            if !listening.iter().all(|r| r.load(Ordering::SeqCst)) {
                continue;
            }
            if last_list.is_none_or(|l| l.elapsed() >= FULL_LIST) {
                match list_all(&ctx, &api, &fleet).await {
                    Ok(()) => {
                        last_list = Some(tokio::time::Instant::now());
                        dirty.store(true, Ordering::SeqCst);
                    }
                    Err(e) => {
                        warn!(error = %e, "listing the fleet failed; retrying");
                        continue;
                    }
                }
            }
            if let Err(e) = reread(&ctx, &fleet).await {
                warn!(error = %e, "reading proplets again failed; retrying");
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
            again = match round(&ctx, proplets, &fleet, &mut orphaned, &mut fenced).await {
                Ok(planned) => planned,
                Err(e) => {
                    warn!(error = %e, "sharding round failed; retrying");
                    true
                }
            };
        }
    })
}

/// Starts one label-selected watch feeding the view; the flag is set once it has listed.
fn hear(
    api: &Api<FleetProplet>,
    narrow: Narrow,
    fleet: &Arc<Mutex<Fleet>>,
    dirty: &Arc<AtomicBool>,
) -> (JoinHandle<()>, Arc<AtomicBool>) {
    let ready = Arc::new(AtomicBool::new(false));
    let (seen, held, changed) = (Arc::clone(&ready), Arc::clone(fleet), Arc::clone(dirty));
    let config = watcher::Config::default().labels(&narrow.selector());
    let watch = tokio::spawn(
        watcher(api.clone(), config)
            .backoff(crate::controllers::runtime::watch_backoff())
            .for_each(move |ev| {
                if let Ok(ev) = ev {
                    let done = matches!(ev, watcher::Event::InitDone);
                    if held.lock().is_ok_and(|mut f| f.heard(narrow, ev)) {
                        changed.store(true, Ordering::SeqCst);
                    }
                    if done {
                        seen.store(true, Ordering::SeqCst);
                    }
                }
                futures::future::ready(())
            }),
    );
    (watch, ready)
}

/// Every Proplet, page by page (one consistent snapshot), into the view: each page is reduced to what
/// placement reads and taken in before the next is read.
async fn list_all(ctx: &Context, api: &Api<FleetProplet>, fleet: &Mutex<Fleet>) -> Result<()> {
    let mut at = None;
    let mut next: Option<String> = None;
    if let Ok(mut f) = fleet.lock() {
        f.list_started();
    }
    loop {
        let mut params = ListParams::default().limit(PAGE);
        if let Some(token) = &next {
            params = params.continue_token(token);
        }
        let page = api.list(&params).await?;
        ctx.metrics
            .shards
            .fleet_reads_total
            .with_label_values(&["list_page"])
            .inc();
        at = at.or(page.metadata.resource_version);
        if let Ok(mut f) = fleet.lock() {
            f.listed_page(page.items.iter().map(Placed::from_wire));
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => next = Some(token),
            _ => break,
        }
    }
    if let Ok(mut f) = fleet.lock() {
        f.list_done(at.as_deref());
    }
    Ok(())
}

/// Reads again the Proplets the view is unsure of.
async fn reread(ctx: &Context, fleet: &Mutex<Fleet>) -> Result<()> {
    let unsure = match fleet.lock() {
        Ok(f) => f.unsure(),
        Err(_) => return Ok(()),
    };
    if unsure.is_empty() {
        return Ok(());
    }
    debug!(proplets = unsure.len(), "reading proplets again");
    ctx.metrics
        .shards
        .fleet_reads_total
        .with_label_values(&["reread"])
        .inc_by(unsure.len() as u64);
    let read: Vec<(Key, Result<Option<FleetProplet>>)> = futures::stream::iter(unsure)
        .map(|key| async move {
            let api: Api<FleetProplet> = Api::namespaced(ctx.client.clone(), &key.0);
            let now = api.get_opt(&key.1).await.map_err(Into::into);
            (key, now)
        })
        .buffer_unordered(READS_AT_ONCE)
        .collect()
        .await;
    for (key, now) in read {
        let now = now?;
        if let Ok(mut f) = fleet.lock() {
            f.checked(&key, now.as_ref());
        }
    }
    Ok(())
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
    proplets: Vec<Arc<Placed>>,
    fleet: &Mutex<Fleet>,
    orphaned: &mut BTreeSet<String>,
    fenced: &mut Fenced,
) -> Result<bool> {
    let states: HashMap<_, _> = ctx.ownership.states().into_iter().collect();
    // Read after the states: every dead shard in them has its takeover record here (membership sets them
    // the other way round).
    let takeovers = ctx.ownership.takeovers();
    let mut p = plan(
        &proplets,
        &states,
        &takeovers,
        ctx.config.max_concurrent_moves,
        ctx.config.shard_by,
    );
    // From here each old copy of a Proplet is held only by its step, and freed as its write's answer
    // replaces it in the view: kept to the end of a first round (a step for every Proplet), the old copies
    // and the new doubled the view at the leader's peak of memory.
    drop(proplets);
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
    let mut draining = p.drains_in_flight;
    // Up to ROUND_WRITES_AT_ONCE writes in flight, a new one as soon as one ends (a dead shard's thousands of
    // Proplets move at the API server's pace, not at that of the slowest write of each batch).
    // Each answer is taken as it comes: held until the last write of a 10,000-proplet round, they were the
    // leader's peak of memory (which its allocator keeps).
    let mut answers = futures::stream::iter(std::mem::take(&mut p.steps))
        .map(|step| async move {
            let done = apply(ctx, &step).await;
            (step, done)
        })
        .buffer_unordered(ROUND_WRITES_AT_ONCE);
    let mut failed = None;
    while let Some((step, written)) = answers.next().await {
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                failed.get_or_insert(e);
                continue;
            }
        };
        let done = written.is_some();
        if let Ok(mut f) = fleet.lock() {
            match written {
                Some(now) => {
                    f.wrote(now);
                }
                // Its guard found it changed: the view's copy is stale.
                None => f.doubt(key_of(step.proplet())),
            }
        }
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
                if kind == MoveKind::Dead
                    && let Some(from) = from
                {
                    info!(proplet = %proplet.name, %from, %to, "proplet of a gone shard reassigned");
                    orphaned.insert(from.to_string());
                }
            }
            Step::Drain { .. } if done => draining += 1,
            _ => {}
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    ctx.metrics.shards.drains_in_flight.set(draining as i64);
    let live: BTreeSet<String> = ctx.ownership.members().into_iter().collect();
    // Only for a gone shard's Tasks, from the view, which holds this round's writes.
    let owner_of = if orphaned.iter().any(|s| !live.contains(s)) {
        fleet.lock().map(|f| f.owners()).unwrap_or_default()
    } else {
        HashMap::new()
    };
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

/// Writes one step: what placement reads of the Proplet as written, or `None` when its guard no longer held
/// (the next round looks again).
async fn apply(ctx: &Context, step: &Step) -> Result<Option<Placed>> {
    let written = match step {
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
    }?;
    Ok(written.map(|p| Placed::from_wire(&p)))
}

/// Relabels the Tasks of a gone shard: those on a proplet follow it; the others go back to be claimed.
/// Returns true when none is left.
async fn adopt_tasks(
    ctx: &Context,
    shard: &str,
    owner_of: &HashMap<Arc<str>, Arc<str>>,
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
            .and_then(|c| owner_of.get(c.as_str()))
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
                    .map(|written| written.is_some())
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
