//! Kubernetes Events, published through kube's [`Recorder`]. It counts a repeat of an Event into that
//! Event's series for 6 minutes, and so keeps every Event it published that long, in a map that never
//! shrinks: one Event per proplet coming online made it about 12 MiB at 5,000 proplets (a heap profile),
//! held for good. A fresh Recorder every [`RENEW`] lets the old map go; a repeat that straddles the change
//! starts a new Event instead of counting into the old one's series.
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};

/// kube's Recorder forgets an Event 6 minutes after it was last seen: by then its map holds only what the
/// newest minutes published.
const RENEW: Duration = Duration::from_secs(6 * 60);

pub struct Events {
    client: Client,
    reporter: Reporter,
    current: Mutex<(Recorder, Instant)>,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Events {
        let recorder = Recorder::new(client.clone(), reporter.clone());
        Events {
            client,
            reporter,
            current: Mutex::new((recorder, Instant::now())),
        }
    }

    /// The Recorder to publish with now (a fresh one once the current one is [`RENEW`] old).
    fn recorder(&self) -> Recorder {
        let mut current = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.1.elapsed() >= RENEW {
            *current = (
                Recorder::new(self.client.clone(), self.reporter.clone()),
                Instant::now(),
            );
        }
        current.0.clone()
    }

    pub async fn publish(
        &self,
        ev: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        self.recorder().publish(ev, reference).await
    }
}
