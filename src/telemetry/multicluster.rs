//! Metrics of a hub's member clusters.
use prometheus::{IntGaugeVec, Opts, Registry};

pub struct MemberMetrics {
    /// 1 while the member's API server answers the hub's probe.
    pub reachable: IntGaugeVec,
    /// Proplets on the member, by phase (`running`, `total`).
    pub proplets: IntGaugeVec,
}

impl MemberMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = MemberMetrics {
            reachable: IntGaugeVec::new(
                Opts::new(
                    "propeller_member_reachable",
                    "1 while the member cluster's API server answers the hub's probe",
                ),
                &["member"],
            )?,
            proplets: IntGaugeVec::new(
                Opts::new(
                    "propeller_member_proplets",
                    "Proplets on the member cluster (running, total), as last probed",
                ),
                &["member", "phase"],
            )?,
        };
        registry.register(Box::new(m.reachable.clone()))?;
        registry.register(Box::new(m.proplets.clone()))?;
        Ok(m)
    }

    /// Forgets every member but `members` (no longer registered, or probed by another hub replica).
    pub fn keep_only(&self, members: &[String]) {
        use prometheus::core::Collector;
        let reported: Vec<String> = self
            .reachable
            .collect()
            .iter()
            .flat_map(|family| family.get_metric().iter())
            .flat_map(|m| m.get_label().iter())
            .filter(|l| l.name() == "member")
            .map(|l| l.value().to_string())
            .collect();
        for member in reported.iter().filter(|m| !members.contains(m)) {
            self.forget(member);
        }
    }

    /// Forgets a member that is no longer registered.
    pub fn forget(&self, member: &str) {
        let _ = self.reachable.remove_label_values(&[member]);
        for phase in ["running", "total"] {
            let _ = self.proplets.remove_label_values(&[member, phase]);
        }
    }
}
