//! Both ends of a live move (drain → acknowledge → reassign), run by every shard:
//! - the shard a Proplet moves to subscribes to its channel and, once the broker has the subscription (a
//!   probe came back), labels it `drain-ready`: from then on its session gets every message about it;
//! - the shard it leaves stopped acting on it when `drain-to` appeared ([`crate::sharding::Ownership`]);
//!   seeing `drain-ready`, it relabels the Proplet's Tasks and then the Proplet itself to the new shard,
//!   which is its acknowledgement and the reassignment in one resourceVersion-checked write.
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use futures::StreamExt;

use super::labels::{Guard, WRITES_AT_ONCE, patch_meta};
use super::plan::drain_ready;
use crate::api::proplet::Proplet;
use crate::api::task::TaskPhase;
use crate::context::Context;
use crate::controllers::runtime::Shutdown;
use crate::controllers::task::wire::channel_of;
use crate::error::Result;
use crate::sharding::{
    DRAIN_LABEL, DRAIN_READY_LABEL, SHARD_LABEL, START_SENT_ANNOTATION, drain_of, shard_of,
};

/// A subscription not confirmed this long after its probe is probed again.
const REPROBE: Duration = Duration::from_secs(1);

/// While a move waits for its subscription to reach the broker, it is looked at this often.
const PENDING_POLL: Duration = Duration::from_millis(100);

/// With no event and nothing pending, our Proplets are looked over for a ready move this often. A move
/// becomes ready by a label its new owner writes, whose event wakes the loop: this only catches a lost
/// wake-up, and at 10,000 proplets a pass every retry period was 2 % of an idle shard's CPU.
const OUTGOING_RESCAN: Duration = Duration::from_secs(30);

/// Runs until `shutdown`, woken by `wake` (Proplet events) and every retry period. `resubscribe` is told
/// when an incoming Proplet's channel must be added to the subscriptions.
pub fn spawn(
    ctx: Arc<Context>,
    wake: Arc<Notify>,
    resubscribe: Arc<Notify>,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut pending = false;
        let mut reprobed = std::time::Instant::now();
        let mut scanned = std::time::Instant::now();
        // An event came since the last pass over our Proplets (kept while we may not act).
        let mut woken = true;
        loop {
            let idle = if pending {
                PENDING_POLL
            } else {
                ctx.config.retry_period.0
            };
            woken |= tokio::select! {
                _ = wake.notified() => true,
                _ = tokio::time::sleep(idle) => false,
                _ = &mut shutdown => return,
            };
            if !ctx.ownership.may_act() {
                continue;
            }
            let was_pending = pending;
            pending = match incoming(&ctx, &resubscribe, &mut reprobed).await {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "incoming handover failed; retrying");
                    true
                }
            };
            // The pass over every Proplet of the shard runs when a move may have changed (an event, a
            // retry); otherwise only as a safety net, not every retry period.
            if woken || was_pending || scanned.elapsed() >= OUTGOING_RESCAN {
                (woken, scanned) = (false, std::time::Instant::now());
                if let Err(e) = outgoing(&ctx).await {
                    warn!(error = %e, "outgoing handover failed; retrying");
                    pending = true;
                }
            }
            // Results parked for tasks we do not hold: kept long enough for a dead shard's tasks to be
            // fenced and moved here (two Lease durations), then dropped as another shard's.
            let park = 3 * ctx.config.lease_duration.0 + Duration::from_secs(5);
            let dropped = ctx
                .results
                .sweep(park, |uid| ctx.task_index.by_uid(uid).is_some());
            if dropped > 0 {
                ctx.metrics
                    .mqtt_messages_total
                    .with_label_values(&["results", "not_owned"])
                    .inc_by(dropped as u64);
            }
            count_owned(&ctx);
            ctx.metrics.shards.tasks.set(ctx.tasks.len() as i64);
        }
    })
}

/// The owned-proplets gauges (taken-over ones among them) from [`crate::sharding::Ownership`].
pub fn count_owned(ctx: &Context) {
    let shards = &ctx.metrics.shards;
    shards.proplets.set(ctx.ownership.owned_count() as i64);
    shards.taken_over.set(ctx.ownership.taken_count() as i64);
}

/// Proplets moving here: labelled `drain-ready` once their channel's subscription is confirmed. Returns
/// whether some still wait for it.
async fn incoming(
    ctx: &Context,
    resubscribe: &Notify,
    reprobed: &mut std::time::Instant,
) -> Result<bool> {
    let (Some(me), Some(mqtt)) = (ctx.ownership.identity(), &ctx.mqtt) else {
        return Ok(false);
    };
    let mut waiting = false;
    let mut ready = Vec::new();
    for p in ctx.incoming.state() {
        if drain_of(p.as_ref()).as_deref() != Some(me) || drain_ready(&p) {
            continue;
        }
        let topics = channel_of(&p)
            .map(|c| c.subscriptions())
            .unwrap_or_default();
        match mqtt.subscribed(&topics).await {
            Some(g) if ctx.backlog.confirmed(g) => ready.push(p),
            Some(g) => {
                waiting = true;
                // The probe of this generation may have been lost (a reconnect): another one.
                if reprobed.elapsed() >= REPROBE
                    && let Some((topic, payload)) = ctx.backlog.probe(g)
                {
                    *reprobed = std::time::Instant::now();
                    if let Err(e) = mqtt.publish(&topic, payload).await {
                        warn!(error = %e, "subscription probe not sent");
                    }
                }
            }
            None => {
                resubscribe.notify_one();
                waiting = true;
            }
        }
    }
    // Many at once: a leaving shard's whole share arrives together.
    let marked: Vec<Result<bool>> = futures::stream::iter(ready)
        .map(|p| async move {
            let ok = patch_meta(
                &ctx.client,
                &ctx.metrics,
                p.as_ref(),
                &[(DRAIN_READY_LABEL, Some("true"))],
                &[],
                Guard::Labels(&[(DRAIN_LABEL, me)]),
            )
            .await
            .map(|written| written.is_some());
            debug!(proplet = %p.name_any(), ok = ?ok, "subscribed for an incoming proplet");
            ok
        })
        .buffer_unordered(WRITES_AT_ONCE)
        .collect()
        .await;
    for m in marked {
        m?;
    }
    Ok(waiting)
}

/// Our Proplets whose new owner is ready: their Tasks, then they, are relabelled to it.
async fn outgoing(ctx: &Context) -> Result<()> {
    let Some(me) = ctx.ownership.identity() else {
        return Ok(());
    };
    let ready: Vec<Arc<Proplet>> = ctx
        .proplets
        .state()
        .into_iter()
        // The label test that copies nothing first: this runs over every Proplet each retry period.
        .filter(|p| drain_ready(p) && p.labels().contains_key(DRAIN_LABEL))
        .filter(|p| shard_of(p.as_ref()).as_deref() == Some(me))
        .collect();
    // Several Proplets at once (each one's Tasks before the Proplet itself): a leaving shard hands its
    // whole share over together.
    let handed: Vec<Result<()>> = futures::stream::iter(ready)
        .map(|p| hand_over(ctx, me, p))
        .buffer_unordered(WRITES_AT_ONCE / 4)
        .collect()
        .await;
    for h in handed {
        h?;
    }
    Ok(())
}

/// One Proplet whose new owner is ready: its Tasks, then it, relabelled to that owner.
async fn hand_over(ctx: &Context, me: &str, p: Arc<Proplet>) -> Result<()> {
    let Some(to) = drain_of(p.as_ref()) else {
        return Ok(());
    };
    let ns = p.namespace();
    let name = p.name_any();
    let client = p.spec.connection_config.client().map(str::to_string);
    let on_it: Vec<_> = ctx
        .tasks
        .state()
        .into_iter()
        .filter(|t| {
            let status = t.status.as_ref();
            t.namespace() == ns
                && shard_of(t.as_ref()).as_deref() == Some(me)
                && (status.and_then(|s| s.assigned_proplet.as_deref()) == Some(name.as_str())
                    || (client.is_some()
                        && status.and_then(|s| s.assigned_client_id.clone()) == client))
        })
        .collect();
    for chunk in on_it.chunks(32) {
        let relabels = chunk.iter().map(|t| {
            // Its start went out from here: the new owner must not send it again.
            let sent = (t.phase() == TaskPhase::Running
                && ctx.launched.contains(&t.uid().unwrap_or_default()))
            .then(|| {
                t.status
                    .as_ref()
                    .and_then(|s| s.attempts)
                    .unwrap_or(0)
                    .to_string()
            });
            let to = to.clone();
            async move {
                let annotations: Vec<(&str, Option<&str>)> = sent
                    .as_deref()
                    .map(|a| vec![(START_SENT_ANNOTATION, Some(a))])
                    .unwrap_or_default();
                patch_meta(
                    &ctx.client,
                    &ctx.metrics,
                    t.as_ref(),
                    &[(SHARD_LABEL, Some(&to))],
                    &annotations,
                    Guard::None,
                )
                .await
                .map(|written| written.is_some())
            }
        });
        for r in futures::future::join_all(relabels).await {
            r?;
        }
    }
    let moved = patch_meta(
        &ctx.client,
        &ctx.metrics,
        p.as_ref(),
        &[
            (SHARD_LABEL, Some(&to)),
            (DRAIN_LABEL, None),
            (DRAIN_READY_LABEL, None),
        ],
        &[],
        Guard::Labels(&[(SHARD_LABEL, me), (DRAIN_LABEL, &to)]),
    )
    .await?
    .is_some();
    if moved {
        ctx.metrics
            .shards
            .moves_total
            .with_label_values(&["live"])
            .inc();
        info!(proplet = %name, %to, "proplet handed over");
    }
    Ok(())
}
