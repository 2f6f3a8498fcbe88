//! The log head: the position of the newest committed event, published by the
//! log writer after every commit and followed by every stage that reads the
//! log. A `tokio::sync::watch` carries it, so any number of stages wait on it
//! without polling and without the writer knowing who they are; a poller
//! publishes what other processes (the CLI importer) append, within its
//! interval.

use std::sync::Arc;
use std::time::Duration;
use tandem_core::LogPosition;
use tandem_store::Store;
use tokio::sync::watch;

/// The committed head of the log; cheap to clone (every clone is the same head).
#[derive(Clone)]
pub struct LogHead {
    sender: Arc<watch::Sender<LogPosition>>,
}

impl LogHead {
    pub fn new(start: LogPosition) -> Self {
        LogHead { sender: Arc::new(watch::Sender::new(start)) }
    }

    /// Moves the head forward to `position`; an older position (a late
    /// report from the poller) is ignored, so the head never goes back.
    pub fn publish(&self, position: LogPosition) {
        self.sender.send_if_modified(|head| {
            let moved = position > *head;
            if moved {
                *head = position;
            }
            moved
        });
    }

    /// Wakes every follower without moving the head (at shutdown, so they
    /// notice their stop flag at once).
    pub fn nudge(&self) {
        self.sender.send_modify(|_| {});
    }

    pub fn current(&self) -> LogPosition {
        *self.sender.borrow()
    }

    /// A follower for a stage that runs on its own thread.
    pub fn follow(&self) -> HeadFollower {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("building a follower's timer runtime");
        HeadFollower { receiver: self.sender.subscribe(), runtime }
    }

    /// Follows appends made by other processes: every `interval`, reads the
    /// store's head and publishes it. Runs until the task is dropped.
    pub async fn poll_store(self, store: Arc<dyn Store>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let store = store.clone();
            match tokio::task::spawn_blocking(move || store.head()).await {
                Ok(Ok(position)) => self.publish(position),
                Ok(Err(error)) => tracing::warn!(%error, "reading the log head failed"),
                Err(_) => {}
            }
        }
    }
}

/// One stage's view of the head, for waiting on a plain thread.
pub struct HeadFollower {
    receiver: watch::Receiver<LogPosition>,
    runtime: tokio::runtime::Runtime,
}

impl HeadFollower {
    /// Blocks until the head is past `after`, the head is nudged, or
    /// `timeout` passes; returns the head as it then stands.
    pub fn wait_beyond(&mut self, after: LogPosition, timeout: Duration) -> LogPosition {
        let receiver = &mut self.receiver;
        if *receiver.borrow_and_update() > after {
            return *receiver.borrow();
        }
        // The timer must be made inside the runtime, hence the async block.
        let _ = self.runtime.block_on(async { tokio::time::timeout(timeout, receiver.changed()).await });
        let head = *receiver.borrow_and_update();
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn every_follower_wakes_when_the_head_moves() {
        let head = LogHead::new(LogPosition(3));
        let followers: Vec<_> = (0..3)
            .map(|_| {
                let mut follower = head.follow();
                std::thread::spawn(move || follower.wait_beyond(LogPosition(3), Duration::from_secs(10)))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        head.publish(LogPosition(9));
        for follower in followers {
            assert_eq!(follower.join().unwrap(), LogPosition(9));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "followers woke on the publish, not the timeout");
    }

    #[test]
    fn the_head_never_moves_back() {
        let head = LogHead::new(LogPosition(0));
        head.publish(LogPosition(5));
        head.publish(LogPosition(4));
        assert_eq!(head.current(), LogPosition(5));
        let mut follower = head.follow();
        assert_eq!(follower.wait_beyond(LogPosition(2), Duration::from_secs(10)), LogPosition(5), "already past");
        assert_eq!(follower.wait_beyond(LogPosition(5), Duration::from_millis(20)), LogPosition(5), "timed out");
    }
}
