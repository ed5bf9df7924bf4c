//! A hub's member clusters: every probe interval (and at once when a registration Secret changes) each hub
//! replica reads the registration Secrets of its namespace and probes the members the ring places on it
//! (all of them for a single replica), keeping each one's `MemberCluster` (created and owned through the
//! Secret, so deleting the Secret removes it). Status is written on transitions, and at most every
//! [`REFRESH`] otherwise; an Event marks each change of reachability. A member's client is kept while its
//! Secret's resourceVersion stays the same, so a rotated token or certificate takes effect at the next
//! probe, without a restart and without disturbing the clients of other members.
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::api::common::{ConditionStatus, find_condition, set_condition};
use crate::api::member_cluster::{MemberCluster, MemberClusterSpec, MemberClusterStatus};
use crate::context::Context;
use crate::controllers::runtime::Shutdown;
use crate::multicluster::probe::{Found, probe};
use crate::multicluster::registration::{self, server_of};

/// Status is rewritten at least this often while nothing changes (lastSuccessfulProbeTime stays useful).
pub const REFRESH: Duration = Duration::from_secs(300);
/// A probe answers within this or counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn spawn(ctx: Arc<Context>, shutdown: Shutdown) -> JoinHandle<()> {
    tokio::spawn(async move {
        let ns = ctx.config.member_namespace();
        let interval = ctx.config.member_probe_interval.0;
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        // Either format's Secrets changing wakes the loop early.
        let [ours, argo] = registration::selectors();
        let changes = futures::stream::select(
            watcher(secrets.clone(), watcher::Config::default().labels(&ours)),
            watcher(secrets.clone(), watcher::Config::default().labels(&argo)),
        )
        .filter(|e| futures::future::ready(matches!(e, Ok(watcher::Event::Apply(_)))));
        let mut changes = std::pin::pin!(changes);
        let mut shutdown = std::pin::pin!(shutdown);
        info!(namespace = %ns, "hub: member clusters are registered by Secrets here");
        loop {
            probe_all(&ctx, &secrets, &ns).await;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = changes.next() => {}
                _ = &mut shutdown => return,
            }
        }
    })
}

async fn probe_all(ctx: &Context, secrets: &Api<Secret>, ns: &str) {
    let mut found = Vec::new();
    for selector in registration::selectors() {
        match secrets.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => found.extend(list.items),
            Err(e) => {
                warn!(namespace = %ns, error = %e, "cannot list member registration Secrets");
                return;
            }
        }
    }
    let names: Vec<String> = found.iter().map(|s| s.name_any()).collect();
    ctx.member_clients.retain(&names);
    // Members are shared out among hub replicas by the ring; each reports metrics for its own only.
    let mine: Vec<Secret> = found
        .into_iter()
        .filter(|s| ctx.ownership.owns_key(&s.name_any()))
        .collect();
    ctx.metrics
        .members
        .keep_only(&mine.iter().map(|s| s.name_any()).collect::<Vec<_>>());
    let members: Api<MemberCluster> = Api::namespaced(ctx.client.clone(), ns);
    for secret in &mine {
        if let Err(e) = probe_one(ctx, &members, secret).await {
            warn!(member = %secret.name_any(), error = %e, "member status not written");
        }
    }
}

async fn probe_one(
    ctx: &Context,
    members: &Api<MemberCluster>,
    secret: &Secret,
) -> Result<(), kube::Error> {
    let name = secret.name_any();
    let outcome = match ctx.member_clients.for_secret(secret).await {
        Ok(client) => probe(&client, PROBE_TIMEOUT).await.map_err(|e| (false, e)),
        Err(e) => Err((true, e)),
    };
    let member = match members.get_opt(&name).await? {
        Some(m) => m,
        None => {
            members
                .create(&PostParams::default(), &new_member(secret))
                .await?
        }
    };
    let before = member.status.clone().unwrap_or_default();
    let status = next_status(&before, &outcome, secret.resource_version());
    record_metrics(ctx, &name, &outcome);
    let was = find_condition(&before.conditions, "Reachable").map(|c| c.status);
    let now = find_condition(&status.conditions, "Reachable").map(|c| c.status);
    if !needs_write(&before, &status) {
        return Ok(());
    }
    members
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": status})),
        )
        .await?;
    ctx.metrics.api_write("memberclusters", "patch");
    if was != now {
        let (type_, reason, note) = match &outcome {
            Ok(f) => (
                EventType::Normal,
                "Reachable",
                format!(
                    "member {name} answers: Kubernetes {}, {} of {} proplets Running",
                    f.version, f.proplets_running, f.proplets_total
                ),
            ),
            Err((_, e)) => (
                EventType::Warning,
                "Unreachable",
                format!("member {name}: {e}"),
            ),
        };
        info!(member = %name, reason, "member cluster {}", note);
        ctx.event(&member, type_, reason, "Probe", note).await;
    }
    Ok(())
}

fn new_member(secret: &Secret) -> MemberCluster {
    let mut m = MemberCluster::new(
        &secret.name_any(),
        MemberClusterSpec {
            secret_name: secret.name_any(),
            server: server_of(secret),
        },
    );
    m.metadata.namespace = secret.namespace();
    // Owned by its Secret: deleting the registration removes the member's object.
    // Not blocking the Secret's deletion: that would need `update` on secrets/finalizers.
    m.metadata.owner_references = secret.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o.block_owner_deletion = None;
        vec![o]
    });
    m
}

/// The status after a probe (`Err((secret_unusable, why))` when it failed). Pure: unit-tested.
pub fn next_status(
    before: &MemberClusterStatus,
    outcome: &Result<Found, (bool, String)>,
    secret_version: Option<String>,
) -> MemberClusterStatus {
    let mut s = before.clone();
    s.secret_version = secret_version;
    match outcome {
        Ok(f) => {
            set_condition(
                &mut s.conditions,
                "Reachable",
                ConditionStatus::True,
                "ProbeSucceeded",
                &format!("Kubernetes {}", f.version),
                None,
            );
            let (st, reason, msg) = if f.operator_installed {
                (
                    ConditionStatus::True,
                    "CRDsInstalled",
                    "the Propeller CRDs are installed",
                )
            } else {
                (
                    ConditionStatus::False,
                    "CRDsMissing",
                    "no Propeller CRDs: install crds/ and the operator (kustomize/member)",
                )
            };
            set_condition(
                &mut s.conditions,
                "OperatorInstalled",
                st,
                reason,
                msg,
                None,
            );
            s.kubernetes_version = Some(f.version.clone());
            s.operator_installed = Some(f.operator_installed);
            s.proplets_running = Some(f.proplets_running);
            s.proplets_total = Some(f.proplets_total);
            s.last_successful_probe_time = Some(Time(jiff::Timestamp::now()));
            s.error = None;
        }
        Err((secret_unusable, why)) => {
            let reason = if *secret_unusable {
                "InvalidSecret"
            } else {
                "ProbeFailed"
            };
            set_condition(
                &mut s.conditions,
                "Reachable",
                ConditionStatus::False,
                reason,
                why,
                None,
            );
            s.error = Some(why.clone());
        }
    }
    s
}

/// Whether `after` differs from `before` in more than its probe time, or the last write is old.
pub fn needs_write(before: &MemberClusterStatus, after: &MemberClusterStatus) -> bool {
    let mut a = after.clone();
    a.last_successful_probe_time = before.last_successful_probe_time.clone();
    if &a != before {
        return true;
    }
    match (
        &before.last_successful_probe_time,
        &after.last_successful_probe_time,
    ) {
        (Some(b), Some(n)) => {
            n.0.duration_since(b.0)
                .try_into()
                .is_ok_and(|d: Duration| d >= REFRESH)
        }
        (None, Some(_)) => true,
        _ => false,
    }
}

fn record_metrics(ctx: &Context, name: &str, outcome: &Result<Found, (bool, String)>) {
    let m = &ctx.metrics.members;
    match outcome {
        Ok(f) => {
            m.reachable.with_label_values(&[name]).set(1);
            m.proplets
                .with_label_values(&[name, "running"])
                .set(f.proplets_running);
            m.proplets
                .with_label_values(&[name, "total"])
                .set(f.proplets_total);
        }
        Err(_) => m.reachable.with_label_values(&[name]).set(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found() -> Found {
        Found {
            version: "v1.20.2".into(),
            operator_installed: true,
            proplets_running: 2,
            proplets_total: 3,
        }
    }

    #[test]
    fn a_probe_fills_the_status_and_a_failure_keeps_what_was_known() {
        let s = next_status(&Default::default(), &Ok(found()), Some("7".into()));
        assert_eq!(s.proplets_running, Some(2));
        assert_eq!(
            find_condition(&s.conditions, "Reachable").map(|c| c.status),
            Some(ConditionStatus::True)
        );
        let down = next_status(&s, &Err((false, "connection refused".into())), None);
        let c = find_condition(&down.conditions, "Reachable").expect("condition");
        assert_eq!(
            (c.status, c.reason.as_deref()),
            (ConditionStatus::False, Some("ProbeFailed"))
        );
        assert_eq!(down.proplets_total, Some(3), "the last known counts stay");
        assert_eq!(down.error.as_deref(), Some("connection refused"));
        let bad = next_status(&s, &Err((true, "not valid YAML".into())), None);
        assert_eq!(
            find_condition(&bad.conditions, "Reachable").and_then(|c| c.reason.as_deref()),
            Some("InvalidSecret")
        );
    }

    #[test]
    fn an_unchanged_member_is_written_only_to_refresh() {
        let s = next_status(&Default::default(), &Ok(found()), Some("7".into()));
        assert!(needs_write(&Default::default(), &s));
        let again = next_status(&s, &Ok(found()), Some("7".into()));
        assert!(!needs_write(&s, &again), "only the probe time moved");
        let mut more = found();
        more.proplets_running = 3;
        assert!(needs_write(
            &s,
            &next_status(&s, &Ok(more), Some("7".into()))
        ));
        let mut old = s.clone();
        old.last_successful_probe_time = Some(Time(
            jiff::Timestamp::now() - jiff::SignedDuration::from_secs(301),
        ));
        assert!(needs_write(&old, &again));
    }
}
