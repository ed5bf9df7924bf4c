//! The sharding protocol's controllers (see docs/sharding.md): the leader's [`sharder`] assigns Proplets to
//! shards by the ring ([`plan`]); every shard [`claim`]s unassigned Tasks and runs both ends of live moves
//! ([`handover`]). Which proplets a replica owns is [`crate::sharding::Ownership`]'s answer.
pub mod claim;
pub mod fleet;
pub mod handover;
pub mod labels;
pub mod plan;
pub mod sharder;
pub mod takeover;
pub mod view;
