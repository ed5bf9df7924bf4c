//! A survivor's side of a takeover (`crate::sharding::takeover`): while a fenced shard's Lease carries a
//! takeover record, this shard's Proplet and Task caches also watch what is labelled with the fenced
//! shard, so the proplets the record places on us are handled from the fence on, before the leader has
//! relabelled them. The watches start earlier, when the shard has been silent for a renew deadline (it has
//! stopped acting; the leader fences it at its expiry): what they bring is no one's until the record
//! comes, then it is told again to every listener. They stop when the shard renews again or the record goes
//! (the shard took its Lease back, or the Lease is gone); once every object is relabelled they hold
//! nothing and cost an idle watch.
use std::collections::BTreeSet;

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::info;

use crate::controllers::runtime::Shutdown;
use crate::controllers::sources::Change;
use crate::sharding::{Ownership, own_selector};

/// Follows the takeovers of `ownership`, starting and stopping extra sources of each cache in `caches`.
pub fn spawn(
    ownership: Ownership,
    caches: Vec<UnboundedSender<Change>>,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(mut changes) = ownership.state_changes() else {
            return;
        };
        let mut shutdown = std::pin::pin!(shutdown);
        let mut watched: BTreeSet<String> = BTreeSet::new();
        let mut taken: BTreeSet<String> = BTreeSet::new();
        loop {
            let me = ownership.identity().unwrap_or_default();
            let taken_now: BTreeSet<String> = ownership
                .takeovers()
                .into_keys()
                .filter(|s| s != me)
                .collect();
            // A silent shard's objects are watched ahead of its fence, as no one's; once fenced, its
            // record says whose each is, and what is cached is told again (ownership reads it then).
            let now: BTreeSet<String> = ownership
                .silent()
                .into_iter()
                .filter(|s| s != me)
                .chain(taken_now.iter().cloned())
                .collect();
            let starts = now.difference(&watched).map(|shard| Change::Start {
                name: shard.clone(),
                selector: own_selector(shard),
            });
            let replays = taken_now
                .difference(&taken)
                .filter(|shard| watched.contains(*shard))
                .map(|shard| Change::Replay {
                    name: shard.clone(),
                });
            let stops = watched.difference(&now).map(|shard| Change::Stop {
                name: shard.clone(),
            });
            let to_send: Vec<Change> = starts.chain(replays).chain(stops).collect();
            taken = taken_now;
            for change in to_send {
                info!(
                    ?change,
                    "the takeover watches of a silent or fenced shard change"
                );
                for c in &caches {
                    // A closed cache has stopped with the operator: nothing is left to fill.
                    let _ = c.send(change.clone());
                }
            }
            watched = now;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = &mut shutdown => return,
            }
        }
    })
}
