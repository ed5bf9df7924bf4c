//! Proplet controller: a Deployment for `type: k8s`, and for every proplet its phase from heartbeats
//! (Initializing → Running → Offline), written on transitions and refreshed at most every --status-refresh.
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::deployment;
use super::runtime::{Seen, Shutdown, Waker, Watches};
use crate::api::common::{ConditionStatus, set_condition};
use crate::api::proplet::{
    AvailableResources, K8sStatus, Proplet, PropletPhase, PropletStatus, PropletType,
};
use crate::context::Context;
use crate::error::Result;
use crate::mqtt::address;
use kube::runtime::reflector::ObjectRef;
use tokio::task::JoinHandle;
use tracing::info;

const HISTORY: usize = 10;

/// Problems with a Proplet's spec that the API server may not catch (an old one ignores CEL rules).
pub fn validate(p: &Proplet) -> std::result::Result<(), String> {
    let cc = &p.spec.connection_config;
    if cc.domain().is_none_or(str::is_empty) {
        return Err("spec.connectionConfig.domainId (or tenantId) is required".into());
    }
    if cc.client().is_none_or(str::is_empty) {
        return Err("spec.connectionConfig.clientId (or entityId) is required".into());
    }
    if cc.channel_id.is_empty() {
        return Err("spec.connectionConfig.channelId is required".into());
    }
    cc.key()?;
    if let Some(r) = cc
        .client_key_secret_ref
        .as_ref()
        .or(cc.api_key_secret_ref.as_ref())
        && r.name.as_deref().is_none_or(str::is_empty)
    {
        return Err("spec.connectionConfig.clientKeySecretRef.name is required".into());
    }
    address::parse(&cc.mqtt_address)
        .map_err(|e| format!("spec.connectionConfig.mqttAddress: {e}"))?;
    match p.spec.type_ {
        PropletType::K8s if p.spec.k8s.is_none() => {
            Err("spec.k8s is required for a k8s proplet".into())
        }
        PropletType::External if p.spec.external.is_none() => {
            Err("spec.external is required for an external proplet".into())
        }
        _ => Ok(()),
    }
}

/// For a discovered Proplet: a Proplet someone declared for the same clientId.
fn declared_twin(p: &Proplet, ctx: &Context) -> Option<String> {
    use crate::discovery::is_discovered as discovered;
    if !discovered(p) {
        return None;
    }
    let client = p.client_id();
    ctx.proplets
        .state()
        .iter()
        .find(|q| {
            !discovered(q) && q.client_id() == client && q.metadata.deletion_timestamp.is_none()
        })
        .map(|q| format!("{}/{}", q.namespace().unwrap_or_default(), q.name_any()))
}

/// A discovered Proplet steps aside for a declared one (the proplet announced itself before its Proplet
/// was created): it is deleted, so that one clientId has one Proplet.
async fn give_way(p: &Proplet, ctx: &Context, declared: &str) -> Result<Action> {
    let ns = p.namespace().unwrap_or_default();
    let msg = format!(
        "Proplet {declared} declares the same clientId: this discovered Proplet is deleted"
    );
    info!(proplet = %p.name_any(), %declared, "discovered Proplet replaced by a declared one");
    ctx.event(p, EventType::Normal, "ReplacedByDeclared", "Discover", msg)
        .await;
    match Api::<Proplet>::namespaced(ctx.client.clone(), &ns)
        .delete(&p.name_any(), &Default::default())
        .await
    {
        Ok(_) => ctx.metrics.api_write("proplets", "delete"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// What wakes a Proplet: its own changes, a declared Proplet taking a discovered one's clientId (the
/// discovered one steps aside), and the tasks placed on it (its `taskCount`).
pub fn wake_ups(ctx: &Arc<Context>, w: &mut Watches, me: &Waker<Proplet>) {
    w.proplets.wake_self(me);
    let c = Arc::clone(ctx);
    w.proplets.wake(me, move |p, seen| match seen {
        Seen::Applied => discovered_twins(&c, p),
        Seen::Deleted => Vec::new(),
    });
    w.tasks
        .wake(me, |t, _| assigned_proplet(t).into_iter().collect());
}

/// How often the silence watch looks for proplets whose heartbeats stopped.
const SILENCE_SWEEP: Duration = Duration::from_secs(1);

/// Wakes each Proplet whose heartbeats stopped, as its last one turns older than `--last-seen-threshold`
/// (half a second after, so that its reconcile finds it past): one look over the heartbeat records each
/// second, instead of a timer per proplet that fires while its heartbeats keep arriving.
pub fn spawn_silence_watch(
    ctx: Arc<Context>,
    me: Waker<Proplet>,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown);
        let threshold = ctx.config.last_seen_threshold.0;
        let margin = jiff::SignedDuration::from_millis(500);
        let behind = || {
            let now = Timestamp::now();
            now.checked_sub(margin).unwrap_or(now)
        };
        let mut swept = behind();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SILENCE_SWEEP) => {}
                _ = &mut shutdown => return,
            }
            let to = behind();
            for client in ctx.liveness.went_silent(threshold, swept, to) {
                if let Some(r) = ctx.proplet_index.by_client(&client) {
                    me.wake(r);
                }
            }
            swept = to;
        }
    })
}

/// Discovered Proplets with the clientId of `p`, when `p` was declared by someone.
fn discovered_twins(ctx: &Context, p: &Proplet) -> Vec<ObjectRef<Proplet>> {
    use crate::discovery::is_discovered;
    if is_discovered(p) {
        return Vec::new();
    }
    let Some(client) = p.spec.connection_config.client() else {
        return Vec::new();
    };
    ctx.proplet_index
        .all_by_client(client)
        .into_iter()
        .filter(|r| ctx.proplets.get(r).is_some_and(|q| is_discovered(&q)))
        .collect()
}

fn assigned_proplet(t: &crate::api::Task) -> Option<ObjectRef<Proplet>> {
    let name = t.status.as_ref()?.assigned_proplet.clone()?;
    Some(ObjectRef::new(&name).within(&t.namespace()?))
}

pub async fn reconcile(p: Arc<Proplet>, ctx: Arc<Context>) -> Result<Action> {
    // Our last status write may not be in the cache yet: start from it (no stale-view conflict).
    let p = ctx.own_writes.latest(p);
    let client_id = p.client_id();
    if !ctx.ownership.holds_client(&client_id) {
        return Ok(Action::await_change());
    }
    if !ctx.ownership.may_act_for(Some(&client_id)) {
        // Our Lease (or our takeover of it) is being confirmed late: nothing is written until it is fresh
        // again.
        return Ok(Action::requeue(ctx.config.retry_period.0));
    }
    let generation = p.metadata.generation;
    let old = p.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = generation;
    status.client_id = Some(client_id.clone()).filter(|c| !c.is_empty());

    if let Err(msg) = validate(&p) {
        return invalid_spec(&p, &ctx, status, &old, &msg).await;
    }
    if let Some(declared) = declared_twin(&p, &ctx) {
        return give_way(&p, &ctx, &declared).await;
    }

    // The Deployment of a k8s proplet.
    let mut deployment_view: Option<Deployment> = None;
    if let (PropletType::K8s, Some(k8s)) = (p.spec.type_, &p.spec.k8s) {
        match deployment::ensure(&ctx, &p, k8s).await? {
            Ok(d) => deployment_view = Some(d),
            Err(msg) => return invalid_spec(&p, &ctx, status, &old, &msg).await,
        }
    }

    // Liveness from heartbeats (in memory), falling back to the last recorded time after a restart.
    let threshold = ctx.config.last_seen_threshold.0;
    let observed = ctx.liveness.get(&client_id).unwrap_or_default();
    let last_seen = observed.last_seen.or(old.last_seen.as_ref().map(|t| t.0));
    let now = Timestamp::now();
    let age = last_seen.map(|t| now.duration_since(t).unsigned_abs());
    // Right after a (re)start no heartbeat has been heard yet: keep the recorded phase for one threshold
    // instead of declaring every proplet Offline.
    // (A shard hears a proplet only since it became its owner.)
    // (And only while connected: a proplet is not judged on heartbeats the broker could not deliver; after a
    // reconnect, those queued for us arrive first.)
    let up_since = ctx.mqtt.as_ref().map(|m| m.up_since());
    let listening = ctx
        .ownership
        .owned_since(&client_id)
        .map_or(ctx.started, |since| since.max(ctx.started))
        .max(up_since.flatten().unwrap_or(ctx.started));
    let listening_at = jiff::SignedDuration::try_from(listening.elapsed())
        .ok()
        .and_then(|d| now.checked_sub(d).ok());
    let heard_since = observed
        .last_seen
        .is_some_and(|t| listening_at.is_none_or(|l| t >= l));
    // Silence says nothing while our own echo does not come back either (a partition the client has not
    // noticed yet).
    let deaf =
        matches!(up_since, Some(None)) || (up_since.is_some() && !ctx.backlog.hears_itself());
    let warming_up = deaf || (!heard_since && listening.elapsed() < threshold);
    let phase = if observed.offline {
        PropletPhase::Offline
    } else if warming_up && old.phase.is_some() {
        old.phase.unwrap_or_default()
    } else {
        match age {
            None => PropletPhase::Initializing,
            Some(a) if a <= threshold => PropletPhase::Running,
            Some(_) => PropletPhase::Offline,
        }
    };
    status.phase = Some(phase);
    status.alive = phase == PropletPhase::Running;
    let g = generation;
    match phase {
        PropletPhase::Running => {
            set_condition(
                &mut status.conditions,
                "Connected",
                ConditionStatus::True,
                "PropletOnline",
                "heartbeats are arriving",
                g,
            );
            set_condition(
                &mut status.conditions,
                "Ready",
                ConditionStatus::True,
                "PropletReady",
                "the proplet is connected and accepts tasks",
                g,
            );
        }
        PropletPhase::Initializing => {
            set_condition(
                &mut status.conditions,
                "Connected",
                ConditionStatus::Unknown,
                "WaitingForHeartbeat",
                "no heartbeat received yet",
                g,
            );
            set_condition(
                &mut status.conditions,
                "Ready",
                ConditionStatus::False,
                "PropletInitializing",
                "waiting for the first heartbeat",
                g,
            );
        }
        PropletPhase::Offline => {
            let why = if observed.offline {
                "the proplet reported itself offline".to_string()
            } else {
                format!("no heartbeat for more than {}s", threshold.as_secs())
            };
            set_condition(
                &mut status.conditions,
                "Connected",
                ConditionStatus::False,
                "PropletOffline",
                &why,
                g,
            );
            set_condition(
                &mut status.conditions,
                "Ready",
                ConditionStatus::False,
                "PropletOffline",
                &why,
                g,
            );
        }
    }

    // Deployment readiness → Healthy and k8sStatus; external proplets are healthy while they heartbeat.
    if let Some(d) = &deployment_view {
        let ds = d.status.clone().unwrap_or_default();
        let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let ready = ds.ready_replicas.unwrap_or(0);
        status.k8s_status = Some(K8sStatus {
            ready_replicas: ready,
            available_replicas: ds.available_replicas.unwrap_or(0),
        });
        let (st, reason, msg) = if desired == 0 {
            (
                ConditionStatus::False,
                "ScaledToZero",
                "the Deployment has 0 replicas".to_string(),
            )
        } else if ready >= desired {
            (
                ConditionStatus::True,
                "DeploymentReady",
                format!("all {desired} replicas are ready"),
            )
        } else {
            (
                ConditionStatus::False,
                "DeploymentNotReady",
                format!("{ready}/{desired} replicas ready"),
            )
        };
        set_condition(&mut status.conditions, "Healthy", st, reason, &msg, g);
    } else {
        let (st, reason, msg) = match phase {
            PropletPhase::Running => (
                ConditionStatus::True,
                "HeartbeatsArriving",
                "heartbeats are arriving",
            ),
            PropletPhase::Initializing => (
                ConditionStatus::Unknown,
                "WaitingForHeartbeat",
                "no heartbeat received yet",
            ),
            PropletPhase::Offline => (
                ConditionStatus::False,
                "PropletOffline",
                "heartbeats stopped",
            ),
        };
        set_condition(&mut status.conditions, "Healthy", st, reason, msg, g);
    }
    status.available_resources = available_resources(&p);
    status.task_count = active_task_count(&ctx, &p);
    if let Some(md) = observed.metadata.clone() {
        status.metadata = Some(md);
    }

    // Heartbeat-driven fields change every beat; write them only with a transition or when due.
    let refresh = ctx.config.status_refresh.0;
    let recorded = old.last_seen.as_ref().map(|t| t.0);
    let refresh_due = match (last_seen, recorded) {
        (Some(seen), Some(rec)) => crate::liveness::refresh_due(&client_id, rec, seen, refresh),
        (Some(_), None) => true,
        _ => false,
    };
    // `taskCount` is for people (placement counts from the Task cache): in a burst it would change with
    // every task, so on its own it is written at most every TASK_COUNT_REFRESH.
    let transition = PropletStatus {
        task_count: old.task_count,
        ..status.clone()
    } != old;
    let count_wait = if status.task_count != old.task_count {
        ctx.proplet_writes
            .wait(&p.uid().unwrap_or_default(), TASK_COUNT_REFRESH)
    } else {
        None
    };
    let count_due = status.task_count != old.task_count && count_wait.is_none();
    if transition || refresh_due || count_due {
        if let Some(seen) = last_seen {
            if recorded != Some(seen) {
                status.alive_history.push(Time(seen));
                let excess = status.alive_history.len().saturating_sub(HISTORY);
                status.alive_history.drain(..excess);
            }
            status.last_seen = Some(Time(seen));
        }
        if let Some(m) = observed.metrics.clone() {
            status.latest_metrics = Some(m);
        }
        ctx.apply_status(p.as_ref(), &status).await?;
        ctx.proplet_writes
            .wrote(&p.uid().unwrap_or_default(), TASK_COUNT_REFRESH);
        if old.phase != Some(phase) {
            announce(&ctx, &p, old.phase, phase).await;
        }
    }
    // Heartbeats ask for the next refresh of lastSeen when it is due: no timer per proplet for it.
    if let Some(recorded) = &status.last_seen {
        ctx.liveness.recorded(&client_id, recorded.0);
    }

    if deaf {
        // Cut from the broker: looked at again later, not in a loop.
        return Ok(Action::requeue(threshold.min(Duration::from_secs(5))));
    }
    if warming_up {
        return Ok(Action::requeue(
            threshold.saturating_sub(listening.elapsed()) + Duration::from_millis(100),
        ));
    }
    // Going Offline is seen by the silence watch, a due refresh of lastSeen by the next heartbeat (both
    // wake this): `refresh` is a backstop. A held-back taskCount waits for its own time.
    let written = transition || refresh_due || count_due;
    Ok(Action::requeue(match count_wait {
        Some(w) if !written => refresh.min(w + Duration::from_millis(50)),
        _ => refresh,
    }))
}

/// How often a changed `taskCount` alone is written.
const TASK_COUNT_REFRESH: Duration = Duration::from_secs(10);

async fn announce(ctx: &Context, p: &Proplet, from: Option<PropletPhase>, to: PropletPhase) {
    let (type_, reason) = match to {
        PropletPhase::Running => (EventType::Normal, "Online"),
        PropletPhase::Offline => (EventType::Warning, "Offline"),
        PropletPhase::Initializing => (EventType::Normal, "Initializing"),
    };
    let from = from.map(PropletPhase::as_str).unwrap_or("(new)");
    ctx.event(
        p,
        type_,
        reason,
        "Heartbeat",
        format!("phase {from} → {}", to.as_str()),
    )
    .await;
}

async fn invalid_spec(
    p: &Proplet,
    ctx: &Context,
    mut status: PropletStatus,
    old: &PropletStatus,
    msg: &str,
) -> Result<Action> {
    set_condition(
        &mut status.conditions,
        "Ready",
        ConditionStatus::False,
        "InvalidSpec",
        msg,
        p.metadata.generation,
    );
    if &status != old {
        ctx.apply_status(p, &status).await?;
        ctx.event(
            p,
            EventType::Warning,
            "InvalidSpec",
            "Validate",
            msg.to_string(),
        )
        .await;
    }
    tracing::warn!(proplet = %p.name_any(), error = %msg, "invalid Proplet spec");
    Ok(Action::await_change())
}

fn available_resources(p: &Proplet) -> Option<AvailableResources> {
    let res = p.spec.resources.as_ref()?;
    let text = |v: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| match v {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
    };
    let custom: std::collections::BTreeMap<String, String> = res
        .iter()
        .filter(|(k, _)| k.as_str() != "cpu" && k.as_str() != "memory")
        .map(|(k, v)| (k.clone(), text(v)))
        .collect();
    Some(AvailableResources {
        cpu: res.get("cpu").map(text),
        memory: res.get("memory").map(text),
        custom: (!custom.is_empty()).then_some(custom),
    })
}

/// Tasks scheduled on or running on this proplet.
pub fn active_task_count(ctx: &Context, p: &Proplet) -> i64 {
    let name = p.name_any();
    let ns = p.namespace();
    ctx.tasks
        .state()
        .iter()
        .filter(|t| t.namespace() == ns)
        .filter(|t| t.phase().is_active())
        .filter(|t| {
            t.status
                .as_ref()
                .and_then(|s| s.assigned_proplet.as_deref())
                == Some(name.as_str())
        })
        .count() as i64
}
