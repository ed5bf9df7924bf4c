//! The states of the shards, judged from their Leases (after timebertt's sharder): ready, leaving (renewed
//! and marked leaving: a graceful stop, whose proplets are drained to the others), expired (not renewed
//! for a Lease duration: its proplets wait while the leader takes its Lease), dead (someone else holds
//! it: the old holder is fenced) and released (let go). Only ready shards are members of the ring.
//!
//! Taking an expired Lease at once is safe: a holder stops acting a renew deadline after the start of its
//! last successful renewal, and this replica saw that renewal no earlier than it was made, so a Lease
//! duration (longer than the renew deadline) after seeing it, the holder has stopped.
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;

use super::lease::{Observed, holder};
use super::{LEAVING_ANNOTATION, shard_of_lease};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Ready,
    Leaving,
    Expired,
    Dead,
    Released,
}

impl State {
    pub fn is_member(self) -> bool {
        self == State::Ready
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Leaving => "leaving",
            State::Expired => "expired",
            State::Dead => "dead",
            State::Released => "released",
        }
    }
}

/// The state of one shard Lease that has been unchanged for `unchanged_for`.
pub fn judge(lease: &Lease, unchanged_for: Duration, lease_duration: Duration) -> State {
    let name = lease.name_any();
    let shard = shard_of_lease(&name).unwrap_or_default();
    match holder(lease) {
        None => State::Released,
        Some(h) if h != shard => State::Dead,
        Some(_) if unchanged_for < lease_duration => {
            if lease.annotations().contains_key(LEAVING_ANNOTATION) {
                State::Leaving
            } else {
                State::Ready
            }
        }
        Some(_) => State::Expired,
    }
}

/// Every shard with its state, sorted by name.
pub fn judge_all(
    leases: &[Lease],
    observed: &mut Observed,
    now: Instant,
    lease_duration: Duration,
) -> Vec<(String, State)> {
    let names = leases.iter().map(|l| l.name_any()).collect();
    observed.retain(&names);
    let mut shards: Vec<(String, State)> = leases
        .iter()
        .filter_map(|l| {
            let name = l.name_any();
            let shard = shard_of_lease(&name)?.to_string();
            let unchanged = observed.observe(l, now);
            Some((shard, judge(l, unchanged, lease_duration)))
        })
        .collect();
    shards.sort_by(|a, b| a.0.cmp(&b.0));
    shards
}

/// Each shard whose Lease it still holds itself, with when this replica last saw that Lease change (a
/// fenced or released Lease is no one's own any more).
fn own_leases<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    observed: &Observed,
) -> Vec<(String, Instant)> {
    leases
        .into_iter()
        .filter_map(|l| {
            let name = l.name_any();
            let shard = shard_of_lease(&name)?;
            if holder(l) != Some(shard) {
                return None;
            }
            Some((shard.to_string(), observed.changed_at(&name)?))
        })
        .collect()
}

/// The shards whose own Lease has been unchanged for `silent_for` or longer, as this replica observed it.
pub fn silent_since<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    observed: &Observed,
    now: Instant,
    silent_for: Duration,
) -> Vec<String> {
    own_leases(leases, observed)
        .into_iter()
        .filter(|(_, at)| now.saturating_duration_since(*at) >= silent_for)
        .map(|(shard, _)| shard)
        .collect()
}

/// The first moment after `now` at which a Lease still held by its own shard will have been unchanged for
/// `lease_duration`, as this replica observed them (a fenced or released Lease expires no more; one past
/// it already does not hide the next).
pub fn next_expiry<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    observed: &Observed,
    lease_duration: Duration,
    now: Instant,
) -> Option<Instant> {
    own_leases(leases, observed)
        .into_iter()
        .map(|(_, at)| at + lease_duration)
        .filter(|at| *at > now)
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(shard: &str, rv: &str, holder: Option<&str>) -> Lease {
        super::super::lease::test_lease(&super::super::shard_lease_name(shard), rv, holder)
    }

    #[test]
    fn a_silent_shard_expires_and_is_dead_only_once_fenced() {
        let d = Duration::from_secs(15);
        let l = lease("op-1", "5", Some("op-1"));
        assert_eq!(judge(&l, Duration::from_secs(3), d), State::Ready);
        assert_eq!(judge(&l, Duration::from_secs(16), d), State::Expired);
        assert_eq!(
            judge(&lease("op-1", "6", Some("op-0")), Duration::ZERO, d),
            State::Dead
        );
        assert_eq!(
            judge(&lease("op-1", "6", None), Duration::ZERO, d),
            State::Released
        );
        assert!(State::Ready.is_member() && !State::Expired.is_member());
        let mut leaving = lease("op-1", "7", Some("op-1"));
        leaving
            .annotations_mut()
            .insert(LEAVING_ANNOTATION.into(), "true".into());
        assert_eq!(judge(&leaving, Duration::from_secs(3), d), State::Leaving);
        assert!(!State::Leaving.is_member());
        // Silent while leaving: expired all the same.
        assert_eq!(judge(&leaving, Duration::from_secs(16), d), State::Expired);
    }

    #[test]
    fn the_next_expiry_is_the_earliest_live_lease_seen_plus_a_duration() {
        let d = Duration::from_secs(15);
        let mut o = Observed::default();
        let t0 = Instant::now();
        let a = lease("a", "1", Some("a"));
        let b = lease("b", "1", Some("b"));
        let fenced = lease("c", "1", Some("a"));
        let released = lease("d", "1", None);
        for (l, at) in [(&a, 3), (&b, 1), (&fenced, 0), (&released, 0)] {
            o.observe(l, t0 + Duration::from_secs(at));
        }
        let all = [a.clone(), b, fenced, released];
        assert_eq!(
            next_expiry(&all, &o, d, t0),
            Some(t0 + Duration::from_secs(16))
        );
        // b renewed: a is next.
        o.observe(&lease("b", "2", Some("b")), t0 + Duration::from_secs(5));
        assert_eq!(
            next_expiry(&all, &o, d, t0),
            Some(t0 + Duration::from_secs(18))
        );
        assert_eq!(next_expiry(&all[2..], &o, d, t0), None);
        // a's moment passed (it expired, unfenced): b's still comes.
        assert_eq!(
            next_expiry(&all, &o, d, t0 + Duration::from_secs(19)),
            Some(t0 + Duration::from_secs(20))
        );
    }

    #[test]
    fn states_follow_what_this_replica_saw_change() {
        let d = Duration::from_secs(15);
        let mut o = Observed::default();
        let t0 = Instant::now();
        let all = vec![lease("b", "1", Some("b")), lease("a", "1", Some("a"))];
        assert_eq!(
            judge_all(&all, &mut o, t0, d),
            vec![("a".into(), State::Ready), ("b".into(), State::Ready)]
        );
        let later = t0 + Duration::from_secs(20);
        let renewed = vec![lease("b", "1", Some("b")), lease("a", "2", Some("a"))];
        assert_eq!(
            judge_all(&renewed, &mut o, later, d),
            vec![("a".into(), State::Ready), ("b".into(), State::Expired)]
        );
    }
}
