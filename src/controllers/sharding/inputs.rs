//! What the sharder's plan reads of each Proplet, followed on its watch: the leader plans again only when
//! that changed. Most events on the fleet are lastSeen refreshes (one per proplet every `--status-refresh`),
//! which change nothing the plan reads; planning the whole fleet each retry period regardless cost the
//! leader about a third of its CPU at 5,000 proplets.
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use kube::ResourceExt;
use kube::runtime::watcher::Event;

use super::plan::key;
use crate::api::proplet::Proplet;
use crate::sharding::{DRAIN_LABEL, DRAIN_READY_LABEL, SHARD_LABEL};

/// The last plan inputs seen of every Proplet, by UID.
#[derive(Default)]
pub struct PlanInputs {
    seen: HashMap<String, u64>,
    /// UIDs seen again during a relist: the others were deleted meanwhile.
    relisted: Option<HashMap<String, u64>>,
}

fn inputs(p: &Proplet) -> u64 {
    let labels = p.labels();
    let cc = &p.spec.connection_config;
    let mut h = DefaultHasher::new();
    (
        labels.get(SHARD_LABEL),
        labels.get(DRAIN_LABEL),
        labels.get(DRAIN_READY_LABEL),
        key(p),
        cc.domain(),
        &cc.channel_id,
        p.metadata.deletion_timestamp.is_some(),
    )
        .hash(&mut h);
    h.finish()
}

impl PlanInputs {
    /// Takes one watch event; true when something the plan reads changed.
    pub fn changed(&mut self, ev: &Event<Proplet>) -> bool {
        match ev {
            Event::Apply(p) => self.apply(p),
            Event::Delete(p) => {
                let uid = p.uid().unwrap_or_default();
                self.seen.remove(&uid);
                true
            }
            Event::Init => {
                self.relisted = Some(HashMap::new());
                false
            }
            Event::InitApply(p) => {
                let (uid, now) = (p.uid().unwrap_or_default(), inputs(p));
                if let Some(r) = self.relisted.as_mut() {
                    r.insert(uid, now);
                }
                false
            }
            Event::InitDone => {
                if let Some(r) = self.relisted.take() {
                    self.seen = r;
                }
                // A relist may hide any change: plan once on the new list.
                true
            }
        }
    }

    fn apply(&mut self, p: &Proplet) -> bool {
        let now = inputs(p);
        self.seen.insert(p.uid().unwrap_or_default(), now) != Some(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::proplet::PropletSpec;

    fn proplet(uid: &str, shard: &str) -> Proplet {
        let spec: PropletSpec = serde_json::from_value(serde_json::json!({
            "type": "external",
            "connectionConfig": {"clientId": format!("client-{uid}"), "channelId": "c", "mqttAddress": "tcp://m:1883"}
        }))
        .expect("spec");
        let mut p = Proplet::new(uid, spec);
        p.metadata.uid = Some(uid.into());
        p.metadata.labels = Some([(SHARD_LABEL.to_string(), shard.to_string())].into());
        p
    }

    #[test]
    fn only_what_the_plan_reads_counts_as_a_change() {
        let mut inputs = PlanInputs::default();
        let p = proplet("a", "shard-0");
        assert!(inputs.changed(&Event::Apply(p.clone())), "first sight");
        let mut refreshed = p.clone();
        refreshed.metadata.resource_version = Some("2".into());
        refreshed.metadata.annotations = Some([("x".to_string(), "y".to_string())].into());
        assert!(
            !inputs.changed(&Event::Apply(refreshed)),
            "a status refresh"
        );
        let moved = proplet("a", "shard-1");
        assert!(inputs.changed(&Event::Apply(moved.clone())), "relabelled");
        let mut draining = moved.clone();
        draining
            .labels_mut()
            .insert(DRAIN_LABEL.into(), "shard-2".into());
        assert!(inputs.changed(&Event::Apply(draining)), "a drain");
        let mut rechanneled = moved.clone();
        rechanneled.spec.connection_config.channel_id = "d".into();
        assert!(
            inputs.changed(&Event::Apply(rechanneled)),
            "another channel"
        );
        assert!(inputs.changed(&Event::Delete(moved)), "deleted");
    }

    #[test]
    fn a_relist_plans_once_and_forgets_what_it_no_longer_holds() {
        let mut inputs = PlanInputs::default();
        inputs.changed(&Event::Apply(proplet("a", "s")));
        inputs.changed(&Event::Apply(proplet("b", "s")));
        assert!(!inputs.changed(&Event::Init));
        assert!(!inputs.changed(&Event::InitApply(proplet("a", "s"))));
        assert!(inputs.changed(&Event::InitDone));
        assert_eq!(
            inputs.seen.len(),
            1,
            "b was deleted while the watch was away"
        );
        assert!(!inputs.changed(&Event::Apply(proplet("a", "s"))));
        assert!(
            inputs.changed(&Event::Apply(proplet("b", "s"))),
            "b is new again"
        );
    }
}
