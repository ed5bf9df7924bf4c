//! One reconciler per kind, sharing a [`Context`]; [`runtime`] runs them and their watches.
pub mod deployment;
pub mod experiment;
pub mod federated_job;
pub mod hub_job;
pub mod member_cluster;
pub mod propeller_job;
pub mod proplet;
pub mod runtime;
pub mod schedule;
pub mod selection;
pub mod sharding;
pub mod sources;
pub mod task;
pub mod training_round;

use std::time::Instant;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use tracing::warn;

use crate::context::Context;
use crate::error::Result;

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
    ctx.apply_status(obj, status).await?;
    ctx.event(obj, EventType::Warning, reason, action, msg.to_string())
        .await;
    warn!(kind = %K::kind(&()), object = %obj.name_any(), %reason, "{msg}");
    Ok(())
}

/// The key of an object in metrics and logs: `namespace/name`.
pub fn object_key<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Wraps a reconcile of `obj` with controller-runtime's metrics (it leaves the work queue) and a trace
/// span carrying the object's key, so that one object can be followed through the logs.
pub async fn measured<K, F>(
    ctx: &Context,
    controller: &'static str,
    obj: &K,
    f: F,
) -> Result<Action>
where
    K: Resource,
    F: std::future::Future<Output = Result<Action>>,
{
    use tracing::Instrument as _;
    let key = object_key(obj);
    let m = &ctx.metrics;
    m.queue_start(controller, &key);
    // The replica, for logs of several operators in one process (tests) or one stream (a log store).
    let replica = ctx.ownership.identity().unwrap_or_default();
    let span = tracing::info_span!("reconcile", controller, object = %key, replica);
    let start = Instant::now();
    let result = f.instrument(span).await;
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

pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
}
