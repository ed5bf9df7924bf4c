//! Heartbeats, discovery data and proplet metrics as they arrive, held in memory so that a heartbeat
//! costs no API write; the Proplet controller turns them into status on transitions and periodic refreshes.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;

use crate::api::common::ResourceMetrics;
use crate::api::proplet::PropletMetadata;

/// Bound on entries for proplets nobody has registered.
pub const MAX_UNKNOWN: usize = 100_000;

#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Last heartbeat (operator receive time).
    pub last_seen: Option<Timestamp>,
    /// The proplet said it is going away (`"status":"offline"`).
    pub offline: bool,
    pub metadata: Option<PropletMetadata>,
    pub metrics: Option<ResourceMetrics>,
}

/// What changed with a message, so the caller wakes the controller only when status must change.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing status-relevant (a routine heartbeat of a live proplet).
    None,
    /// Liveness or discovery data changed: reconcile now.
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
    /// than `threshold`.
    pub fn heartbeat(
        &self,
        client_id: &str,
        offline: bool,
        threshold: std::time::Duration,
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
        if was_live {
            Change::None
        } else {
            Change::Transition
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

    pub fn forget(&self, client_id: &str) {
        if let Ok(mut map) = self.inner.lock() {
            map.remove(client_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_transitions_wake_the_controller() {
        let l = Liveness::default();
        let t = Duration::from_secs(30);
        assert_eq!(l.heartbeat("p", false, t), Change::Transition);
        assert_eq!(l.heartbeat("p", false, t), Change::None);
        assert_eq!(l.heartbeat("p", true, t), Change::Transition);
        assert_eq!(l.heartbeat("p", false, t), Change::Transition);
        assert_eq!(l.heartbeat("p", false, Duration::ZERO), Change::Transition);
    }
}
