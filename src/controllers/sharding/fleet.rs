//! What the leader reads of each Proplet, for placement ([`Placed`]). Its lists and watches read objects
//! straight into that form ([`FleetProplet`] skips status, managed fields and the rest of the spec while
//! parsing), so the leader never holds a full Proplet it does not own: a kept copy of each (even without
//! status) cost it about 3 KiB per proplet, a third of its memory at 10,000 proplets. The view made of them
//! is [`super::view::Fleet`].
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::NamespaceResourceScope;
use serde::Deserialize;

use crate::api::proplet::Proplet;
use crate::config::ShardBy;
use crate::sharding::takeover::{channel_key, ring_position};
use crate::sharding::{DRAIN_LABEL, DRAIN_READY_LABEL, SHARD_LABEL};

/// What placement reads of one Proplet. The leader keeps one per Proplet of the fleet, so the texts are
/// shared: the name with the view's key (and with the key when there is no clientId), and the few distinct
/// namespaces, shards and channels among all of them ([`super::view::Fleet`] interns them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    /// For writes that must see the object unchanged; not a plan input.
    pub resource_version: Option<Version>,
    pub shard: Option<Arc<str>>,
    pub drain: Option<Arc<str>>,
    /// The drain-ready label as found (the target sets it to "true"; whatever it holds, a write that
    /// removes it must know it is there).
    pub drain_ready: Option<Arc<str>>,
    /// Whether the object has labels at all: a label write must not replace the map (see [`Placed::meta`]).
    pub labelled: bool,
    /// Its clientId (its name when it has none yet): what the ring hashes and what groups the Proplets
    /// claiming one clientId.
    pub key: Arc<str>,
    /// `domain/channel`, the MQTT topics it is heard on; `None` without a channel.
    pub channel: Option<Arc<str>>,
    pub deleting: bool,
}

/// A resourceVersion as the view keeps it: a number when it is one (every API server stores etcd revisions
/// in them), so that no text is held for each of the fleet's Proplets; else its text. Kubernetes calls them
/// opaque: only a number that reads back as the same text is kept as one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    Revision(u64),
    Opaque(Arc<str>),
}

impl Version {
    pub fn of(text: &str) -> Version {
        let canonical = !text.is_empty()
            && text.bytes().all(|b| b.is_ascii_digit())
            && (text == "0" || !text.starts_with('0'));
        match text.parse() {
            Ok(n) if canonical => Version::Revision(n),
            _ => Version::Opaque(text.into()),
        }
    }

    /// The revision, to tell which of two copies is newer (None: opaque).
    pub fn revision(&self) -> Option<u64> {
        match self {
            Version::Revision(n) => Some(*n),
            Version::Opaque(_) => None,
        }
    }

    /// The text it was read from.
    pub fn text(&self) -> String {
        match self {
            Version::Revision(n) => n.to_string(),
            Version::Opaque(t) => t.to_string(),
        }
    }
}

/// The fields of a Proplet's connectionConfig placement reads, with the same later names accepted as
/// [`crate::api::proplet::ConnectionConfig`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Connection {
    domain_id: Option<String>,
    tenant_id: Option<String>,
    channel_id: String,
    client_id: Option<String>,
    entity_id: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Spec {
    connection_config: Connection,
}

/// The metadata placement reads. Everything else, `managedFields` above all (a tree of objects per
/// writer, which the API server sends with every object), is skipped unread instead of being built and
/// dropped: the leader reads every Proplet in its lists.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct LeanMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

fn lean_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LeanMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

/// A Proplet as the leader's lists, watches and write answers parse it: every other field is skipped
/// unread. Also what its label writes are addressed with (its kind is a Proplet's).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct FleetProplet {
    #[serde(default, deserialize_with = "lean_meta")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Spec,
}

impl Resource for FleetProplet {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Proplet::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Proplet::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Proplet::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Proplet::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Placed {
    fn new(meta: &ObjectMeta, client: Option<&str>, domain: Option<&str>, channel: &str) -> Placed {
        let labels = meta.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k));
        let name: Arc<str> = meta.name.as_deref().unwrap_or_default().into();
        Placed {
            key: client.map_or_else(|| Arc::clone(&name), Arc::from),
            channel: channel_key(domain, channel).map(Arc::from),
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            resource_version: meta.resource_version.as_deref().map(Version::of),
            shard: label(SHARD_LABEL).map(|v| Arc::from(v.as_str())),
            drain: label(DRAIN_LABEL).map(|v| Arc::from(v.as_str())),
            drain_ready: label(DRAIN_READY_LABEL).map(|v| Arc::from(v.as_str())),
            labelled: labels.is_some(),
            deleting: meta.deletion_timestamp.is_some(),
            name,
        }
    }

    pub fn of(p: &Proplet) -> Placed {
        let cc = &p.spec.connection_config;
        Placed::new(&p.metadata, cc.client(), cc.domain(), &cc.channel_id)
    }

    pub fn from_wire(p: &FleetProplet) -> Placed {
        let cc = &p.spec.connection_config;
        Placed::new(
            &p.metadata,
            cc.client_id.as_deref().or(cc.entity_id.as_deref()),
            cc.domain_id.as_deref().or(cc.tenant_id.as_deref()),
            &cc.channel_id,
        )
    }

    /// Where its place on the ring is hashed from: its key, or its channel when the ring groups by
    /// channel (and it has one).
    pub fn position(&self, by: ShardBy) -> &str {
        ring_position(&self.key, self.channel.as_deref(), by)
    }

    /// What a label write is built from: name, namespace, resourceVersion, and the sharding labels (the
    /// labels map present, if only with those, whenever the object has one: an absent map is created by the
    /// write, which would replace one that exists).
    pub fn object(&self) -> FleetProplet {
        let labels: BTreeMap<String, String> = [
            (SHARD_LABEL, self.shard.as_deref()),
            (DRAIN_LABEL, self.drain.as_deref()),
            (DRAIN_READY_LABEL, self.drain_ready.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.to_string())))
        .collect();
        FleetProplet {
            metadata: ObjectMeta {
                name: Some(self.name.to_string()),
                namespace: Some(self.namespace.to_string()),
                resource_version: self.resource_version.as_ref().map(Version::text),
                labels: self.labelled.then_some(labels),
                ..ObjectMeta::default()
            },
            spec: Spec::default(),
        }
    }

    /// Whether the plan reads anything different in `other` (the resourceVersion aside).
    pub fn plans_like(&self, other: &Placed) -> bool {
        fn inputs(p: &Placed) -> impl PartialEq + '_ {
            (
                (&p.name, &p.namespace, &p.key, &p.channel),
                (&p.shard, &p.drain, &p.drain_ready),
                (p.labelled, p.deleting),
            )
        }
        inputs(self) == inputs(other)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use kube::ResourceExt;

    use super::*;
    use crate::api::proplet::PropletSpec;

    #[test]
    fn a_resource_version_is_kept_as_a_number_only_when_it_reads_back_the_same() {
        for (text, revision) in [("0", Some(0)), ("81234", Some(81234)), ("007", None)]
            .into_iter()
            .chain([("+5", None), ("a1", None), ("", None)])
            .chain([("99999999999999999999999", None)])
        {
            let v = Version::of(text);
            assert_eq!(v.revision(), revision, "{text:?}");
            assert_eq!(v.text(), text, "written back as read");
        }
    }

    /// An external Proplet in namespace `ns`, with no labels.
    pub(crate) fn unlabelled(name: &str) -> Proplet {
        let spec: PropletSpec = serde_json::from_value(serde_json::json!({
            "type": "external",
            "connectionConfig": {"clientId": format!("client-{name}"), "domainId": "d", "channelId": "c", "mqttAddress": "tcp://m:1883"}
        }))
        .expect("spec");
        let mut p = Proplet::new(name, spec);
        p.metadata.namespace = Some("ns".into());
        p
    }

    fn proplet(name: &str, shard: &str) -> Proplet {
        let mut p = unlabelled(name);
        p.metadata.labels = Some([(SHARD_LABEL.to_string(), shard.to_string())].into());
        p
    }

    /// The Proplet as the leader parses it, from its JSON (status and all).
    pub(crate) fn wire(p: &Proplet) -> FleetProplet {
        serde_json::from_value(serde_json::to_value(p).expect("json")).expect("parses")
    }

    #[test]
    fn the_watch_reads_what_a_full_proplet_says() {
        let mut p = proplet("a", "shard-0");
        p.spec.connection_config.client_id = None;
        p.spec.connection_config.entity_id = Some("later-name".into());
        p.spec.connection_config.domain_id = None;
        p.spec.connection_config.tenant_id = Some("tenant".into());
        p.labels_mut()
            .insert(DRAIN_READY_LABEL.into(), "true".into());
        p.status = Some(Default::default());
        let placed = Placed::from_wire(&wire(&p));
        assert_eq!(placed, Placed::of(&p));
        assert_eq!(&*placed.key, "later-name");
        assert_eq!(placed.position(ShardBy::Channel), "tenant/c");
        assert_eq!(placed.position(ShardBy::ClientId), "later-name");
        assert_eq!(placed.drain_ready.as_deref(), Some("true"));
        let mut nameless = proplet("b", "s");
        nameless.spec.connection_config.client_id = None;
        assert_eq!(
            &*Placed::of(&nameless).key,
            "b",
            "no clientId yet: its name"
        );
    }

    #[test]
    fn the_watch_keeps_no_managed_fields_and_still_sees_a_deletion() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
        let mut p = proplet("a", "shard-0");
        p.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("propeller-operator".into()),
            ..Default::default()
        }]);
        p.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        p.metadata.uid = Some("uid-a".into());
        p.metadata.resource_version = Some("7".into());
        let parsed = wire(&p);
        assert_eq!(parsed.metadata.managed_fields, None);
        assert_eq!(parsed.metadata.uid.as_deref(), Some("uid-a"));
        assert_eq!(parsed.metadata.resource_version.as_deref(), Some("7"));
        let placed = Placed::from_wire(&parsed);
        assert!(placed.deleting);
        assert_eq!(placed, Placed::of(&p));
    }

    #[test]
    fn a_label_write_never_creates_a_labels_map_over_one_that_exists() {
        let mut p = proplet("a", "shard-0");
        p.labels_mut().insert("team".into(), "x".into());
        let meta = Placed::of(&p).object().metadata;
        assert_eq!(
            meta.labels,
            Some([(SHARD_LABEL.to_string(), "shard-0".to_string())].into())
        );
        // Whatever a label holds, the write that removes it sees it.
        p.labels_mut()
            .insert(DRAIN_READY_LABEL.into(), "yes".into());
        assert_eq!(
            Placed::of(&p)
                .object()
                .metadata
                .labels
                .and_then(|l| l.get(DRAIN_READY_LABEL).cloned())
                .as_deref(),
            Some("yes")
        );
        p.metadata.labels = None;
        assert_eq!(Placed::of(&p).object().metadata.labels, None);
        p.metadata.labels = Some(BTreeMap::new());
        assert_eq!(
            Placed::of(&p).object().metadata.labels,
            Some(BTreeMap::new())
        );
    }
}
