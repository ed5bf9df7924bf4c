//! Prometheus metrics (controller-runtime's names where they exist) and the HTTP endpoint serving them
//! with the health probes.
pub mod events;
pub mod multicluster;
pub mod secure;
pub mod server;
pub mod sharding;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric family. Labels are bounded sets (controller, result, kind, outcome, resource, phase):
/// never object names.
pub struct Metrics {
    pub registry: Registry,
    pub reconcile_total: IntCounterVec,
    pub reconcile_errors_total: IntCounterVec,
    pub reconcile_time_seconds: HistogramVec,
    pub mqtt_messages_total: IntCounterVec,
    pub mqtt_published_total: IntCounterVec,
    pub mqtt_connected: IntGauge,
    pub mqtt_reconnects: IntCounter,
    pub api_writes_total: IntCounterVec,
    pub task_dispatch_seconds: Histogram,
    pub task_completion_seconds: Histogram,
    pub proplets: IntGaugeVec,
    pub registry_requests_total: IntCounterVec,
    pub discovery_total: IntCounterVec,
    pub workqueue_depth: IntGaugeVec,
    pub workqueue_adds_total: IntCounterVec,
    pub workqueue_queue_duration_seconds: HistogramVec,
    pub tasks: IntGaugeVec,
    pub fl_updates_total: IntCounterVec,
    pub fl_rounds_total: IntCounterVec,
    pub fl_model_requests_total: IntCounterVec,
    pub fl_dataset_requests_total: IntCounterVec,
    /// FL requests refused for their capability (none, wrong, another participant's).
    pub fl_requests_refused_total: IntCounterVec,
    pub shards: sharding::ShardMetrics,
    pub members: multicluster::MemberMetrics,
    /// Queued objects per controller (a key is queued once until its reconcile starts), with the time it
    /// was first queued.
    queued: Mutex<HashMap<(&'static str, String), Instant>>,
}

impl Metrics {
    /// A fresh registry with every family: one per operator, so several operators in one process (tests,
    /// a hub beside its members) keep their own counts.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let reconcile_total = IntCounterVec::new(
            Opts::new(
                "controller_runtime_reconcile_total",
                "Total number of reconciliations per controller",
            ),
            &["controller", "result"],
        )?;
        let reconcile_errors_total = IntCounterVec::new(
            Opts::new(
                "controller_runtime_reconcile_errors_total",
                "Total number of reconciliation errors per controller",
            ),
            &["controller"],
        )?;
        let reconcile_time_seconds = HistogramVec::new(
            HistogramOpts::new(
                "controller_runtime_reconcile_time_seconds",
                "Length of time per reconciliation per controller",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )?;
        let mqtt_messages_total = IntCounterVec::new(
            Opts::new(
                "propeller_mqtt_messages_total",
                "MQTT messages received, by kind and outcome (ok, malformed, unknown_proplet, unknown_task, not_owned)",
            ),
            &["kind", "outcome"],
        )?;
        let mqtt_published_total = IntCounterVec::new(
            Opts::new(
                "propeller_mqtt_published_total",
                "MQTT messages published, by kind and outcome",
            ),
            &["kind", "outcome"],
        )?;
        let mqtt_connected = IntGauge::new(
            "propeller_mqtt_connected",
            "1 while the broker connection is up",
        )?;
        let mqtt_reconnects = IntCounter::new(
            "propeller_mqtt_reconnects_total",
            "Broker connections regained after a loss (each re-sends the starts of running tasks once their proplets are back)",
        )?;
        let api_writes_total = IntCounterVec::new(
            Opts::new(
                "propeller_api_writes_total",
                "Writes to the API server by resource and verb",
            ),
            &["resource", "verb"],
        )?;
        let task_dispatch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "propeller_task_dispatch_seconds",
                "Task creation to start message published",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        let task_completion_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "propeller_task_completion_seconds",
                "Result received to status written",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let proplets = IntGaugeVec::new(
            Opts::new(
                "propeller_proplets",
                "Proplets by phase, as last reconciled",
            ),
            &["phase"],
        )?;
        let registry_requests_total = IntCounterVec::new(
            Opts::new(
                "propeller_registry_requests_total",
                "Module requests on registry/proplet, by outcome (served, not_found, error, dropped, duplicate, \
             other_replica)",
            ),
            &["outcome"],
        )?;
        let discovery_total = IntCounterVec::new(
            Opts::new(
                "propeller_discovery_total",
                "Discovery messages of unknown proplets, by outcome (created, exists, limit, dropped, error)",
            ),
            &["outcome"],
        )?;
        let workqueue_depth = IntGaugeVec::new(
            Opts::new(
                "workqueue_depth",
                "Current depth of the work queue (objects waiting for a reconcile)",
            ),
            &["name"],
        )?;
        let workqueue_adds_total = IntCounterVec::new(
            Opts::new(
                "workqueue_adds_total",
                "Total number of adds handled by the work queue",
            ),
            &["name"],
        )?;
        let workqueue_queue_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "workqueue_queue_duration_seconds",
                "How long an object waits in the work queue before its reconcile starts",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["name"],
        )?;
        let tasks = IntGaugeVec::new(
            Opts::new(
                "propeller_tasks",
                "Tasks by phase, as the operator sees them",
            ),
            &["phase"],
        )?;
        let fl_updates_total = IntCounterVec::new(
            Opts::new(
                "propeller_fl_updates_total",
                "Federated-learning client updates by route (http, mqtt, result) and outcome (accepted, duplicate, \
             late, malformed, not_participant, unknown_round, too_large, error)",
            ),
            &["via", "outcome"],
        )?;
        let fl_rounds_total = IntCounterVec::new(
            Opts::new(
                "propeller_fl_rounds_total",
                "Training rounds ended, by outcome (completed, timeout, insufficient_updates, aggregation_failed, \
             invalid_spec)",
            ),
            &["outcome"],
        )?;
        let fl_model_requests_total = IntCounterVec::new(
            Opts::new(
                "propeller_fl_model_requests_total",
                "Model registry reads (GET /models/{version}) by outcome (served, not_found, error)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(fl_updates_total.clone()))?;
        registry.register(Box::new(fl_rounds_total.clone()))?;
        let fl_dataset_requests_total = IntCounterVec::new(
            Opts::new(
                "propeller_fl_dataset_requests_total",
                "Dataset reads (GET /datasets/{clientId}) by outcome (served, not_found, error)",
            ),
            &["outcome"],
        )?;
        let fl_requests_refused_total = IntCounterVec::new(
            Opts::new(
                "propeller_fl_requests_refused_total",
                "FL coordinator requests refused by reason (no_capability: not a per-task URL; \
                 bad_capability: an unknown task or a wrong token; wrong_participant: another \
                 participant's update, data or round)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(fl_requests_refused_total.clone()))?;
        registry.register(Box::new(fl_model_requests_total.clone()))?;
        registry.register(Box::new(fl_dataset_requests_total.clone()))?;
        registry.register(Box::new(workqueue_depth.clone()))?;
        registry.register(Box::new(workqueue_adds_total.clone()))?;
        registry.register(Box::new(workqueue_queue_duration_seconds.clone()))?;
        registry.register(Box::new(tasks.clone()))?;
        registry.register(Box::new(registry_requests_total.clone()))?;
        registry.register(Box::new(discovery_total.clone()))?;
        registry.register(Box::new(reconcile_total.clone()))?;
        registry.register(Box::new(reconcile_errors_total.clone()))?;
        registry.register(Box::new(reconcile_time_seconds.clone()))?;
        registry.register(Box::new(mqtt_messages_total.clone()))?;
        registry.register(Box::new(mqtt_published_total.clone()))?;
        registry.register(Box::new(mqtt_reconnects.clone()))?;
        registry.register(Box::new(mqtt_connected.clone()))?;
        registry.register(Box::new(api_writes_total.clone()))?;
        registry.register(Box::new(task_dispatch_seconds.clone()))?;
        registry.register(Box::new(task_completion_seconds.clone()))?;
        registry.register(Box::new(proplets.clone()))?;
        let shards = sharding::ShardMetrics::new(&registry)?;
        let members = multicluster::MemberMetrics::new(&registry)?;
        Ok(Metrics {
            registry,
            reconcile_total,
            reconcile_errors_total,
            reconcile_time_seconds,
            mqtt_messages_total,
            mqtt_published_total,
            mqtt_reconnects,
            mqtt_connected,
            api_writes_total,
            task_dispatch_seconds,
            task_completion_seconds,
            proplets,
            registry_requests_total,
            discovery_total,
            workqueue_depth,
            workqueue_adds_total,
            workqueue_queue_duration_seconds,
            tasks,
            fl_updates_total,
            fl_rounds_total,
            fl_model_requests_total,
            fl_dataset_requests_total,
            fl_requests_refused_total,
            shards,
            members,
            queued: Mutex::new(HashMap::new()),
        })
    }
}

impl Metrics {
    pub fn mqtt_message(&self, kind: &str, outcome: &str) {
        self.mqtt_messages_total
            .with_label_values(&[kind, outcome])
            .inc();
    }

    pub fn fl_update(&self, via: &str, outcome: &str) {
        self.fl_updates_total
            .with_label_values(&[via, outcome])
            .inc();
    }

    pub fn api_write(&self, resource: &str, verb: &str) {
        self.api_writes_total
            .with_label_values(&[resource, verb])
            .inc();
    }

    /// An object was queued for `controller`'s reconcile (a watch event or a trigger).
    pub fn queue_add(&self, controller: &'static str, key: String) {
        self.workqueue_adds_total
            .with_label_values(&[controller])
            .inc();
        if let Ok(mut q) = self.queued.lock() {
            q.entry((controller, key)).or_insert_with(Instant::now);
            let depth = q.keys().filter(|(c, _)| *c == controller).count();
            self.workqueue_depth
                .with_label_values(&[controller])
                .set(depth as i64);
        }
    }

    /// `controller`'s reconcile of `key` starts: it leaves the queue.
    pub fn queue_start(&self, controller: &'static str, key: &str) {
        if let Ok(mut q) = self.queued.lock() {
            if let Some(at) = q.remove(&(controller, key.to_string())) {
                self.workqueue_queue_duration_seconds
                    .with_label_values(&[controller])
                    .observe(at.elapsed().as_secs_f64());
            }
            let depth = q.keys().filter(|(c, _)| *c == controller).count();
            self.workqueue_depth
                .with_label_values(&[controller])
                .set(depth as i64);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
