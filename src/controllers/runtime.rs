//! One way to run a controller: watches that fill the caches and name what to wake, a work queue per
//! controller, bounded concurrency, metrics and a trace span per reconcile, back-off after errors, and a stop
//! that lets reconciles in flight finish. Each controller declares what wakes it next to its reconcile (a
//! `wake_ups` function); `run.rs` only wires them together.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::stream::{AbortHandle, BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::warn;

use crate::api::{FederatedJob, PropellerJob, Proplet, Task, TrainingRound};
use crate::context::{Context, Writers};
use crate::error::{Error, Result};
use crate::telemetry::Metrics;

use super::sources::{Change, Merge, Source};

/// Resolves once when the operator is asked to stop; every loop and controller listens to it.
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

/// Bounds of a kind this operator watches and reconciles.
pub trait Kind:
    Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Kind for K where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// The work-queue key of an object reference (as [`super::object_key`] of the object).
pub fn ref_key<K: Resource>(r: &ObjectRef<K>) -> String {
    format!("{}/{}", r.namespace.as_deref().unwrap_or_default(), r.name)
}

/// The owner of `obj` that is a `K` (by kind and apiVersion), as a reference to wake.
pub fn owner<K, O>(obj: &O) -> Option<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
    O: Resource,
{
    let o = obj
        .owner_references()
        .iter()
        .find(|o| o.kind == K::kind(&()) && o.api_version == K::api_version(&()))?;
    Some(ObjectRef::new(&o.name).within(obj.meta().namespace.as_deref()?))
}

/// Wakes one controller for an object; each wake counts as a work-queue add.
pub struct Waker<K: Resource> {
    tx: mpsc::UnboundedSender<ObjectRef<K>>,
    controller: &'static str,
    metrics: Arc<Metrics>,
}

impl<K: Resource> Clone for Waker<K> {
    fn clone(&self) -> Self {
        Waker {
            tx: self.tx.clone(),
            controller: self.controller,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

impl<K: Resource> Waker<K> {
    pub fn wake(&self, r: ObjectRef<K>) {
        self.metrics.queue_add(self.controller, ref_key(&r));
        // A closed queue means the controller has stopped: nothing is left to wake.
        let _ = self.tx.send(r);
    }

    pub fn wake_all(&self, refs: impl IntoIterator<Item = ObjectRef<K>>) {
        for r in refs {
            self.wake(r);
        }
    }

    /// A call that wakes every object `store` holds.
    pub fn into_erased(self, store: &Store<K>) -> Box<dyn Fn() + Send + Sync>
    where
        K: Kind,
    {
        let store = store.clone();
        Box::new(move || {
            self.wake_all(
                store
                    .state()
                    .iter()
                    .map(|o| ObjectRef::from_obj(o.as_ref())),
            )
        })
    }
}

/// A controller's work queue: its [`Waker`]s fill it, [`run_controller`] drains it.
pub struct Queue<K: Resource> {
    waker: Waker<K>,
    rx: mpsc::UnboundedReceiver<ObjectRef<K>>,
}

impl<K: Resource> Queue<K> {
    pub fn new(controller: &'static str, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Queue {
            waker: Waker {
                tx,
                controller,
                metrics,
            },
            rx,
        }
    }

    pub fn waker(&self) -> Waker<K> {
        self.waker.clone()
    }

    pub fn controller(&self) -> &'static str {
        self.waker.controller
    }
}

/// What happened to a watched object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Applied,
    Deleted,
}

type EventHandler<K> = Box<dyn Fn(&watcher::Event<K>) + Send + Sync>;
type ObjectHandler<K> = Box<dyn Fn(&K, Seen) + Send + Sync>;

/// One watch: it fills a cache, then hands every event to what listens to it (indexes first, then the
/// wake-ups of the controllers that care).
pub struct Watch<K: Kind> {
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    on_event: Vec<EventHandler<K>>,
    on_object: Vec<ObjectHandler<K>>,
    /// Extra sources of the same cache, started and stopped while the watch runs.
    extra: Option<(Merge<K>, mpsc::UnboundedReceiver<Change>)>,
}

impl<K: Kind> Watch<K> {
    pub fn new(api: Api<K>, config: watcher::Config, writer: Writer<K>) -> Self {
        Watch {
            api,
            config,
            writer,
            on_event: Vec::new(),
            on_object: Vec::new(),
            extra: None,
        }
    }

    /// Lets extra watches fill this watch's cache (`in_primary` says what this watch's own selector
    /// selects); the returned sender starts and stops them. Listeners see one stream of events.
    pub fn extra_sources(
        &mut self,
        in_primary: impl Fn(&K) -> bool + Send + Sync + 'static,
    ) -> mpsc::UnboundedSender<Change> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.extra = Some((Merge::new(self.writer.as_reader(), in_primary), rx));
        tx
    }

    /// `f` sees every event (relists included), before any wake-up.
    pub fn on_event(&mut self, f: impl Fn(&watcher::Event<K>) + Send + Sync + 'static) {
        self.on_event.push(Box::new(f));
    }

    /// `f` sees every object applied or deleted.
    pub fn on_object(&mut self, f: impl Fn(&K, Seen) + Send + Sync + 'static) {
        self.on_object.push(Box::new(f));
    }

    /// Wakes `waker` for the objects `f` names whenever an object is applied or deleted.
    pub fn wake<T: Resource + 'static>(
        &mut self,
        waker: &Waker<T>,
        f: impl Fn(&K, Seen) -> Vec<ObjectRef<T>> + Send + Sync + 'static,
    ) {
        let waker = waker.clone();
        self.on_object(move |obj, seen| waker.wake_all(f(obj, seen)));
    }

    /// Wakes the controller of this kind for each object applied (not deleted: nothing is left to do).
    pub fn wake_self(&mut self, waker: &Waker<K>) {
        self.wake(waker, |obj, seen| match seen {
            Seen::Applied => vec![ObjectRef::from_obj(obj)],
            Seen::Deleted => Vec::new(),
        });
    }

    /// Runs the watch until the operator stops.
    pub fn spawn(self, shutdown: Shutdown) -> JoinHandle<()> {
        let events = lean(self.api.clone(), self.config.clone())
            .backoff(watch_backoff())
            .take_until(shutdown.clone());
        tokio::spawn(self.follow(events, shutdown))
    }

    /// Caches `events` (and those of any extra source) and tells every listener, until they end.
    async fn follow<S>(self, events: S, shutdown: Shutdown)
    where
        S: futures::Stream<Item = std::result::Result<watcher::Event<K>, watcher::Error>>
            + Send
            + 'static,
    {
        let Watch {
            api,
            mut writer,
            on_event,
            on_object,
            extra,
            ..
        } = self;
        let (mut merge, mut control) = match extra {
            Some((m, c)) => (Some(m), Some(c)),
            None => (None, None),
        };
        let kind = K::kind(&()).to_string();
        let reader = writer.as_reader();
        let mut streams: SelectAll<SourcedEvents<K>> = SelectAll::new();
        streams.push(events.map(|e| (None, e)).boxed());
        let mut running: HashMap<String, AbortHandle> = HashMap::new();
        let mut relist = Relist { before: Vec::new() };
        loop {
            let batch = tokio::select! {
                change = next_change(&mut control) => match change {
                    Some(Change::Start { name, selector }) => {
                        if running.contains_key(&name) {
                            continue;
                        }
                        let (events, stop) = futures::stream::abortable(
                            lean(api.clone(), from_watch_cache(&selector))
                                .backoff(watch_backoff())
                                .take_until(shutdown.clone()),
                        );
                        running.insert(name.clone(), stop);
                        streams.push(events.map(move |e| (Some(name.clone()), e)).boxed());
                        continue;
                    }
                    Some(Change::Replay { name }) => {
                        merge.as_ref().map(|m| m.replay(&name)).unwrap_or_default()
                    }
                    Some(Change::Stop { name }) => {
                        if let Some(stop) = running.remove(&name) {
                            stop.abort();
                        }
                        merge.as_mut().map(|m| m.stop(&name)).unwrap_or_default()
                    }
                    None => {
                        control = None;
                        continue;
                    }
                },
                item = streams.next() => match item {
                    None => break,
                    Some((_, Err(e))) => {
                        warn!(%kind, error = %e, "watch error");
                        continue;
                    }
                    Some((source, Ok(ev))) => match merge.as_mut() {
                        Some(m) => m.event(&source, ev),
                        None => vec![ev],
                    },
                },
            };
            for ev in batch {
                writer.apply_watcher_event(&ev);
                for f in &on_event {
                    f(&ev);
                }
                let tell = |obj: &K, seen: Seen| {
                    for f in &on_object {
                        f(obj, seen);
                    }
                };
                match &ev {
                    watcher::Event::Apply(o) => tell(o, Seen::Applied),
                    watcher::Event::Delete(o) => tell(o, Seen::Deleted),
                    watcher::Event::Init => relist.begin(&reader),
                    watcher::Event::InitApply(_) => {}
                    watcher::Event::InitDone => relist.end(&reader, tell),
                }
            }
        }
    }
}

type SourcedEvents<K> = BoxStream<
    'static,
    (
        Source,
        std::result::Result<watcher::Event<K>, watcher::Error>,
    ),
>;

/// The next start or stop of an extra source; never, for a watch without them.
async fn next_change(control: &mut Option<mpsc::UnboundedReceiver<Change>>) -> Option<Change> {
    match control {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

/// What a (re)list changed. The cache takes a list's objects only when the list is done, and a controller
/// woken for an object its cache does not hold yet drops the wake-up: so the objects of a list are told
/// once the cache holds them — a Task created while the API server was away would otherwise never be
/// reconciled. Those that were cached before and are not in the list were deleted meanwhile: told as such.
struct Relist<K: Kind> {
    before: Vec<Arc<K>>,
}

impl<K: Kind> Relist<K> {
    fn begin(&mut self, cache: &Store<K>) {
        self.before = cache.state();
    }

    fn end(&mut self, cache: &Store<K>, tell: impl Fn(&K, Seen)) {
        for obj in std::mem::take(&mut self.before) {
            let now = cache.get(&ObjectRef::from_obj(obj.as_ref()));
            // A namesake created meanwhile is another object: the one cached before is gone.
            if now.is_none_or(|n| n.uid() != obj.uid()) {
                tell(obj.as_ref(), Seen::Deleted);
            }
        }
        for obj in cache.state() {
            tell(obj.as_ref(), Seen::Applied);
        }
    }
}

/// How long a broken watch waits before it tries again: client-go's exponential back-off (kube's
/// default), capped at 5 s instead of 30 s: after an API server outage longer than a few seconds, a
/// watch could otherwise sleep up to 30 s after the server was back while tasks wait for it. A few
/// relists every 5 s from a handful of replicas cost the server little.
pub fn watch_backoff() -> impl kube::runtime::utils::Backoff {
    let exponential: watcher::ExponentialBackoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(800))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into();
    kube::runtime::utils::ResetTimerBackoff::new(exponential, Duration::from_secs(120))
}

/// A watch whose objects drop `managedFields` before they are cached: they are often the larger part of
/// an object, and nothing here reads them (thousands of Proplets cost a third of the memory).
fn lean<K: Kind>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures::Stream<Item = std::result::Result<watcher::Event<K>, watcher::Error>> + Send {
    watcher(api, config).modify(|o| o.managed_fields_mut().clear())
}

/// A watch whose list is served from the API server's watch cache: a fenced shard's share, listed from
/// etcd, is a read of every object of the kind filtered by label there (5 to 7 s for 3,300 of 10,000
/// Proplets on the test bed, two survivors at once), which holds the takeover back. An older list is
/// safe: the watch from its resourceVersion brings what changed since. Not paged: kube sends no
/// `resourceVersion=0` with a limit (the API server would ignore the limit), so a paged list of "any"
/// semantic is a consistent read from etcd after all.
fn from_watch_cache(selector: &str) -> watcher::Config {
    let mut config = watcher::Config::default().labels(selector).any_semantic();
    config.page_size = None;
    config
}

/// Every watch of one operator. Controllers add their wake-ups, then [`Watches::spawn`] starts them.
pub struct Watches {
    /// A single replica's Proplets are all; a shard's, those labelled with it.
    pub proplets: Watch<Proplet>,
    /// Same for Tasks.
    pub tasks: Watch<Task>,
    /// A shard's Proplets moving to it.
    pub incoming: Option<Watch<Proplet>>,
    /// A shard's view of the Tasks nobody has claimed.
    pub unclaimed: Option<Watch<Task>>,
    /// Jobs of the job backend: only watched with `--k8s-task-backend=job`.
    pub jobs: Option<Watch<Job>>,
    pub propeller_jobs: Watch<PropellerJob>,
    pub federated_jobs: Watch<FederatedJob>,
    pub training_rounds: Watch<TrainingRound>,
    /// ConfigMaps holding FL client updates.
    pub fl_updates: Watch<ConfigMap>,
}

impl Watches {
    /// Watches in `namespace` (empty: all namespaces); a shard's Proplet and Task watches are restricted
    /// to what is labelled with `shard`.
    pub fn new(
        client: &Client,
        namespace: &str,
        writers: Writers,
        shard: Option<&str>,
        job_selector: Option<&str>,
        fl_update_selector: &str,
    ) -> Self {
        use crate::sharding::{incoming_selector, own_selector, unclaimed_selector};
        let all = watcher::Config::default;
        let own = || match shard {
            Some(s) => all().labels(&own_selector(s)),
            None => all(),
        };
        Watches {
            proplets: Watch::new(api(client, namespace), own(), writers.proplets),
            tasks: Watch::new(api(client, namespace), own(), writers.tasks),
            incoming: shard.map(|s| {
                Watch::new(
                    api(client, namespace),
                    all().labels(&incoming_selector(s)),
                    writers.incoming,
                )
            }),
            unclaimed: shard.map(|_| {
                Watch::new(
                    api(client, namespace),
                    all().labels(&unclaimed_selector()),
                    writers.unclaimed,
                )
            }),
            jobs: job_selector
                .map(|s| Watch::new(api(client, namespace), all().labels(s), writers.jobs)),
            propeller_jobs: Watch::new(api(client, namespace), all(), writers.propeller_jobs),
            federated_jobs: Watch::new(api(client, namespace), all(), writers.federated_jobs),
            training_rounds: Watch::new(api(client, namespace), all(), writers.training_rounds),
            fl_updates: Watch::new(
                api(client, namespace),
                all().labels(fl_update_selector),
                writers.fl_updates,
            ),
        }
    }

    pub fn spawn(self, shutdown: &Shutdown) -> Vec<JoinHandle<()>> {
        let mut handles = vec![
            self.proplets.spawn(shutdown.clone()),
            self.tasks.spawn(shutdown.clone()),
            self.propeller_jobs.spawn(shutdown.clone()),
            self.federated_jobs.spawn(shutdown.clone()),
            self.training_rounds.spawn(shutdown.clone()),
            self.fl_updates.spawn(shutdown.clone()),
        ];
        if let Some(jobs) = self.jobs {
            handles.push(jobs.spawn(shutdown.clone()));
        }
        if let Some(w) = self.incoming {
            handles.push(w.spawn(shutdown.clone()));
        }
        if let Some(w) = self.unclaimed {
            handles.push(w.spawn(shutdown.clone()));
        }
        handles
    }
}

fn api<K>(client: &Client, namespace: &str) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    if namespace.is_empty() {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), namespace)
    }
}

/// Runs `reconcile` over `queue` until `shutdown`: then no new reconcile starts and those in flight finish.
pub fn run_controller<K, R, F>(
    queue: Queue<K>,
    store: Store<K>,
    reconcile: R,
    ctx: Arc<Context>,
    shutdown: Shutdown,
) -> BoxFuture<'static, ()>
where
    K: Kind + Unpin,
    R: Fn(Arc<K>, Arc<Context>) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Action>> + Send + 'static,
{
    let controller = queue.controller();
    let concurrency = ctx.config.max_concurrent_reconciles;
    let reconcile = Arc::new(reconcile);
    drive(
        queue.rx,
        store,
        move |obj: Arc<K>, ctx: Arc<Context>| {
            let reconcile = Arc::clone(&reconcile);
            async move {
                let measured_ctx = Arc::clone(&ctx);
                super::measured(
                    &measured_ctx,
                    controller,
                    obj.as_ref(),
                    reconcile(obj.clone(), ctx),
                )
                .await
            }
        },
        retry_after_error::<K>(controller),
        ctx,
        concurrency,
        shutdown,
    )
}

/// The kube-runtime controller under [`run_controller`], for any context (unit tests use their own).
pub fn drive<K, C, R, F, E>(
    rx: mpsc::UnboundedReceiver<ObjectRef<K>>,
    store: Store<K>,
    reconcile: R,
    error_policy: impl Fn(Arc<K>, &E, Arc<C>) -> Action + Send + Sync + 'static,
    ctx: Arc<C>,
    concurrency: u16,
    shutdown: Shutdown,
) -> BoxFuture<'static, ()>
where
    K: Kind + Unpin,
    C: Send + Sync + 'static,
    R: FnMut(Arc<K>, Arc<C>) -> F + Send + 'static,
    F: futures::TryFuture<Ok = Action, Error = E> + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    let config = kube::runtime::controller::Config::default().concurrency(concurrency);
    // The queue ends with the shutdown: no new reconcile starts; the graceful shutdown lets those in
    // flight finish before the stream ends.
    let triggers = UnboundedReceiverStream::new(rx).take_until(shutdown.clone());
    Controller::for_stream(
        futures::stream::empty::<std::result::Result<K, watcher::Error>>(),
        store,
    )
    .with_config(config)
    .reconcile_on(triggers)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|_| async {})
    .boxed()
}

/// Back-off after an error: the next try comes in a while, not at once.
pub fn retry_after_error<K: Resource>(
    controller: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action + Send + Sync + 'static {
    move |obj: Arc<K>, err: &Error, ctx: Arc<Context>| {
        let name = obj.meta().name.clone().unwrap_or_default();
        let replica = ctx.ownership.identity().unwrap_or_default();
        if let Error::Conflict(msg) = err {
            // Our view was stale; the watch is about to deliver the newer version.
            tracing::info!(controller, object = %name, %replica, %msg, "stale view; retrying");
            return Action::requeue(Duration::from_millis(200));
        }
        warn!(controller, object = %name, %replica, error = %err, "reconcile failed; retrying in 5s");
        Action::requeue(Duration::from_secs(5))
    }
}

/// A future resolving with `shutdown`, shareable by every loop.
pub fn shutdown_from(shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Shutdown {
    shutdown.boxed().shared()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    #[test]
    fn a_takeover_watch_lists_from_the_watch_cache_unpaged() {
        let config = from_watch_cache("a=b");
        assert_eq!(config.list_semantic, watcher::ListSemantic::Any);
        assert_eq!(config.page_size, None);
        assert_eq!(config.label_selector.as_deref(), Some("a=b"));
    }

    fn task(name: &str) -> Task {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "propeller.propeller.abstractmachines.fr/v1", "kind": "Task",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1"},
            "spec": {"name": name},
        }))
        .expect("task")
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    /// A stop lets the reconcile in flight finish, starts nothing new, and takes no longer than that.
    #[tokio::test]
    async fn a_stop_finishes_reconciles_in_flight_and_starts_no_more() {
        let (store, mut writer) = reflector::store::<Task>();
        writer.apply_watcher_event(&watcher::Event::Init);
        for name in ["a", "b"] {
            writer.apply_watcher_event(&watcher::Event::InitApply(task(name)));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let queue = Queue::<Task>::new("task", Arc::clone(&metrics));
        let waker = queue.waker();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = shutdown_from(async {
            let _ = stop_rx.await;
        });
        let (started, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (s, f) = (Arc::clone(&started), Arc::clone(&finished));
        let running = tokio::spawn(drive(
            queue.rx,
            store,
            move |_t: Arc<Task>, _c: Arc<()>| {
                let (s, f) = (Arc::clone(&s), Arc::clone(&f));
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    f.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Never>(Action::await_change())
                }
            },
            |_, _: &Never, _| Action::await_change(),
            Arc::new(()),
            4,
            shutdown,
        ));
        waker.wake(ObjectRef::new("a").within("ns"));
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let asked = Instant::now();
        let _ = stop_tx.send(());
        waker.wake(ObjectRef::new("b").within("ns"));
        tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("the controller stops")
            .expect("no panic");
        let took = asked.elapsed();
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "the reconcile in flight finished"
        );
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "nothing started after the stop"
        );
        eprintln!("stop took {took:?} with a 300 ms reconcile in flight");
    }

    /// After a relist (the API server came back, the watch's resourceVersion was too old), a controller
    /// woken for an object its cache does not hold yet drops the wake-up: the chaos run lost 500 Tasks
    /// created while the watch was away that way. Every object is told only when the cache holds it, and
    /// one that vanished meanwhile is told deleted.
    #[tokio::test]
    async fn a_relist_tells_its_objects_once_cached_and_those_gone_as_deleted() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        let (store, writer) = reflector::store::<Task>();
        let mut watch = Watch::new(
            Api::namespaced(client, "ns"),
            watcher::Config::default(),
            writer,
        );
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (t, cache) = (Arc::clone(&told), store.clone());
        watch.on_object(move |obj: &Task, seen| {
            let cached = cache.get(&ObjectRef::from_obj(obj)).is_some();
            t.lock().expect("lock").push((obj.name_any(), seen, cached));
        });
        let with_uid = |name: &str| {
            let mut t = task(name);
            t.metadata.uid = Some(format!("uid-{name}"));
            t
        };
        use watcher::Event::*;
        let events = vec![
            Init,
            InitApply(with_uid("a")),
            InitApply(with_uid("gone")),
            InitDone,
            // The watch breaks; the relist finds a Task created meanwhile and misses one deleted.
            Init,
            InitApply(with_uid("a")),
            InitApply(with_uid("new")),
            InitDone,
        ];
        watch
            .follow(
                futures::stream::iter(events.into_iter().map(Ok)),
                futures::future::pending::<()>().boxed().shared(),
            )
            .await;
        let told = told.lock().expect("lock").clone();
        let mut after_relist: Vec<_> = told[2..].to_vec();
        after_relist.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            after_relist,
            vec![
                ("a".to_string(), Seen::Applied, true),
                ("gone".to_string(), Seen::Deleted, false),
                ("new".to_string(), Seen::Applied, true),
            ],
            "told: {told:?}"
        );
        assert!(
            told[..2]
                .iter()
                .all(|(_, seen, cached)| *seen == Seen::Applied && *cached),
            "the first list: {told:?}"
        );
    }
}
