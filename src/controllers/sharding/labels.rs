//! Label writes of the sharding protocol, each guarded by what its decision was based on: the object's
//! resourceVersion ([`Guard::Version`], for claims: any change refuses it), or only the labels the decision
//! read ([`Guard::Labels`]: a JSON patch whose `test` operations fail if another writer moved them). The
//! latter matters for Proplets, whose status changes often: a resourceVersion would make every move race
//! with heartbeats.
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};

use crate::context::MANAGER;
use crate::error::{Error, Result, conflict};
use crate::telemetry::Metrics;

/// Label writes a sharding component keeps in flight at once: a shard's whole share moves at the API
/// server's pace, not one write after the other.
pub const WRITES_AT_ONCE: usize = 64;

/// What must still hold for a label write to apply.
#[derive(Clone, Copy, Debug)]
pub enum Guard<'a> {
    /// Nothing: the write is right whatever happened meanwhile.
    None,
    /// The object is unchanged since it was read.
    Version,
    /// These labels still have these values.
    Labels(&'a [(&'a str, &'a str)]),
}

/// What a label write can address: a namespaced object the API server's answer parses into.
pub trait Labelled:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Labelled for K where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// A JSON pointer segment (RFC 6901).
fn pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Sets (`Some`) or removes (`None`) labels and annotations of `obj`, if `guard` holds. Returns the object
/// as the API server wrote it, or `None` when the guard did not hold (someone changed what the decision was
/// based on, or the object is gone).
pub async fn patch_meta<K>(
    client: &Client,
    metrics: &Metrics,
    obj: &K,
    labels: &[(&str, Option<&str>)],
    annotations: &[(&str, Option<&str>)],
    guard: Guard<'_>,
) -> Result<Option<K>>
where
    K: Labelled,
{
    let ns = obj
        .namespace()
        .ok_or_else(|| Error::NoNamespace(obj.name_any()))?;
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let mut ops: Vec<Value> = Vec::new();
    match guard {
        Guard::None => {}
        Guard::Version => ops.push(json!({
            "op": "test", "path": "/metadata/resourceVersion", "value": obj.resource_version()
        })),
        Guard::Labels(expected) => {
            for (k, v) in expected {
                ops.push(json!({"op": "test", "path": format!("/metadata/labels/{}", pointer(k)), "value": v}));
            }
        }
    }
    let mut edit = |field: &str,
                    present: &std::collections::BTreeMap<String, String>,
                    map_missing: bool,
                    changes: &[(&str, Option<&str>)]| {
        if changes.iter().any(|(_, v)| v.is_some()) && map_missing {
            ops.push(json!({"op": "add", "path": format!("/metadata/{field}"), "value": {}}));
        }
        for (k, v) in changes {
            let path = format!("/metadata/{field}/{}", pointer(k));
            match v {
                Some(v) => ops.push(json!({"op": "add", "path": path, "value": v})),
                None if present.contains_key(*k) => ops.push(json!({"op": "remove", "path": path})),
                None => {}
            }
        }
    };
    let meta = obj.meta();
    edit("labels", obj.labels(), meta.labels.is_none(), labels);
    edit(
        "annotations",
        obj.annotations(),
        meta.annotations.is_none(),
        annotations,
    );
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))?;
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(MANAGER),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(written) => {
            metrics.api_write(&K::plural(&()), "patch");
            Ok(Some(written))
        }
        Err(e) => match conflict(e) {
            Error::Conflict(_) => Ok(None),
            Error::Kube(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            other => Err(other),
        },
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_keys_are_escaped_in_pointers() {
        assert_eq!(
            super::pointer("propeller.propeller.abstractmachines.fr/shard"),
            "propeller.propeller.abstractmachines.fr~1shard"
        );
        assert_eq!(super::pointer("a~b"), "a~0b");
    }
}
