//! What every reconciler, the MQTT router and the FL coordinator of one operator share. Everything an
//! operator keeps — watch caches, indexes, in-memory buffers, its metrics registry — lives here, so that
//! several operators run side by side in one process (replicas, a hub and its members, in tests) without
//! sharing state.
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tracing::warn;

use crate::api::{FederatedJob, PropellerJob, Proplet, Task, TrainingRound};
use crate::clock::Clock;
use crate::config::OperatorConfig;
use crate::error::{Error, Result, conflict};
use crate::indexes::{BroadcastChannels, PropletIndex, TaskIndex};
use crate::liveness::Liveness;
use crate::memory::{
    CachesReady, Launched, ModuleMisses, OwnWrites, PendingResults, TaskMetricsBuffer, WriteTimes,
};
use crate::mqtt::MqttClient;
use crate::mqtt::backlog::Backlog;
use crate::sharding::Ownership;
use crate::telemetry::Metrics;
use crate::telemetry::events::Events;

/// Field manager of every write.
pub const MANAGER: &str = "propeller-operator";

pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub mqtt: Option<MqttClient>,
    pub ownership: Ownership,
    pub metrics: Arc<Metrics>,
    /// The Proplets this replica owns (all of them for a single replica; a shard's label-selected watch).
    pub proplets: Store<Proplet>,
    /// The Tasks this replica holds (all for a single replica; a shard's label-selected watch).
    pub tasks: Store<Task>,
    /// Proplets moving to this shard (empty for a single replica).
    pub incoming: Store<Proplet>,
    /// Tasks no shard has claimed yet (empty for a single replica).
    pub unclaimed: Store<Task>,
    /// Jobs of the job backend (empty when the backend is mqtt).
    pub jobs: Store<Job>,
    pub propeller_jobs: Store<PropellerJob>,
    pub federated_jobs: Store<FederatedJob>,
    pub training_rounds: Store<TrainingRound>,
    /// ConfigMaps holding FL client updates (see [`crate::fl::store`]).
    pub fl_updates: Store<ConfigMap>,
    pub proplet_index: PropletIndex,
    pub task_index: TaskIndex,
    /// The channels of the proplets each running broadcast was sent to.
    pub broadcasts: BroadcastChannels,
    /// Woken whenever the MQTT subscriptions may have to change (owned Proplets, running broadcasts).
    pub resubscribe: Arc<tokio::sync::Notify>,
    pub liveness: Liveness,
    pub results: PendingResults,
    pub task_metrics: TaskMetricsBuffer,
    /// Tasks whose module a proplet asked for and the registry does not hold.
    pub module_misses: ModuleMisses,
    /// Our status writes the watch caches have not caught up with yet.
    pub own_writes: OwnWrites,
    /// When each Proplet's status was last written (spaces out `taskCount` writes).
    pub proplet_writes: WriteTimes,
    /// Tasks whose start this process published.
    pub launched: Launched,
    /// Whether the Proplet and Task caches are complete.
    pub caches_ready: CachesReady,
    /// Whether what the broker queued for this operator's session has been handled.
    pub backlog: Backlog,
    pub recorder: Events,
    /// The time cron schedules are judged by.
    pub clock: Clock,
    /// A hub's clients for its member clusters.
    pub member_clients: crate::multicluster::clients::MemberClients,
    /// When this operator started: until a heartbeat threshold has passed, silence proves nothing.
    pub started: Instant,
}

/// The writing halves of the watch caches in [`Context`], for the watches that fill them.
pub struct Writers {
    pub proplets: Writer<Proplet>,
    pub tasks: Writer<Task>,
    pub incoming: Writer<Proplet>,
    pub unclaimed: Writer<Task>,
    pub jobs: Writer<Job>,
    pub propeller_jobs: Writer<PropellerJob>,
    pub federated_jobs: Writer<FederatedJob>,
    pub training_rounds: Writer<TrainingRound>,
    pub fl_updates: Writer<ConfigMap>,
}

impl Context {
    /// A context with empty caches; the watches fed by the returned [`Writers`] fill them.
    pub fn new(
        client: Client,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
        mqtt: Option<MqttClient>,
        clock: Clock,
    ) -> (Context, Writers) {
        let (proplets, proplet_writer) = reflector::store();
        let (tasks, task_writer) = reflector::store();
        let (incoming, incoming_writer) = reflector::store();
        let (unclaimed, unclaimed_writer) = reflector::store();
        let (jobs, job_writer) = reflector::store();
        let (propeller_jobs, pjob_writer) = reflector::store();
        let (federated_jobs, fjob_writer) = reflector::store();
        let (training_rounds, round_writer) = reflector::store();
        let (fl_updates, update_writer) = reflector::store();
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(config.identity()),
        };
        let backlog = Backlog::new(config.default_channel().as_ref(), &config.mqtt_client_id());
        let ownership = if config.leader_elect {
            Ownership::sharded(&config.identity(), config.renew_deadline.0)
        } else {
            Ownership::single()
        };
        let resubscribe = Arc::new(tokio::sync::Notify::new());
        let ctx = Context {
            backlog,
            launched: Launched::default(),
            caches_ready: CachesReady::default(),
            recorder: Events::new(client.clone(), reporter),
            client,
            config,
            mqtt,
            ownership,
            metrics,
            proplets,
            tasks,
            incoming,
            unclaimed,
            jobs,
            propeller_jobs,
            federated_jobs,
            training_rounds,
            fl_updates,
            proplet_index: PropletIndex::default(),
            task_index: TaskIndex::default(),
            broadcasts: BroadcastChannels::new(Arc::clone(&resubscribe)),
            resubscribe,
            liveness: Liveness::default(),
            results: PendingResults::default(),
            task_metrics: TaskMetricsBuffer::default(),
            module_misses: ModuleMisses::default(),
            own_writes: OwnWrites::default(),
            proplet_writes: WriteTimes::default(),
            clock,
            member_clients: Default::default(),
            started: Instant::now(),
        };
        let writers = Writers {
            proplets: proplet_writer,
            tasks: task_writer,
            incoming: incoming_writer,
            unclaimed: unclaimed_writer,
            jobs: job_writer,
            propeller_jobs: pjob_writer,
            federated_jobs: fjob_writer,
            training_rounds: round_writer,
            fl_updates: update_writer,
        };
        (ctx, writers)
    }

    /// An Event for a routine step of a task (dispatch, completion): only with `--task-events=all`, since
    /// each costs an API write per task.
    pub async fn routine_event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        reason: &str,
        action: &str,
        note: String,
    ) {
        if self.config.task_events == crate::config::TaskEvents::All {
            self.event(obj, EventType::Normal, reason, action, note)
                .await;
        }
    }

    /// Publishes an Event about `obj`; failures are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let reference: ObjectReference = obj.object_ref(&());
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(truncate(&note, 1000)),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            warn!(object = %obj.name_any(), %reason, error = %e, "could not publish event");
        } else {
            self.metrics.api_write("events", "create");
        }
    }

    /// Replaces the status of `obj`, only if `obj` is still the newest version (a JSON patch that tests
    /// the resourceVersion): a decision made on a stale view fails with [`Error::Conflict`] instead of
    /// acting twice. Returns the object as written.
    pub async fn apply_status<K>(&self, obj: &K, status: &impl Serialize) -> Result<K>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + Serialize
            + std::fmt::Debug,
    {
        // A shard whose Lease is not fresh may already have a successor: it decides nothing more.
        if !self.ownership.may_act() {
            return Err(Error::Fenced(format!("status of {}", obj.name_any())));
        }
        let ns = obj
            .namespace()
            .ok_or_else(|| Error::NoNamespace(obj.name_any()))?;
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj.resource_version()},
            {"op": "add", "path": "/status", "value": status},
        ]))?;
        let written = api
            .patch_status(
                &obj.name_any(),
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await
            .map_err(|e| match conflict(e) {
                Error::Conflict(m) => Error::Conflict(format!(
                    "status of {} at resourceVersion {:?}: {m}",
                    obj.name_any(),
                    obj.resource_version()
                )),
                other => other,
            })?;
        self.metrics.api_write(&K::plural(&()), "patch_status");
        self.own_writes.record(&written);
        Ok(written)
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
