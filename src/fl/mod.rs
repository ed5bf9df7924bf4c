//! Federated learning: the operator is the coordinator and the model registry of every FederatedJob.
//! Updates and models live in the cluster ([`store`]); proplets reach the HTTP side ([`server`]) at
//! `--fl-public-url`, or fall back to MQTT (handled by the router through [`intake`]). Across clusters,
//! a hub runs experiments on member clusters ([`federation`]) and keeps their models ([`member_models`]).
pub mod aggregate;
pub mod capability;
pub mod datasets;
pub mod federation;
pub mod intake;
pub mod member_models;
pub mod params;
pub mod patience;
pub mod server;
pub mod store;
pub mod update;

/// The unprefixed topic real proplets publish an update on when their HTTP POST fails.
pub const UPDATE_FALLBACK_TOPIC: &str = "fl/rounds/+/updates/+";
/// The unprefixed topic Propeller's coordinator announces finished rounds on.
pub const NEXT_ROUND_TOPIC: &str = "fl/rounds/next";

/// `(round_id, proplet_id)` of a fallback topic `fl/rounds/{round_id}/updates/{proplet_id}`.
pub fn parse_update_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("fl/rounds/")?;
    let (round, proplet) = rest.split_once("/updates/")?;
    (!round.is_empty() && !round.contains('/') && !proplet.is_empty() && !proplet.contains('/'))
        .then_some((round, proplet))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fallback_topics_name_round_and_proplet() {
        assert_eq!(
            super::parse_update_topic("fl/rounds/round-1/updates/p-1"),
            Some(("round-1", "p-1"))
        );
        assert_eq!(super::parse_update_topic("fl/rounds/next"), None);
        assert_eq!(
            super::parse_update_topic("m/d/c/x/fl/rounds/r/updates/p"),
            None
        );
    }
}
