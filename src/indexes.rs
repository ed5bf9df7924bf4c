//! In-memory lookups the MQTT router needs (clientId → Proplet, UID → Task), kept up to date from the
//! watch streams. Built from what this replica watches, so they only ever hold its shard.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use crate::api::{Proplet, Task};
use crate::mqtt::topics::Channel;

#[derive(Clone, Default)]
pub struct PropletIndex {
    inner: Arc<RwLock<PropletMaps>>,
}

#[derive(Default)]
struct PropletMaps {
    /// Every Proplet claiming a clientId, the latest last (usually one; a discovered and a declared
    /// Proplet may share one for a moment). The last one answers [`PropletIndex::by_client`].
    by_client: HashMap<String, Vec<ObjectRef<Proplet>>>,
    channel_of: HashMap<ObjectRef<Proplet>, (String, Channel)>,
    /// How many Proplets use each channel: the subscription set without a scan of every Proplet.
    channels: BTreeMap<Channel, usize>,
    /// Counts changes of the set of channels (not of how many use each): the subscriptions need a look
    /// only when it moved, not on each of the status updates that make most events.
    channel_changes: u64,
    /// What a relist saw of each object (not the object: a copy of the whole shard), swapped in when it
    /// is done.
    relist: Option<Vec<Indexed>>,
}

/// What the index reads of a Proplet: its clientId and channel, when it has both.
type Indexed = (ObjectRef<Proplet>, Option<(String, Channel)>);

fn indexed(p: &Proplet) -> Indexed {
    let cc = &p.spec.connection_config;
    let wanted = match (cc.client(), cc.domain()) {
        (Some(client), Some(domain)) => {
            Some((client.to_string(), Channel::new(domain, &cc.channel_id)))
        }
        _ => None,
    };
    (ObjectRef::from_obj(p), wanted)
}

impl PropletMaps {
    fn insert(&mut self, (r, wanted): Indexed) {
        // Status updates (most events) change neither: nothing to do.
        if wanted.is_some() && self.channel_of.get(&r) == wanted.as_ref() {
            return;
        }
        self.remove(&r);
        if let Some((client, channel)) = wanted {
            self.by_client
                .entry(client.clone())
                .or_default()
                .push(r.clone());
            let users = self.channels.entry(channel.clone()).or_default();
            if *users == 0 {
                self.channel_changes += 1;
            }
            *users += 1;
            self.channel_of.insert(r, (client, channel));
        }
    }

    fn remove(&mut self, r: &ObjectRef<Proplet>) {
        let Some((client, channel)) = self.channel_of.remove(r) else {
            return;
        };
        if let Some(refs) = self.by_client.get_mut(&client) {
            refs.retain(|x| x != r);
            if refs.is_empty() {
                self.by_client.remove(&client);
            }
        }
        if let Some(n) = self.channels.get_mut(&channel) {
            *n -= 1;
            if *n == 0 {
                self.channels.remove(&channel);
                self.channel_changes += 1;
            }
        }
    }
}

impl PropletIndex {
    pub fn apply(&self, event: &watcher::Event<Proplet>) {
        let Ok(mut m) = self.inner.write() else {
            return;
        };
        match event {
            watcher::Event::Apply(p) => m.insert(indexed(p)),
            watcher::Event::Delete(p) => m.remove(&ObjectRef::from_obj(p)),
            watcher::Event::Init => m.relist = Some(Vec::new()),
            watcher::Event::InitApply(p) => {
                if let Some(buf) = m.relist.as_mut() {
                    buf.push(indexed(p));
                }
            }
            watcher::Event::InitDone => {
                let fresh = m.relist.take().unwrap_or_default();
                m.by_client.clear();
                m.channel_of.clear();
                m.channels.clear();
                for p in fresh {
                    m.insert(p);
                }
                m.channel_changes += 1;
            }
        }
    }

    /// The Proplet whose clientId this is.
    pub fn by_client(&self, client_id: &str) -> Option<ObjectRef<Proplet>> {
        self.inner
            .read()
            .ok()?
            .by_client
            .get(client_id)?
            .last()
            .cloned()
    }

    /// Every Proplet claiming this clientId.
    pub fn all_by_client(&self, client_id: &str) -> Vec<ObjectRef<Proplet>> {
        self.inner
            .read()
            .ok()
            .and_then(|m| m.by_client.get(client_id).cloned())
            .unwrap_or_default()
    }

    /// Changes whenever [`PropletIndex::channels`] may have.
    pub fn channel_changes(&self) -> u64 {
        self.inner.read().map(|m| m.channel_changes).unwrap_or(0)
    }

    /// Every (domain, channel) a Proplet uses.
    pub fn channels(&self) -> BTreeSet<Channel> {
        self.inner
            .read()
            .map(|m| m.channels.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[derive(Clone, Default)]
pub struct TaskIndex {
    inner: Arc<RwLock<TaskMaps>>,
}

#[derive(Default)]
struct TaskMaps {
    by_uid: HashMap<String, ObjectRef<Task>>,
    relist: Option<Vec<(String, ObjectRef<Task>)>>,
}

impl TaskIndex {
    pub fn apply(&self, event: &watcher::Event<Task>) {
        let Ok(mut m) = self.inner.write() else {
            return;
        };
        let entry = |t: &Task| t.uid().map(|uid| (uid, ObjectRef::from_obj(t)));
        match event {
            watcher::Event::Apply(t) => {
                if let Some((uid, r)) = entry(t) {
                    m.by_uid.insert(uid, r);
                }
            }
            watcher::Event::Delete(t) => {
                if let Some(uid) = t.uid() {
                    m.by_uid.remove(&uid);
                }
            }
            watcher::Event::Init => m.relist = Some(Vec::new()),
            watcher::Event::InitApply(t) => {
                if let (Some(buf), Some(e)) = (m.relist.as_mut(), entry(t)) {
                    buf.push(e);
                }
            }
            watcher::Event::InitDone => {
                let fresh = m.relist.take().unwrap_or_default();
                m.by_uid = fresh.into_iter().collect();
            }
        }
    }

    pub fn by_uid(&self, uid: &str) -> Option<ObjectRef<Task>> {
        self.inner.read().ok()?.by_uid.get(uid).cloned()
    }
}

/// The channels each broadcast this replica holds was sent to. Results come back on the targets'
/// channels, and a shard hears a channel only while it subscribes to it: a shard's broadcast reaches
/// proplets of other shards, so their channels are subscribed to for as long as the broadcast runs.
pub struct BroadcastChannels {
    by_task: std::sync::Mutex<HashMap<String, BTreeSet<Channel>>>,
    /// Woken on every change: the subscriptions follow.
    changed: Arc<tokio::sync::Notify>,
}

impl BroadcastChannels {
    /// Tells `resubscribe` of every change.
    pub fn new(resubscribe: Arc<tokio::sync::Notify>) -> Self {
        BroadcastChannels {
            by_task: Default::default(),
            changed: resubscribe,
        }
    }

    pub fn get(&self, uid: &str) -> Option<BTreeSet<Channel>> {
        self.by_task.lock().ok()?.get(uid).cloned()
    }

    /// Records `channels` for task `uid` (the subscriptions are recomputed when they changed).
    pub fn set(&self, uid: &str, channels: BTreeSet<Channel>) {
        let changed = self.by_task.lock().is_ok_and(|mut m| {
            m.insert(uid.to_string(), channels.clone()).as_ref() != Some(&channels)
        });
        if changed {
            self.changed.notify_one();
        }
    }

    /// The broadcast ended or went away: its channels are no longer needed for it.
    pub fn forget(&self, uid: &str) {
        if self
            .by_task
            .lock()
            .is_ok_and(|mut m| m.remove(uid).is_some())
        {
            self.changed.notify_one();
        }
    }

    /// Every channel some running broadcast needs.
    pub fn all(&self) -> BTreeSet<Channel> {
        self.by_task
            .lock()
            .map(|m| m.values().flatten().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn proplet(name: &str, client: &str) -> Proplet {
        serde_json::from_value(json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Proplet",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"type": "external", "external": {},
                     "connectionConfig": {"domainId": "d", "channelId": "c", "clientId": client,
                                          "clientKey": "k", "mqttAddress": "tcp://b:1883"}},
        }))
        .expect("proplet")
    }

    #[test]
    fn a_client_claimed_twice_survives_the_removal_of_one_claim() {
        let index = PropletIndex::default();
        let declared = proplet("declared", "c-1");
        let discovered = proplet("discovered-c-1", "c-1");
        index.apply(&watcher::Event::Apply(declared.clone()));
        index.apply(&watcher::Event::Apply(discovered.clone()));
        index.apply(&watcher::Event::Delete(discovered));
        assert_eq!(
            index.by_client("c-1").map(|r| r.name),
            Some("declared".to_string())
        );
        index.apply(&watcher::Event::Delete(declared));
        assert!(index.by_client("c-1").is_none());
        assert_eq!(index.channels().len(), 0);
    }
}
