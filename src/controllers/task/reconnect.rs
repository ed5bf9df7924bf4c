//! After the broker connection came back (the broker restarted, or this operator was cut from it), the
//! starts of running tasks are no longer known to have arrived: a proplet's MQTT session is clean, so one
//! that was disconnected too lost what was published to it meanwhile, and a result in flight may be lost with
//! its connection. Every running task this process serves is forgotten as launched and woken: [`super::launch::resume`]
//! sends its start again once what the broker queued for us is handled (its result would be among it) and
//! its proplet is heard again. A proplet ignores a start for a task it is running; a task whose result its
//! proplet lost runs again — the only way to a result the wire has lost.
use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use tracing::{info, warn};

use super::super::runtime::{Shutdown, Waker};
use crate::api::task::{Task, TaskPhase};
use crate::context::Context;
use crate::mqtt::MqttClient;
use crate::mqtt::backlog::Backlog;

/// Runs until `shutdown`: on every connection after the first, re-arms the backlog (with a marker of its
/// own) and wakes the running tasks; meanwhile sends the backlog's echo (see [`crate::mqtt::backlog`]).
pub async fn follow(ctx: Arc<Context>, mqtt: MqttClient, tasks: Waker<Task>, shutdown: Shutdown) {
    let mut connects = mqtt.connects();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut echo = tokio::time::interval(Backlog::ECHO_EVERY);
    echo.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = connects.changed() => if changed.is_err() { return },
            _ = echo.tick() => {
                // Queued (not awaited on the network): a dead connection shows as an echo that never returns.
                if let Some((topic, payload)) = ctx.backlog.echo()
                    && mqtt.up_since().is_some()
                {
                    let _ = mqtt.publish(&topic, payload).await;
                }
                continue;
            }
            _ = &mut shutdown => return,
        }
        let connection = *connects.borrow_and_update();
        if connection <= 1 {
            continue;
        }
        ctx.launched.clear();
        if let Some((topic, marker)) = ctx.backlog.reconnected(connection)
            && let Err(e) = mqtt.publish(&topic, marker).await
        {
            warn!(error = %e, "the reconnect marker was not sent; waiting out the fallback");
        }
        let running: Vec<ObjectRef<Task>> = ctx
            .tasks
            .state()
            .iter()
            .filter(|t| t.phase() == TaskPhase::Running)
            .filter(|t| t.status.as_ref().is_some_and(|s| s.job_name.is_none()))
            .map(|t| ObjectRef::from_obj(t.as_ref()))
            .collect();
        ctx.metrics.mqtt_reconnects.inc();
        info!(
            connection,
            tasks = running.len(),
            "MQTT reconnected: starts of running tasks go out again once their proplets are back"
        );
        tasks.wake_all(running);
    }
}
