//! Leases held with optimistic concurrency: every acquire, renew and release is a PUT carrying the
//! resourceVersion it was decided on, so two replicas never both believe they hold one Lease (a stale
//! decision fails with 409). Expiry of someone else's Lease is judged by when this replica last saw it
//! change, not by comparing clocks (as client-go does): clock skew between replicas cannot fence early.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};

use super::LEAVING_ANNOTATION;
use super::takeover::TAKEOVER_ANNOTATION;

/// Lease timings (client-go's defaults: 15 s, 10 s, 2 s).
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What an attempt to hold a Lease found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// We hold it; `transitions` counts its changes of holder (a fencing epoch); `from_other`: we took it
    /// from another holder just now.
    Held { transitions: i32, from_other: bool },
    /// Someone else holds it and it has not expired.
    HeldBy(String),
}

/// The holder of a Lease, if any (a released Lease has none).
pub fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// When each Lease was last seen to change (its resourceVersion), by this replica's monotonic clock.
#[derive(Debug, Default)]
pub struct Observed {
    seen: HashMap<String, (String, Instant)>,
}

impl Observed {
    /// Records `lease` as seen now; returns how long it has been unchanged.
    pub fn observe(&mut self, lease: &Lease, now: Instant) -> Duration {
        let rv = lease.resource_version().unwrap_or_default();
        let entry = self
            .seen
            .entry(lease.name_any())
            .or_insert_with(|| (rv.clone(), now));
        if entry.0 != rv {
            *entry = (rv, now);
        }
        now.saturating_duration_since(entry.1)
    }

    /// How long the Lease `name` has been unchanged, if it was ever seen.
    pub fn unchanged_for(&self, name: &str, now: Instant) -> Option<Duration> {
        self.seen
            .get(name)
            .map(|(_, at)| now.saturating_duration_since(*at))
    }

    /// When the Lease `name` was last seen to change, if it was ever seen.
    pub fn changed_at(&self, name: &str) -> Option<Instant> {
        self.seen.get(name).map(|(_, at)| *at)
    }

    /// Forgets Leases no longer listed.
    pub fn retain(&mut self, names: &std::collections::HashSet<String>) {
        self.seen.retain(|n, _| names.contains(n));
    }
}

/// One holder's access to the Leases of a namespace.
#[derive(Clone)]
pub struct Leases {
    api: Api<Lease>,
    holder: String,
    duration: Duration,
}

impl Leases {
    pub fn new(client: kube::Client, namespace: &str, holder: &str, duration: Duration) -> Self {
        Leases {
            api: Api::namespaced(client, namespace),
            holder: holder.to_string(),
            duration,
        }
    }

    pub fn api(&self) -> &Api<Lease> {
        &self.api
    }

    /// Creates, renews or takes `name`. Taking someone else's Lease needs `takeable(&lease)` (a released
    /// Lease is always takeable). `labels` are set on creation; `leaving` sets (`Some(true)`) or clears
    /// (`Some(false)`) the leaving mark, `None` leaves it as it is; taking the Lease writes `takeover` as
    /// its takeover record, or removes the one it had.
    pub async fn hold(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        leaving: Option<bool>,
        takeover: Option<&str>,
        takeable: impl FnOnce(&Lease) -> bool,
    ) -> kube::Result<Hold> {
        let now = MicroTime(jiff::Timestamp::now());
        let Some(mut lease) = self.api.get_opt(name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    annotations: (leaving == Some(true))
                        .then(|| [(LEAVING_ANNOTATION.to_string(), "true".to_string())].into()),
                    labels: Some(
                        labels
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    ),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Hold::Held {
                    transitions: 0,
                    from_other: false,
                }),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Hold::HeldBy(String::new())),
                Err(e) => Err(e),
            };
        };
        let current = holder(&lease).map(str::to_string);
        let mine = current.as_deref() == Some(self.holder.as_str());
        if !mine && current.is_some() && !takeable(&lease) {
            return Ok(Hold::HeldBy(current.unwrap_or_default()));
        }
        match leaving {
            Some(true) => {
                lease
                    .annotations_mut()
                    .insert(LEAVING_ANNOTATION.to_string(), "true".to_string());
            }
            Some(false) => {
                lease.annotations_mut().remove(LEAVING_ANNOTATION);
            }
            None => {}
        }
        let from_other = !mine && current.is_some();
        if !mine {
            match takeover {
                Some(record) => lease
                    .annotations_mut()
                    .insert(TAKEOVER_ANNOTATION.to_string(), record.to_string()),
                None => lease.annotations_mut().remove(TAKEOVER_ANNOTATION),
            };
        }
        let spec = lease.spec.get_or_insert_with(Default::default);
        if !mine {
            spec.holder_identity = Some(self.holder.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.duration_seconds());
        let transitions = spec.lease_transitions.unwrap_or(0);
        // The PUT carries the resourceVersion read above: a concurrent change makes it fail.
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(Hold::Held {
                transitions,
                from_other,
            }),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Hold::HeldBy(String::new())),
            Err(e) => Err(e),
        }
    }

    /// Clears the holder of `name` if it is us, so that others need not wait for it to expire.
    pub async fn release(&self, name: &str) -> kube::Result<()> {
        let Some(mut lease) = self.api.get_opt(name).await? else {
            return Ok(());
        };
        if holder(&lease) != Some(self.holder.as_str()) {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        }
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn duration_seconds(&self) -> i32 {
        self.duration.as_secs().clamp(1, i32::MAX as u64) as i32
    }
}

/// A Lease as a test sees it.
#[cfg(test)]
pub(crate) fn test_lease(name: &str, rv: &str, holder: Option<&str>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_string),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, rv: &str, holder: Option<&str>) -> Lease {
        test_lease(name, rv, holder)
    }

    #[test]
    fn expiry_counts_from_the_last_change_this_replica_saw() {
        let mut o = Observed::default();
        let t0 = Instant::now();
        assert_eq!(o.observe(&lease("a", "1", Some("a")), t0), Duration::ZERO);
        let t1 = t0 + Duration::from_secs(7);
        assert_eq!(
            o.observe(&lease("a", "1", Some("a")), t1),
            Duration::from_secs(7)
        );
        // A renewal (new resourceVersion) restarts the count, whatever its renewTime says.
        assert_eq!(o.observe(&lease("a", "2", Some("a")), t1), Duration::ZERO);
        let t2 = t1 + Duration::from_secs(3);
        assert_eq!(
            o.observe(&lease("a", "2", Some("a")), t2),
            Duration::from_secs(3)
        );
        o.retain(&Default::default());
        assert_eq!(o.observe(&lease("a", "2", Some("a")), t2), Duration::ZERO);
    }

    #[test]
    fn a_released_lease_has_no_holder() {
        assert_eq!(holder(&lease("a", "1", Some("x"))), Some("x"));
        assert_eq!(holder(&lease("a", "1", Some(""))), None);
        assert_eq!(holder(&lease("a", "1", None)), None);
    }
}
