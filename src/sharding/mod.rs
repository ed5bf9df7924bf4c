//! Which proplets this replica owns. Every controller and the MQTT router ask this one component. A single
//! replica owns everything; with `--leader-elect`, replicas are shards that each own the Proplets labelled
//! with their name (the leader's sharder writes the labels from the ring), and only while they hold their
//! shard Lease. See docs/sharding.md for the protocol.
pub mod lease;
pub mod members;
pub mod membership;
pub mod ring;
pub mod takeover;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::runtime::watcher;

use crate::api::proplet::Proplet;

/// The shard that owns a Proplet, or a Task.
pub const SHARD_LABEL: &str = "propeller.propeller.abstractmachines.fr/shard";
/// Set by the leader on a Proplet that moves between live shards: the shard it goes to.
pub const DRAIN_LABEL: &str = "propeller.propeller.abstractmachines.fr/drain-to";
/// Set by the shard a Proplet moves to, once it is subscribed to the Proplet's channel.
pub const DRAIN_READY_LABEL: &str = "propeller.propeller.abstractmachines.fr/drain-ready";
/// On shard Leases: the ring they belong to.
pub const RING_LABEL: &str = "propeller.propeller.abstractmachines.fr/ring";
pub const RING: &str = "propeller-operator";
/// On a Task: shards that claimed it and could not place it.
pub const PASSED_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/passed-by";

/// On a shard Lease: its replica is stopping gracefully and hands its proplets over before it lets go.
pub const LEAVING_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/leaving";

/// On a Task handed over between live shards: the attempt whose start the old shard had sent (the new
/// one need not send it again).
pub const START_SENT_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/start-sent";

/// The attempt whose start was sent before a handover, if the Task says so.
pub fn start_sent(obj: &impl ResourceExt) -> Option<i32> {
    obj.annotations()
        .get(START_SENT_ANNOTATION)
        .and_then(|a| a.parse().ok())
}

/// The shard Lease of a replica.
pub fn shard_lease_name(identity: &str) -> String {
    format!("propeller-shard-{identity}")
}

/// The replica a shard Lease belongs to.
pub fn shard_of_lease(name: &str) -> Option<&str> {
    name.strip_prefix("propeller-shard-")
}

fn label(obj: &impl ResourceExt, key: &str) -> Option<String> {
    obj.labels().get(key).cloned()
}

/// The shard named on an object.
pub fn shard_of(obj: &impl ResourceExt) -> Option<String> {
    label(obj, SHARD_LABEL)
}

/// The shard an object is moving to.
pub fn drain_of(obj: &impl ResourceExt) -> Option<String> {
    label(obj, DRAIN_LABEL)
}

#[derive(Clone, Debug, Default)]
pub struct Ownership {
    shard: Option<Arc<Shard>>,
}

#[derive(Debug)]
pub struct Shard {
    identity: String,
    renew_deadline: Duration,
    /// When our shard Lease was last renewed.
    renewed: Mutex<Option<Instant>>,
    leader: AtomicBool,
    /// clientId → keys of our Proplets with it that are not moving away.
    owned: RwLock<Owned>,
    /// Every shard with a Lease, with its state, sorted.
    states: RwLock<Vec<(String, members::State)>>,
    /// The ring of the members in `states`, built when they change (a ring of 1,000 virtual nodes per
    /// member is too dear to build per decision).
    ring: RwLock<Arc<ring::Ring>>,
    /// Fenced shards whose Lease records how their proplets are taken over.
    takeovers: RwLock<HashMap<String, takeover::Known>>,
    /// Shards silent for a renew deadline (they stopped acting) but not fenced yet: their objects are
    /// watched ahead of a takeover, as no one's.
    silent: RwLock<BTreeSet<String>>,
    /// Bumped whenever `states` changes: the leader's sharder acts on a change at once (a fenced shard's
    /// proplets move without waiting for the sharder's next period).
    changes: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Owned {
    by_client: HashMap<String, HashSet<String>>,
    /// Keys owned by takeover (still labelled with their fenced shard): the shard they came from.
    taken_from: HashMap<String, String>,
    /// The clientId of each owned Proplet (namespace/name): an event then costs a few lookups, not a pass
    /// over the whole shard (status refreshes bring dozens of events a second).
    client_of: HashMap<String, String>,
    /// When each owned clientId became ours: its heartbeats reach us only from then on.
    since: HashMap<String, Instant>,
    /// While the watch relists: what the new list holds so far.
    relisting: Option<HashMap<String, Claim>>,
}

/// Why a Proplet is ours: its clientId, and the fenced shard it is taken over from (None: its label).
type Claim = (String, Option<String>);

impl Owned {
    fn insert(&mut self, key: String, (client, from): Claim) {
        if self.client_of.get(&key) == Some(&client) && self.taken_from.get(&key) == from.as_ref() {
            return;
        }
        if self.client_of.get(&key) == Some(&client) {
            // Only the reason changed (its relabel to us arrived): it stays ours since it was.
            match from {
                Some(f) => self.taken_from.insert(key, f),
                None => self.taken_from.remove(&key),
            };
            return;
        }
        self.remove(&key);
        if let Some(f) = from {
            self.taken_from.insert(key.clone(), f);
        }
        let keys = self.by_client.entry(client.clone()).or_default();
        if keys.is_empty() {
            self.since.insert(client.clone(), Instant::now());
        }
        keys.insert(key.clone());
        self.client_of.insert(key, client);
    }

    fn remove(&mut self, key: &str) {
        self.taken_from.remove(key);
        let Some(client) = self.client_of.remove(key) else {
            return;
        };
        if let Some(keys) = self.by_client.get_mut(&client) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_client.remove(&client);
                self.since.remove(&client);
            }
        }
    }

    /// Replaces everything with a relisted set, keeping `since` of the clientIds still owned.
    fn replace(&mut self, claims: HashMap<String, Claim>) {
        let since = std::mem::take(&mut self.since);
        self.by_client.clear();
        self.client_of.clear();
        self.taken_from.clear();
        for (key, claim) in claims {
            self.insert(key, claim);
        }
        for (client, at) in since {
            if let Some(s) = self.since.get_mut(&client) {
                *s = at;
            }
        }
    }
}

impl Ownership {
    /// The single-replica owner of every proplet.
    pub fn single() -> Self {
        Ownership::default()
    }

    /// One shard of several: owns nothing until its Lease is held and Proplets are labelled for it.
    pub fn sharded(identity: &str, renew_deadline: Duration) -> Self {
        Ownership {
            shard: Some(Arc::new(Shard {
                identity: identity.to_string(),
                renew_deadline,
                renewed: Mutex::new(None),
                leader: AtomicBool::new(false),
                owned: RwLock::new(Owned::default()),
                states: RwLock::new(Vec::new()),
                ring: RwLock::new(Arc::new(ring::Ring::new(
                    Vec::<String>::new(),
                    ring::VIRTUAL_NODES,
                ))),
                takeovers: RwLock::new(HashMap::new()),
                silent: RwLock::new(BTreeSet::new()),
                changes: tokio::sync::watch::Sender::new(0),
            })),
        }
    }

    pub fn is_sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// This shard's name (None for a single replica).
    pub fn identity(&self) -> Option<&str> {
        self.shard.as_ref().map(|s| s.identity.as_str())
    }

    /// Whether this replica may publish and write for what it owns: always for a single replica; for a
    /// shard, only while its Lease was renewed within the renew deadline.
    pub fn may_act(&self) -> bool {
        match &self.shard {
            None => true,
            Some(s) => s
                .renewed
                .lock()
                .ok()
                .and_then(|r| *r)
                .is_some_and(|at| at.elapsed() < s.renew_deadline),
        }
    }

    /// Whether this replica handles the proplet with this clientId (and the tasks placed on it). One
    /// taken over from a fenced shard only while a recent list of the Leases showed it fenced.
    pub fn owns_client(&self, client_id: &str) -> bool {
        match &self.shard {
            None => true,
            Some(s) => {
                if !self.may_act() {
                    return false;
                }
                let Ok(owned) = s.owned.read() else {
                    return false;
                };
                let Some(keys) = owned.by_client.get(client_id) else {
                    return false;
                };
                keys.iter().any(|k| match owned.taken_from.get(k) {
                    None => true,
                    Some(from) => s.takeovers.read().is_ok_and(|t| {
                        t.get(from)
                            .is_some_and(|k| k.confirmed_within(s.renew_deadline))
                    }),
                })
            }
        }
    }

    /// Whether this replica's Proplet watch holds the proplet as its own (not moving away), whatever the
    /// state of its Lease: for bookkeeping in memory (heartbeats), never for acting.
    pub fn holds_client(&self, client_id: &str) -> bool {
        match &self.shard {
            None => true,
            Some(s) => s
                .owned
                .read()
                .is_ok_and(|o| o.by_client.contains_key(client_id)),
        }
    }

    /// Whether this replica may write and publish for the proplet with this clientId (None: for work on no
    /// proplet): [`Ownership::may_act`], and for one taken over, while the takeover is confirmed.
    pub fn may_act_for(&self, client_id: Option<&str>) -> bool {
        match client_id {
            Some(c) if self.holds_client(c) => self.owns_client(c),
            _ => self.may_act(),
        }
    }

    /// Whether an object in this replica's caches is another shard's: labelled with another shard and not
    /// about a proplet we hold. Only objects of a silent or fenced shard are such (its takeover watches
    /// bring all of them; a fence's record places some on us): they are left alone.
    pub fn is_foreign(&self, shard: Option<&str>, client: Option<&str>) -> bool {
        match &self.shard {
            None => false,
            Some(s) => {
                shard != Some(s.identity.as_str()) && !client.is_some_and(|c| self.holds_client(c))
            }
        }
    }

    /// [`Ownership::is_foreign`] for a Task: by its shard label and the proplet it is assigned to.
    pub fn is_foreign_task(&self, t: &crate::api::task::Task) -> bool {
        let client = t
            .status
            .as_ref()
            .and_then(|s| s.assigned_client_id.as_deref());
        self.is_foreign(shard_of(t).as_deref(), client)
    }

    /// Whether this replica handles `key` among work shared out by the ring in memory, with no labels or
    /// handover (a hub's member clusters: probing one twice during a change of members is harmless):
    /// always for a single replica; for a shard, when the ring of live shards places `key` on it and
    /// its Lease is fresh.
    pub fn owns_key(&self, key: &str) -> bool {
        match &self.shard {
            None => true,
            Some(s) => self.may_act() && self.ring().owner(key) == Some(s.identity.as_str()),
        }
    }

    /// Whether this replica runs the singleton work (always, for a single replica).
    pub fn is_leader(&self) -> bool {
        match &self.shard {
            None => true,
            Some(s) => s.leader.load(Ordering::SeqCst) && self.may_act(),
        }
    }

    /// Every shard with a Lease and its state, as last judged (empty for a single replica).
    pub fn states(&self) -> Vec<(String, members::State)> {
        self.shard
            .as_ref()
            .and_then(|s| s.states.read().ok().map(|m| m.clone()))
            .unwrap_or_default()
    }

    /// The live shards (the ring's members), sorted.
    pub fn members(&self) -> Vec<String> {
        member_names(&self.states())
    }

    /// The ring of the live shards, as of the last change of members (empty for a single replica).
    pub fn ring(&self) -> Arc<ring::Ring> {
        self.shard
            .as_ref()
            .and_then(|s| s.ring.read().ok().map(|r| Arc::clone(&r)))
            .unwrap_or_else(|| Arc::new(ring::Ring::new(Vec::<String>::new(), 1)))
    }

    /// How many clientIds this shard owns now.
    pub fn owned_count(&self) -> usize {
        self.shard
            .as_ref()
            .and_then(|s| s.owned.read().ok().map(|o| o.by_client.len()))
            .unwrap_or(0)
    }

    pub(crate) fn renewed(&self, at: Instant) {
        if let Some(s) = &self.shard
            && let Ok(mut r) = s.renewed.lock()
        {
            *r = Some(at);
        }
    }

    /// Stops acting at once (the Lease is lost or released).
    pub(crate) fn revoke(&self) {
        if let Some(s) = &self.shard {
            if let Ok(mut r) = s.renewed.lock() {
                *r = None;
            }
            s.leader.store(false, Ordering::SeqCst);
        }
    }

    pub(crate) fn set_leader(&self, leading: bool) {
        if let Some(s) = &self.shard {
            s.leader.store(leading, Ordering::SeqCst);
        }
    }

    pub(crate) fn set_states(&self, states: Vec<(String, members::State)>) {
        if let Some(s) = &self.shard
            && let Ok(mut m) = s.states.write()
            && *m != states
        {
            let members = member_names(&states);
            if members != member_names(&m)
                && let Ok(mut r) = s.ring.write()
            {
                *r = Arc::new(ring::Ring::new(members, ring::VIRTUAL_NODES));
            }
            *m = states;
            s.changes.send_modify(|n| *n += 1);
        }
    }

    /// The fenced shards whose proplets are taken over, with their records. `listed` is when the list of
    /// Leases these come from started (None: seen by the watch, which confirms nothing): each takeover it
    /// holds is confirmed as of then; one first seen by the watch waits for the next list.
    pub(crate) fn set_takeovers(
        &self,
        takeovers: Vec<(String, takeover::Takeover)>,
        listed: Option<Instant>,
    ) {
        let Some(s) = &self.shard else { return };
        let Ok(mut known) = s.takeovers.write() else {
            return;
        };
        let before = known.len();
        let next: HashMap<String, takeover::Known> = takeovers
            .into_iter()
            .map(|(shard, t)| {
                let confirmed = listed.or_else(|| known.get(&shard).and_then(|k| k.confirmed));
                (
                    shard,
                    takeover::Known {
                        takeover: t,
                        confirmed,
                    },
                )
            })
            .collect();
        let changed = next.len() != before || next.keys().any(|k| !known.contains_key(k));
        *known = next;
        drop(known);
        if changed {
            s.changes.send_modify(|n| *n += 1);
        }
    }

    /// The other shards silent for a renew deadline and not fenced yet (their Leases, as of a list or the
    /// watch): their Proplets and Tasks are listed ahead of the fence, so that a takeover finds them cached.
    pub(crate) fn set_silent(&self, silent: BTreeSet<String>) {
        let Some(s) = &self.shard else { return };
        let Ok(mut known) = s.silent.write() else {
            return;
        };
        if *known != silent {
            *known = silent;
            drop(known);
            s.changes.send_modify(|n| *n += 1);
        }
    }

    /// See [`Ownership::set_silent`].
    pub fn silent(&self) -> BTreeSet<String> {
        self.shard
            .as_ref()
            .and_then(|s| s.silent.read().ok().map(|k| k.clone()))
            .unwrap_or_default()
    }

    /// The fenced shards whose proplets are taken over, and how (empty for a single replica).
    pub fn takeovers(&self) -> HashMap<String, takeover::Takeover> {
        self.shard
            .as_ref()
            .and_then(|s| s.takeovers.read().ok())
            .map(|t| {
                t.iter()
                    .map(|(n, k)| (n.clone(), k.takeover.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many Proplets this shard owns by takeover (still labelled with a fenced shard).
    pub fn taken_count(&self) -> usize {
        self.shard
            .as_ref()
            .and_then(|s| s.owned.read().ok().map(|o| o.taken_from.len()))
            .unwrap_or(0)
    }

    /// Changes as [`Ownership::states`] changes (None for a single replica, whose states never do).
    pub fn state_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.shard.as_ref().map(|s| s.changes.subscribe())
    }

    /// Follows the (label-selected) Proplet watch: a Proplet in it is ours unless it is moving away.
    pub fn apply(&self, ev: &watcher::Event<Proplet>) {
        let Some(s) = &self.shard else { return };
        let Ok(mut owned) = s.owned.write() else {
            return;
        };
        let Ok(takeovers) = s.takeovers.read() else {
            return;
        };
        let key = |p: &Proplet| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
        // Ours by its label, or taken over from a fenced shard whose record places it on us.
        let claim = |p: &Proplet| -> Option<Claim> {
            let client = p.spec.connection_config.client()?.to_string();
            if drain_of(p).is_some() {
                return None;
            }
            let shard = shard_of(p)?;
            if shard == s.identity {
                return Some((client, None));
            }
            let t = takeovers.get(&shard)?;
            (t.takeover.owner(p) == Some(s.identity.as_str())).then_some((client, Some(shard)))
        };
        match ev {
            watcher::Event::Init => owned.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                if let Some(c) = claim(p)
                    && let Some(next) = owned.relisting.as_mut()
                {
                    next.insert(key(p), c);
                }
            }
            watcher::Event::InitDone => {
                if let Some(next) = owned.relisting.take() {
                    owned.replace(next);
                }
            }
            watcher::Event::Apply(p) => match claim(p) {
                Some(c) => owned.insert(key(p), c),
                None => owned.remove(&key(p)),
            },
            watcher::Event::Delete(p) => owned.remove(&key(p)),
        }
    }

    /// Since when this replica has owned `client_id` (None for a single replica, which always has).
    pub fn owned_since(&self, client_id: &str) -> Option<Instant> {
        let s = self.shard.as_ref()?;
        s.owned.read().ok()?.since.get(client_id).copied()
    }
}

/// The ring's members among shards and their states.
fn member_names(states: &[(String, members::State)]) -> Vec<String> {
    states
        .iter()
        .filter(|(_, s)| s.is_member())
        .map(|(n, _)| n.clone())
        .collect()
}

/// The label selector of what a shard watches.
pub fn own_selector(identity: &str) -> String {
    format!("{SHARD_LABEL}={identity}")
}

/// The label selector of Proplets moving to a shard.
pub fn incoming_selector(identity: &str) -> String {
    format!("{DRAIN_LABEL}={identity}")
}

/// The label selector of Tasks no shard has claimed.
pub fn unclaimed_selector() -> String {
    format!("!{SHARD_LABEL}")
}

/// The label selector of shard Leases.
pub fn ring_selector() -> String {
    format!("{RING_LABEL}={RING}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::proplet::PropletSpec;

    #[test]
    fn a_single_replica_owns_everything() {
        let o = Ownership::single();
        assert!(["a", "proplet-1", ""].iter().all(|c| o.owns_client(c)));
        assert!(o.is_leader() && o.may_act());
    }

    #[test]
    fn the_ring_is_rebuilt_when_the_members_change_and_only_then() {
        use members::State::{Expired, Ready};
        let o = Ownership::sharded("a", Duration::from_secs(10));
        o.renewed(Instant::now());
        assert!(o.ring().members().is_empty());
        assert!(!o.owns_key("k"), "no ring, no key");
        o.set_states(vec![("a".into(), Ready), ("b".into(), Ready)]);
        let two = o.ring();
        assert_eq!(two.members(), ["a", "b"]);
        o.set_states(vec![
            ("a".into(), Ready),
            ("b".into(), Ready),
            ("c".into(), Expired),
        ]);
        assert!(
            Arc::ptr_eq(&two, &o.ring()),
            "a shard that is no member changes no ring"
        );
        let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        let ours = keys.iter().filter(|k| o.owns_key(k)).count();
        assert!(ours > 0 && ours < keys.len(), "{ours} of 200");
        o.set_states(vec![("a".into(), Ready)]);
        assert_eq!(o.ring().members(), ["a"]);
        assert!(keys.iter().all(|k| o.owns_key(k)));
        o.revoke();
        assert!(!o.owns_key("k0"), "no key without a fresh Lease");
    }

    fn proplet(name: &str, client: &str, labels: &[(&str, &str)]) -> Proplet {
        let spec: PropletSpec =
            serde_json::from_value(serde_json::json!({"type": "external", "connectionConfig": {"clientId": client, "channelId": "c", "mqttAddress": "tcp://m:1883"}}))
                .expect("spec");
        let mut p = Proplet::new(name, spec);
        p.metadata.namespace = Some("ns".into());
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p
    }

    #[test]
    fn a_survivor_owns_what_a_confirmed_takeover_record_places_on_it_and_nothing_else() {
        let o = Ownership::sharded("b", Duration::from_millis(300));
        o.renewed(Instant::now());
        let record = takeover::Takeover::new(
            crate::config::ShardBy::ClientId,
            ["a".to_string(), "b".to_string()],
        );
        let clients: Vec<String> = (0..40).map(|i| format!("c-{i}")).collect();
        let ours: Vec<&String> = clients
            .iter()
            .filter(|c| record.owner_at(c) == Some("b"))
            .collect();
        assert!(!ours.is_empty() && ours.len() < clients.len());
        // Seen by the watch only: nothing is confirmed yet.
        o.set_takeovers(vec![("x".into(), record.clone())], None);
        for (i, c) in clients.iter().enumerate() {
            o.apply(&watcher::Event::Apply(proplet(
                &format!("p{i}"),
                c,
                &[(SHARD_LABEL, "x")],
            )));
        }
        assert_eq!(o.taken_count(), ours.len());
        assert!(ours.iter().all(|c| o.holds_client(c) && !o.owns_client(c)));
        o.set_takeovers(vec![("x".into(), record.clone())], Some(Instant::now()));
        for c in &clients {
            assert_eq!(o.owns_client(c), ours.contains(&c), "{c}");
            assert_eq!(o.is_foreign(Some("x"), Some(c)), !ours.contains(&c));
        }
        assert!(
            o.is_foreign(Some("x"), None),
            "an unplaced task of the fenced shard"
        );
        assert!(!o.is_foreign(Some("b"), None));
        // The confirmation lapses a renew deadline after the list that made it.
        std::thread::sleep(Duration::from_millis(320));
        o.renewed(Instant::now());
        assert!(
            ours.iter()
                .all(|c| !o.owns_client(c) && !o.may_act_for(Some(c)))
        );
        assert!(o.may_act_for(None), "its own work goes on");
        o.set_takeovers(vec![("x".into(), record.clone())], Some(Instant::now()));
        let first = ours[0];
        let name = format!("p{}", clients.iter().position(|c| c == first).unwrap_or(0));
        let since = o.owned_since(first);
        // Its relabel to us keeps it ours, since it was; the takeover's end no longer matters to it.
        o.apply(&watcher::Event::Apply(proplet(
            &name,
            first,
            &[(SHARD_LABEL, "b")],
        )));
        assert_eq!(o.owned_since(first), since);
        assert_eq!(o.taken_count(), ours.len() - 1);
        o.set_takeovers(Vec::new(), Some(Instant::now()));
        assert!(o.owns_client(first));
        assert!(
            ours[1..].iter().all(|c| !o.owns_client(c)),
            "the fenced shard is back"
        );
    }

    #[test]
    fn a_shard_owns_its_labelled_proplets_only_while_its_lease_is_fresh_and_they_stay() {
        let o = Ownership::sharded("op-0", Duration::from_secs(10));
        let mine = proplet("a", "client-a", &[(SHARD_LABEL, "op-0")]);
        o.apply(&watcher::Event::Apply(mine.clone()));
        assert!(!o.owns_client("client-a"), "no Lease yet");
        o.renewed(Instant::now());
        assert!(o.owns_client("client-a"));
        assert!(!o.owns_client("client-b"));
        assert!(!o.is_leader());
        let moving = proplet(
            "a",
            "client-a",
            &[(SHARD_LABEL, "op-0"), (DRAIN_LABEL, "op-1")],
        );
        o.apply(&watcher::Event::Apply(moving));
        assert!(
            !o.owns_client("client-a"),
            "a draining proplet is let go at once"
        );
        o.apply(&watcher::Event::Apply(mine.clone()));
        assert!(o.owns_client("client-a"));
        let since = o.owned_since("client-a");
        std::thread::sleep(Duration::from_millis(2));
        o.apply(&watcher::Event::Apply(mine.clone()));
        assert_eq!(
            o.owned_since("client-a"),
            since,
            "a status refresh keeps it"
        );
        o.revoke();
        assert!(!o.owns_client("client-a"), "a lost Lease stops everything");
        o.renewed(Instant::now());
        // A relist that no longer holds it drops it.
        o.apply(&watcher::Event::Init);
        o.apply(&watcher::Event::InitApply(proplet(
            "b",
            "client-b",
            &[(SHARD_LABEL, "op-0")],
        )));
        assert!(o.owns_client("client-a"), "kept until the relist is done");
        let since_b = o.owned_since("client-b");
        assert!(since_b.is_none(), "not yet");
        o.apply(&watcher::Event::InitDone);
        assert!(!o.owns_client("client-a") && o.owns_client("client-b"));
        assert!(o.owned_since("client-a").is_none());
        let since_b = o.owned_since("client-b");
        o.apply(&watcher::Event::Init);
        o.apply(&watcher::Event::InitApply(proplet(
            "b",
            "client-b",
            &[(SHARD_LABEL, "op-0")],
        )));
        o.apply(&watcher::Event::InitDone);
        assert_eq!(o.owned_since("client-b"), since_b, "a relist keeps it");
        // Two Proplets claiming one clientId: it stays owned until both are gone.
        o.apply(&watcher::Event::Apply(proplet(
            "b2",
            "client-b",
            &[(SHARD_LABEL, "op-0")],
        )));
        o.apply(&watcher::Event::Delete(proplet(
            "b2",
            "client-b",
            &[(SHARD_LABEL, "op-0")],
        )));
        assert!(o.owns_client("client-b"));
        o.apply(&watcher::Event::Delete(proplet(
            "b",
            "client-b",
            &[(SHARD_LABEL, "op-0")],
        )));
        assert_eq!(o.owned_count(), 0);
    }
}
