//! Which proplets this replica owns. Every controller and the MQTT router ask this one component, so
//! that replicas can later split the proplets by clientId without touching them. Today one replica runs
//! and owns everything.
pub mod ring;

#[derive(Clone, Debug, Default)]
pub struct Ownership {
    _private: (),
}

impl Ownership {
    /// The single-replica owner of every proplet.
    pub fn single() -> Self {
        Ownership::default()
    }

    /// Whether this replica handles the proplet with this clientId (and the tasks placed on it).
    pub fn owns_client(&self, _client_id: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_replica_owns_everything() {
        let o = Ownership::single();
        assert!(["a", "proplet-1", ""].iter().all(|c| o.owns_client(c)));
    }
}
