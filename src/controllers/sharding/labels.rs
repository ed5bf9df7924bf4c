//! Label writes of the sharding protocol: merge patches of metadata, checked against the resourceVersion
//! they were decided on when the decision depends on it.
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Map, Value, json};

use crate::context::MANAGER;
use crate::error::{Error, Result, conflict};
use crate::telemetry::Metrics;

/// Sets (`Some`) or removes (`None`) labels and annotations of `obj`. With `checked`, only if `obj` is
/// still the newest version. Returns false when a check failed (someone changed it first).
pub async fn patch_meta<K>(
    client: &Client,
    metrics: &Metrics,
    obj: &K,
    labels: &[(&str, Option<&str>)],
    annotations: &[(&str, Option<&str>)],
    checked: bool,
) -> Result<bool>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(obj.name_any()))?;
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let to_map = |kv: &[(&str, Option<&str>)]| -> Map<String, Value> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.map_or(Value::Null, |v| json!(v))))
            .collect()
    };
    let mut meta = Map::new();
    if !labels.is_empty() {
        meta.insert("labels".into(), Value::Object(to_map(labels)));
    }
    if !annotations.is_empty() {
        meta.insert("annotations".into(), Value::Object(to_map(annotations)));
    }
    if checked {
        meta.insert("resourceVersion".into(), json!(obj.resource_version()));
    }
    let patch = json!({ "metadata": meta });
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(MANAGER),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            metrics.api_write(&K::plural(&()), "patch");
            Ok(true)
        }
        Err(e) => match conflict(e) {
            Error::Conflict(_) => Ok(false),
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            other => Err(other),
        },
    }
}
