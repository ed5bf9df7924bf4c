//! What one operator holds in memory between the MQTT router and the controllers, and to spend fewer API
//! writes. Every piece belongs to one [`crate::context::Context`]: several operators in one process (tests,
//! a hub beside its members) never share it. Losing any of it on a restart costs at most an early write or
//! a redelivered message, never a decision: decisions are made on what Kubernetes holds.
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::common::ResourceMetrics;
use crate::mqtt::client::Ack;
use crate::mqtt::wire::TaskResult;

/// A result and when it arrived.
pub type Received = (TaskResult, Instant);

/// Results received over MQTT, waiting for the Task controller to write them (keyed by Task UID), each with
/// its MQTT acknowledgement: sent once the result is written (or found moot), so that a result received by
/// an operator that dies before writing it is delivered again to the next one.
#[derive(Clone, Default)]
pub struct PendingResults {
    inner: Arc<Mutex<HashMap<String, Vec<Waiting>>>>,
}

/// A result and its acknowledgement.
type Waiting = (Received, Option<Ack>);

impl PendingResults {
    pub fn push(&self, uid: &str, result: TaskResult, ack: Option<Ack>) {
        if let Ok(mut m) = self.inner.lock() {
            m.entry(uid.to_string())
                .or_default()
                .push(((result, Instant::now()), ack));
        }
    }

    /// Everything waiting for this task, oldest first (kept until [`PendingResults::done`]).
    pub fn peek(&self, uid: &str) -> Vec<Received> {
        self.inner
            .lock()
            .ok()
            .and_then(|m| {
                m.get(uid)
                    .map(|v| v.iter().map(|(r, _)| r.clone()).collect())
            })
            .unwrap_or_default()
    }

    /// Forgets the first `n` results of a task once they are written (acknowledging them).
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

    /// Keeps what waits for a task that left this shard (it may come back: a live handover), acknowledged
    /// now as parked results are, and as fresh for [`PendingResults::sweep`] as if it had just arrived.
    pub fn park(&self, uid: &str) {
        if let Ok(mut m) = self.inner.lock()
            && let Some(v) = m.get_mut(uid)
        {
            for ((_, at), ack) in v.iter_mut() {
                *at = Instant::now();
                drop(ack.take());
            }
        }
    }

    /// Forgets (and acknowledges) everything waiting for a task that is gone.
    pub fn forget(&self, uid: &str) {
        if let Ok(mut m) = self.inner.lock() {
            m.remove(uid);
        }
    }

    /// Drops (acknowledging them) results of tasks `known` does not know that have waited `longer` than
    /// this: a shard parks results of tasks it does not hold yet, since a Task moving to it may reach its
    /// cache after its result. Returns how many were dropped.
    pub fn sweep(&self, longer: Duration, known: impl Fn(&str) -> bool) -> usize {
        let Ok(mut m) = self.inner.lock() else {
            return 0;
        };
        let mut dropped = 0;
        m.retain(|uid, waiting| {
            let stale = waiting.iter().all(|((_, at), _)| at.elapsed() >= longer);
            if stale && !known(uid) {
                dropped += waiting.len();
                false
            } else {
                true
            }
        });
        dropped
    }
}

/// The latest task_metrics sample of each running task, written to status at most every
/// `--status-refresh` (keyed by Task UID).
#[derive(Clone, Default)]
pub struct TaskMetricsBuffer {
    inner: Arc<Mutex<HashMap<String, BufferedMetrics>>>,
}

/// A sample and when a sample of that task was last written.
type BufferedMetrics = (ResourceMetrics, Option<Instant>);

impl TaskMetricsBuffer {
    /// Stores a sample; true when it is due for writing.
    pub fn offer(&self, uid: &str, sample: ResourceMetrics, every: Duration) -> bool {
        let Ok(mut m) = self.inner.lock() else {
            return false;
        };
        let entry = m.entry(uid.to_string()).or_insert((sample.clone(), None));
        entry.0 = sample;
        entry.1.is_none_or(|t| t.elapsed() >= every)
    }

    /// The sample to write now, if one is due; marks it written.
    pub fn take_due(&self, uid: &str, every: Duration) -> Option<ResourceMetrics> {
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

/// Task UIDs remembered as waiting for a missing module (until their controller records it).
pub const MAX_MISSES: usize = 10_000;

/// Tasks a missing module was asked for (Task UID → module name), for the Task controller to record.
#[derive(Clone, Default)]
pub struct ModuleMisses {
    inner: Arc<Mutex<HashMap<String, String>>>,
}

impl ModuleMisses {
    pub fn record(&self, uid: &str, app_name: &str) {
        if let Ok(mut m) = self.inner.lock()
            && (m.len() < MAX_MISSES || m.contains_key(uid))
        {
            m.insert(uid.to_string(), app_name.to_string());
        }
    }

    pub fn take(&self, uid: &str) -> Option<String> {
        self.inner.lock().ok()?.remove(uid)
    }
}

/// Tasks whose start this operator process has published (by UID). A running task missing here was started
/// by an earlier process, or its start did not go out: once the session backlog is handled (its result would
/// have come), it is sent its start again — a proplet ignores a start for a task it is running.
#[derive(Default)]
pub struct Launched {
    inner: Mutex<HashSet<String>>,
}

impl Launched {
    pub fn insert(&self, uid: &str) {
        if let Ok(mut s) = self.inner.lock() {
            s.insert(uid.to_string());
        }
    }

    pub fn contains(&self, uid: &str) -> bool {
        self.inner.lock().map(|s| s.contains(uid)).unwrap_or(false)
    }

    pub fn forget(&self, uid: &str) {
        if let Ok(mut s) = self.inner.lock() {
            s.remove(uid);
        }
    }

    /// Forgets every start: none is known to have arrived any more (the connection was lost).
    pub fn clear(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.clear();
        }
    }
}

/// Whether the Proplet and Task caches hold a complete list (their watches' first InitDone). Waited for by
/// several tasks at once; kube's `Store::wait_until_ready` wakes only one of several waiters.
pub struct CachesReady {
    tx: tokio::sync::watch::Sender<(bool, bool)>,
}

impl Default for CachesReady {
    fn default() -> Self {
        CachesReady {
            tx: tokio::sync::watch::channel((false, false)).0,
        }
    }
}

impl CachesReady {
    pub fn proplets_listed(&self) {
        self.tx
            .send_if_modified(|(p, _)| !std::mem::replace(p, true));
    }

    pub fn tasks_listed(&self) {
        self.tx
            .send_if_modified(|(_, t)| !std::mem::replace(t, true));
    }

    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|(p, t)| *p && *t).await;
    }
}

/// When something was last written, by object UID: spaces out writes that may wait (a Proplet's
/// `taskCount`). Losing it on a restart costs one early write.
#[derive(Default)]
pub struct WriteTimes {
    inner: Mutex<HashMap<String, Instant>>,
}

impl WriteTimes {
    /// Past this many entries, those older than the spacing are dropped.
    const MAX: usize = 100_000;

    /// How long a write of `uid` must still wait to be `every` after the last; `None`: it may go now.
    pub fn wait(&self, uid: &str, every: Duration) -> Option<Duration> {
        let map = self.inner.lock().ok()?;
        let since = map.get(uid)?.elapsed();
        (since < every).then(|| every - since)
    }

    pub fn wrote(&self, uid: &str, every: Duration) {
        if let Ok(mut map) = self.inner.lock() {
            if map.len() > Self::MAX {
                map.retain(|_, at| at.elapsed() < every);
            }
            map.insert(uid.to_string(), Instant::now());
        }
    }
}

/// Our own recent status writes. A reconcile that starts from the watch cache right after a write would
/// otherwise see the object before it and fail its resourceVersion test (a conflict, a wasted write and a
/// retry); it takes the written object instead. Records stay for [`OwnWrites::FRESH_FOR`] even once the
/// watch has caught up: a reconcile may hold a copy taken from the cache just before. Each is held as its
/// compact JSON (smaller than a `serde_json::Value` tree of it) and forgotten by
/// [`OwnWrites::forget_stale`] soon after, even when no write follows: a wave of writes (a fleet's
/// phases written at start-up, a shard's share arriving at once) would otherwise leave thousands of
/// objects in memory until the next write.
pub struct OwnWrites {
    inner: Mutex<Records>,
    fresh_for: Duration,
}

impl Default for OwnWrites {
    fn default() -> Self {
        OwnWrites::fresh_for(Self::FRESH_FOR)
    }
}

#[derive(Default)]
struct Records {
    by_uid: HashMap<String, Written>,
    /// Every record in the order it was made: the stale ones are dropped from the front as new ones come,
    /// so that only the last few seconds' writes are held (each holds a whole object).
    order: std::collections::VecDeque<(Instant, String)>,
}

impl Records {
    /// Drops the records made `fresh_for` ago or more, and the oldest beyond `keep`.
    fn forget(&mut self, fresh_for: Duration, keep: usize) {
        while let Some((at, _)) = self.order.front()
            && (at.elapsed() >= fresh_for || self.order.len() > keep)
        {
            if let Some((at, uid)) = self.order.pop_front()
                && self.by_uid.get(&uid).is_some_and(|w| w.at == at)
            {
                self.by_uid.remove(&uid);
            }
        }
        if self.by_uid.is_empty() {
            // A wave of writes grew them: give that memory back.
            self.by_uid.shrink_to_fit();
            self.order.shrink_to_fit();
        }
    }
}

struct Written {
    resource_version: String,
    at: Instant,
    /// The object as written, in compact JSON.
    object: Vec<u8>,
}

impl OwnWrites {
    /// The watch delivers our writes within milliseconds; an entry older than this is forgotten (e.g. a
    /// relist that skipped the event).
    pub const FRESH_FOR: Duration = Duration::from_secs(5);
    /// Past this many entries, the oldest are dropped however fresh (each holds a whole object).
    const MAX: usize = 10_000;

    /// Records kept for `fresh_for` (the default is [`OwnWrites::FRESH_FOR`]).
    pub fn fresh_for(fresh_for: Duration) -> Self {
        OwnWrites {
            inner: Mutex::default(),
            fresh_for,
        }
    }

    pub fn record<K: Resource + Serialize>(&self, written: &K) {
        let (Some(uid), Some(rv)) = (written.uid(), written.resource_version()) else {
            return;
        };
        let Ok(object) = serde_json::to_vec(written) else {
            return;
        };
        if let Ok(mut m) = self.inner.lock() {
            m.forget(self.fresh_for, Self::MAX - 1);
            let Records { by_uid, order } = &mut *m;
            let at = Instant::now();
            order.push_back((at, uid.clone()));
            by_uid.insert(
                uid,
                Written {
                    resource_version: rv,
                    at,
                    object,
                },
            );
        }
    }

    /// Forgets the records that are no longer fresh: called every [`OwnWrites::FRESH_FOR`] by the operator.
    pub fn forget_stale(&self) {
        if let Ok(mut m) = self.inner.lock() {
            m.forget(self.fresh_for, Self::MAX);
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.inner.lock().map(|m| m.by_uid.len()).unwrap_or(0)
    }

    /// The object as we last wrote it, when the cache has not caught up with that write yet.
    pub fn newer<K: Resource + DeserializeOwned>(&self, cached: &K) -> Option<K> {
        let uid = cached.uid()?;
        let m = self.inner.lock().ok()?;
        let w = m.by_uid.get(&uid)?;
        if w.at.elapsed() >= self.fresh_for {
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
        serde_json::from_slice(&w.object).ok()
    }

    /// The cached object, or our newer write of it.
    pub fn latest<K: Resource + DeserializeOwned>(
        &self,
        cached: std::sync::Arc<K>,
    ) -> std::sync::Arc<K> {
        match self.newer(cached.as_ref()) {
            Some(written) => std::sync::Arc::new(written),
            None => cached,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let own = OwnWrites::default();
        own.record(&task("10", false));
        assert!(
            own.newer(&task("9", false)).is_some(),
            "cache behind our write"
        );
        assert!(own.newer(&task("10", false)).is_none(), "caught up");
        assert!(
            own.newer(&task("11", false)).is_none(),
            "someone wrote after us"
        );
        assert!(
            own.newer(&task("9", true)).is_none(),
            "a deletion always wins"
        );
        assert!(
            own.newer(&task("9", false)).is_some(),
            "kept after the watch caught up: a reconcile may still hold the older copy"
        );
    }

    /// Records of 100 Tasks written within a moment, kept for 50 ms, and the Task last written.
    fn a_wave_of_writes() -> (OwnWrites, Task) {
        let own = OwnWrites::fresh_for(Duration::from_millis(50));
        let mut t = task("10", false);
        for i in 0..100 {
            t.metadata.uid = Some(format!("uid-{i}"));
            own.record(&t);
        }
        (own, t)
    }

    #[test]
    fn only_the_last_moments_writes_are_held() {
        let (own, mut t) = a_wave_of_writes();
        assert_eq!(own.held(), 100);
        std::thread::sleep(Duration::from_millis(60));
        t.metadata.uid = Some("uid-new".into());
        own.record(&t);
        assert_eq!(own.held(), 1, "the stale records went with the next write");
        // A uid written again stays held by its newer record.
        own.record(&t);
        std::thread::sleep(Duration::from_millis(30));
        own.record(&t);
        std::thread::sleep(Duration::from_millis(30));
        t.metadata.uid = Some("uid-other".into());
        own.record(&t);
        t.metadata.uid = Some("uid-new".into());
        t.metadata.resource_version = Some("9".into());
        assert!(own.newer(&t).is_some(), "its latest record is fresh");
    }

    #[test]
    fn stale_records_are_forgotten_without_another_write() {
        let (own, _) = a_wave_of_writes();
        own.forget_stale();
        assert_eq!(own.held(), 100, "fresh records stay");
        std::thread::sleep(Duration::from_millis(60));
        own.forget_stale();
        assert_eq!(
            own.held(),
            0,
            "the wave's records are gone with no write after it"
        );
    }

    #[test]
    fn two_operators_keep_their_own_records() {
        let (a, b) = (OwnWrites::default(), OwnWrites::default());
        a.record(&task("10", false));
        assert!(a.newer(&task("9", false)).is_some());
        assert!(b.newer(&task("9", false)).is_none(), "b never wrote it");
    }

    #[test]
    fn module_misses_are_bounded() {
        let m = ModuleMisses::default();
        for i in 0..MAX_MISSES + 10 {
            m.record(&format!("uid-{i}"), "x");
        }
        assert!(m.take(&format!("uid-{}", MAX_MISSES + 5)).is_none());
        assert_eq!(m.take("uid-0").as_deref(), Some("x"));
        assert!(m.take("uid-0").is_none());
    }

    #[test]
    fn writes_are_spaced() {
        let w = WriteTimes::default();
        let every = Duration::from_secs(10);
        assert!(w.wait("u", every).is_none(), "never written: go");
        w.wrote("u", every);
        assert!(w.wait("u", every).is_some_and(|d| d <= every));
        assert!(w.wait("other", every).is_none());
    }

    /// A task that left this shard keeps its results (it may come back); the sweep drops them only a park
    /// period after it left, not after they arrived.
    #[test]
    fn results_of_a_task_that_left_stay_parked_until_the_sweep() {
        let results = PendingResults::default();
        let r = TaskResult {
            task_id: "u".into(),
            proplet_id: Some("c".into()),
            results: serde_json::json!("42"),
            error: None,
        };
        results.push("u", r, None);
        std::thread::sleep(Duration::from_millis(30));
        results.park("u");
        assert_eq!(results.sweep(Duration::from_millis(20), |_| false), 0);
        assert_eq!(results.peek("u").len(), 1, "kept for when it comes back");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(results.sweep(Duration::from_millis(20), |_| false), 1);
        assert!(results.peek("u").is_empty());
    }
}
