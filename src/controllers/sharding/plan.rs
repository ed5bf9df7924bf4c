//! The leader's assignment of Proplets to shards, decided from a snapshot (pure): the ring over the live
//! shards says where each Proplet belongs; a Proplet with no owner, or whose owner is dead or released, is
//! assigned at once; one owned by a live shard that should move (or by a shard leaving gracefully, which
//! is live but no member) is drained first (bounded concurrency).
use std::collections::HashMap;
use std::sync::Arc;

use kube::ResourceExt;

use super::fleet::Placed;
use crate::api::proplet::Proplet;
use crate::config::ShardBy;
use crate::sharding::DRAIN_READY_LABEL;
use crate::sharding::members::State;
use crate::sharding::ring::{LOAD_FACTOR, Ring, VIRTUAL_NODES};
use crate::sharding::takeover::Takeover;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoveKind {
    /// Never assigned.
    New,
    /// From a shard that is dead (fenced) or released: nobody is left to acknowledge.
    Dead,
}

impl MoveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::New => "new",
            MoveKind::Dead => "dead",
        }
    }
}

#[derive(Clone, Debug)]
pub enum Step {
    /// Label the Proplet with `to` (and clear any drain). `from` is its previous, dead shard.
    Assign {
        proplet: Arc<Placed>,
        from: Option<Arc<str>>,
        to: Arc<str>,
        kind: MoveKind,
    },
    /// Ask its live owner to hand it to `to`.
    Drain { proplet: Arc<Placed>, to: Arc<str> },
    /// A drain that no longer makes sense (the ring changed back, or its target left): cleared.
    CancelDrain { proplet: Arc<Placed> },
}

impl Step {
    /// The Proplet the step writes.
    pub fn proplet(&self) -> &Placed {
        match self {
            Step::Assign { proplet, .. }
            | Step::Drain { proplet, .. }
            | Step::CancelDrain { proplet } => proplet,
        }
    }
}

#[derive(Debug, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Proplets whose owner is silent (expired) and not yet fenced: they wait.
    pub unowned: usize,
    pub drains_in_flight: usize,
}

/// Where a Proplet's place on the ring is hashed from: its key, or its channel (`domain/channel`: the
/// MQTT topics it is heard on) when the ring groups by channel.
pub fn position(p: &Proplet, by: ShardBy) -> String {
    Placed::of(p).position(by).to_string()
}

/// What to do now. `states` holds every shard with a Lease; a shard without one counts as gone. A fenced
/// shard's Proplets go where its takeover record places them (its survivors already handle them there),
/// unless that shard is no member any more.
pub fn plan(
    proplets: &[Arc<Placed>],
    states: &HashMap<String, State>,
    takeovers: &HashMap<String, Takeover>,
    max_moves: usize,
    by: ShardBy,
) -> Plan {
    let members = states
        .iter()
        .filter(|(_, s)| s.is_member())
        .map(|(n, _)| n.clone());
    let ring = Ring::new(members, VIRTUAL_NODES);
    let mut out = Plan::default();
    if ring.members().is_empty() {
        out.unowned = proplets.iter().filter(|p| p.shard.is_none()).count();
        return out;
    }
    let desired = ring.assign_grouped(
        proplets.iter().map(|p| (p.position(by), &*p.key)),
        LOAD_FACTOR,
    );
    // Every step names one of a few shards: each name is held once, not once per step (a first round
    // plans a step for every Proplet of the fleet).
    let names: HashMap<&str, Arc<str>> = ring
        .members()
        .iter()
        .map(|m| (m.as_str(), Arc::from(m.as_str())))
        .collect();
    let shared = |name: &str| names.get(name).cloned().unwrap_or_else(|| Arc::from(name));
    let state = |s: &str| states.get(s).copied();
    let mut new_drains = Vec::new();
    for p in proplets {
        let Some(want) = desired.get(&*p.key).map(|w| shared(w)) else {
            continue;
        };
        let drain = p.drain.clone();
        let Some(current) = p.shard.clone() else {
            out.steps.push(Step::Assign {
                proplet: Arc::clone(p),
                from: None,
                to: want.clone(),
                kind: MoveKind::New,
            });
            continue;
        };
        match state(&current) {
            // A leaving shard still acts: it hands its proplets over like a member would.
            Some(s) if s.is_member() || s == State::Leaving => {}
            Some(State::Expired) => {
                out.unowned += 1;
                continue;
            }
            // Dead, released, or no Lease at all.
            _ => {
                let taken_by = takeovers
                    .get(&*current)
                    .and_then(|t| t.owner_at(p.position(t.by())))
                    // A survivor that is leaving still acts on what it took over: relabelled to it,
                    // then drained from it like the rest of its share. One that is silent acts no more.
                    .filter(|o| state(o).is_some_and(|s| s.is_member() || s == State::Leaving));
                out.steps.push(Step::Assign {
                    proplet: Arc::clone(p),
                    to: taken_by.map_or_else(|| want.clone(), shared),
                    from: Some(current),
                    kind: MoveKind::Dead,
                });
                continue;
            }
        }
        if *current == *want {
            if drain.is_some() {
                out.steps.push(Step::CancelDrain {
                    proplet: Arc::clone(p),
                });
            }
            continue;
        }
        match drain {
            Some(d) if *d == *want => out.drains_in_flight += 1,
            Some(_) => out.steps.push(Step::CancelDrain {
                proplet: Arc::clone(p),
            }),
            // A leaving shard's proplets too: all at once moved no faster in total (the API server's
            // writes are the limit) and each one's handover took 6 times longer (docs/sharding.md).
            None => new_drains.push(Step::Drain {
                proplet: Arc::clone(p),
                to: want.clone(),
            }),
        }
    }
    let room = max_moves.saturating_sub(out.drains_in_flight);
    out.steps.extend(new_drains.into_iter().take(room));
    out
}

/// Whether the shard a Proplet moves to has said it listens on the Proplet's channel.
pub fn drain_ready(p: &Proplet) -> bool {
    p.labels().get(DRAIN_READY_LABEL).map(String::as_str) == Some("true")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::proplet::PropletSpec;
    use crate::sharding::{DRAIN_LABEL, SHARD_LABEL};

    fn proplet(i: usize, labels: &[(&str, &str)]) -> Arc<Proplet> {
        let spec: PropletSpec = serde_json::from_value(serde_json::json!({
            "type": "external",
            "connectionConfig": {"clientId": format!("client-{i}"), "channelId": "c", "mqttAddress": "tcp://m:1883"}
        }))
        .expect("spec");
        let mut p = Proplet::new(&format!("p-{i}"), spec);
        p.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        Arc::new(p)
    }

    fn on_channel(i: usize, channel: &str) -> Arc<Proplet> {
        let mut p = (*proplet(i, &[])).clone();
        p.spec.connection_config.channel_id = channel.to_string();
        Arc::new(p)
    }

    #[test]
    fn grouped_by_channel_a_channels_proplets_share_a_shard() {
        let ps: Vec<Arc<Proplet>> = (0..60)
            .map(|i| on_channel(i, &format!("ch-{}", i % 6)))
            .collect();
        let st = states(&[
            ("a", State::Ready),
            ("b", State::Ready),
            ("c", State::Ready),
        ]);
        let split = |by: ShardBy| {
            let to = assigned(&plan(&placed(&ps), &st, &HashMap::new(), 10, by));
            assert_eq!(to.len(), 60, "every new Proplet assigned");
            let mut shards: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
            for p in &ps {
                shards
                    .entry(p.spec.connection_config.channel_id.clone())
                    .or_default()
                    .insert(to[&p.name_any()].clone());
            }
            shards.values().map(|s| s.len() - 1).sum::<usize>()
        };
        // Each shard fills once at most: at most three extra (channel, shard) pairs.
        assert!(split(ShardBy::Channel) <= 3);
        assert!(split(ShardBy::ClientId) > 3, "by clientId, channels spread");
        assert_eq!(position(&ps[0], ShardBy::Channel), "/ch-0");
        assert_eq!(position(&ps[0], ShardBy::ClientId), "client-0");
    }

    fn placed(ps: &[Arc<Proplet>]) -> Vec<Arc<Placed>> {
        ps.iter().map(|p| Arc::new(Placed::of(p))).collect()
    }

    fn states(s: &[(&str, State)]) -> HashMap<String, State> {
        s.iter().map(|(n, st)| (n.to_string(), *st)).collect()
    }

    fn assigned(plan: &Plan) -> HashMap<String, String> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                Step::Assign { proplet, to, .. } => {
                    Some((proplet.name.to_string(), to.to_string()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn steps_to_one_shard_share_its_name() {
        let ps: Vec<_> = (0..40).map(|i| proplet(i, &[])).collect();
        let st = states(&[("a", State::Ready), ("b", State::Ready)]);
        let plan = plan(&placed(&ps), &st, &HashMap::new(), 10, ShardBy::ClientId);
        let targets: Vec<&Arc<str>> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                Step::Assign { to, .. } => Some(to),
                _ => None,
            })
            .collect();
        assert_eq!(targets.len(), 40);
        for name in ["a", "b"] {
            let to: Vec<_> = targets.iter().filter(|t| ****t == *name).collect();
            assert!(!to.is_empty(), "some proplets go to {name}");
            assert!(
                to.iter().all(|t| Arc::ptr_eq(t, to[0])),
                "every step to {name} holds the same text"
            );
        }
    }

    #[test]
    fn new_proplets_are_spread_over_the_live_shards_only() {
        let ps: Vec<_> = (0..300).map(|i| proplet(i, &[])).collect();
        let st = states(&[
            ("a", State::Ready),
            ("b", State::Ready),
            ("c", State::Expired),
            ("d", State::Released),
        ]);
        let plan = plan(&placed(&ps), &st, &HashMap::new(), 10, ShardBy::ClientId);
        let to = assigned(&plan);
        assert_eq!(to.len(), 300);
        let on_a = to.values().filter(|s| *s == "a").count();
        assert!(to.values().all(|s| s == "a" || s == "b"));
        assert!((100..=200).contains(&on_a), "{on_a} of 300 on a");
    }

    #[test]
    fn a_fenced_shards_proplets_go_where_its_takeover_record_places_them() {
        for by in [ShardBy::ClientId, ShardBy::Channel] {
            let ps: Vec<Arc<Proplet>> = (0..200)
                .map(|i| {
                    let mut p = (*on_channel(i, &format!("ch-{}", i % 20))).clone();
                    p.metadata.labels = Some([(SHARD_LABEL.to_string(), "x".to_string())].into());
                    Arc::new(p)
                })
                .collect();
            let st = states(&[
                ("a", State::Ready),
                ("b", State::Ready),
                ("c", State::Ready),
                ("x", State::Dead),
            ]);
            // Fenced when c was not a member yet: the record, not today's ring, decides.
            let record = Takeover::new(by, ["a".to_string(), "b".to_string()]);
            let takeovers = HashMap::from([("x".to_string(), record.clone())]);
            let to = assigned(&plan(&placed(&ps), &st, &takeovers, 10, by));
            assert_eq!(to.len(), 200);
            for p in &ps {
                assert_eq!(
                    Some(to[&p.name_any()].as_str()),
                    record.owner(p),
                    "the survivor that took it over is the one it is relabelled to ({by:?})"
                );
            }
            // A record's shard that is gone too: the ring of today's members decides.
            let st_b_gone = states(&[("a", State::Ready), ("c", State::Ready), ("x", State::Dead)]);
            let to = assigned(&plan(&placed(&ps), &st_b_gone, &takeovers, 10, by));
            assert!(to.values().all(|s| s == "a" || s == "c"));
        }
    }

    #[test]
    fn a_dead_shards_proplets_move_at_once_and_an_expired_ones_wait() {
        let ps = vec![
            proplet(1, &[(SHARD_LABEL, "dead")]),
            proplet(2, &[(SHARD_LABEL, "gone")]),
            proplet(3, &[(SHARD_LABEL, "silent")]),
        ];
        let st = states(&[
            ("a", State::Ready),
            ("dead", State::Dead),
            ("silent", State::Expired),
        ]);
        let plan = plan(&placed(&ps), &st, &HashMap::new(), 10, ShardBy::ClientId);
        assert_eq!(plan.unowned, 1);
        let to = assigned(&plan);
        assert_eq!(to.get("p-1").map(String::as_str), Some("a"));
        assert_eq!(
            to.get("p-2").map(String::as_str),
            Some("a"),
            "no Lease at all"
        );
        assert!(!to.contains_key("p-3"));
    }

    #[test]
    fn live_owners_are_drained_first_and_no_more_than_the_limit_at_once() {
        // Everything on a; b joins: about half should move, 5 at a time.
        let ps: Vec<_> = (0..100)
            .map(|i| proplet(i, &[(SHARD_LABEL, "a")]))
            .collect();
        let st = states(&[("a", State::Ready), ("b", State::Ready)]);
        let plan1 = plan(&placed(&ps), &st, &HashMap::new(), 5, ShardBy::ClientId);
        assert!(
            assigned(&plan1).is_empty(),
            "a live owner is never bypassed"
        );
        let drains: Vec<_> = plan1
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Drain { to, .. } if &**to == "b"))
            .collect();
        assert_eq!(drains.len(), 5);
        // With 3 already draining to b, 2 more start.
        let moving: Vec<String> = drains
            .iter()
            .take(3)
            .filter_map(|s| match s {
                Step::Drain { proplet, .. } => Some(proplet.name.to_string()),
                _ => None,
            })
            .collect();
        let ps2: Vec<_> = (0..100)
            .map(|i| {
                if moving.contains(&format!("p-{i}")) {
                    proplet(i, &[(SHARD_LABEL, "a"), (DRAIN_LABEL, "b")])
                } else {
                    proplet(i, &[(SHARD_LABEL, "a")])
                }
            })
            .collect();
        let plan2 = plan(&placed(&ps2), &st, &HashMap::new(), 5, ShardBy::ClientId);
        assert_eq!(plan2.drains_in_flight, 3);
        let new = plan2
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Drain { .. }))
            .count();
        assert_eq!(new, 2);
    }

    #[test]
    fn a_leaving_shard_is_drained_never_bypassed() {
        let ps: Vec<_> = (0..20).map(|i| proplet(i, &[(SHARD_LABEL, "a")])).collect();
        let st = states(&[("a", State::Leaving), ("b", State::Ready)]);
        let plan = plan(&placed(&ps), &st, &HashMap::new(), 8, ShardBy::ClientId);
        assert!(assigned(&plan).is_empty(), "a leaving owner still acts");
        let drains = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Drain { to, .. } if &**to == "b"))
            .count();
        assert_eq!(drains, 8, "every proplet goes, bounded by the limit");
    }

    #[test]
    fn a_drain_whose_reason_went_away_is_cancelled() {
        let p = proplet(7, &[(SHARD_LABEL, "a"), (DRAIN_LABEL, "b")]);
        let only_a = states(&[("a", State::Ready)]);
        let plan = plan(
            &placed(&[p]),
            &only_a,
            &HashMap::new(),
            10,
            ShardBy::ClientId,
        );
        assert!(matches!(plan.steps.as_slice(), [Step::CancelDrain { .. }]));
    }
}
