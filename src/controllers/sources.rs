//! One cache filled by several watches: the primary one (a shard's own, label-selected) and extra ones
//! started and stopped while the operator runs (a dead shard's objects, taken over before they are
//! relabelled). kube's cache takes a whole relist at once, which would drop every other source's objects:
//! [`Merge`] turns the extra sources' lists into single changes, puts their objects back into each relist of
//! the primary watch, and deletes an object only when no source holds it any more.
use std::collections::{HashMap, HashSet};

use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::Event;

/// Where an event came from: the primary watch (`None`) or the named extra source.
pub type Source = Option<String>;

/// Starts or stops an extra source of a watch.
#[derive(Clone, Debug)]
pub enum Change {
    /// Watch what this selector selects, under this name, until it is stopped.
    Start {
        name: String,
        selector: String,
    },
    Stop {
        name: String,
    },
    /// Tell every listener again of what this source holds (what it may mean has changed: a fenced
    /// shard's objects, listed as no one's, are taken over).
    Replay {
        name: String,
    },
}

/// What a cache of several sources can hold: any cluster-scoped or namespaced kind.
pub trait Cached: Resource<DynamicType = ()> + Clone + Send + Sync + 'static {}

impl<K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static> Cached for K {}

/// What each source holds, to turn every source's events into events for the one cache.
pub struct Merge<K: Cached> {
    /// What the primary watch selects (checked on an object, not asked of the API server): an object an
    /// extra source lets go of that the primary one selects has moved to it, and is no deletion.
    in_primary: Box<dyn Fn(&K) -> bool + Send + Sync>,
    cache: Store<K>,
    /// The primary watch's relist in progress: what it has listed so far.
    primary_relist: Option<HashSet<ObjectRef<K>>>,
    extra: HashMap<String, HashMap<ObjectRef<K>, K>>,
    extra_relist: HashMap<String, HashSet<ObjectRef<K>>>,
}

impl<K: Cached> Merge<K> {
    pub fn new(cache: Store<K>, in_primary: impl Fn(&K) -> bool + Send + Sync + 'static) -> Self {
        Merge {
            in_primary: Box::new(in_primary),
            cache,
            primary_relist: None,
            extra: HashMap::new(),
            extra_relist: HashMap::new(),
        }
    }

    /// Whether any extra source holds something.
    pub fn is_empty(&self) -> bool {
        self.extra.values().all(HashMap::is_empty)
    }

    /// The events for the cache that `ev` from `source` makes.
    pub fn event(&mut self, source: &Source, ev: Event<K>) -> Vec<Event<K>> {
        match source {
            None => self.primary(ev),
            Some(name) => self.extra(name, ev),
        }
    }

    /// Forgets an extra source: what only it held is deleted.
    pub fn stop(&mut self, name: &str) -> Vec<Event<K>> {
        self.extra_relist.remove(name);
        let held = self.extra.remove(name).unwrap_or_default();
        held.into_iter()
            .filter_map(|(r, obj)| self.released(r, obj))
            .collect()
    }

    /// What an extra source holds, as the cache has it, again (not what the primary watch holds).
    pub fn replay(&self, name: &str) -> Vec<Event<K>> {
        self.extra
            .get(name)
            .into_iter()
            .flat_map(HashMap::keys)
            .filter(|r| !self.in_primary_cache(r))
            .filter_map(|r| self.cache.get(r))
            .map(|obj| Event::Apply((*obj).clone()))
            .collect()
    }

    fn primary(&mut self, ev: Event<K>) -> Vec<Event<K>> {
        match ev {
            Event::Init => {
                self.primary_relist = Some(HashSet::new());
                vec![Event::Init]
            }
            Event::InitApply(obj) => {
                if let Some(listed) = self.primary_relist.as_mut() {
                    listed.insert(ObjectRef::from_obj(&obj));
                }
                vec![Event::InitApply(obj)]
            }
            Event::InitDone => {
                // The cache takes the list as a whole: what the extra sources hold goes in with it.
                let listed = self.primary_relist.take().unwrap_or_default();
                let mut added = HashSet::new();
                let mut out: Vec<Event<K>> = self
                    .extra
                    .values()
                    .flat_map(|held| held.iter())
                    .filter(|(r, _)| !listed.contains(*r) && added.insert((*r).clone()))
                    .map(|(_, obj)| Event::InitApply(obj.clone()))
                    .collect();
                out.push(Event::InitDone);
                out
            }
            Event::Apply(obj) => vec![Event::Apply(obj)],
            Event::Delete(obj) => {
                let r = ObjectRef::from_obj(&obj);
                match self.held_by_extra(&r) {
                    Some(other) => vec![Event::Apply(other)],
                    None => vec![Event::Delete(obj)],
                }
            }
        }
    }

    fn extra(&mut self, name: &str, ev: Event<K>) -> Vec<Event<K>> {
        match ev {
            Event::Init => {
                self.extra_relist.insert(name.to_string(), HashSet::new());
                Vec::new()
            }
            Event::InitApply(obj) => {
                if let Some(listed) = self.extra_relist.get_mut(name) {
                    listed.insert(ObjectRef::from_obj(&obj));
                }
                self.held(name, obj)
            }
            Event::InitDone => {
                let listed = self.extra_relist.remove(name).unwrap_or_default();
                tracing::info!(
                    source = name,
                    objects = listed.len(),
                    "an extra watch listed"
                );
                let gone: Vec<(ObjectRef<K>, K)> = self
                    .extra
                    .get_mut(name)
                    .map(|held| {
                        let gone: Vec<ObjectRef<K>> = held
                            .keys()
                            .filter(|r| !listed.contains(*r))
                            .cloned()
                            .collect();
                        gone.into_iter()
                            .filter_map(|r| held.remove(&r).map(|o| (r, o)))
                            .collect()
                    })
                    .unwrap_or_default();
                gone.into_iter()
                    .filter_map(|(r, obj)| self.released(r, obj))
                    .collect()
            }
            Event::Apply(obj) => self.held(name, obj),
            Event::Delete(obj) => {
                let r = ObjectRef::from_obj(&obj);
                if let Some(held) = self.extra.get_mut(name) {
                    held.remove(&r);
                }
                // A watch says "deleted" of an object that only left its selector, with its new state: one
                // the primary watch selects now has moved to us (its arrival there is on its way).
                if (self.in_primary)(&obj) {
                    return vec![Event::Apply(obj)];
                }
                self.released(r, obj).into_iter().collect()
            }
        }
    }

    fn held(&mut self, name: &str, obj: K) -> Vec<Event<K>> {
        let r = ObjectRef::from_obj(&obj);
        self.extra
            .entry(name.to_string())
            .or_default()
            .insert(r.clone(), obj.clone());
        if self.in_primary_cache(&r) {
            return Vec::new();
        }
        vec![Event::Apply(obj)]
    }

    /// An object an extra source no longer holds: kept if another source holds it, else deleted.
    fn released(&self, r: ObjectRef<K>, obj: K) -> Option<Event<K>> {
        if self.in_primary_cache(&r) {
            return None;
        }
        Some(match self.held_by_extra(&r) {
            Some(other) => Event::Apply(other),
            None => Event::Delete(obj),
        })
    }

    fn in_primary_cache(&self, r: &ObjectRef<K>) -> bool {
        self.cache.get(r).is_some_and(|o| (self.in_primary)(&o))
    }

    fn held_by_extra(&self, r: &ObjectRef<K>) -> Option<K> {
        self.extra.values().find_map(|held| held.get(r).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector::store::Writer;

    fn cm(name: &str, shard: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([("shard".to_string(), shard.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    struct Cache {
        writer: Writer<ConfigMap>,
        merge: Merge<ConfigMap>,
    }

    impl Cache {
        fn new() -> Cache {
            let writer = Writer::default();
            let merge = Merge::new(writer.as_reader(), |o: &ConfigMap| {
                o.metadata.labels.as_ref().and_then(|l| l.get("shard")) == Some(&"b".to_string())
            });
            Cache { writer, merge }
        }

        fn feed(&mut self, source: Option<&str>, ev: Event<ConfigMap>) -> usize {
            let out = self.merge.event(&source.map(str::to_string), ev);
            for e in &out {
                self.writer.apply_watcher_event(e);
            }
            out.len()
        }

        fn stop(&mut self, name: &str) {
            for e in self.merge.stop(name) {
                self.writer.apply_watcher_event(&e);
            }
        }

        fn names(&self) -> Vec<String> {
            let mut n: Vec<String> = self
                .writer
                .as_reader()
                .state()
                .iter()
                .map(|o| {
                    format!(
                        "{}:{}",
                        o.metadata.name.clone().unwrap_or_default(),
                        o.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get("shard"))
                            .cloned()
                            .unwrap_or_default()
                    )
                })
                .collect();
            n.sort();
            n
        }
    }

    fn list(c: &mut Cache, source: Option<&str>, objs: &[ConfigMap]) {
        c.feed(source, Event::Init);
        for o in objs {
            c.feed(source, Event::InitApply(o.clone()));
        }
        c.feed(source, Event::InitDone);
    }

    #[test]
    fn a_relist_of_the_primary_watch_keeps_what_extra_sources_hold() {
        let mut c = Cache::new();
        list(&mut c, None, &[cm("p1", "b")]);
        list(&mut c, Some("a"), &[cm("x1", "a"), cm("x2", "a")]);
        assert_eq!(c.names(), ["p1:b", "x1:a", "x2:a"]);
        list(&mut c, None, &[cm("p1", "b"), cm("p2", "b")]);
        assert_eq!(c.names(), ["p1:b", "p2:b", "x1:a", "x2:a"]);
        // An extra source's relist deletes what it no longer lists.
        list(&mut c, Some("a"), &[cm("x2", "a")]);
        assert_eq!(c.names(), ["p1:b", "p2:b", "x2:a"]);
        c.stop("a");
        assert_eq!(c.names(), ["p1:b", "p2:b"]);
        assert!(c.merge.is_empty());
    }

    #[test]
    fn a_replay_tells_again_of_what_only_the_extra_source_holds() {
        let mut c = Cache::new();
        list(&mut c, None, &[cm("p1", "b")]);
        list(&mut c, Some("a"), &[cm("x1", "a"), cm("x2", "a")]);
        // x2 relabelled to us: the primary watch has it, a replay does not tell of it again.
        c.feed(None, Event::Apply(cm("x2", "b")));
        let mut told: Vec<String> = c
            .merge
            .replay("a")
            .iter()
            .filter_map(|e| match e {
                Event::Apply(o) => o.metadata.name.clone(),
                _ => None,
            })
            .collect();
        told.sort();
        assert_eq!(told, ["x1"]);
        assert!(c.merge.replay("unknown").is_empty());
    }

    #[test]
    fn an_object_moving_from_an_extra_source_to_the_primary_one_is_never_deleted() {
        for primary_first in [true, false] {
            let mut c = Cache::new();
            list(&mut c, None, &[]);
            list(&mut c, Some("a"), &[cm("x1", "a")]);
            // Relabelled to us: the primary watch adds it, the extra one says "deleted" with its new state.
            let (arrive, leave) = (Event::Apply(cm("x1", "b")), Event::Delete(cm("x1", "b")));
            let order = if primary_first {
                [(None, arrive), (Some("a"), leave)]
            } else {
                [(Some("a"), leave), (None, arrive)]
            };
            for (source, ev) in order {
                c.feed(source, ev);
                assert_eq!(c.names(), ["x1:b"], "primary first: {primary_first}");
            }
            c.stop("a");
            assert_eq!(c.names(), ["x1:b"]);
        }
    }

    #[test]
    fn an_object_leaving_for_another_shard_is_deleted_unless_another_source_holds_it() {
        let mut c = Cache::new();
        list(&mut c, None, &[]);
        list(&mut c, Some("a"), &[cm("x1", "a"), cm("x2", "a")]);
        list(&mut c, Some("d"), &[cm("x2", "a")]);
        c.feed(Some("a"), Event::Delete(cm("x1", "c")));
        c.feed(Some("a"), Event::Delete(cm("x2", "c")));
        assert_eq!(c.names(), ["x2:a"], "x2 is still held by d");
        c.stop("d");
        assert!(c.names().is_empty());
        // The primary copy wins over an extra source's: an extra one's news of it changes nothing.
        list(&mut c, None, &[cm("p1", "b")]);
        assert_eq!(c.feed(Some("a"), Event::Apply(cm("p1", "a"))), 0);
        assert_eq!(c.names(), ["p1:b"]);
        c.feed(None, Event::Delete(cm("p1", "b")));
        assert_eq!(c.names(), ["p1:a"], "still held by the extra source");
    }
}
