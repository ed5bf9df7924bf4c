//! Where client updates arrive, whatever the route (HTTP `/update`, the MQTT fallback topic, the result
//! envelope): checked against the round and its participants, then stored durably. The round controller
//! is woken by the stored ConfigMap's watch event, so any replica may take an update.
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use super::store::{self, StoreError, Via};
use super::update::Update;
use crate::api::{Proplet, TrainingRound};
use crate::context::Context;

/// Which rounds an update may be for.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// The experiment named in the URL the proplet was given.
    Job { namespace: &'a str, name: &'a str },
    /// Unknown (the MQTT fallback topic names only the round id and the proplet).
    Anywhere,
}

/// Why an update was not taken.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub outcome: &'static str,
    pub message: String,
}

impl Refusal {
    fn new(status: u16, outcome: &'static str, message: String) -> Self {
        Refusal {
            status,
            outcome,
            message,
        }
    }
}

/// What became of an accepted update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipt {
    Accepted,
    /// The participant's update was already stored (the first one counts).
    Duplicate,
    /// The round had closed: recorded, not aggregated.
    Late,
}

impl Receipt {
    pub fn as_str(self) -> &'static str {
        match self {
            Receipt::Accepted => "accepted",
            Receipt::Duplicate => "duplicate",
            Receipt::Late => "late",
        }
    }
}

/// The MQTT clientId of the Proplet named `name` in `namespace`.
pub fn client_of(ctx: &Context, namespace: &str, name: &str) -> Option<String> {
    ctx.proplets
        .get(&ObjectRef::<Proplet>::new(name).within(namespace))
        .and_then(|p| p.spec.connection_config.client().map(str::to_string))
}

/// Checks and stores `update`; the outcome is counted by route.
pub async fn receive(
    ctx: &Context,
    target: Target<'_>,
    update: &Update,
    via: Via,
) -> Result<Receipt, Refusal> {
    let outcome = receive_inner(ctx, target, update, via).await;
    let label = match &outcome {
        Ok(r) => r.as_str(),
        Err(r) => r.outcome,
    };
    ctx.metrics.fl_update(via.as_str(), label);
    if let Err(r) = &outcome {
        warn!(round = %update.round_id, proplet = %update.proplet_id, via = via.as_str(),
              status = r.status, "FL update refused: {}", r.message);
    }
    outcome
}

async fn receive_inner(
    ctx: &Context,
    target: Target<'_>,
    update: &Update,
    via: Via,
) -> Result<Receipt, Refusal> {
    let mut rounds: Vec<std::sync::Arc<TrainingRound>> = ctx
        .training_rounds
        .state()
        .into_iter()
        .filter(|r| r.spec.round_id == update.round_id)
        .filter(|r| match target {
            Target::Job { namespace, name } => {
                r.namespace().as_deref() == Some(namespace) && r.spec.federated_job_ref.name == name
            }
            Target::Anywhere => true,
        })
        .collect();
    if rounds.is_empty() {
        return Err(Refusal::new(
            404,
            "unknown_round",
            format!("no round {:?} in this experiment", update.round_id),
        ));
    }
    // Open rounds first, then the newest (a proplet trains for one round at a time).
    rounds.sort_by_key(|r| (r.is_closed(), std::cmp::Reverse(r.creation_timestamp())));
    let found = rounds.iter().find_map(|r| {
        let ns = r.namespace().unwrap_or_default();
        r.participant_for(&update.proplet_id, |p| client_of(ctx, &ns, p))
            .map(|p| (r, p))
    });
    let Some((round, participant)) = found else {
        return Err(Refusal::new(
            403,
            "not_participant",
            format!(
                "{:?} is not a participant of round {:?}",
                update.proplet_id, update.round_id
            ),
        ));
    };
    let late = round.is_closed();
    let transient =
        |e: &StoreError| matches!(e, StoreError::Kube(k) if super::patience::transient(k));
    let created = super::patience::patiently(transient, || {
        store::put_update(
            ctx,
            round,
            &participant,
            update,
            via,
            late,
            ctx.config.fl_max_update_bytes,
        )
    })
    .await
    .map_err(|e| match e {
        StoreError::TooLarge(m) => Refusal::new(413, "too_large", m),
        StoreError::Kube(e) => {
            Refusal::new(503, "error", format!("could not store the update: {e}"))
        }
    })?;
    let receipt = match (created, late) {
        (false, _) => Receipt::Duplicate,
        (true, true) => Receipt::Late,
        (true, false) => Receipt::Accepted,
    };
    info!(round = %round.name_any(), %participant, via = via.as_str(), receipt = receipt.as_str(), "FL update");
    Ok(receipt)
}
