//! In-memory lookups the MQTT router needs (clientId → Proplet, UID → Task), kept up to date from the
//! watch streams. Built from what this replica watches, so they only ever hold its shard.
use std::collections::{BTreeSet, HashMap};
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
    by_client: HashMap<String, ObjectRef<Proplet>>,
    channel_of: HashMap<ObjectRef<Proplet>, (String, Channel)>,
    /// Objects seen during a relist, swapped in when it is done.
    relist: Option<Vec<Proplet>>,
}

impl PropletMaps {
    fn insert(&mut self, p: &Proplet) {
        let r = ObjectRef::from_obj(p);
        self.remove(&r);
        let cc = &p.spec.connection_config;
        if let (Some(client), Some(domain)) = (cc.client(), cc.domain()) {
            self.by_client.insert(client.to_string(), r.clone());
            self.channel_of.insert(
                r,
                (client.to_string(), Channel::new(domain, &cc.channel_id)),
            );
        }
    }

    fn remove(&mut self, r: &ObjectRef<Proplet>) {
        if let Some((client, _)) = self.channel_of.remove(r)
            && self.by_client.get(&client) == Some(r)
        {
            // Another Proplet may claim the same clientId (e.g. a discovered one and a declared one).
            match self.channel_of.iter().find(|(_, (c, _))| c == &client) {
                Some((other, _)) => {
                    self.by_client.insert(client, other.clone());
                }
                None => {
                    self.by_client.remove(&client);
                }
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
            watcher::Event::Apply(p) => m.insert(p),
            watcher::Event::Delete(p) => m.remove(&ObjectRef::from_obj(p)),
            watcher::Event::Init => m.relist = Some(Vec::new()),
            watcher::Event::InitApply(p) => {
                if let Some(buf) = m.relist.as_mut() {
                    buf.push(p.clone());
                }
            }
            watcher::Event::InitDone => {
                let fresh = m.relist.take().unwrap_or_default();
                m.by_client.clear();
                m.channel_of.clear();
                for p in &fresh {
                    m.insert(p);
                }
            }
        }
    }

    /// The Proplet whose clientId this is.
    pub fn by_client(&self, client_id: &str) -> Option<ObjectRef<Proplet>> {
        self.inner.read().ok()?.by_client.get(client_id).cloned()
    }

    /// Every (domain, channel) a Proplet uses.
    pub fn channels(&self) -> BTreeSet<Channel> {
        self.inner
            .read()
            .map(|m| m.channel_of.values().map(|(_, c)| c.clone()).collect())
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
