//! Wires one operator together: its context, the watches and each controller's wake-ups, the MQTT
//! connection with its router and subscriptions, the HTTP endpoints. Nothing here decides anything: each
//! controller declares what wakes it (`wake_ups`), [`crate::controllers::runtime`] runs them.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use kube::runtime::controller::Action;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::config::{K8sTaskBackend, OperatorConfig};
use crate::context::Context;
use crate::controllers::runtime::{Queue, Seen, Watches, run_controller, shutdown_from};
use crate::controllers::sharding::{claim, handover, sharder};
use crate::controllers::{federated_job, propeller_job, proplet, task, training_round};
use crate::mqtt::subscriptions::{self, Policy};
use crate::mqtt::{MqttClient, MqttSettings};
use crate::router::{self, Triggers};
use crate::sharding::membership::{self, Membership};
use crate::telemetry::Metrics;
use crate::telemetry::server::Readiness;

/// Reconciles still running this long after a stop are abandoned (they are idempotent: the next operator
/// redoes them).
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Runs until SIGINT/SIGTERM, with the client from the environment (in-cluster or KUBECONFIG).
pub async fn run(config: OperatorConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered before anything starts: a signal that comes while the operator starts is not lost (and
    // does not kill the process with the default handler).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let client = crate::clusters::from_environment().await?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("shutdown signal received");
    };
    run_with(client, config, shutdown).await
}

/// Runs until `shutdown` completes.
pub async fn run_with(
    client: Client,
    config: OperatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with_clock(client, config, Clock::default(), shutdown).await
}

/// [`run_with`], with schedules judged by `clock`.
pub async fn run_with_clock(
    client: Client,
    config: OperatorConfig,
    clock: Clock,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let handover = config.shutdown_handover_timeout.0;
    let operator = Operator::start(client, config, clock).await?;
    let halted = operator.halted();
    tokio::select! {
        _ = shutdown => {}
        _ = halted => {
            operator.stop().await;
            anyhow::bail!("this replica lost a Lease it needs and stopped");
        }
    }
    operator.leave(handover).await;
    operator.stop().await;
    Ok(())
}

/// A running operator. Several may run in one process (replicas, a hub and its members, in tests): each
/// has its own context, metrics and ports.
pub struct Operator {
    ctx: Arc<Context>,
    health_address: Option<SocketAddr>,
    metrics_address: Option<SocketAddr>,
    fl_address: Option<SocketAddr>,
    stop: oneshot::Sender<()>,
    /// Set when a Lease this replica needs is lost: it stops acting, and should stop.
    halt: watch::Receiver<bool>,
    membership: Option<Membership>,
    controllers: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

impl Operator {
    /// Binds its ports, connects, and starts every watch and controller.
    pub async fn start(
        client: Client,
        mut config: OperatorConfig,
        clock: Clock,
    ) -> anyhow::Result<Operator> {
        crate::clusters::install_crypto_provider();
        // Configuration errors before anything starts.
        let discovery_namespace = config
            .auto_discover_proplets
            .then(|| config.discovery_namespace())
            .transpose()?;
        let timings = config.lease_timings()?;
        let metrics = Arc::new(Metrics::new()?);
        let readiness = Readiness::default();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (halt_tx, halt) = watch::channel(false);
        let mut halted = halt.clone();
        let shutdown = shutdown_from(async move {
            tokio::select! {
                _ = stop_rx => {}
                _ = until_halted(&mut halted) => {}
            }
        });
        let mut background = Vec::new();

        let health = match config.health_probe_bind_address.0 {
            Some(addr) => Some(bind(addr, "/metrics, /healthz, /readyz").await?),
            None => None,
        };
        let health_address = health.as_ref().map(|(_, a)| *a);
        if let Some((listener, _)) = health {
            let (m, r) = (Arc::clone(&metrics), readiness.clone());
            background.push(tokio::spawn(async move {
                if let Err(e) = crate::telemetry::server::serve(listener, m, r).await {
                    error!(error = %e, "the metrics/probe server stopped");
                }
            }));
        }

        let metrics_address = match config.metrics_bind_address.0 {
            Some(addr) => {
                let (listener, bound) = bind(addr, "/metrics").await?;
                let m = Arc::clone(&metrics);
                if config.metrics_secure {
                    let tls =
                        crate::telemetry::secure::tls_config(config.metrics_cert_dir.as_deref())?;
                    let c = client.clone();
                    background.push(tokio::spawn(async move {
                        if let Err(e) = crate::telemetry::secure::serve(listener, tls, c, m).await {
                            error!(error = %e, "the secure metrics server stopped");
                        }
                    }));
                } else {
                    let r = readiness.clone();
                    background.push(tokio::spawn(async move {
                        if let Err(e) = crate::telemetry::server::serve(listener, m, r).await {
                            error!(error = %e, "the metrics server stopped");
                        }
                    }));
                }
                Some(bound)
            }
            None => None,
        };

        if let Some(addr) = config.embedded_broker {
            crate::embedded_broker::start(addr)?;
            config.mqtt_address = format!("tcp://{addr}");
        }
        let (mqtt, inbox) = connect(&config, &metrics)?;
        let (ctx, writers) = Context::new(client.clone(), config, metrics, mqtt.clone(), clock);
        let ctx = Arc::new(ctx);
        let config = &ctx.config;
        let shard = ctx.ownership.identity().map(str::to_string);
        let membership = shard.as_ref().map(|identity| {
            info!(%identity, namespace = %config.lease_namespace(), "sharded: leader election and shard Lease on");
            membership::spawn(
                client.clone(),
                membership::Settings {
                    identity: identity.clone(),
                    namespace: config.lease_namespace(),
                    leader_lease: config.leader_election_id.clone(),
                    timings,
                    shard_by: config.shard_by,
                },
                ctx.ownership.clone(),
                Arc::clone(&ctx.metrics),
                halt_tx,
            )
        });

        let proplets = Queue::new("proplet", Arc::clone(&ctx.metrics));
        let tasks = Queue::new("task", Arc::clone(&ctx.metrics));
        let propeller_jobs = Queue::new("propellerjob", Arc::clone(&ctx.metrics));
        let federated_jobs = Queue::new("federatedjob", Arc::clone(&ctx.metrics));
        let training_rounds = Queue::new("traininground", Arc::clone(&ctx.metrics));
        let claims = Queue::new("taskclaim", Arc::clone(&ctx.metrics));

        let job_selector = (config.k8s_task_backend == K8sTaskBackend::Job)
            .then_some(task::job_backend::MANAGED_SELECTOR);
        let mut watches = Watches::new(
            &client,
            &config.watch_namespace,
            writers,
            shard.as_deref(),
            job_selector,
            crate::fl::store::UPDATE_LABEL,
        );
        // A shard's Proplet and Task caches also hold what it takes over from fenced shards.
        let takeover_caches = shard.as_deref().map(|me| {
            let (a, b) = (me.to_string(), me.to_string());
            vec![
                watches
                    .proplets
                    .extra_sources(move |p| crate::sharding::shard_of(p).as_deref() == Some(&a)),
                watches
                    .tasks
                    .extra_sources(move |t| crate::sharding::shard_of(t).as_deref() == Some(&b)),
            ]
        });
        keep_indexes(&ctx, &mut watches);
        proplet::wake_ups(&ctx, &mut watches, &proplets.waker());
        background.push(spawn_forget_stale(Arc::clone(&ctx), shutdown.clone()));
        background.push(proplet::spawn_silence_watch(
            Arc::clone(&ctx),
            proplets.waker(),
            shutdown.clone(),
        ));
        task::wake_ups(&ctx, &mut watches, &tasks.waker());
        propeller_job::wake_ups(&ctx, &mut watches, &propeller_jobs.waker());
        federated_job::wake_ups(&mut watches, &federated_jobs.waker());
        training_round::wake_ups(&mut watches, &training_rounds.waker());
        if let Some(unclaimed) = &mut watches.unclaimed {
            unclaimed.wake_self(&claims.waker());
        }
        // Proplets moving here or away: the handover looks again. Not on every event: most are status
        // updates, and each look scans the shard's Proplets.
        let moves = Arc::new(Notify::new());
        let m = Arc::clone(&moves);
        watches.proplets.on_event(move |ev| {
            if may_move(ev) {
                m.notify_one();
            }
        });
        if let Some(w) = watches.incoming.as_mut() {
            let m = Arc::clone(&moves);
            w.on_event(move |_| m.notify_one());
        }

        // Subscriptions follow the owned Proplets' channels and those of running broadcasts.
        let changed = Arc::clone(&ctx.resubscribe);
        if let (Some(mqtt), Some(inbox)) = (mqtt, inbox) {
            // The index has seen the event already (indexes listen first).
            let index = ctx.proplet_index.clone();
            let seen = std::sync::atomic::AtomicU64::new(u64::MAX);
            let notify = Arc::clone(&changed);
            watches.proplets.on_event(move |_| {
                let now = index.channel_changes();
                if seen.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                    notify.notify_one();
                }
            });
            if let Some(w) = watches.incoming.as_mut() {
                let notify = Arc::clone(&changed);
                w.on_event(move |_| notify.notify_one());
            }
            let marker = ctx.backlog.marker();
            let mut policy = Policy {
                default_channel: config.default_channel(),
                // Real proplets publish an FL update here, unprefixed, when their HTTP POST fails.
                fixed: vec![crate::fl::UPDATE_FALLBACK_TOPIC.to_string()],
            };
            policy
                .fixed
                .extend(marker.as_ref().map(|(topic, _)| topic.clone()));
            let index = Arc::clone(&ctx);
            let probes = Arc::clone(&ctx);
            background.push(subscriptions::follow(
                mqtt.clone(),
                policy,
                move || served_channels(&index),
                Arc::clone(&changed),
                marker,
                move |generation| probes.backlog.probe(generation),
                shutdown.clone(),
            ));
            background.push(tokio::spawn(task::reconnect::follow(
                Arc::clone(&ctx),
                mqtt.clone(),
                tasks.waker(),
                shutdown.clone(),
            )));
            let (registry, worker) = crate::registry::spawn(Arc::clone(&ctx), tasks.waker());
            background.push(worker);
            let discovery = discovery_namespace.map(|namespace| {
                info!(%namespace, limit = config.discovery_max_proplets, "proplet auto-discovery on");
                let (queue, worker) = crate::discovery::spawn(Arc::clone(&ctx), namespace);
                background.push(worker);
                queue
            });
            let triggers = Triggers {
                proplets: proplets.waker(),
                tasks: tasks.waker(),
                registry,
                discovery,
            };
            background.push(tokio::spawn(router::run(inbox, Arc::clone(&ctx), triggers)));
        }

        let fl_address = match config.fl_bind_address.0 {
            Some(addr) => {
                let (listener, bound) = bind(addr, "the FL coordinator and model registry").await?;
                let c = Arc::clone(&ctx);
                background.push(tokio::spawn(async move {
                    if let Err(e) = crate::fl::server::serve(listener, c).await {
                        error!(error = %e, "the FL coordinator server stopped");
                    }
                }));
                Some(bound)
            }
            None => None,
        };
        background.push(tokio::spawn(task::report_phases(
            Arc::clone(&ctx),
            shutdown.clone(),
        )));
        background.extend(watches.spawn(&shutdown));
        if ctx.config.hub {
            background.push(crate::controllers::member_cluster::spawn(
                Arc::clone(&ctx),
                shutdown.clone(),
            ));
        }
        if shard.is_some() {
            background.push(handover::spawn(
                Arc::clone(&ctx),
                moves,
                Arc::clone(&changed),
                shutdown.clone(),
            ));
            background.push(sharder::spawn(Arc::clone(&ctx), shutdown.clone()));
            background.push(crate::controllers::sharding::takeover::spawn(
                ctx.ownership.clone(),
                takeover_caches.unwrap_or_default(),
                shutdown.clone(),
            ));
            background.push(wake_on_leading(
                Arc::clone(&ctx),
                [
                    propeller_jobs.waker().into_erased(&ctx.propeller_jobs),
                    federated_jobs.waker().into_erased(&ctx.federated_jobs),
                    training_rounds.waker().into_erased(&ctx.training_rounds),
                ],
                shutdown.clone(),
            ));
        }

        let controllers = tokio::spawn(futures::FutureExt::map(
            futures::future::join_all([
                run_controller(
                    proplets,
                    ctx.proplets.clone(),
                    proplet::reconcile,
                    Arc::clone(&ctx),
                    shutdown.clone(),
                ),
                run_controller(
                    tasks,
                    ctx.tasks.clone(),
                    task::reconcile,
                    Arc::clone(&ctx),
                    shutdown.clone(),
                ),
                run_controller(
                    propeller_jobs,
                    ctx.propeller_jobs.clone(),
                    leader_only(propeller_job::reconcile),
                    Arc::clone(&ctx),
                    shutdown.clone(),
                ),
                run_controller(
                    federated_jobs,
                    ctx.federated_jobs.clone(),
                    leader_only(federated_job::reconcile),
                    Arc::clone(&ctx),
                    shutdown.clone(),
                ),
                run_controller(
                    training_rounds,
                    ctx.training_rounds.clone(),
                    leader_only(training_round::reconcile),
                    Arc::clone(&ctx),
                    shutdown.clone(),
                ),
                run_controller(
                    claims,
                    ctx.unclaimed.clone(),
                    claim::reconcile,
                    Arc::clone(&ctx),
                    shutdown.clone(),
                ),
            ]),
            |_| (),
        ));
        readiness.set_ready();
        info!(identity = %ctx.config.identity(), "controllers running");
        Ok(Operator {
            ctx,
            health_address,
            metrics_address,
            fl_address,
            stop,
            halt,
            membership,
            controllers,
            background,
        })
    }

    /// Where /metrics, /healthz and /readyz are served (the port the system chose for port 0).
    /// The `--metrics-bind-address` port as bound (HTTPS with `--metrics-secure`).
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics_address
    }

    pub fn health_address(&self) -> Option<SocketAddr> {
        self.health_address
    }

    /// Where the FL coordinator and model registry are served.
    pub fn fl_address(&self) -> Option<SocketAddr> {
        self.fl_address
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Completes when this replica lost a Lease it needs (it has stopped acting; [`Operator::stop`] it).
    pub fn halted(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut halt = self.halt.clone();
        async move { until_halted(&mut halt).await }
    }

    /// Dies without any goodbye, as a killed process does: nothing drains, no Lease is released (they
    /// expire), the broker keeps the MQTT session. For tests of failover.
    pub async fn crash(self) {
        if let Some(m) = self.membership {
            m.abandon();
        }
        self.controllers.abort();
        close(self.background, &self.ctx).await;
    }

    /// A sharded replica's graceful goodbye, before [`Operator::stop`]: its proplets are handed to the
    /// other shards (make-before-break) until none is left or `deadline` passed. Returns how many were
    /// left (0 for a single replica).
    pub async fn leave(&self, deadline: Duration) -> usize {
        match &self.membership {
            Some(m) => m.leave(&self.ctx.client, deadline).await,
            None => 0,
        }
    }

    /// Stops: no reconcile starts any more, those in flight finish, the Leases are released, then the
    /// watches, the endpoints and the MQTT connection close. Returns how long it took.
    pub async fn stop(self) -> Duration {
        let asked = Instant::now();
        let _ = self.stop.send(());
        let mut controllers = self.controllers;
        if tokio::time::timeout(STOP_DEADLINE, &mut controllers)
            .await
            .is_err()
        {
            warn!(deadline = ?STOP_DEADLINE, "controllers still busy after the stop; exiting anyway");
            controllers.abort();
        }
        if let Some(m) = self.membership {
            m.release().await;
        }
        close(self.background, &self.ctx).await;
        let took = asked.elapsed();
        info!(?took, "stopped");
        took
    }
}

/// Ends the watches, endpoints and loops, then the MQTT connection.
async fn close(background: Vec<JoinHandle<()>>, ctx: &Context) {
    for task in &background {
        task.abort();
    }
    // Awaited so that their listeners are closed when this returns: a successor may bind the same ports.
    for task in background {
        let _ = task.await;
    }
    if let Some(m) = &ctx.mqtt {
        m.disconnect().await;
    }
}

/// Completes when `halt` is set; never when nobody can set it (a single replica has no Leases to lose).
async fn until_halted(halt: &mut watch::Receiver<bool>) {
    if halt.wait_for(|h| *h).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Binds a listener; port 0 takes any free port, and the one bound is logged and returned.
async fn bind(
    addr: SocketAddr,
    what: &str,
) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("bind {addr} for {what}: {e}"))?;
    let bound = listener.local_addr()?;
    info!(address = %bound, "serving {what}");
    Ok((listener, bound))
}

/// The broker connection, if one is configured.
fn connect(
    config: &OperatorConfig,
    metrics: &Metrics,
) -> anyhow::Result<(
    Option<MqttClient>,
    Option<tokio::sync::mpsc::Receiver<crate::mqtt::client::Message>>,
)> {
    if config.mqtt_address.is_empty() {
        warn!(
            "MQTT not configured: tasks fail with MQTTNotConfigured and proplet liveness is not tracked"
        );
        return Ok((None, None));
    }
    let client_id = config.mqtt_client_id();
    let mut settings = MqttSettings::new(&config.mqtt_address, &client_id);
    settings.qos = config.mqtt_qos;
    settings.timeout = config.mqtt_timeout.0;
    settings.username = (!config.client_id.is_empty()).then(|| config.client_id.clone());
    settings.password = config.mqtt_password()?;
    settings.ca_cert = config.mqtt_ca_cert.clone();
    settings.client_cert = config.mqtt_client_cert.clone();
    settings.client_key = config.mqtt_client_cert_key.clone();
    let (client, inbox) = MqttClient::start(&settings, metrics.mqtt_connected.clone())?;
    info!(address = %config.mqtt_address, %client_id, "MQTT client started");
    Ok((Some(client), Some(inbox)))
}

/// Forgets our own writes' records once stale, whether or not more writes come (see [`OwnWrites`]).
///
/// [`OwnWrites`]: crate::memory::OwnWrites
fn spawn_forget_stale(
    ctx: Arc<Context>,
    shutdown: crate::controllers::runtime::Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(crate::memory::OwnWrites::FRESH_FOR) => {}
                _ = &mut shutdown => return,
            }
            ctx.own_writes.forget_stale();
        }
    })
}

/// The indexes and records that follow the watches, before any controller is woken.
fn keep_indexes(ctx: &Arc<Context>, watches: &mut Watches) {
    let c = Arc::clone(ctx);
    watches.proplets.on_event(move |ev| {
        c.ownership.apply(ev);
        c.proplet_index.apply(ev);
        // On every event, not only on the handover's tick: how soon a takeover completes is read from them.
        crate::controllers::sharding::handover::count_owned(&c);
        if let kube::runtime::watcher::Event::InitDone = ev {
            c.caches_ready.proplets_listed();
        }
    });
    let c = Arc::clone(ctx);
    watches.proplets.on_object(move |p, seen| {
        // Heartbeat state of a deleted Proplet would otherwise stay for ever (unless another Proplet
        // claims the clientId, e.g. a declared twin).
        if seen == Seen::Deleted
            && let Some(client) = p.spec.connection_config.client()
            && c.proplet_index.by_client(client).is_none()
        {
            c.liveness.forget(client);
        }
    });
    let c = Arc::clone(ctx);
    watches.tasks.on_event(move |ev| {
        c.task_index.apply(ev);
        if let kube::runtime::watcher::Event::InitDone = ev {
            c.caches_ready.tasks_listed();
        }
    });
}

/// Whether a Proplet event may give the handover work: a Proplet with a drain label (moving away, or its
/// new owner ready), or a relist.
fn may_move(ev: &kube::runtime::watcher::Event<crate::api::Proplet>) -> bool {
    use kube::runtime::watcher::Event;
    match ev {
        Event::Apply(p) | Event::Delete(p) => crate::sharding::drain_of(p).is_some(),
        Event::InitDone => true,
        Event::Init | Event::InitApply(_) => false,
    }
}

/// The channels whose messages this replica must hear: those of its Proplets and of those moving to it.
fn served_channels(ctx: &Context) -> std::collections::BTreeSet<crate::mqtt::topics::Channel> {
    let mut channels = ctx.proplet_index.channels();
    channels.extend(ctx.broadcasts.all());
    channels.extend(
        ctx.incoming
            .state()
            .iter()
            .filter_map(|p| task::wire::channel_of(p)),
    );
    channels
}

/// A reconcile that runs only on the leader (a single replica always leads); elsewhere it waits for
/// [`wake_on_leading`].
fn leader_only<K, F>(
    reconcile: fn(Arc<K>, Arc<Context>) -> F,
) -> impl Fn(Arc<K>, Arc<Context>) -> futures::future::BoxFuture<'static, crate::error::Result<Action>>
where
    K: Send + Sync + 'static,
    F: std::future::Future<Output = crate::error::Result<Action>> + Send + 'static,
{
    move |obj, ctx| {
        if ctx.ownership.is_leader() {
            Box::pin(reconcile(obj, ctx))
        } else {
            Box::pin(async { Ok(Action::await_change()) })
        }
    }
}

/// Wakes every object of the leader's controllers when this replica becomes the leader.
fn wake_on_leading<const N: usize>(
    ctx: Arc<Context>,
    wakers: [Box<dyn Fn() + Send + Sync>; N],
    shutdown: crate::controllers::runtime::Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut leading = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(ctx.config.retry_period.0 / 4) => {}
                _ = &mut shutdown => return,
            }
            let now = ctx.ownership.is_leader();
            if now && !leading {
                info!("this replica leads: the leader's controllers look at everything");
                for wake in &wakers {
                    wake();
                }
            }
            leading = now;
        }
    })
}
