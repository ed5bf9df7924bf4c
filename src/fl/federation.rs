//! A hub FederatedJob on its members, as pure decisions (unit-tested; the controller does the I/O):
//! who trains on each member, the member FederatedJob of each round (one round, starting from the hub's
//! global model), and when a hub round aggregates.
//!
//! Two-level FedAvg: each member averages its participants' updates weighted by samples and reports its
//! model with the samples behind it; the hub averages member models weighted by those samples. When every
//! participant answers, that equals FedAvg over all participants at once:
//! `Σₘ Nₘ·(Σᵢ nᵢθᵢ / Nₘ) / Σₘ Nₘ = Σᵢ nᵢθᵢ / Σᵢ nᵢ`.
use std::collections::BTreeMap;

use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::store;
use crate::api::federated_job::{FederatedJob, MemberParticipants};
use crate::api::proplet::{Proplet, PropletPhase};
use crate::naming::bounded_name;

/// On member FederatedJobs: the uid of the hub job that made them.
pub const HUB_JOB_UID_LABEL: &str = "propeller.propeller.abstractmachines.fr/hub-job-uid";
/// On member FederatedJobs: the hub round they are part of.
pub const HUB_ROUND_LABEL: &str = "propeller.propeller.abstractmachines.fr/hub-round";
/// On member FederatedJobs: `namespace/name` of the hub job, for people.
pub const HUB_JOB_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/hub-job";
/// On the hub job: its member FederatedJobs are deleted before it goes.
pub const MEMBER_JOBS_FINALIZER: &str = "propeller.propeller.abstractmachines.fr/member-jobs";

/// Spec errors of a hub job, before anything runs.
pub fn validate(job: &FederatedJob) -> Result<(), String> {
    let Some(members) = &job.spec.members else {
        return Err("not a hub job: spec.members is absent".into());
    };
    if !job.spec.participants.is_empty() {
        return Err(
            "participants must be empty in a hub job: name them per member in members.clusters"
                .into(),
        );
    }
    if members.clusters.is_empty() {
        return Err("members.clusters is empty".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in &members.clusters {
        if m.name.trim().is_empty() {
            return Err("a member has an empty name".into());
        }
        if !seen.insert(&m.name) {
            return Err(format!("member {:?} is listed twice", m.name));
        }
        if m.max_participants.is_some_and(|n| n < 1) {
            return Err(format!(
                "member {}: maxParticipants must be at least 1",
                m.name
            ));
        }
        if m.k_of_n.is_some_and(|k| k < 1) {
            return Err(format!("member {}: kOfN must be at least 1", m.name));
        }
        if !m.participants.is_empty() && m.k_of_n.is_some_and(|k| k > m.participants.len() as i64) {
            return Err(format!(
                "member {}: kOfN {} is more than its {} participants",
                m.name,
                m.k_of_n.unwrap_or_default(),
                m.participants.len()
            ));
        }
    }
    let n = members.clusters.len() as i64;
    if let Some(min) = members.min_available
        && !(1..=n).contains(&min)
    {
        return Err(format!(
            "members.minAvailable is {min}: it must be between 1 and the {n} members"
        ));
    }
    if job.spec.k_of_n < 0 {
        return Err("kOfN must not be negative".into());
    }
    Ok(())
}

/// Member models a hub round needs.
pub fn min_available(job: &FederatedJob) -> usize {
    let members = job.spec.members.as_ref();
    let n = members.map_or(0, |m| m.clusters.len());
    members
        .and_then(|m| m.min_available)
        .map_or(n, |k| k.max(1) as usize)
}

/// The member FederatedJob of hub round `n`.
pub fn member_job_name(job: &str, n: i64) -> String {
    bounded_name(job, &format!("-round-{n}"), 253)
}

/// Where member `m`'s FederatedJobs and Proplets are.
pub fn member_namespace(job: &FederatedJob, m: &MemberParticipants) -> String {
    m.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| job.namespace().unwrap_or_default())
}

/// Who trains on a member: the named participants, else its Running proplets matching the selector, in
/// name order, at most `maxParticipants`.
pub fn choose_participants(m: &MemberParticipants, proplets: &[Proplet]) -> Vec<String> {
    if !m.participants.is_empty() {
        return m
            .participants
            .iter()
            .map(|p| p.proplet_id.clone())
            .collect();
    }
    let wanted = m.selector.clone().unwrap_or_default();
    let mut chosen: Vec<String> = proplets
        .iter()
        .filter(|p| p.phase() == PropletPhase::Running)
        .filter(|p| {
            let labels = p.labels();
            wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .map(|p| p.name_any())
        .collect();
    chosen.sort();
    if let Some(max) = m.max_participants {
        chosen.truncate(max.max(1) as usize);
    }
    chosen
}

/// Updates a member needs: its own kOfN, else the job's, capped at its participants; else all of them.
pub fn member_k(job: &FederatedJob, m: &MemberParticipants, participants: usize) -> i64 {
    let n = participants as i64;
    m.k_of_n
        .or((job.spec.k_of_n > 0).then_some(job.spec.k_of_n))
        .map_or(n, |k| k.clamp(1, n.max(1)))
}

/// Member `m`'s FederatedJob for hub round `n`: one round over `participants` from `model` (the hub's
/// global model version n−1), the job's client, hyperparameters, dataset and aggregator.
pub fn member_job(
    job: &FederatedJob,
    m: &MemberParticipants,
    n: i64,
    model: &Value,
    participants: &[String],
) -> Result<FederatedJob, String> {
    let uid = job.uid().ok_or("the hub job has no uid yet")?;
    let s = &job.spec;
    serde_json::from_value(json!({
        "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "FederatedJob",
        "metadata": {
            "name": member_job_name(&job.name_any(), n),
            "namespace": member_namespace(job, m),
            "labels": {HUB_JOB_UID_LABEL: uid, HUB_ROUND_LABEL: n.to_string()},
            "annotations": {HUB_JOB_ANNOTATION: format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any())},
        },
        "spec": {
            "experimentId": s.experiment_id,
            "modelRef": store::model_uri((n - 1).max(0) as u64),
            "taskWasmImage": s.task_wasm_image,
            "participants": participants.iter().map(|p| json!({"propletId": p})).collect::<Vec<_>>(),
            "hyperparams": s.hyperparams,
            "kOfN": member_k(job, m, participants.len()),
            "timeoutSeconds": s.timeout_seconds,
            "rounds": {"total": 1},
            "aggregator": s.aggregator,
            "initialModel": model,
            "dataset": s.dataset,
        },
    }))
    .map_err(|e| e.to_string())
}

/// Where a member stands in the current hub round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Its model is stored on the hub.
    Contributed,
    /// Its round runs (or is about to).
    Training,
    /// Its round ended without a model: it cannot contribute to this round unless it runs again.
    Failed(String),
    /// The hub cannot reach it now (it may come back).
    Unreachable(String),
}

/// What a hub round does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Aggregate the contributed members' models.
    Aggregate,
    /// Keep going: members may still contribute.
    Running,
    /// Below quorum and nothing more will come by itself: wait (the members named are missing), and run
    /// the failed members' rounds again.
    Waiting { missing: Vec<String> },
}

/// The decision of a hub round from its members' standing (pure).
pub fn decide(
    standing: &BTreeMap<String, Standing>,
    min_available: usize,
    deadline_passed: bool,
) -> Decision {
    let contributed = standing
        .values()
        .filter(|s| **s == Standing::Contributed)
        .count();
    let still_coming = standing
        .values()
        .filter(|s| matches!(s, Standing::Training | Standing::Unreachable(_)))
        .count();
    if contributed == standing.len() && contributed > 0 {
        return Decision::Aggregate;
    }
    let over = deadline_passed || still_coming == 0;
    if contributed >= min_available.max(1) && over {
        return Decision::Aggregate;
    }
    if over {
        return Decision::Waiting {
            missing: standing
                .iter()
                .filter(|(_, s)| **s != Standing::Contributed)
                .map(|(m, _)| m.clone())
                .collect(),
        };
    }
    Decision::Running
}

/// `job`'s finalizer list with [`MEMBER_JOBS_FINALIZER`] added, or `None` when it is there.
pub fn with_finalizer(job: &FederatedJob) -> Option<Vec<String>> {
    let mut f = job.finalizers().to_vec();
    if f.iter().any(|x| x == MEMBER_JOBS_FINALIZER) {
        return None;
    }
    f.push(MEMBER_JOBS_FINALIZER.to_string());
    Some(f)
}

/// Whether `job` is a hub job.
pub fn is_hub_job(job: &FederatedJob) -> bool {
    job.spec.members.is_some()
}

/// The owner reference a hub object (a member model kept on the hub) carries.
pub fn owner_of(
    job: &FederatedJob,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    job.controller_owner_ref(&()).map(|mut o| {
        o.controller = None;
        o
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fl::aggregate;
    use crate::fl::params::Params;
    use crate::fl::update::Update;

    fn hub(members: Value) -> FederatedJob {
        serde_json::from_value(json!({
            "metadata": {"name": "exp", "namespace": "fl", "uid": "hub-1"},
            "spec": {"experimentId": "exp-1", "modelRef": "m", "taskWasmImage": "fl.wasm",
                     "timeoutSeconds": 30, "rounds": {"total": 2}, "aggregator": {"algorithm": "fedavg"},
                     "hyperparams": {"lr": 0.1}, "dataset": "d", "members": members}
        }))
        .expect("job")
    }

    fn proplet(name: &str, running: bool, labels: Value) -> Proplet {
        let mut v = json!({"metadata": {"name": name, "labels": labels}, "spec": {"type": "external", "connectionConfig": {"clientId": name, "channelId": "c", "mqttAddress": "tcp://m:1883"}}});
        if running {
            v["status"] = json!({"phase": "Running"});
        }
        serde_json::from_value(v).expect("proplet")
    }

    #[test]
    fn hub_specs_say_what_is_wrong() {
        assert!(validate(&hub(json!({"clusters": [{"name": "a"}, {"name": "b"}]}))).is_ok());
        let cases = [
            (json!({"clusters": []}), "empty"),
            (json!({"clusters": [{"name": "a"}, {"name": "a"}]}), "twice"),
            (
                json!({"minAvailable": 3, "clusters": [{"name": "a"}, {"name": "b"}]}),
                "minAvailable",
            ),
            (
                json!({"clusters": [{"name": "a", "maxParticipants": 0}]}),
                "maxParticipants",
            ),
            (
                json!({"clusters": [{"name": "a", "participants": [{"propletId": "p"}], "kOfN": 2}]}),
                "kOfN",
            ),
        ];
        for (members, why) in cases {
            let e = validate(&hub(members.clone())).expect_err("invalid");
            assert!(e.contains(why), "{members}: {e}");
        }
        let mut j = hub(json!({"clusters": [{"name": "a"}]}));
        j.spec.participants = vec![crate::api::federated_job::Participant {
            proplet_id: "p".into(),
        }];
        assert!(
            validate(&j)
                .expect_err("flat participants")
                .contains("per member")
        );
    }

    #[test]
    fn members_train_with_named_or_selected_running_proplets() {
        let j = hub(json!({"clusters": [
            {"name": "a", "participants": [{"propletId": "x"}]},
            {"name": "b", "selector": {"site": "b"}, "maxParticipants": 2},
            {"name": "c", "namespace": "edge"},
        ]}));
        let m = &j.spec.members.as_ref().expect("members").clusters;
        let fleet = [
            proplet("p3", true, json!({"site": "b"})),
            proplet("p1", true, json!({"site": "b"})),
            proplet("p2", false, json!({"site": "b"})),
            proplet("p4", true, json!({"site": "c"})),
            proplet("p0", true, json!({"site": "b"})),
        ];
        assert_eq!(choose_participants(&m[0], &fleet), ["x"]);
        assert_eq!(choose_participants(&m[1], &fleet), ["p0", "p1"]);
        assert_eq!(choose_participants(&m[2], &fleet), ["p0", "p1", "p3", "p4"]);
        assert_eq!(member_namespace(&j, &m[0]), "fl");
        assert_eq!(member_namespace(&j, &m[2]), "edge");
    }

    #[test]
    fn a_member_job_is_one_round_from_the_global_model() {
        let mut j = hub(json!({"clusters": [{"name": "a", "kOfN": 1}, {"name": "b"}]}));
        let m = j.spec.members.clone().expect("members").clusters;
        let model = json!({"w": [0.5, 1.0], "b": 0.1});
        let parts = ["p1".to_string(), "p2".to_string()];
        let mj = member_job(&j, &m[0], 2, &model, &parts).expect("member job");
        assert_eq!(mj.name_any(), "exp-round-2");
        assert_eq!(mj.labels()[HUB_JOB_UID_LABEL], "hub-1");
        assert_eq!(mj.labels()[HUB_ROUND_LABEL], "2");
        assert_eq!(mj.spec.rounds.total, 1);
        assert_eq!(mj.spec.k_of_n, 1);
        assert_eq!(mj.spec.initial_model.as_ref(), Some(&model));
        assert_eq!(mj.spec.model_ref, "fl/models/global_model_v1");
        assert_eq!(mj.spec.dataset.as_deref(), Some("d"));
        assert!(mj.spec.members.is_none(), "a member job runs locally");
        // The member's own validation accepts it.
        assert!(crate::controllers::federated_job::validate(&mj).is_ok());
        assert_eq!(member_k(&j, &m[1], 2), 2, "all participants by default");
        j.spec.k_of_n = 5;
        assert_eq!(member_k(&j, &m[1], 3), 3, "the job's kOfN, capped");
    }

    fn standing(v: &[(&str, Standing)]) -> BTreeMap<String, Standing> {
        v.iter().map(|(m, s)| (m.to_string(), s.clone())).collect()
    }

    #[test]
    fn a_hub_round_aggregates_at_quorum_and_waits_below_it() {
        use Standing::*;
        let all = standing(&[("a", Contributed), ("b", Contributed)]);
        assert_eq!(decide(&all, 2, false), Decision::Aggregate);
        let one = standing(&[("a", Contributed), ("b", Training)]);
        assert_eq!(
            decide(&one, 1, false),
            Decision::Running,
            "b may still come"
        );
        assert_eq!(
            decide(&one, 1, true),
            Decision::Aggregate,
            "deadline, quorum of 1"
        );
        assert_eq!(
            decide(&one, 2, true),
            Decision::Waiting {
                missing: vec!["b".into()]
            }
        );
        let failed = standing(&[("a", Contributed), ("b", Failed("timeout".into()))]);
        assert_eq!(
            decide(&failed, 1, false),
            Decision::Aggregate,
            "b cannot come"
        );
        assert!(matches!(
            decide(&failed, 2, false),
            Decision::Waiting { .. }
        ));
        let down = standing(&[("a", Contributed), ("b", Unreachable("refused".into()))]);
        assert_eq!(
            decide(&down, 2, false),
            Decision::Running,
            "b may come back"
        );
    }

    fn update(id: &str, n: u64, w: &[f64]) -> Update {
        Update {
            round_id: "round-1".into(),
            proplet_id: id.into(),
            num_samples: n,
            metrics: Default::default(),
            params: Params::from_json(&json!({"w": w})).expect("params"),
        }
    }

    #[test]
    fn two_level_fedavg_equals_flat_fedavg() {
        let fedavg = aggregate::by_name("fedavg", None).expect("fedavg");
        let site_a = [
            update("p1", 10, &[1.0, 2.0]),
            update("p2", 30, &[3.0, -1.0]),
        ];
        let site_b = [
            update("p3", 5, &[0.5, 0.5]),
            update("p4", 15, &[-2.0, 4.0]),
            update("p5", 40, &[1.5, 0.0]),
        ];
        let member = |id: &str, ups: &[Update]| {
            let model = fedavg.aggregate(ups).expect("member model");
            Update {
                round_id: "round-1".into(),
                proplet_id: id.into(),
                num_samples: ups.iter().map(|u| u.num_samples).sum(),
                metrics: Default::default(),
                params: model,
            }
        };
        let hub = fedavg
            .aggregate(&[member("a", &site_a), member("b", &site_b)])
            .expect("hub model");
        let all: Vec<Update> = site_a.iter().chain(site_b.iter()).cloned().collect();
        let flat = fedavg.aggregate(&all).expect("flat");
        let (h, f) = (hub.to_json(), flat.to_json());
        for i in 0..2 {
            let (x, y) = (h["w"][i].as_f64(), f["w"][i].as_f64());
            assert!(
                x.zip(y).is_some_and(|(x, y)| (x - y).abs() < 1e-12),
                "{h} vs {f}"
            );
        }
    }
}
