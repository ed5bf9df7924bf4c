//! The leader's view of the fleet for placement: a [`Placed`] per Proplet, kept without hearing every
//! Proplet's every status refresh.
//!
//! A watch of the whole fleet brought the leader every `lastSeen` refresh of every Proplet (a third more
//! watch events than a single replica, which made it the heaviest shard at 10,000 proplets). Placement
//! acts only on Proplets with no shard and on those moving; the rest only weigh on the ring's bounded load
//! and move when the ring changes. So the view is kept from:
//! - a paged list of the whole fleet, when the replica starts leading and every [`super::sharder`]
//!   full-list period (what no watch below sees: deletions and clientId edits of settled Proplets);
//! - two label-selected watches ([`Narrow`]): Proplets with no shard label, and Proplets with a drain label;
//! - the leader's own label writes (the API server's answer to each).
//!
//! A Proplet leaving a selected watch (assigned, handed over, deleted) arrives as a deletion carrying its
//! previous content: the view cannot tell which, so it reads that Proplet again before the next plan
//! ([`Fleet::unsure`]), unless the deletion is the leader's own write, whose answer it already holds.
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;
use kube::runtime::watcher::Event;

use super::fleet::{FleetProplet, Placed, Version};
use crate::sharding::{DRAIN_LABEL, SHARD_LABEL};

/// namespace, name (the texts of the Proplet's [`Placed`], shared).
pub type Key = (Arc<str>, Arc<str>);

pub fn key_of(p: &Placed) -> Key {
    (Arc::clone(&p.namespace), Arc::clone(&p.name))
}

/// The label-selected watches the view hears between full lists: the Proplets placement acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narrow {
    /// No shard label: never assigned, or unlabelled by hand.
    Unassigned,
    /// A drain label: moving between live shards.
    Draining,
}

impl Narrow {
    pub const ALL: [Narrow; 2] = [Narrow::Unassigned, Narrow::Draining];

    pub fn selector(self) -> String {
        match self {
            Narrow::Unassigned => format!("!{SHARD_LABEL}"),
            Narrow::Draining => DRAIN_LABEL.to_string(),
        }
    }

    fn holds(self, p: &Placed) -> bool {
        match self {
            Narrow::Unassigned => p.shard.is_none(),
            Narrow::Draining => p.drain.is_some(),
        }
    }

    fn index(self) -> usize {
        match self {
            Narrow::Unassigned => 0,
            Narrow::Draining => 1,
        }
    }
}

/// The revision of a resourceVersion, to tell which of two copies is newer. Kubernetes calls them opaque;
/// every API server stores etcd revisions in them. One that is no number is taken as newest.
fn revision(v: Option<&Version>) -> Option<u64> {
    v.and_then(Version::revision)
}

/// The same for a resourceVersion as the API server sends it (a list's).
fn text_revision(rv: Option<&str>) -> Option<u64> {
    rv.and_then(|v| v.parse().ok())
}

/// Whether `a` is known to be older than `b`.
fn older(a: Option<u64>, b: Option<u64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a < b)
}

/// A Proplet in the view, with the full list that last found it. Found by its own namespace and name: the
/// table holds no key beside it (a map's copy of the key was two thirds of each of its slots, and a table
/// has up to twice as many slots as Proplets).
struct Entry {
    placed: Arc<Placed>,
    list: u64,
}

/// The view's Proplets by namespace and name.
#[derive(Default)]
struct Proplets {
    table: HashTable<Entry>,
    hasher: RandomState,
}

impl Proplets {
    fn hash(&self, namespace: &str, name: &str) -> u64 {
        self.hasher.hash_one((namespace, name))
    }

    fn get(&self, key: &Key) -> Option<&Entry> {
        let hash = self.hash(&key.0, &key.1);
        self.table.find(hash, |e| is(e, key))
    }

    fn get_mut(&mut self, key: &Key) -> Option<&mut Entry> {
        let hash = self.hash(&key.0, &key.1);
        self.table.find_mut(hash, |e| is(e, key))
    }

    fn insert(&mut self, entry: Entry) {
        let hash = self.hash(&entry.placed.namespace, &entry.placed.name);
        let hasher = &self.hasher;
        self.table.insert_unique(hash, entry, |e| {
            hasher.hash_one((&*e.placed.namespace, &*e.placed.name))
        });
    }

    fn remove(&mut self, key: &Key) {
        let hash = self.hash(&key.0, &key.1);
        if let Ok(found) = self.table.find_entry(hash, |e| is(e, key)) {
            found.remove();
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.table.iter()
    }

    fn retain(&mut self, keep: impl FnMut(&mut Entry) -> bool) {
        self.table.retain(keep);
    }
}

fn is(e: &Entry, key: &Key) -> bool {
    *e.placed.namespace == *key.0 && *e.placed.name == *key.1
}

#[derive(Default)]
pub struct Fleet {
    proplets: Proplets,
    /// The full list under way (or the last one): its pages mark what they find, in place, so that a list
    /// never holds a second copy of the fleet beside the view.
    list: u64,
    /// The texts many Proplets share (namespaces, shards, channels), held once.
    shared: HashSet<Arc<str>>,
    /// Proplets whose state the view cannot tell (they left a selected watch), with the resourceVersion
    /// at which they did: read again before the next plan.
    unsure: HashMap<Key, Option<Version>>,
    /// During a selected watch's relist: the Proplets it holds so far.
    relisting: [Option<HashSet<Key>>; 2],
}

impl Fleet {
    /// Takes a newer copy of a Proplet; true when something the plan reads changed.
    fn take(&mut self, now: Placed) -> bool {
        self.take_listed(now, None)
    }

    /// [`Fleet::take`], marking the Proplet as found by the list `list` (even when the view's copy is
    /// newer: it exists).
    fn take_listed(&mut self, mut now: Placed, list: Option<u64>) -> bool {
        self.share(&mut now);
        // A Proplet already held keeps the name its first copy holds.
        if let Some(was) = self.proplets.get(&key_of(&now)) {
            let name = &was.placed.name;
            if now.key == now.name {
                now.key = Arc::clone(name);
            }
            now.name = Arc::clone(name);
        }
        let key = key_of(&now);
        let now_revision = revision(now.resource_version.as_ref());
        if self
            .unsure
            .get(&key)
            .is_some_and(|at| !older(now_revision, revision(at.as_ref())))
        {
            self.unsure.remove(&key);
        }
        match self.proplets.get_mut(&key) {
            Some(was) if older(now_revision, revision(was.placed.resource_version.as_ref())) => {
                if let Some(l) = list {
                    was.list = l;
                }
                false
            }
            Some(was) => {
                let changed = !was.placed.plans_like(&now);
                was.placed = Arc::new(now);
                if let Some(l) = list {
                    was.list = l;
                }
                changed
            }
            None => {
                self.proplets.insert(Entry {
                    placed: Arc::new(now),
                    list: list.unwrap_or(0),
                });
                true
            }
        }
    }

    /// One event of a selected watch; true when something the plan reads changed (or may have).
    pub fn heard(&mut self, from: Narrow, ev: Event<FleetProplet>) -> bool {
        match ev {
            Event::Apply(p) => self.take(Placed::from_wire(&p)),
            Event::InitApply(p) => {
                let now = Placed::from_wire(&p);
                if let Some(seen) = self.relisting[from.index()].as_mut() {
                    seen.insert(key_of(&now));
                }
                self.take(now)
            }
            Event::Delete(p) => {
                let gone = Placed::from_wire(&p);
                let key = key_of(&gone);
                let known = self.proplets.get(&key).map(|e| &e.placed);
                // The leader's own write, whose answer is already here.
                if known.is_some_and(|k| {
                    k.resource_version.is_some() && k.resource_version == gone.resource_version
                }) {
                    return false;
                }
                self.unsure.insert(key, gone.resource_version);
                true
            }
            Event::Init => {
                self.relisting[from.index()] = Some(HashSet::new());
                false
            }
            Event::InitDone => {
                // What left the selection while the watch was away is in no event of the relist.
                if let Some(seen) = self.relisting[from.index()].take() {
                    for e in self.proplets.iter() {
                        let key = key_of(&e.placed);
                        if from.holds(&e.placed) && !seen.contains(&key) {
                            self.unsure.entry(key).or_insert(None);
                        }
                    }
                }
                true
            }
        }
    }

    /// Replaces the texts of `p` that other Proplets share by the copy already held.
    fn share(&mut self, p: &mut Placed) {
        let texts = [
            Some(&mut p.namespace),
            p.shard.as_mut(),
            p.drain.as_mut(),
            p.channel.as_mut(),
            p.drain_ready.as_mut(),
        ];
        for text in texts.into_iter().flatten() {
            match self.shared.get(&**text) {
                Some(held) => *text = Arc::clone(held),
                None => {
                    self.shared.insert(Arc::clone(text));
                }
            }
        }
    }

    /// A full list of the fleet begins; its pages follow ([`Fleet::listed_page`]), then
    /// [`Fleet::list_done`]. Until then the view goes on as it was (a list that fails half-way only
    /// brought newer copies).
    pub fn list_started(&mut self) {
        self.list += 1;
    }

    /// One page of the list under way.
    pub fn listed_page(&mut self, items: impl IntoIterator<Item = Placed>) {
        for now in items {
            self.take_listed(now, Some(self.list));
        }
    }

    /// The list under way is complete, read at resourceVersion `at`: what it did not find was deleted
    /// before it, unless the view heard of it after it (created since).
    pub fn list_done(&mut self, at: Option<&str>) {
        let list = self.list;
        let at = text_revision(at);
        self.proplets
            .retain(|e| e.list == list || older(at, revision(e.placed.resource_version.as_ref())));
        // A doubt from before the list is settled by it.
        self.unsure
            .retain(|_, since| since.is_none() || older(at, revision(since.as_ref())));
        // Texts no Proplet holds any more (a channel or namespace emptied, a shard gone).
        self.shared.retain(|t| Arc::strong_count(t) > 1);
    }

    /// A whole list at once.
    #[cfg(test)]
    fn listed(&mut self, items: Vec<Placed>, at: Option<&str>) {
        self.list_started();
        self.listed_page(items);
        self.list_done(at);
    }

    /// The API server's answer to one of the leader's writes.
    pub fn wrote(&mut self, p: Placed) -> bool {
        self.take(p)
    }

    /// A Proplet whose copy here may be stale (a guarded write found it changed).
    pub fn doubt(&mut self, key: Key) {
        self.unsure.entry(key).or_insert(None);
    }

    /// The Proplets to read again before the next plan.
    pub fn unsure(&self) -> Vec<Key> {
        self.unsure.keys().cloned().collect()
    }

    /// What reading one again found (`None`: it is gone).
    pub fn checked(&mut self, key: &Key, now: Option<&FleetProplet>) {
        self.unsure.remove(key);
        match now {
            Some(p) => {
                self.take(Placed::from_wire(p));
            }
            None => {
                self.proplets.remove(key);
            }
        }
    }

    /// Each Proplet's owner by its key (clientId): the Proplets with a shard label.
    pub fn owners(&self) -> HashMap<Arc<str>, Arc<str>> {
        self.proplets
            .iter()
            .filter_map(|e| Some((Arc::clone(&e.placed.key), e.placed.shard.clone()?)))
            .collect()
    }

    pub fn snapshot(&self) -> Vec<Arc<Placed>> {
        self.proplets
            .iter()
            .map(|e| Arc::clone(&e.placed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kube::ResourceExt;

    use super::*;
    use crate::controllers::sharding::fleet::tests::{unlabelled, wire};

    fn proplet(name: &str, rv: u64, labels: &[(&str, &str)]) -> FleetProplet {
        let mut p = unlabelled(name);
        p.metadata.resource_version = Some(rv.to_string());
        for (k, v) in labels {
            p.labels_mut().insert(k.to_string(), v.to_string());
        }
        wire(&p)
    }

    fn placed(items: Vec<FleetProplet>) -> Vec<Placed> {
        items.iter().map(Placed::from_wire).collect()
    }

    /// A full list of `proplets` (name, resourceVersion), all on `shard`, read at `at`.
    fn list_on(fleet: &mut Fleet, shard: &str, proplets: &[(&str, u64)], at: &str) {
        let items = proplets
            .iter()
            .map(|(name, rv)| proplet(name, *rv, &[(SHARD_LABEL, shard)]))
            .collect();
        fleet.listed(placed(items), Some(at));
    }

    fn key(name: &str) -> Key {
        ("ns".into(), name.into())
    }

    /// The names in the view, sorted.
    fn names(fleet: &Fleet) -> Vec<String> {
        let mut names: Vec<_> = fleet
            .snapshot()
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        names.sort();
        names
    }

    fn shard_of(fleet: &Fleet, name: &str) -> Option<String> {
        fleet
            .snapshot()
            .into_iter()
            .find(|p| &*p.name == name)
            .and_then(|p| p.shard.as_deref().map(str::to_string))
    }

    #[test]
    fn a_new_proplet_assigned_by_the_leader_needs_no_second_read() {
        let mut fleet = Fleet::default();
        fleet.listed(
            placed(vec![proplet("settled", 3, &[(SHARD_LABEL, "a")])]),
            Some("5"),
        );
        assert!(fleet.heard(Narrow::Unassigned, Event::Apply(proplet("new", 6, &[]))));
        // The answer to the leader's label write, then the watch's deletion (the old content, the write's
        // version): the view already knows.
        assert!(fleet.wrote(Placed::from_wire(&proplet("new", 7, &[(SHARD_LABEL, "b")]))));
        assert!(!fleet.heard(Narrow::Unassigned, Event::Delete(proplet("new", 7, &[]))));
        assert!(fleet.unsure().is_empty());
        assert_eq!(shard_of(&fleet, "new").as_deref(), Some("b"));
        // The same two the other way round: the doubt the deletion raises is settled by the answer.
        fleet.heard(Narrow::Unassigned, Event::Apply(proplet("other", 8, &[])));
        assert!(fleet.heard(Narrow::Unassigned, Event::Delete(proplet("other", 9, &[]))));
        assert_eq!(fleet.unsure(), vec![key("other")]);
        fleet.wrote(Placed::from_wire(&proplet(
            "other",
            9,
            &[(SHARD_LABEL, "a")],
        )));
        assert!(fleet.unsure().is_empty());
        assert_eq!(fleet.snapshot().len(), 3);
    }

    #[test]
    fn leaving_a_watch_for_another_reason_is_read_again() {
        let mut fleet = Fleet::default();
        let draining = [(SHARD_LABEL, "a"), (DRAIN_LABEL, "b")];
        fleet.listed(placed(vec![proplet("p", 3, &draining)]), Some("3"));
        // Handed over by its old owner (or deleted): the deletion says neither.
        assert!(fleet.heard(Narrow::Draining, Event::Delete(proplet("p", 9, &draining))));
        assert_eq!(fleet.unsure(), vec![key("p")]);
        fleet.checked(&key("p"), Some(&proplet("p", 9, &[(SHARD_LABEL, "b")])));
        assert!(fleet.unsure().is_empty());
        assert_eq!(shard_of(&fleet, "p").as_deref(), Some("b"));
        fleet.heard(Narrow::Draining, Event::Delete(proplet("p", 12, &draining)));
        fleet.checked(&key("p"), None);
        assert!(fleet.snapshot().is_empty(), "gone");
    }

    #[test]
    fn an_older_copy_never_replaces_a_newer_one() {
        let mut fleet = Fleet::default();
        fleet.wrote(Placed::from_wire(&proplet("p", 10, &[(SHARD_LABEL, "b")])));
        assert!(!fleet.heard(Narrow::Unassigned, Event::Apply(proplet("p", 9, &[]))));
        assert_eq!(shard_of(&fleet, "p").as_deref(), Some("b"));
        // A list read before the write does not undo it either.
        fleet.listed(placed(vec![proplet("p", 8, &[])]), Some("8"));
        assert_eq!(shard_of(&fleet, "p").as_deref(), Some("b"));
    }

    #[test]
    fn a_list_forgets_what_was_deleted_before_it_and_keeps_what_came_after() {
        let mut fleet = Fleet::default();
        list_on(&mut fleet, "a", &[("deleted", 2), ("stays", 3)], "3");
        fleet.heard(Narrow::Unassigned, Event::Apply(proplet("newer", 20, &[])));
        fleet.heard(Narrow::Unassigned, Event::Delete(proplet("early", 5, &[])));
        fleet.heard(Narrow::Unassigned, Event::Delete(proplet("late", 25, &[])));
        list_on(&mut fleet, "a", &[("stays", 4)], "10");
        let names = names(&fleet);
        assert_eq!(names, ["newer", "stays"]);
        assert_eq!(
            fleet.unsure(),
            vec![key("late")],
            "a doubt raised after the list stays"
        );
    }

    #[test]
    fn a_list_in_pages_meets_what_is_heard_between_them() {
        let mut fleet = Fleet::default();
        list_on(
            &mut fleet,
            "a",
            &[("first", 2), ("second", 3), ("deleted", 4)],
            "4",
        );
        fleet.list_started();
        fleet.listed_page(placed(vec![proplet("first", 2, &[(SHARD_LABEL, "a")])]));
        // Between two pages: a write newer than the list, and a Proplet created after it.
        fleet.wrote(Placed::from_wire(&proplet(
            "second",
            12,
            &[(SHARD_LABEL, "b")],
        )));
        fleet.heard(
            Narrow::Unassigned,
            Event::Apply(proplet("created", 13, &[])),
        );
        fleet.listed_page(placed(vec![proplet("second", 3, &[(SHARD_LABEL, "a")])]));
        fleet.list_done(Some("10"));
        let names = names(&fleet);
        assert_eq!(
            names,
            ["created", "first", "second"],
            "only the deleted one goes"
        );
        assert_eq!(
            shard_of(&fleet, "second").as_deref(),
            Some("b"),
            "the page's older copy does not undo the write"
        );
        // A list that fails half-way leaves the view as it was.
        fleet.list_started();
        fleet.listed_page(placed(vec![proplet("first", 14, &[(SHARD_LABEL, "c")])]));
        assert_eq!(fleet.snapshot().len(), 3);
        assert_eq!(shard_of(&fleet, "first").as_deref(), Some("c"));
    }

    #[test]
    fn proplets_share_their_namespace_shard_and_channel_texts() {
        let mut fleet = Fleet::default();
        list_on(&mut fleet, "s", &[("a", 2), ("b", 3)], "3");
        let all = fleet.snapshot();
        let (a, b) = (&all[0], &all[1]);
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        assert!(Arc::ptr_eq(
            a.shard.as_ref().expect("labelled"),
            b.shard.as_ref().expect("labelled")
        ));
        assert!(Arc::ptr_eq(
            a.channel.as_ref().expect("a channel"),
            b.channel.as_ref().expect("a channel")
        ));
        drop(all);
        // Moved to another shard: "s" is held by no Proplet and forgotten at the next list.
        list_on(&mut fleet, "t", &[("a", 4), ("b", 5)], "5");
        assert!(!fleet.shared.contains("s"));
        assert!(fleet.shared.contains("t"));
        // Newer copies keep the name their first copy held.
        let names: Vec<Arc<str>> = fleet
            .snapshot()
            .iter()
            .map(|p| Arc::clone(&p.name))
            .collect();
        list_on(&mut fleet, "t", &[("a", 6), ("b", 7)], "7");
        for (was, now) in names.iter().zip(fleet.snapshot().iter()) {
            assert!(Arc::ptr_eq(was, &now.name));
        }
    }

    #[test]
    fn a_relisted_watch_doubts_what_left_it_while_away() {
        let mut fleet = Fleet::default();
        fleet.heard(Narrow::Unassigned, Event::Apply(proplet("a", 2, &[])));
        fleet.heard(Narrow::Unassigned, Event::Apply(proplet("b", 3, &[])));
        fleet.wrote(Placed::from_wire(&proplet("c", 4, &[(SHARD_LABEL, "x")])));
        assert!(!fleet.heard(Narrow::Unassigned, Event::Init));
        fleet.heard(Narrow::Unassigned, Event::InitApply(proplet("a", 2, &[])));
        // The other watch's relist does not count.
        fleet.heard(Narrow::Draining, Event::Init);
        fleet.heard(Narrow::Draining, Event::InitDone);
        assert!(fleet.unsure().is_empty());
        assert!(fleet.heard(Narrow::Unassigned, Event::InitDone));
        assert_eq!(
            fleet.unsure(),
            vec![key("b")],
            "c is assigned: not this watch's"
        );
    }

    #[test]
    fn only_what_the_plan_reads_counts_as_a_change() {
        let mut fleet = Fleet::default();
        let draining = [(SHARD_LABEL, "a"), (DRAIN_LABEL, "b")];
        assert!(fleet.heard(Narrow::Draining, Event::Apply(proplet("p", 2, &draining))));
        // A status refresh: only its resourceVersion differs in what the view parses.
        assert!(!fleet.heard(Narrow::Draining, Event::Apply(proplet("p", 3, &draining))));
        assert_eq!(
            fleet.snapshot()[0].resource_version,
            Some(Version::Revision(3)),
            "the newest version is kept for guarded writes"
        );
        let ready = [
            (SHARD_LABEL, "a"),
            (DRAIN_LABEL, "b"),
            (crate::sharding::DRAIN_READY_LABEL, "true"),
        ];
        assert!(fleet.heard(Narrow::Draining, Event::Apply(proplet("p", 4, &ready))));
    }

    #[test]
    fn a_refused_write_is_read_again() {
        let mut fleet = Fleet::default();
        fleet.listed(
            placed(vec![proplet("p", 3, &[(SHARD_LABEL, "a")])]),
            Some("3"),
        );
        fleet.doubt(key("p"));
        assert_eq!(fleet.unsure(), vec![key("p")]);
        fleet.checked(&key("p"), Some(&proplet("p", 3, &[(SHARD_LABEL, "a")])));
        assert!(fleet.unsure().is_empty());
        assert_eq!(fleet.snapshot().len(), 1);
    }
}
