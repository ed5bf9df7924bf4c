//! One replica's membership: it keeps its shard Lease (the right to act on its proplets) and competes for
//! the leader Lease (kube-leader-election), every retry period; it judges the other shards' Leases into the
//! ring's members; as leader, it fences shards that went silent by taking their Lease. A replica that
//! cannot renew its shard Lease within the renew deadline stops acting at once and halts (its successor
//! starts clean, as controller-runtime's managers do); one that loses the leadership steps back.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kube_leader_election::{LeaseLock, LeaseLockParams, LeaseLockResult};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::lease::{Hold, Leases, Observed, Timings, holder};
use super::members::{State, judge_all, next_expiry, silent_since};
use super::ring::ShardBy;
use super::takeover::{TAKEOVER_ANNOTATION, Takeover};
use super::{Ownership, RING, RING_LABEL, ring_selector, shard_lease_name};
use crate::telemetry::Metrics;

#[derive(Clone, Debug)]
pub struct Settings {
    pub identity: String,
    pub namespace: String,
    pub leader_lease: String,
    pub timings: Timings,
    /// What the ring hashes: recorded in a fence, for the takeover of the fenced shard's proplets.
    pub shard_by: ShardBy,
}

/// The running membership loop, and what a graceful stop releases.
pub struct Membership {
    loop_: JoinHandle<()>,
    /// Set by [`Membership::leave`]: the shard Lease is marked leaving, the leadership is not sought.
    leaving: Arc<AtomicBool>,
    /// Runs the loop's next round now instead of at its next tick.
    wake: Arc<tokio::sync::Notify>,
    leases: Leases,
    leader: Arc<LeaseLock>,
    ownership: Ownership,
    settings: Settings,
    metrics: Arc<Metrics>,
}

/// Starts the loop. `halt` is set when this replica must stop (a Lease lost).
pub fn spawn(
    client: Client,
    settings: Settings,
    ownership: Ownership,
    metrics: Arc<Metrics>,
    halt: tokio::sync::watch::Sender<bool>,
) -> Membership {
    let leases = Leases::new(
        client.clone(),
        &settings.namespace,
        &settings.identity,
        settings.timings.duration,
    );
    let leader = Arc::new(LeaseLock::new(
        client,
        &settings.namespace,
        LeaseLockParams {
            lease_name: settings.leader_lease.clone(),
            holder_id: settings.identity.clone(),
            lease_ttl: settings.timings.duration,
        },
    ));
    let leaving = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());
    let (seen, changes) = tokio::sync::mpsc::unbounded_channel();
    let watch = AbortOnDrop(watch_leases(leases.api().clone(), seen));
    let state = Loop {
        leaving: Arc::clone(&leaving),
        wake: Arc::clone(&wake),
        leases: leases.clone(),
        leader: Arc::clone(&leader),
        ownership: ownership.clone(),
        settings: settings.clone(),
        metrics: Arc::clone(&metrics),
        observed: Observed::default(),
        known: BTreeMap::new(),
        takeovers: HashMap::new(),
        _watch: watch,
        renewed: None,
        acting_from: None,
        leading: None,
    };
    let loop_ = tokio::spawn(state.run(halt, changes));
    Membership {
        loop_,
        leaving,
        wake,
        leases,
        leader,
        ownership,
        settings,
        metrics,
    }
}

impl Membership {
    /// Stops renewing without releasing anything (a crash, for tests: the Leases expire).
    pub fn abandon(self) {
        self.loop_.abort();
        self.ownership.revoke();
    }

    /// A graceful stop's first half: marks the shard Lease leaving (the leader then drains this shard's
    /// proplets to the others, make-before-break, as for any live move), hands the leadership over, and
    /// waits until no Proplet is labelled with this shard, or `deadline` passed, or no other shard is
    /// ready to take them. Whatever is left moves once the Lease is released. Returns how many were left.
    pub async fn leave(&self, client: &Client, deadline: Duration) -> usize {
        let started = Instant::now();
        // The loop marks the shard Lease and, if this replica leads, hands the leadership over (another
        // replica then drains us) within a retry period.
        self.leaving.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let proplets: kube::Api<crate::api::Proplet> = kube::Api::all(client.clone());
        let mine = ListParams::default()
            .labels(&super::own_selector(&self.settings.identity))
            .limit(1);
        let mut left = usize::MAX;
        while started.elapsed() < deadline {
            let others = self
                .ownership
                .states()
                .iter()
                .any(|(n, s)| s.is_member() && n != &self.settings.identity);
            left = match proplets.list_metadata(&mine).await {
                Ok(l) => {
                    l.items.len() + l.metadata.remaining_item_count.unwrap_or(0).max(0) as usize
                }
                Err(e) => {
                    warn!(error = %e, "could not count this shard's proplets while leaving");
                    left
                }
            };
            if left == 0 || !others {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        info!(left, took = ?started.elapsed(), "left the ring");
        left
    }

    /// After the controllers drained: gives up both Leases so that others take over within a retry
    /// period instead of a Lease duration.
    pub async fn release(self) {
        self.loop_.abort();
        let _ = self.loop_.await;
        let leading = self.ownership.is_leader();
        self.ownership.revoke();
        let name = shard_lease_name(&self.settings.identity);
        match self.leases.release(&name).await {
            Ok(()) => self.metrics.shards.lease("shard", "released"),
            Err(e) => warn!(error = %e, lease = %name, "shard Lease not released; it will expire"),
        }
        if leading {
            match self.leader.step_down().await {
                Ok(()) => self.metrics.shards.lease("leader", "released"),
                Err(e) => warn!(error = %e, "leader Lease not released; it will expire"),
            }
            leader_gauge(&self.metrics, &self.settings, 0);
        }
    }
}

struct Loop {
    leaving: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    leases: Leases,
    leader: Arc<LeaseLock>,
    ownership: Ownership,
    settings: Settings,
    metrics: Arc<Metrics>,
    observed: Observed,
    /// The ring's Leases by name, as last listed or watched.
    known: BTreeMap<String, Lease>,
    /// The takeover records on fenced Leases, read: each is read again only when it changes (a record's
    /// ring is dear to build, and the Leases are judged every retry period).
    takeovers: HashMap<String, Takeover>,
    _watch: AbortOnDrop,
    /// When the shard Lease was last renewed.
    renewed: Option<Instant>,
    /// After taking our shard Lease back from the leader that fenced us: not before then do we act, so
    /// that the survivors' takeover of our proplets has lapsed (their confirmation lasts a renew deadline).
    acting_from: Option<Instant>,
    /// When the leader Lease was last renewed, while leading.
    leading: Option<Instant>,
}

impl Loop {
    /// Gives up the leadership without halting: the leader's tasks check it before each action.
    fn step_back(&mut self, why: &str) {
        warn!(lease = %self.settings.leader_lease, "{why}: stepping back");
        self.leading = None;
        self.metrics.shards.lease("leader", "lost");
        self.ownership.set_leader(false);
        leader_gauge(&self.metrics, &self.settings, 0);
    }

    /// Rounds every retry period, on a wake-up and at the next expiry; `changes` brings every change of a
    /// ring Lease as the watch sees it.
    async fn run(
        mut self,
        halt: tokio::sync::watch::Sender<bool>,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<Lease>,
    ) {
        let mut every = tokio::time::interval(self.settings.timings.retry_period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = Arc::clone(&self.wake);
            let expiry = self.next_expiry();
            let woke = tokio::select! {
                _ = every.tick() => Woke::Period,
                _ = wake.notified() => Woke::Period,
                Some(lease) = changes.recv() => Woke::Changed(Box::new(lease)),
                _ = tokio::time::sleep_until(expiry) => Woke::Expiry,
            };
            let result = match woke {
                Woke::Period => self.round().await,
                Woke::Changed(lease) => {
                    // Seen as it is made: a renewal is observed within the watch's latency, not a retry
                    // period later, so a silent shard expires a Lease duration after its last renewal.
                    let fenced = takeover_record(&lease).is_some();
                    self.known.insert(lease.name_any(), *lease);
                    self.judge_known(None).await;
                    // A fence seen by the watch confirms nothing: a list does, at once, so that the
                    // survivors take the fenced shard's proplets over without waiting for the next round.
                    if fenced {
                        let timings = self.settings.timings;
                        self.judge(timings.retry_period, timings.renew_deadline)
                            .await
                    } else {
                        Ok(())
                    }
                }
                // A shard went silent for a Lease duration just now: a whole round, so that a dead leader's
                // Lease is sought at once too.
                Woke::Expiry => self.round().await,
            };
            if let Err(why) = result {
                error!(identity = %self.settings.identity, "{why}: this replica stops acting and halts");
                self.ownership.revoke();
                leader_gauge(&self.metrics, &self.settings, 0);
                halt.send_replace(true);
                return;
            }
        }
    }

    /// One retry period's work; an error means this replica lost a Lease it needs.
    async fn round(&mut self) -> Result<(), String> {
        let deadline = self.settings.timings.renew_deadline;
        let duration = self.settings.timings.duration;
        let started = Instant::now();
        let own = shard_lease_name(&self.settings.identity);
        // Our own Lease held by someone else (the leader fenced us while we were away) is ours again once
        // it expired.
        let expired = self
            .observed
            .unchanged_for(&own, started)
            .is_some_and(|d| d >= duration);
        // Every call is bounded: a stuck request must not keep this replica believing in a Lease it no
        // longer renews (may_act goes false at the deadline all the same), nor stop it from halting.
        let retry = self.settings.timings.retry_period;
        match bounded(
            deadline / 2,
            self.leases.hold(
                &own,
                &[(RING_LABEL, RING)],
                Some(self.leaving.load(Ordering::SeqCst)),
                None,
                |_| expired,
            ),
        )
        .await
        {
            Ok(Hold::Held { from_other, .. }) => {
                if self.renewed.is_none() {
                    info!(lease = %own, "shard Lease acquired");
                    self.metrics.shards.lease("shard", "acquired");
                }
                if from_other {
                    // Fenced while we were away: survivors may act on our proplets until their last
                    // confirmation of the fence lapses (a renew deadline after the list that made it).
                    let from = Instant::now() + deadline;
                    warn!(lease = %own, "shard Lease taken back after a fence: acting again in {deadline:?}");
                    self.acting_from = Some(from);
                }
                self.renewed = Some(started);
                if self.acting_from.is_none_or(|from| Instant::now() >= from) {
                    self.ownership.renewed(started);
                }
            }
            Ok(Hold::HeldBy(other)) => {
                if self.renewed.is_some() {
                    self.metrics.shards.lease("shard", "lost");
                    return Err(format!("shard Lease {own} taken by {other:?}"));
                }
            }
            Err(e) => {
                self.metrics.shards.lease("shard", "error");
                warn!(error = %e, lease = %own, "shard Lease not renewed");
                if self.renewed.is_some_and(|t| t.elapsed() >= deadline) {
                    return Err(format!("shard Lease {own} not renewed within {deadline:?}"));
                }
            }
        }

        if self.leaving.load(Ordering::SeqCst) {
            // A replica on its way out does not lead: another one takes over and drains it.
            if self.leading.take().is_some() {
                self.ownership.set_leader(false);
                leader_gauge(&self.metrics, &self.settings, 0);
                match bounded_any(deadline / 2, self.leader.step_down()).await {
                    Some(Ok(())) => {
                        info!(lease = %self.settings.leader_lease, "leadership handed over: leaving");
                        self.metrics.shards.lease("leader", "released");
                    }
                    Some(Err(e)) => warn!(error = %e, "leader Lease not released; it will expire"),
                    None => warn!("leader Lease release timed out; it will expire"),
                }
            }
        } else {
            self.compete(started, retry, deadline).await;
        }
        self.judge(retry, deadline).await
    }

    /// One try at the leader Lease: acquired or renewed, or stepping back when it is lost.
    async fn compete(&mut self, started: Instant, retry: Duration, deadline: Duration) {
        match tokio::time::timeout(retry.max(deadline / 2), self.leader.try_acquire_or_renew())
            .await
            .unwrap_or_else(|_| {
                Err(kube_leader_election::Error::TraverseLease {
                    key: "(request timed out)".to_string(),
                })
            }) {
            Ok(LeaseLockResult::Acquired(_)) => {
                if self.leading.is_none() {
                    info!(lease = %self.settings.leader_lease, "leader Lease acquired");
                    self.metrics.shards.lease("leader", "acquired");
                }
                self.leading = Some(started);
                self.ownership.set_leader(true);
                leader_gauge(&self.metrics, &self.settings, 1);
            }
            Ok(LeaseLockResult::NotAcquired(_)) => {
                // kube-leader-election takes an expired Lease without a precondition: two replicas may both
                // believe they won, and the loser learns it here. Every leader decision is a guarded write
                // and each leader task checks the leadership before it acts, so stepping back is enough.
                if self.leading.is_some() {
                    self.step_back("leadership lost");
                }
            }
            Err(e) => {
                self.metrics.shards.lease("leader", "error");
                warn!(error = %e, "leader Lease not renewed");
                if self.leading.is_some_and(|t| t.elapsed() >= deadline) {
                    self.step_back("leader Lease not renewed within the renew deadline");
                }
            }
        }
    }

    /// Reads every shard Lease into the ring's states; as leader, fences the silent ones.
    async fn judge(&mut self, retry: Duration, deadline: Duration) -> Result<(), String> {
        let started = Instant::now();
        let listed = bounded(
            retry.max(deadline / 2),
            self.leases
                .api()
                .list(&ListParams::default().labels(&ring_selector())),
        )
        .await;
        match listed {
            Ok(l) => {
                self.known = l.items.into_iter().map(|l| (l.name_any(), l)).collect();
            }
            Err(e) => {
                // The watch may still bring changes; the ring is judged from what was seen last.
                warn!(error = %e, "shard Leases not listed; the ring stays as it was");
                return Ok(());
            }
        }
        self.judge_known(Some(started)).await;
        Ok(())
    }

    /// When the next live shard Lease expires unless renewed (far ahead when there is none: the retry
    /// period's round comes first).
    fn next_expiry(&self) -> tokio::time::Instant {
        // One that came within the margin is still ahead: the wake-up lands just past it.
        let now = Instant::now();
        let from = now.checked_sub(EXPIRY_MARGIN).unwrap_or(now);
        // A shard's silence (a renew deadline: listed ahead of its fence) and its expiry (its fence).
        let timings = &self.settings.timings;
        let soonest = [timings.renew_deadline, timings.duration]
            .into_iter()
            .filter_map(|after| next_expiry(self.known.values(), &self.observed, after, from))
            .map(|at| at + EXPIRY_MARGIN)
            .min();
        soonest.map_or_else(
            || tokio::time::Instant::now() + self.settings.timings.retry_period * 4,
            tokio::time::Instant::from_std,
        )
    }

    /// Judges the known shard Leases into the ring's states and the fenced shards' takeovers (`listed`:
    /// when the list they come from started, None for the watch); as leader, fences the silent ones.
    async fn judge_known(&mut self, listed: Option<Instant>) {
        let duration = self.settings.timings.duration;
        let leases: Vec<Lease> = self.known.values().cloned().collect();
        let now = Instant::now();
        let states = judge_all(&leases, &mut self.observed, now, duration);
        let members = states.iter().filter(|(_, s)| s.is_member()).count();
        for s in [
            State::Ready,
            State::Leaving,
            State::Expired,
            State::Dead,
            State::Released,
        ] {
            let n = states.iter().filter(|(_, st)| *st == s).count();
            self.metrics
                .shards
                .shard_states
                .with_label_values(&[s.as_str()])
                .set(n as i64);
        }
        self.metrics.shards.ring_members.set(members as i64);
        let mut read = std::mem::take(&mut self.takeovers);
        let takeovers = states
            .iter()
            .filter(|(n, s)| *s == State::Dead && n != &self.settings.identity)
            .filter_map(|(n, _)| {
                let record = takeover_record(self.known.get(&shard_lease_name(n))?)?;
                let takeover = match read.remove(record) {
                    Some(t) => t,
                    None => Takeover::parse(record)?,
                };
                self.takeovers.insert(record.to_string(), takeover.clone());
                Some((n.clone(), takeover))
            })
            .collect();
        // A shard silent for a renew deadline has stopped acting; it is fenced at its expiry. Its objects
        // are listed in between, so that a takeover finds them cached (the list, not the fence, took most
        // of a takeover's time at 10,000 proplets).
        let silent = silent_since(
            self.known.values(),
            &self.observed,
            now,
            self.settings.timings.renew_deadline,
        )
        .into_iter()
        .filter(|s| *s != self.settings.identity)
        .collect();
        self.ownership.set_silent(silent);
        // Takeovers before states: whoever reads the states, then the takeovers, finds the record of
        // every dead shard it saw (the sharder must never relabel a taken-over proplet elsewhere).
        self.ownership.set_takeovers(takeovers, listed);
        self.ownership.set_states(states.clone());

        if self.ownership.is_leader() {
            let ring = states
                .iter()
                .filter(|(_, s)| s.is_member())
                .map(|(n, _)| n.clone());
            let record = Takeover::record_of(self.settings.shard_by, ring);
            // Never our own: if it expired, our own renewal is failing and we stop acting anyway.
            for (shard, _) in states
                .iter()
                .filter(|(n, s)| *s == State::Expired && n != &self.settings.identity)
            {
                self.fence(shard, &leases, &record).await;
            }
        }
    }

    /// Takes the Lease of a shard silent for a Lease duration: from then on it cannot renew, and it
    /// stopped acting at its renew deadline before; its proplets may move.
    async fn fence(&self, shard: &str, leases: &[Lease], record: &str) {
        let name = shard_lease_name(shard);
        let Some(judged) = leases.iter().find(|l| l.name_any() == name) else {
            return;
        };
        let rv = judged.resource_version();
        let result = bounded(
            self.settings.timings.renew_deadline / 2,
            self.leases.hold(&name, &[], None, Some(record), |current| {
                // Only the version judged silent: a renewal in between keeps the shard alive.
                current.resource_version() == rv && holder(current) == Some(shard)
            }),
        )
        .await;
        match result {
            Ok(Hold::Held { .. }) => {
                warn!(%shard, "shard silent for a Lease duration: its Lease is taken, its proplets move");
                self.metrics.shards.lease("shard", "fenced");
            }
            Ok(Hold::HeldBy(_)) => {}
            Err(e) => warn!(error = %e, %shard, "could not fence a silent shard"),
        }
    }
}

/// The takeover record a fence wrote on a shard Lease, while someone other than the shard holds it.
fn takeover_record(lease: &Lease) -> Option<&str> {
    let shard = super::shard_of_lease(lease.metadata.name.as_deref()?)?;
    holder(lease).filter(|h| *h != shard)?;
    lease
        .annotations()
        .get(TAKEOVER_ANNOTATION)
        .map(String::as_str)
}

/// Past a Lease's expiry when the timer fires (the judgement needs `unchanged_for >= duration`).
const EXPIRY_MARGIN: Duration = Duration::from_millis(5);

/// What woke the loop.
enum Woke {
    Period,
    Changed(Box<Lease>),
    Expiry,
}

/// Sends every ring Lease as it is listed or changes. Deletions are left to the periodic list (a
/// deleted shard Lease is a rare, manual act).
fn watch_leases(
    api: Api<Lease>,
    seen: tokio::sync::mpsc::UnboundedSender<Lease>,
) -> JoinHandle<()> {
    let config = watcher::Config::default().labels(&ring_selector());
    tokio::spawn(
        watcher(api, config)
            .default_backoff()
            .applied_objects()
            .for_each(move |lease| {
                match lease {
                    Ok(lease) => {
                        let _ = seen.send(lease);
                    }
                    Err(e) => warn!(error = %e, "shard Lease watch failed; retrying"),
                }
                futures::future::ready(())
            }),
    )
}

/// Aborts the task when dropped (the Lease watch ends with the loop).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `call`, or a timeout error after `limit`.
async fn bounded<T>(
    limit: std::time::Duration,
    call: impl std::future::Future<Output = kube::Result<T>>,
) -> kube::Result<T> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(kube::Error::Service(
            format!("no answer within {limit:?}").into(),
        ))
    })
}

/// `call`, or `None` after `limit`.
async fn bounded_any<T>(
    limit: std::time::Duration,
    call: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::time::timeout(limit, call).await.ok()
}

/// `leader_election_master_status` of this replica's leader Lease.
fn leader_gauge(metrics: &Metrics, settings: &Settings, value: i64) {
    metrics
        .shards
        .leader
        .with_label_values(&[&settings.leader_lease])
        .set(value);
}
