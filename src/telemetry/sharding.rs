//! Metrics of leader election and sharding.
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub struct ShardMetrics {
    /// client-go's name: 1 while this replica holds the leader Lease `name`.
    pub leader: IntGaugeVec,
    pub ring_members: IntGauge,
    /// Shards by state (ready, expired, dead, released), as this replica judged their Leases.
    pub shard_states: IntGaugeVec,
    /// Proplets this shard owns.
    pub proplets: IntGauge,
    /// Of those, the ones taken over from a fenced shard and not relabelled yet.
    pub taken_over: IntGauge,
    /// Tasks this shard holds (its label-selected watch).
    pub tasks: IntGauge,
    /// Proplets moved between shards, by kind (live: drained and acknowledged; dead: from a fenced or
    /// released shard; new: labelled for the first time).
    pub moves_total: IntCounterVec,
    pub drains_in_flight: IntGauge,
    /// Proplets without a live owner, as the leader last saw them.
    pub unowned: IntGauge,
    /// Tasks claimed, passed on, or lost to another shard's claim.
    pub claims_total: IntCounterVec,
    /// Lease acquisitions, renewals, losses and fencings.
    pub lease_total: IntCounterVec,
    /// What the leader reads to keep its view of the fleet beside its two selected watches: full-list
    /// pages, and Proplets read again because the view could not tell their state.
    pub fleet_reads_total: IntCounterVec,
}

impl ShardMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = ShardMetrics {
            leader: IntGaugeVec::new(
                Opts::new(
                    "leader_election_master_status",
                    "1 while this replica is the leader of the named Lease",
                ),
                &["name"],
            )?,
            ring_members: IntGauge::new(
                "propeller_shard_ring_members",
                "Live shards in the ring (ready or expired)",
            )?,
            shard_states: IntGaugeVec::new(
                Opts::new("propeller_shard_states", "Shards by Lease state"),
                &["state"],
            )?,
            proplets: IntGauge::new("propeller_shard_proplets", "Proplets this shard owns")?,
            taken_over: IntGauge::new(
                "propeller_shard_taken_over_proplets",
                "Proplets this shard owns by a fenced shard's takeover record, not relabelled yet",
            )?,
            tasks: IntGauge::new("propeller_shard_tasks", "Tasks this shard holds")?,
            moves_total: IntCounterVec::new(
                Opts::new(
                    "propeller_shard_moves_total",
                    "Proplets assigned to a shard, by kind (new, live, dead)",
                ),
                &["kind"],
            )?,
            drains_in_flight: IntGauge::new(
                "propeller_shard_drains_in_flight",
                "Proplets being handed over between live shards",
            )?,
            unowned: IntGauge::new(
                "propeller_shard_unowned_objects",
                "Proplets with no live owner, as the leader last saw them",
            )?,
            claims_total: IntCounterVec::new(
                Opts::new(
                    "propeller_shard_task_claims_total",
                    "Unclaimed tasks by outcome (claimed, passed, conflict)",
                ),
                &["outcome"],
            )?,
            lease_total: IntCounterVec::new(
                Opts::new(
                    "propeller_shard_lease_total",
                    "Lease events by lease (shard, leader) and event (acquired, lost, released, fenced, error)",
                ),
                &["lease", "event"],
            )?,
            fleet_reads_total: IntCounterVec::new(
                Opts::new(
                    "propeller_shard_fleet_reads_total",
                    "The leader's reads for its view of the fleet, by kind (list_page, reread)",
                ),
                &["kind"],
            )?,
        };
        registry.register(Box::new(m.leader.clone()))?;
        registry.register(Box::new(m.ring_members.clone()))?;
        registry.register(Box::new(m.shard_states.clone()))?;
        registry.register(Box::new(m.proplets.clone()))?;
        registry.register(Box::new(m.tasks.clone()))?;
        registry.register(Box::new(m.taken_over.clone()))?;
        registry.register(Box::new(m.moves_total.clone()))?;
        registry.register(Box::new(m.drains_in_flight.clone()))?;
        registry.register(Box::new(m.unowned.clone()))?;
        registry.register(Box::new(m.claims_total.clone()))?;
        registry.register(Box::new(m.lease_total.clone()))?;
        registry.register(Box::new(m.fleet_reads_total.clone()))?;
        Ok(m)
    }

    pub fn lease(&self, lease: &str, event: &str) {
        self.lease_total.with_label_values(&[lease, event]).inc();
    }
}
