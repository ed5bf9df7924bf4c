//! The time schedules are judged by. Real time in the operator; tests of recurring tasks move it forward
//! (a run lasting past a per-minute tick would otherwise take a real minute).
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn now(&self) -> jiff::Timestamp {
        let now = jiff::Timestamp::now();
        let offset = jiff::SignedDuration::from_millis(self.offset_ms.load(Ordering::SeqCst));
        now.checked_add(offset).unwrap_or(now)
    }

    /// Moves this clock (and every copy of it) forward.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::SeqCst);
    }
}
