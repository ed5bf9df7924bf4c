//! A survivor's side of a takeover (`crate::sharding::takeover`): while a fenced shard's Lease carries a
//! takeover record, this shard's Proplet and Task caches also watch what is labelled with the fenced
//! shard, so the proplets the record places on us are handled from the fence on, before the leader has
//! relabelled them. The watches stop when the record goes (the shard took its Lease back, or the Lease is
//! gone); once every object is relabelled they hold nothing and cost an idle watch.
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
        loop {
            let me = ownership.identity().unwrap_or_default();
            let now: BTreeSet<String> = ownership
                .takeovers()
                .into_keys()
                .filter(|s| s != me)
                .collect();
            let starts = now.difference(&watched).map(|shard| Change::Start {
                name: shard.clone(),
                selector: own_selector(shard),
            });
            let stops = watched.difference(&now).map(|shard| Change::Stop {
                name: shard.clone(),
            });
            for change in starts.chain(stops) {
                info!(?change, "a fenced shard's takeover watches change");
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
