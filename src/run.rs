//! Wires the operator together: one watch per kind feeding the stores, the indexes and the controllers;
//! the MQTT connection and its router; the metrics and probe endpoint.
use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{error, info, warn};

use crate::api::{FederatedJob, PropellerJob, Proplet, Task, TrainingRound};
use crate::config::{K8sTaskBackend, OperatorConfig};
use crate::controllers::{self, Context, PendingResults, object_key};
use crate::indexes::{PropletIndex, TaskIndex};
use crate::liveness::Liveness;
use crate::mqtt::{MqttClient, MqttSettings};
use crate::router::{self, Triggers};
use crate::sharding::Ownership;
use crate::telemetry::metrics;
use crate::telemetry::server::{self, Readiness};
use k8s_openapi::api::core::v1::ConfigMap;

fn api<K>(client: &Client, namespace: &str) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    if namespace.is_empty() {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), namespace)
    }
}

/// Runs until SIGINT/SIGTERM, with the client from the environment (in-cluster or KUBECONFIG).
pub async fn run(config: OperatorConfig) -> anyhow::Result<()> {
    crate::testbed::install_crypto_provider();
    let client = Client::try_default().await?;
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
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
    run_with_clock(client, config, crate::clock::Clock::default(), shutdown).await
}

/// [`run_with`], with schedules judged by `clock`.
pub async fn run_with_clock(
    client: Client,
    mut config: OperatorConfig,
    clock: crate::clock::Clock,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    crate::testbed::install_crypto_provider();
    let shutdown = futures::FutureExt::shared(futures::FutureExt::boxed(shutdown));
    // Configuration errors before anything starts.
    let discovery_namespace = config
        .auto_discover_proplets
        .then(|| config.discovery_namespace())
        .transpose()?;
    let readiness = Readiness::default();
    // Background loops end with the operator (tests run several operators in one process).
    let mut background = Vec::new();
    if let Some(addr) = config.health_probe_bind_address.0 {
        let r = readiness.clone();
        background.push(tokio::spawn(async move {
            if let Err(e) = server::serve(addr, r).await {
                error!(error = %e, "the metrics/probe server stopped");
            }
        }));
    }

    if let Some(addr) = config.embedded_broker {
        crate::embedded_broker::start(addr)?;
        config.mqtt_address = format!("tcp://{addr}");
    }
    let (mqtt, inbox) = if config.mqtt_address.is_empty() {
        warn!(
            "MQTT not configured: tasks fail with MQTTNotConfigured and proplet liveness is not tracked"
        );
        (None, None)
    } else {
        let mut settings = MqttSettings::new(&config.mqtt_address, &config.mqtt_client_id);
        settings.qos = config.mqtt_qos;
        settings.timeout = config.mqtt_timeout.0;
        settings.username = (!config.client_id.is_empty()).then(|| config.client_id.clone());
        settings.password = config.mqtt_password()?;
        settings.ca_cert = config.mqtt_ca_cert.clone();
        settings.client_cert = config.mqtt_client_cert.clone();
        settings.client_key = config.mqtt_client_cert_key.clone();
        let (c, rx) = MqttClient::start(&settings)?;
        info!(address = %config.mqtt_address, client_id = %config.mqtt_client_id, "MQTT client started");
        (Some(c), Some(rx))
    };

    let ns = config.watch_namespace.clone();
    let (proplet_store, proplet_writer) = reflector::store::<Proplet>();
    let (task_store, task_writer) = reflector::store::<Task>();
    let (job_store, job_writer) = reflector::store::<Job>();
    let (pjob_store, pjob_writer) = reflector::store::<PropellerJob>();
    let (fjob_store, fjob_writer) = reflector::store::<FederatedJob>();
    let (round_store, round_writer) = reflector::store::<TrainingRound>();
    let (update_store, update_writer) = reflector::store::<ConfigMap>();
    let reporter = Reporter {
        controller: "propeller-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: config.clone(),
        mqtt: mqtt.clone(),
        ownership: Ownership::single(),
        proplets: proplet_store.clone(),
        tasks: task_store.clone(),
        jobs: job_store,
        proplet_index: PropletIndex::default(),
        task_index: TaskIndex::default(),
        liveness: Liveness::default(),
        results: PendingResults::default(),
        task_metrics: controllers::TaskMetricsBuffer::default(),
        module_misses: crate::registry::ModuleMisses::default(),
        federated_jobs: fjob_store.clone(),
        training_rounds: round_store.clone(),
        fl_updates: update_store,
        recorder: Recorder::new(client.clone(), reporter),
        clock,
        started: std::time::Instant::now(),
    });

    let (proplet_main_tx, proplet_main_rx) = mpsc::unbounded_channel::<Proplet>();
    let (task_main_tx, task_main_rx) = mpsc::unbounded_channel::<Task>();
    let (proplet_trigger_tx, proplet_trigger_rx) = mpsc::unbounded_channel::<ObjectRef<Proplet>>();
    let (task_trigger_tx, task_trigger_rx) = mpsc::unbounded_channel::<ObjectRef<Task>>();
    let (pjob_trigger_tx, pjob_trigger_rx) = mpsc::unbounded_channel::<ObjectRef<PropellerJob>>();
    let (pjob_main_tx, pjob_main_rx) = mpsc::unbounded_channel::<PropellerJob>();
    let (fjob_main_tx, fjob_main_rx) = mpsc::unbounded_channel::<FederatedJob>();
    let (fjob_trigger_tx, fjob_trigger_rx) = mpsc::unbounded_channel::<ObjectRef<FederatedJob>>();
    let (round_main_tx, round_main_rx) = mpsc::unbounded_channel::<TrainingRound>();
    let (round_trigger_tx, round_trigger_rx) =
        mpsc::unbounded_channel::<ObjectRef<TrainingRound>>();
    if let Some(addr) = config.fl_bind_address.0 {
        let ctx = Arc::clone(&ctx);
        background.push(tokio::spawn(async move {
            if let Err(e) = crate::fl::server::serve(addr, ctx).await {
                error!(error = %e, "the FL coordinator server stopped");
            }
        }));
    }

    // Proplets: store + index + subscriptions, then the Proplet controller and the tasks that care.
    {
        let ctx = Arc::clone(&ctx);
        let api = api::<Proplet>(&client, &ns);
        let task_trigger = task_trigger_tx.clone();
        let default_channel = config.default_channel();
        background.push(tokio::spawn(async move {
            let stream =
                reflector::reflector(proplet_writer, lean(api, watcher::Config::default()))
                    .default_backoff();
            futures::pin_mut!(stream);
            let mut subscribed: Option<BTreeSet<String>> = None;
            while let Some(ev) = stream.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        warn!(error = %e, "Proplet watch error");
                        continue;
                    }
                };
                ctx.proplet_index.apply(&ev);
                if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = &ev {
                    controllers::own_writes::seen(p);
                }
                if let watcher::Event::Apply(p)
                | watcher::Event::InitApply(p)
                | watcher::Event::Delete(p) = &ev
                {
                    if matches!(ev, watcher::Event::Delete(_)) {
                        // Heartbeat state of a deleted Proplet would otherwise stay for ever.
                        // (Unless another Proplet claims the clientId, e.g. a declared twin.)
                        if let Some(client) = p.spec.connection_config.client()
                            && ctx.proplet_index.by_client(client).is_none()
                        {
                            ctx.liveness.forget(client);
                        }
                    } else {
                        let _ = proplet_main_tx.send(p.clone());
                        // A discovered Proplet for the same clientId steps aside (see its controller).
                        for twin in discovered_twins(&ctx, p) {
                            let _ = proplet_main_tx.send(twin);
                        }
                    }
                    for t in tasks_affected_by(&ctx, p) {
                        let _ = task_trigger.send(t);
                    }
                }
                if let Some(mqtt) = &ctx.mqtt {
                    let mut wanted: BTreeSet<String> = ctx
                        .proplet_index
                        .channels()
                        .iter()
                        .flat_map(|c| c.subscriptions())
                        .collect();
                    if let Some(ch) = &default_channel {
                        wanted.extend(ch.subscriptions());
                    }
                    // Real proplets publish an FL update here, unprefixed, when their HTTP POST fails.
                    wanted.insert(crate::fl::UPDATE_FALLBACK_TOPIC.to_string());
                    if subscribed.as_ref() != Some(&wanted) {
                        mqtt.set_subscriptions(wanted.clone()).await;
                        subscribed = Some(wanted);
                    }
                }
            }
        }));
    }
    // Tasks: store + index, then the Task controller; the proplet a task sits on recounts its tasks.
    {
        let ctx = Arc::clone(&ctx);
        let api = api::<Task>(&client, &ns);
        let proplet_trigger = proplet_trigger_tx.clone();
        let task_trigger = task_trigger_tx.clone();
        let pjob_trigger = pjob_trigger_tx.clone();
        let round_trigger = round_trigger_tx.clone();
        let pjobs = pjob_store.clone();
        background.push(tokio::spawn(async move {
            let stream = reflector::reflector(task_writer, lean(api, watcher::Config::default()))
                .default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        warn!(error = %e, "Task watch error");
                        continue;
                    }
                };
                ctx.task_index.apply(&ev);
                if let watcher::Event::Apply(t) | watcher::Event::InitApply(t) = &ev {
                    controllers::own_writes::seen(t);
                }
                if let watcher::Event::Apply(t)
                | watcher::Event::InitApply(t)
                | watcher::Event::Delete(t) = &ev
                {
                    if !matches!(ev, watcher::Event::Delete(_)) {
                        let _ = task_main_tx.send(t.clone());
                    }
                    if let Some(p) = assigned_proplet(t) {
                        let _ = proplet_trigger.send(p);
                    }
                    for j in jobs_counting(&pjobs, t) {
                        let _ = pjob_trigger.send(j);
                    }
                    if let Some(r) = owner::<TrainingRound, _>(t) {
                        let _ = round_trigger.send(r);
                    }
                    let gone = matches!(ev, watcher::Event::Delete(_));
                    if t.phase().is_terminal() || gone {
                        for d in dependents(&ctx, t) {
                            let _ = task_trigger.send(d);
                        }
                        // A slot may have freed: the capacity queue of the namespace moves.
                        for q in queued(&ctx, t) {
                            let _ = task_trigger.send(q);
                        }
                    }
                }
            }
        }));
    }
    // PropellerJobs: store, then their controller.
    {
        let api = api::<PropellerJob>(&client, &ns);
        background.push(tokio::spawn(async move {
            let stream = reflector::reflector(pjob_writer, lean(api, watcher::Config::default()))
                .default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(j) | watcher::Event::InitApply(j)) => {
                        let _ = pjob_main_tx.send(j);
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "PropellerJob watch error"),
                }
            }
        }));
    }
    // FederatedJobs, their TrainingRounds, and the stored client updates that wake the rounds.
    {
        let fjob_api = api::<FederatedJob>(&client, &ns);
        let round_api = api::<TrainingRound>(&client, &ns);
        let update_api = api::<ConfigMap>(&client, &ns);
        background.push(tokio::spawn(async move {
            let stream =
                reflector::reflector(fjob_writer, lean(fjob_api, watcher::Config::default()))
                    .default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(j) | watcher::Event::InitApply(j)) => {
                        let _ = fjob_main_tx.send(j);
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "FederatedJob watch error"),
                }
            }
        }));
        let fjob_trigger = fjob_trigger_tx.clone();
        background.push(tokio::spawn(async move {
            let stream =
                reflector::reflector(round_writer, lean(round_api, watcher::Config::default()))
                    .default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r)) => {
                        if let Some(j) = owner::<FederatedJob, _>(&r) {
                            let _ = fjob_trigger.send(j);
                        }
                        let _ = round_main_tx.send(r);
                    }
                    Ok(watcher::Event::Delete(r)) => {
                        if let Some(j) = owner::<FederatedJob, _>(&r) {
                            let _ = fjob_trigger.send(j);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "TrainingRound watch error"),
                }
            }
        }));
        let round_trigger = round_trigger_tx.clone();
        let selector = watcher::Config::default().labels(crate::fl::store::UPDATE_LABEL);
        background.push(tokio::spawn(async move {
            let stream =
                reflector::reflector(update_writer, lean(update_api, selector)).default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                        if let Some(r) = owner::<TrainingRound, _>(&cm) {
                            let _ = round_trigger.send(r);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "FL update ConfigMap watch error"),
                }
            }
        }));
    }
    // Jobs of the job backend: their changes wake the Task that owns them.
    if config.k8s_task_backend == K8sTaskBackend::Job {
        let api = api::<Job>(&client, &ns);
        let task_trigger = task_trigger_tx.clone();
        let selector =
            watcher::Config::default().labels(crate::controllers::job_backend::MANAGED_SELECTOR);
        background.push(tokio::spawn(async move {
            let stream = reflector::reflector(job_writer, lean(api, selector)).default_backoff();
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => {
                        warn!(error = %e, "Job watch error");
                        continue;
                    }
                };
                if let watcher::Event::Apply(j) | watcher::Event::Delete(j) = &ev
                    && let Some(t) = owning_task(j)
                {
                    let _ = task_trigger.send(t);
                }
            }
        }));
    }
    // Tasks by phase, from the store (cheap: no API call), for dashboards.
    {
        let ctx = Arc::clone(&ctx);
        background.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                every.tick().await;
                let mut counts = std::collections::BTreeMap::new();
                for t in ctx.tasks.state() {
                    *counts.entry(t.phase().as_str()).or_insert(0i64) += 1;
                }
                for phase in crate::api::task::TaskPhase::ALL {
                    let n = counts.get(phase.as_str()).copied().unwrap_or(0);
                    metrics().tasks.with_label_values(&[phase.as_str()]).set(n);
                }
            }
        }));
    }
    if let Some(inbox) = inbox {
        let (registry, worker) = crate::registry::spawn(Arc::clone(&ctx), task_trigger_tx.clone());
        background.push(worker);
        let discovery = if let Some(namespace) = discovery_namespace {
            info!(%namespace, limit = config.discovery_max_proplets, "proplet auto-discovery on");
            let (queue, worker) = crate::discovery::spawn(Arc::clone(&ctx), namespace);
            background.push(worker);
            Some(queue)
        } else {
            None
        };
        let ctx = Arc::clone(&ctx);
        let triggers = Triggers {
            proplets: proplet_trigger_tx.clone(),
            tasks: task_trigger_tx.clone(),
            registry,
            discovery,
        };
        background.push(tokio::spawn(router::run(inbox, ctx, triggers)));
    }

    // The input streams end with the shutdown signal, so the controllers drain and return.
    // Bounded: unbounded reconciles in a burst open one API connection each (thousands of TLS
    // connections and their buffers) and only queue up at the API server anyway.
    let controller_config =
        kube::runtime::controller::Config::default().concurrency(config.max_concurrent_reconciles);
    let proplet_controller = Controller::for_stream(
        UnboundedReceiverStream::new(proplet_main_rx)
            .inspect(|p| metrics().queue_add("proplet", object_key(p)))
            .map(Ok)
            .take_until(shutdown.clone()),
        proplet_store,
    )
    .with_config(controller_config.clone())
    .reconcile_on(
        UnboundedReceiverStream::new(proplet_trigger_rx)
            .inspect(|r| metrics().queue_add("proplet", ref_key(r)))
            .take_until(shutdown.clone()),
    )
    .graceful_shutdown_on(shutdown.clone())
    .run(
        controllers::proplet::reconcile,
        controllers::retry_after_error::<Proplet>("proplet"),
        Arc::clone(&ctx),
    )
    .for_each(|_| async {});
    let task_controller = Controller::for_stream(
        UnboundedReceiverStream::new(task_main_rx)
            .inspect(|t| metrics().queue_add("task", object_key(t)))
            .map(Ok),
        task_store,
    )
    .with_config(controller_config.clone())
    .reconcile_on(
        UnboundedReceiverStream::new(task_trigger_rx)
            .inspect(|r| metrics().queue_add("task", ref_key(r))),
    )
    .shutdown_on_signal()
    .run(
        controllers::task::reconcile,
        controllers::retry_after_error::<Task>("task"),
        Arc::clone(&ctx),
    )
    .for_each(|_| async {});
    let pjob_controller = Controller::for_stream(
        UnboundedReceiverStream::new(pjob_main_rx)
            .inspect(|j| metrics().queue_add("propellerjob", object_key(j)))
            .map(Ok)
            .take_until(shutdown.clone()),
        pjob_store,
    )
    .with_config(controller_config.clone())
    .reconcile_on(
        UnboundedReceiverStream::new(pjob_trigger_rx)
            .inspect(|r| metrics().queue_add("propellerjob", ref_key(r)))
            .take_until(shutdown.clone()),
    )
    .graceful_shutdown_on(shutdown.clone())
    .run(
        controllers::propeller_job::reconcile,
        controllers::retry_after_error::<PropellerJob>("propellerjob"),
        Arc::clone(&ctx),
    )
    .for_each(|_| async {});
    let fjob_controller = Controller::for_stream(
        UnboundedReceiverStream::new(fjob_main_rx)
            .inspect(|j| metrics().queue_add("federatedjob", object_key(j)))
            .map(Ok)
            .take_until(shutdown.clone()),
        fjob_store,
    )
    .with_config(controller_config.clone())
    .reconcile_on(
        UnboundedReceiverStream::new(fjob_trigger_rx)
            .inspect(|r| metrics().queue_add("federatedjob", ref_key(r)))
            .take_until(shutdown.clone()),
    )
    .graceful_shutdown_on(shutdown.clone())
    .run(
        controllers::federated_job::reconcile,
        controllers::retry_after_error::<FederatedJob>("federatedjob"),
        Arc::clone(&ctx),
    )
    .for_each(|_| async {});
    let round_controller = Controller::for_stream(
        UnboundedReceiverStream::new(round_main_rx)
            .inspect(|r| metrics().queue_add("traininground", object_key(r)))
            .map(Ok)
            .take_until(shutdown.clone()),
        round_store,
    )
    .with_config(controller_config.clone())
    .reconcile_on(
        UnboundedReceiverStream::new(round_trigger_rx)
            .inspect(|r| metrics().queue_add("traininground", ref_key(r)))
            .take_until(shutdown.clone()),
    )
    .graceful_shutdown_on(shutdown.clone())
    .run(
        controllers::training_round::reconcile,
        controllers::retry_after_error::<TrainingRound>("traininground"),
        Arc::clone(&ctx),
    )
    .for_each(|_| async {});
    readiness.set_ready();
    info!("controllers running");
    let controllers = async {
        tokio::join!(
            proplet_controller,
            task_controller,
            pjob_controller,
            fjob_controller,
            round_controller
        )
    };
    tokio::pin!(controllers);
    tokio::select! {
        _ = &mut controllers => {}
        _ = shutdown.clone() => {
            // Let reconciles in flight finish, but do not wait for ever.
            if tokio::time::timeout(std::time::Duration::from_secs(5), &mut controllers).await.is_err() {
                warn!("controllers still busy 5 s after the shutdown signal; exiting anyway");
            }
        }
    }
    for task in background {
        task.abort();
    }
    if let Some(m) = &mqtt {
        m.disconnect().await;
    }
    info!("stopped");
    Ok(())
}

/// A watch whose objects drop `managedFields` before they are cached: they are often the larger part of
/// an object, and nothing here reads them (thousands of Proplets cost a third of the memory).
fn lean<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, config).modify(|o| o.managed_fields_mut().clear())
}

/// The controlling owner of `obj` when it is a `K`.
fn owner<K, O>(obj: &O) -> Option<ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()>,
    O: kube::Resource,
{
    let o = obj
        .owner_references()
        .iter()
        .find(|o| o.kind == K::kind(&()) && o.api_version == K::api_version(&()))?;
    Some(ObjectRef::new(&o.name).within(&obj.namespace()?))
}

/// The work-queue key of a trigger (as [`object_key`] of the object).
fn ref_key<K: kube::Resource>(r: &ObjectRef<K>) -> String
where
    K::DynamicType: Default,
{
    format!("{}/{}", r.namespace.clone().unwrap_or_default(), r.name)
}

/// The PropellerJobs a task counts for: its owner, and those naming it in taskRefs.
fn jobs_counting(jobs: &reflector::Store<PropellerJob>, t: &Task) -> Vec<ObjectRef<PropellerJob>> {
    let ns = t.namespace();
    let name = t.name_any();
    let mut out: Vec<ObjectRef<PropellerJob>> = t
        .owner_references()
        .iter()
        .filter(|o| o.kind == "PropellerJob")
        .filter_map(|o| Some(ObjectRef::new(&o.name).within(ns.as_deref()?)))
        .collect();
    out.extend(
        jobs.state()
            .iter()
            .filter(|j| j.namespace() == ns)
            .filter(|j| j.spec.task_refs.iter().flatten().any(|r| r == &name))
            .map(|j| ObjectRef::from_obj(j.as_ref())),
    );
    out
}

fn owning_task(j: &Job) -> Option<ObjectRef<Task>> {
    let owner = j
        .owner_references()
        .iter()
        .find(|o| o.kind == "Task" && o.api_version.starts_with(crate::api::GROUP))?;
    Some(ObjectRef::new(&owner.name).within(&j.namespace()?))
}

fn assigned_proplet(t: &Task) -> Option<ObjectRef<Proplet>> {
    let name = t.status.as_ref()?.assigned_proplet.clone()?;
    Some(ObjectRef::new(&name).within(&t.namespace()?))
}

/// Tasks to look at again when a proplet changes: those waiting for one in its namespace, and those on it.
fn tasks_affected_by(ctx: &Context, p: &Proplet) -> Vec<ObjectRef<Task>> {
    let ns = p.namespace();
    let name = p.name_any();
    ctx.tasks
        .state()
        .iter()
        .filter(|t| t.namespace() == ns)
        .filter(|t| {
            let phase = t.phase();
            // Pending tasks only when they wait for a proplet: a fresh one has its own event, and waking
            // every pending task on every proplet change is quadratic in a burst.
            crate::scheduling::waiting_for_proplet(t)
                || (phase.is_active()
                    && t.status
                        .as_ref()
                        .and_then(|s| s.assigned_proplet.as_deref())
                        == Some(name.as_str()))
        })
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// Discovered Proplets with the clientId of `p`, when `p` was declared by someone.
fn discovered_twins(ctx: &Context, p: &Proplet) -> Vec<Proplet> {
    use crate::discovery::is_discovered;
    if is_discovered(p) {
        return Vec::new();
    }
    let Some(client) = p.spec.connection_config.client() else {
        return Vec::new();
    };
    ctx.proplet_index
        .all_by_client(client)
        .iter()
        .filter_map(|r| ctx.proplets.get(r))
        .filter(|q| is_discovered(q))
        .map(|q| (*q).clone())
        .collect()
}

/// Tasks waiting for room on a proplet in `t`'s namespace.
fn queued(ctx: &Context, t: &Task) -> Vec<ObjectRef<Task>> {
    let ns = t.namespace();
    ctx.tasks
        .state()
        .iter()
        .filter(|q| q.namespace() == ns && crate::scheduling::is_queued(q))
        .map(|q| ObjectRef::from_obj(q.as_ref()))
        .collect()
}

/// Pending tasks that name `t` in `dependsOn`.
fn dependents(ctx: &Context, t: &Task) -> Vec<ObjectRef<Task>> {
    let ns = t.namespace();
    let name = t.name_any();
    ctx.tasks
        .state()
        .iter()
        .filter(|d| d.namespace() == ns && d.phase() == crate::api::task::TaskPhase::Pending)
        .filter(|d| d.spec.depends_on.iter().flatten().any(|n| n == &name))
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}
