//! One reconciler per kind, sharing a [`Context`].
pub mod deployment;
pub mod federated_job;
pub mod job_backend;
pub mod propeller_job;
pub mod proplet;
pub mod schedule;
pub mod selection;
pub mod task;
pub mod training_round;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};

use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tracing::warn;

use crate::api::{Proplet, Task};
use crate::config::OperatorConfig;
use crate::error::{Error, Result};
use crate::indexes::{PropletIndex, TaskIndex};
use crate::liveness::Liveness;
use crate::mqtt::MqttClient;
use crate::mqtt::wire::TaskResult;
use crate::sharding::Ownership;
use crate::telemetry::metrics;

/// Field manager of every write.
pub const MANAGER: &str = "propeller-operator";

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub mqtt: Option<MqttClient>,
    pub ownership: Ownership,
    pub proplets: Store<Proplet>,
    pub tasks: Store<Task>,
    /// Jobs of the job backend (empty when the backend is mqtt).
    pub jobs: Store<k8s_openapi::api::batch::v1::Job>,
    pub proplet_index: PropletIndex,
    pub task_index: TaskIndex,
    pub liveness: Liveness,
    pub results: PendingResults,
    pub task_metrics: TaskMetricsBuffer,
    pub federated_jobs: Store<crate::api::FederatedJob>,
    pub training_rounds: Store<crate::api::TrainingRound>,
    /// ConfigMaps holding FL client updates (see [`crate::fl::store`]).
    pub fl_updates: Store<k8s_openapi::api::core::v1::ConfigMap>,
    /// Tasks whose module a proplet asked for and the registry does not hold.
    pub module_misses: crate::registry::ModuleMisses,
    pub recorder: Recorder,
    /// The time cron schedules are judged by.
    pub clock: crate::clock::Clock,
    /// When this operator started: until a heartbeat threshold has passed, silence proves nothing.
    pub started: Instant,
}

impl Context {
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
            metrics().api_write("events", "create");
        }
    }
}

/// Reports what keeps `obj` from progressing (`status` already carries its `Ready=False` condition): the
/// status is written only when it differs from `old`, and only then come a Warning Event and a log line —
/// a reconcile that finds nothing new costs no API write.
pub async fn report_blocked<K, S>(
    ctx: &Context,
    obj: &K,
    old: &S,
    status: &S,
    reason: &str,
    action: &str,
    msg: &str,
) -> Result<()>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + Serialize
        + std::fmt::Debug,
    S: PartialEq + Serialize,
{
    if status == old {
        return Ok(());
    }
    apply_status(&ctx.client, obj, status).await?;
    ctx.event(obj, EventType::Warning, reason, action, msg.to_string())
        .await;
    warn!(kind = %K::kind(&()), object = %obj.name_any(), %reason, "{msg}");
    Ok(())
}

/// Replaces the status of `obj`, only if `obj` is still the newest version (a JSON patch that tests the
/// resourceVersion): a decision made on a stale view fails with [`Error::Conflict`] instead of acting twice.
/// Returns the object as written.
pub async fn apply_status<K>(client: &Client, obj: &K, status: &impl Serialize) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(obj.name_any()))?;
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
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
    metrics().api_write(&K::plural(&()), "patch_status");
    own_writes::record(&written);
    Ok(written)
}

/// Our own status writes not yet back from the watch. A reconcile that starts from the watch cache right
/// after a write would otherwise see the object before it and fail its resourceVersion test (a conflict,
/// a wasted write and a retry); it takes the written object instead.
pub mod own_writes {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use kube::{Resource, ResourceExt};
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    /// The watch delivers our writes within milliseconds; an entry older than this is forgotten (e.g. a
    /// relist that skipped the event).
    const FRESH_FOR: Duration = Duration::from_secs(5);
    /// Past this many entries, stale ones are dropped (each holds a whole object).
    const MAX: usize = 10_000;

    struct Written {
        resource_version: String,
        at: Instant,
        object: serde_json::Value,
    }

    fn map() -> &'static Mutex<HashMap<String, Written>> {
        static MAP: OnceLock<Mutex<HashMap<String, Written>>> = OnceLock::new();
        MAP.get_or_init(|| Mutex::new(HashMap::new()))
    }

    pub fn record<K: Resource + Serialize>(written: &K) {
        let (Some(uid), Some(rv)) = (written.uid(), written.resource_version()) else {
            return;
        };
        let Ok(object) = serde_json::to_value(written) else {
            return;
        };
        if let Ok(mut m) = map().lock() {
            if m.len() >= MAX {
                m.retain(|_, w| w.at.elapsed() < FRESH_FOR);
            }
            m.insert(
                uid,
                Written {
                    resource_version: rv,
                    at: Instant::now(),
                    object,
                },
            );
        }
    }

    /// The watch delivered `seen`: a recorded write it has caught up with is dropped.
    pub fn seen<K: Resource>(seen: &K) {
        let (Some(uid), Some(rv)) = (seen.uid(), seen.resource_version()) else {
            return;
        };
        if let Ok(mut m) = map().lock()
            && m.get(&uid).is_some_and(|w| w.resource_version == rv)
        {
            m.remove(&uid);
        }
    }

    /// The object as we last wrote it, when the cache has not caught up with that write yet.
    pub fn newer<K: Resource + DeserializeOwned>(cached: &K) -> Option<K> {
        let uid = cached.uid()?;
        let mut m = map().lock().ok()?;
        let w = m.get(&uid)?;
        if w.at.elapsed() >= FRESH_FOR {
            m.remove(&uid);
            return None;
        }
        // Only a write the cache has not seen yet: with etcd, resourceVersions are revisions, so a larger
        // one is newer. (Our write's event may come back before we record it; a later event then has a
        // larger version and wins.) Unparsable versions or a deletion in the cache: the cache wins.
        let ours = w.resource_version.parse::<u64>().ok()?;
        let theirs = cached.resource_version()?.parse::<u64>().ok()?;
        if ours <= theirs || cached.meta().deletion_timestamp.is_some() {
            return None;
        }
        serde_json::from_value(w.object.clone()).ok()
    }
}

/// A failed precondition (stale resourceVersion) as [`Error::Conflict`].
pub fn conflict(e: kube::Error) -> Error {
    match &e {
        kube::Error::Api(s) if s.code == 409 || s.code == 422 => Error::Conflict(s.message.clone()),
        _ => Error::Kube(e),
    }
}

/// A result and when it arrived.
pub type Received = (TaskResult, Instant);

/// Results received over MQTT, waiting for the Task controller to write them (keyed by Task UID).
#[derive(Clone, Default)]
pub struct PendingResults {
    inner: Arc<Mutex<HashMap<String, Vec<Received>>>>,
}

impl PendingResults {
    pub fn push(&self, uid: &str, result: TaskResult) {
        if let Ok(mut m) = self.inner.lock() {
            m.entry(uid.to_string())
                .or_default()
                .push((result, Instant::now()));
        }
    }

    /// Everything waiting for this task, oldest first (kept until [`PendingResults::done`]).
    pub fn peek(&self, uid: &str) -> Vec<Received> {
        self.inner
            .lock()
            .ok()
            .and_then(|m| m.get(uid).cloned())
            .unwrap_or_default()
    }

    /// Forgets the first `n` results of a task once they are written.
    pub fn done(&self, uid: &str, n: usize) {
        if let Ok(mut m) = self.inner.lock()
            && let Some(v) = m.get_mut(uid)
        {
            v.drain(..n.min(v.len()));
            if v.is_empty() {
                m.remove(uid);
            }
        }
    }
}

/// The latest task_metrics sample of each running task, written to status at most every
/// `--status-refresh` (keyed by Task UID).
#[derive(Clone, Default)]
pub struct TaskMetricsBuffer {
    inner: Arc<Mutex<HashMap<String, BufferedMetrics>>>,
}

/// A sample and when a sample of that task was last written.
type BufferedMetrics = (crate::api::common::ResourceMetrics, Option<Instant>);

impl TaskMetricsBuffer {
    /// Stores a sample; true when it is due for writing.
    pub fn offer(
        &self,
        uid: &str,
        sample: crate::api::common::ResourceMetrics,
        every: Duration,
    ) -> bool {
        let Ok(mut m) = self.inner.lock() else {
            return false;
        };
        let entry = m.entry(uid.to_string()).or_insert((sample.clone(), None));
        entry.0 = sample;
        entry.1.is_none_or(|t| t.elapsed() >= every)
    }

    /// The sample to write now, if one is due; marks it written.
    pub fn take_due(
        &self,
        uid: &str,
        every: Duration,
    ) -> Option<crate::api::common::ResourceMetrics> {
        let mut m = self.inner.lock().ok()?;
        let entry = m.get_mut(uid)?;
        if entry.1.is_some_and(|t| t.elapsed() < every) {
            return None;
        }
        entry.1 = Some(Instant::now());
        Some(entry.0.clone())
    }

    pub fn forget(&self, uid: &str) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(uid);
        }
    }
}

/// The key of an object in metrics and logs: `namespace/name`.
pub fn object_key<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Wraps a reconcile of `obj` with controller-runtime's metrics (it leaves the work queue) and a trace
/// span carrying the object's key, so that one object can be followed through the logs.
pub async fn measured<K, F>(controller: &'static str, obj: &K, f: F) -> Result<Action>
where
    K: Resource,
    F: std::future::Future<Output = Result<Action>>,
{
    use tracing::Instrument as _;
    let key = object_key(obj);
    metrics().queue_start(controller, &key);
    let span = tracing::info_span!("reconcile", controller, object = %key);
    let start = Instant::now();
    let result = f.instrument(span).await;
    let m = metrics();
    m.reconcile_time_seconds
        .with_label_values(&[controller])
        .observe(start.elapsed().as_secs_f64());
    let label = match &result {
        Ok(_) => "success",
        Err(_) => {
            m.reconcile_errors_total
                .with_label_values(&[controller])
                .inc();
            "error"
        }
    };
    m.reconcile_total
        .with_label_values(&[controller, label])
        .inc();
    result
}

/// Back-off after an error: the next try comes in a while, not at once.
pub fn retry_after_error<K: Resource>(
    controller: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj: Arc<K>, err: &Error, _ctx: Arc<Context>| {
        if let Error::Conflict(msg) = err {
            // Our view was stale; the watch is about to deliver the newer version.
            tracing::info!(controller, object = %obj.as_ref().name_any(), %msg, "stale view; retrying");
            return Action::requeue(Duration::from_millis(200));
        }
        warn!(controller, error = %err, "reconcile failed; retrying in 5s");
        Action::requeue(Duration::from_secs(5))
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

pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::own_writes;
    use crate::api::Task;
    use serde_json::json;

    fn task(rv: &str, deleting: bool) -> Task {
        let mut v = json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
            "metadata": {"name": "t", "namespace": "ns", "uid": "own-writes-test-uid", "resourceVersion": rv},
            "spec": {"name": "t"},
        });
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(v).expect("task")
    }

    #[test]
    fn only_a_write_newer_than_the_cache_replaces_it() {
        own_writes::record(&task("10", false));
        assert!(
            own_writes::newer(&task("9", false)).is_some(),
            "cache behind our write"
        );
        assert!(own_writes::newer(&task("10", false)).is_none(), "caught up");
        assert!(
            own_writes::newer(&task("11", false)).is_none(),
            "someone wrote after us"
        );
        assert!(
            own_writes::newer(&task("9", true)).is_none(),
            "a deletion always wins"
        );
        own_writes::seen(&task("10", false));
        assert!(
            own_writes::newer(&task("9", false)).is_none(),
            "forgotten once seen"
        );
    }
}
