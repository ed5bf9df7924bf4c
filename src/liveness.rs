//! Heartbeats, discovery data and proplet metrics as they arrive, held in memory so that a heartbeat
//! costs no API write; the Proplet controller turns them into status on transitions and periodic refreshes.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;

use crate::api::common::ResourceMetrics;
use crate::api::proplet::PropletMetadata;

/// Bound on entries for proplets nobody has registered.
pub const MAX_UNKNOWN: usize = 100_000;

/// Whether a recorded `lastSeen` is due for its refresh at `now`: once a moment of the proplet's own
/// refresh slot has passed since it was recorded. The slots are `refresh` apart and placed by a hash of the
/// clientId, so a proplet is refreshed once per `refresh` (the recorded value is never older; a transition
/// written just before the slot is refreshed at it all the same) and the fleet's
/// refreshes are spread evenly over the period whenever the proplets were written. Refreshed `refresh` after
/// their last write instead, proplets written together (an operator start, a shard's share moved at once)
/// refreshed together for ever: one write per proplet in one burst (10,000 at 10,000 proplets), in which
/// every other write waited. Whole seconds, as `lastSeen` is stored, so the heartbeat that asks and the
/// reconcile that writes agree.
pub fn refresh_due(
    client_id: &str,
    recorded: Timestamp,
    now: Timestamp,
    refresh: Duration,
) -> bool {
    let period = refresh.as_secs().max(1) as i64;
    let offset = (xxhash_rust::xxh64::xxh64(client_id.as_bytes(), 0) % period as u64) as i64;
    let slot = |t: Timestamp| (t.as_second() + offset).div_euclid(period);
    slot(now) > slot(recorded)
}

#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Last heartbeat (operator receive time).
    pub last_seen: Option<Timestamp>,
    /// The proplet said it is going away (`"status":"offline"`).
    pub offline: bool,
    pub metadata: Option<PropletMetadata>,
    pub metrics: Option<ResourceMetrics>,
    /// The `lastSeen` the Proplet's status holds, as its controller last wrote or read it.
    pub recorded: Option<Timestamp>,
    /// A heartbeat found that `lastSeen` due for a refresh, and woke the controller for it.
    refresh_asked: bool,
}

/// What changed with a message, so the caller wakes the controller only when status must change.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing status-relevant (a routine heartbeat of a live proplet).
    None,
    /// Liveness or discovery data changed, or the recorded `lastSeen` is due for a refresh: reconcile now.
    Transition,
}

#[derive(Clone, Default)]
pub struct Liveness {
    inner: Arc<Mutex<HashMap<String, Observed>>>,
}

impl Liveness {
    pub fn get(&self, client_id: &str) -> Option<Observed> {
        self.inner.lock().ok()?.get(client_id).cloned()
    }

    /// Records a heartbeat. A transition when the proplet was unknown, offline, or silent for longer
    /// than `threshold`; and once when the `lastSeen` its status records is due for its refresh
    /// ([`refresh_due`]).
    pub fn heartbeat(
        &self,
        client_id: &str,
        offline: bool,
        threshold: Duration,
        refresh: Duration,
    ) -> Change {
        let now = Timestamp::now();
        let Ok(mut map) = self.inner.lock() else {
            return Change::None;
        };
        let entry = map.entry(client_id.to_string()).or_default();
        let was_live = !entry.offline
            && entry
                .last_seen
                .is_some_and(|t| now.duration_since(t).unsigned_abs() <= threshold);
        entry.offline = offline;
        if offline {
            return Change::Transition;
        }
        entry.last_seen = Some(now);
        if !was_live {
            return Change::Transition;
        }
        let due = entry
            .recorded
            .is_some_and(|r| refresh_due(client_id, r, now, refresh));
        if due && !entry.refresh_asked {
            entry.refresh_asked = true;
            Change::Transition
        } else {
            Change::None
        }
    }

    /// What the Proplet's status now says of `lastSeen` (its controller wrote or read it): the next refresh
    /// is asked for when a heartbeat finds it due ([`refresh_due`]).
    pub fn recorded(&self, client_id: &str, last_seen: Timestamp) {
        if let Ok(mut map) = self.inner.lock()
            && let Some(entry) = map.get_mut(client_id)
        {
            entry.recorded = Some(last_seen);
            entry.refresh_asked = false;
        }
    }

    pub fn discovery(&self, client_id: &str, metadata: PropletMetadata) -> Change {
        let Ok(mut map) = self.inner.lock() else {
            return Change::None;
        };
        let entry = map.entry(client_id.to_string()).or_default();
        // Discovery also means the proplet just started: it is alive.
        entry.last_seen = Some(Timestamp::now());
        entry.offline = false;
        if entry.metadata.as_ref() == Some(&metadata) {
            Change::None
        } else {
            entry.metadata = Some(metadata);
            Change::Transition
        }
    }

    /// Keeps discovery data of a proplet that has no Proplet (yet), without counting it as a heartbeat;
    /// at most [`MAX_UNKNOWN`] such entries, so a flood of fake ids cannot grow memory without bound.
    pub fn remember_discovery(&self, client_id: &str, metadata: PropletMetadata) {
        let Ok(mut map) = self.inner.lock() else {
            return;
        };
        if !map.contains_key(client_id) && map.len() >= MAX_UNKNOWN {
            return;
        }
        map.entry(client_id.to_string()).or_default().metadata = Some(metadata);
    }

    pub fn metrics(&self, client_id: &str, metrics: ResourceMetrics) {
        if let Ok(mut map) = self.inner.lock() {
            map.entry(client_id.to_string()).or_default().metrics = Some(metrics);
        }
    }

    /// Proplets whose last heartbeat turned older than `threshold` in (`from`, `to`]: those that went
    /// silent then (not those that said they are offline: that was a transition already).
    pub fn went_silent(&self, threshold: Duration, from: Timestamp, to: Timestamp) -> Vec<String> {
        let Ok(map) = self.inner.lock() else {
            return Vec::new();
        };
        let Ok(threshold) = jiff::SignedDuration::try_from(threshold) else {
            return Vec::new();
        };
        map.iter()
            .filter(|(_, o)| !o.offline)
            .filter_map(|(id, o)| Some((id, o.last_seen?.checked_add(threshold).ok()?)))
            .filter(|(_, silent_at)| from < *silent_at && *silent_at <= to)
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn forget(&self, client_id: &str) {
        if let Ok(mut map) = self.inner.lock() {
            map.remove(client_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transitions_wake_the_controller() {
        let l = Liveness::default();
        let (t, r) = (Duration::from_secs(30), Duration::from_secs(120));
        assert_eq!(l.heartbeat("p", false, t, r), Change::Transition);
        assert_eq!(l.heartbeat("p", false, t, r), Change::None);
        assert_eq!(l.heartbeat("p", true, t, r), Change::Transition);
        assert_eq!(l.heartbeat("p", false, t, r), Change::Transition);
        assert_eq!(
            l.heartbeat("p", false, Duration::ZERO, r),
            Change::Transition
        );
    }

    #[test]
    fn a_heartbeat_asks_once_for_the_refresh_of_a_recorded_last_seen_that_is_due() {
        let l = Liveness::default();
        let (t, r) = (Duration::from_secs(30), Duration::from_secs(120));
        l.heartbeat("p", false, t, r);
        let mut now = Timestamp::now();
        // In the last 5 s of p's slot no record stays undue 5 s longer (a 1-in-24 failure): wait for the
        // next slot to begin.
        if refresh_due("p", now, now + jiff::SignedDuration::from_secs(5), r) {
            std::thread::sleep(Duration::from_secs(6));
            now = Timestamp::now();
        }
        let ago = |s: i64| now - jiff::SignedDuration::from_secs(s);
        // The oldest record not due even 5 s from now (the heartbeat reads its own clock).
        let fresh = (0..120)
            .rev()
            .map(ago)
            .find(|rec| !refresh_due("p", *rec, now + jiff::SignedDuration::from_secs(5), r))
            .expect("a record younger than its slot");
        l.recorded("p", fresh);
        assert_eq!(l.heartbeat("p", false, t, r), Change::None, "not due yet");
        l.recorded("p", now - jiff::SignedDuration::from_secs(121));
        assert_eq!(l.heartbeat("p", false, t, r), Change::Transition, "due");
        assert_eq!(l.heartbeat("p", false, t, r), Change::None, "asked already");
        // Written: the next refresh is a refresh away.
        l.recorded("p", Timestamp::now());
        assert_eq!(l.heartbeat("p", false, t, r), Change::None);
    }

    #[test]
    fn refreshes_written_together_spread_over_the_period_once_per_period() {
        let refresh = Duration::from_secs(180);
        let written = Timestamp::from_second(1_800_000_000).expect("a time");
        let after = |from: Timestamp, secs: i64| from + jiff::SignedDuration::from_secs(secs);
        let due_after = |id: &str, from: Timestamp| {
            (0..=180)
                .find(|s| refresh_due(id, from, after(from, *s), refresh))
                .expect("due within the period: the recorded value is never older")
        };
        let first: Vec<i64> = (0..1000)
            .map(|i| due_after(&format!("p-{i}"), written))
            .collect();
        // Spread over the whole period at once, not bunched: every tenth of it holds some.
        for tenth in 0..10 {
            let from = 1 + tenth * 18;
            assert!(
                first.iter().any(|s| (from..from + 18).contains(s)),
                "none due in {from}..{}",
                from + 18
            );
        }
        for (i, due) in first.iter().enumerate().take(50) {
            let id = format!("p-{i}");
            let refreshed = after(written, *due);
            // Written then: due again exactly a period later (one write per proplet per period), and the
            // same answer whenever asked.
            assert_eq!(due_after(&id, refreshed), 180, "{id}");
            assert!(refresh_due(&id, refreshed, after(refreshed, 200), refresh));
            assert!(!refresh_due(&id, refreshed, after(refreshed, 179), refresh));
        }
        // lastSeen is stored in whole seconds: a sub-second recorded value gives the same answer.
        let precise = written + jiff::SignedDuration::from_millis(900);
        for (i, due) in first.iter().enumerate().take(50) {
            let id = format!("p-{i}");
            for s in [due - 1, *due] {
                assert_eq!(
                    refresh_due(&id, precise, after(written, s), refresh),
                    refresh_due(&id, written, after(written, s), refresh)
                );
            }
        }
    }

    #[test]
    fn a_proplet_goes_silent_once_when_its_last_heartbeat_turns_older_than_the_threshold() {
        let l = Liveness::default();
        let t = Duration::from_secs(30);
        l.heartbeat("quiet", false, t, t);
        l.heartbeat("leaving", true, t, t);
        let beat = l
            .get("quiet")
            .and_then(|o| o.last_seen)
            .expect("a heartbeat was recorded");
        let at = |secs: i64| beat + jiff::SignedDuration::from_secs(secs);
        assert!(l.went_silent(t, at(0), at(29)).is_empty());
        assert_eq!(l.went_silent(t, at(29), at(31)), vec!["quiet".to_string()]);
        // The next span does not report it again; one that said it is offline never goes silent.
        assert!(l.went_silent(t, at(31), at(60)).is_empty());
        assert!(
            l.went_silent(t, at(-60), at(600))
                .iter()
                .all(|id| id != "leaving")
        );
    }
}
