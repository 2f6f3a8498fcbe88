//! Each stage's committed progress, published for the stage after it to
//! wake on. A stage publishes on a `tokio::sync::watch` once a commit that
//! gives the next stage work is durable: the log writer its head
//! ([`crate::log_head`]), the resolver its committed log position, the
//! audience stage and the outbox stage a count of the commits that
//! recorded membership changes or put items in an outbox (neither has a
//! position the next stage could compare: a timer records an exit without
//! reading the log). Every stage waits on its predecessor's signal, so work
//! moves along the pipeline as soon as the commit before it is durable,
//! rather than at the next tick of a poll, and the publisher never knows
//! who follows it.
//!
//! Signals do not cross processes. Each waiting stage keeps a slower
//! recheck as a fallback: for a predecessor that runs on another node in
//! scale-out mode, and for changes the CLI makes in the store.

use std::sync::Arc;
use std::time::Duration;
use tandem_core::LogPosition;
use tokio::sync::watch;

/// How many commits a stage has published that gave the next stage work,
/// since this process started; only its changes matter, not its value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct CommitCount(pub u64);

/// One stage's published progress; cheap to clone (every clone is the same
/// signal).
pub struct Progress<P> {
    sender: Arc<watch::Sender<P>>,
}

impl<P> Clone for Progress<P> {
    fn clone(&self) -> Self {
        Progress { sender: self.sender.clone() }
    }
}

impl<P: Default> Default for Progress<P> {
    fn default() -> Self {
        Progress { sender: Arc::new(watch::Sender::new(P::default())) }
    }
}

impl<P: Copy + PartialOrd> Progress<P> {
    pub fn new(start: P) -> Self {
        Progress { sender: Arc::new(watch::Sender::new(start)) }
    }

    /// Moves the progress forward to `position` and wakes every follower;
    /// an older position (a late report) is ignored, so progress never goes
    /// back.
    pub fn publish(&self, position: P) {
        self.sender.send_if_modified(|current| {
            let moved = position > *current;
            if moved {
                *current = position;
            }
            moved
        });
    }

    /// Wakes every follower without moving the progress: at shutdown, so
    /// they notice their stop flag at once, or when work appeared that no
    /// commit of the stage put there (a destination resumed).
    pub fn nudge(&self) {
        self.sender.send_modify(|_| {});
    }

    pub fn current(&self) -> P {
        *self.sender.borrow()
    }

    /// A follower for a stage that runs on its own thread. What is
    /// published from now on wakes its next wait.
    pub fn follow(&self) -> Follower<P> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("building a follower's timer runtime");
        Follower { receiver: self.sender.subscribe(), runtime }
    }
}

impl Progress<CommitCount> {
    /// Counts one more commit and wakes every follower.
    pub fn count_commit(&self) {
        self.sender.send_modify(|count| count.0 += 1);
    }
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Something was published or nudged.
    Woken,
    /// The timeout passed first.
    TimedOut,
}

/// One stage's view of another's progress, for waiting on a plain thread.
///
/// A wait returns at once when something was published since the last
/// wait returned (or since the follower was made), so a stage that waits
/// only between its steps, each of which reads the store afresh, never
/// misses a commit: one published before the wait returned is in the store
/// the next step reads, and one published after wakes the next wait.
pub struct Follower<P> {
    receiver: watch::Receiver<P>,
    runtime: tokio::runtime::Runtime,
}

impl<P: Copy + PartialOrd> Follower<P> {
    /// Blocks until something is published (or nudged) that this follower
    /// has not waited for yet, or until `timeout` passes.
    pub fn wait(&mut self, timeout: Duration) -> WaitOutcome {
        let receiver = &mut self.receiver;
        // The timer must be made inside the runtime, hence the async block.
        outcome(self.runtime.block_on(async { tokio::time::timeout(timeout, changed(receiver)).await }))
    }

    /// Blocks until the progress is past `after`, something new is nudged,
    /// or `timeout` passes; returns the progress as it then stands.
    pub fn wait_beyond(&mut self, after: P, timeout: Duration) -> P {
        if *self.receiver.borrow_and_update() > after {
            return *self.receiver.borrow();
        }
        self.wait(timeout);
        let latest = *self.receiver.borrow_and_update();
        latest
    }

    /// As [`Follower::wait`], waking on whichever of this follower and
    /// `other` sees something new first: for a stage with two predecessors.
    pub fn wait_either<Q: Copy + PartialOrd>(&mut self, other: &mut Follower<Q>, timeout: Duration) -> WaitOutcome {
        let (mine, theirs) = (&mut self.receiver, &mut other.receiver);
        outcome(self.runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                tokio::select! {
                    () = changed(mine) => {}
                    () = changed(theirs) => {}
                }
            })
            .await
        }))
    }

    /// As [`Follower::wait_either`], with a third follower.
    pub fn wait_any<Q: Copy + PartialOrd, R: Copy + PartialOrd>(
        &mut self,
        second: &mut Follower<Q>,
        third: &mut Follower<R>,
        timeout: Duration,
    ) -> WaitOutcome {
        let (first, second, third) = (&mut self.receiver, &mut second.receiver, &mut third.receiver);
        outcome(self.runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                tokio::select! {
                    () = changed(first) => {}
                    () = changed(second) => {}
                    () = changed(third) => {}
                }
            })
            .await
        }))
    }
}

fn outcome(waited: Result<(), tokio::time::error::Elapsed>) -> WaitOutcome {
    match waited {
        Ok(()) => WaitOutcome::Woken,
        Err(_) => WaitOutcome::TimedOut,
    }
}

/// Completes when the receiver has something unseen, marking it seen; never
/// completes once every sender is gone (the wait then lasts its timeout
/// rather than spinning).
async fn changed<P>(receiver: &mut watch::Receiver<P>) {
    if receiver.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The signals of the stages after the log, in flow order; one set per
/// process, shared by the stages that publish and those that follow (and
/// by the API, which nudges delivery when it resumes a destination).
#[derive(Clone, Default)]
pub struct StageProgress {
    /// The resolver's committed log position: the audience and outbox
    /// stages read events only up to it.
    pub resolved: Progress<LogPosition>,
    /// Audience-stage commits that recorded membership changes, for the
    /// outbox stage.
    pub audiences: Progress<CommitCount>,
    /// Commits that put items in an outbox, for the delivery workers.
    pub outbox: Progress<CommitCount>,
    /// Destinations created or deleted through this node's API: the outbox
    /// stage starts (or stops) their delivery workers at once rather than
    /// at its next periodic listing, so the first items a new destination
    /// gets do not wait for a worker.
    pub destinations: Progress<CommitCount>,
}

impl StageProgress {
    /// Wakes every follower of every signal (at shutdown).
    pub fn nudge_all(&self) {
        self.resolved.nudge();
        self.audiences.nudge();
        self.outbox.nudge();
        self.destinations.nudge();
    }

    /// Says the set of destinations changed, and wakes the outbox stage.
    pub fn destinations_changed(&self) {
        self.destinations.count_commit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A timeout no wait in these tests should reach: one that returns
    /// [`WaitOutcome::Woken`] woke on a signal, not on its timer.
    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn a_wait_on_three_followers_wakes_on_the_third() {
        let (first, second, third) =
            (Progress::new(LogPosition(0)), Progress::new(CommitCount(0)), Progress::new(CommitCount(0)));
        let (mut on_first, mut on_second, mut on_third) = (first.follow(), second.follow(), third.follow());
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            third.count_commit();
        });
        assert_eq!(on_first.wait_any(&mut on_second, &mut on_third, LONG), WaitOutcome::Woken);
        waker.join().unwrap();
        drop((first, second));
    }

    #[test]
    fn every_follower_wakes_when_progress_moves() {
        let progress = Progress::new(LogPosition(3));
        let followers: Vec<_> = (0..3)
            .map(|_| {
                let mut follower = progress.follow();
                std::thread::spawn(move || follower.wait_beyond(LogPosition(3), LONG))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        progress.publish(LogPosition(9));
        for follower in followers {
            assert_eq!(follower.join().unwrap(), LogPosition(9));
        }
    }

    #[test]
    fn progress_never_moves_back() {
        let progress = Progress::new(LogPosition(0));
        progress.publish(LogPosition(5));
        progress.publish(LogPosition(4));
        assert_eq!(progress.current(), LogPosition(5));
        let mut follower = progress.follow();
        assert_eq!(follower.wait_beyond(LogPosition(2), LONG), LogPosition(5), "already past");
        assert_eq!(follower.wait_beyond(LogPosition(5), Duration::from_millis(20)), LogPosition(5), "timed out");
        progress.publish(LogPosition(5));
        assert_eq!(
            follower.wait(Duration::from_millis(20)),
            WaitOutcome::TimedOut,
            "publishing the same position wakes no one"
        );
    }

    #[test]
    fn a_commit_published_between_two_waits_is_not_missed() {
        let progress = Progress::<CommitCount>::default();
        let mut follower = progress.follow();
        // Published while the follower was busy (between waits): the next
        // wait returns at once, however long its timeout.
        progress.count_commit();
        assert_eq!(follower.wait(LONG), WaitOutcome::Woken);
        assert_eq!(progress.current(), CommitCount(1));
        // Seen now: the next wait lasts until the next commit.
        assert_eq!(follower.wait(Duration::from_millis(20)), WaitOutcome::TimedOut);
        let waiter = std::thread::spawn(move || follower.wait(LONG));
        std::thread::sleep(Duration::from_millis(50));
        progress.count_commit();
        assert_eq!(waiter.join().unwrap(), WaitOutcome::Woken);
    }

    #[test]
    fn a_stage_with_two_predecessors_wakes_on_either() {
        let resolved = Progress::new(LogPosition(0));
        let audiences = Progress::<CommitCount>::default();
        let mut on_resolved = resolved.follow();
        let mut on_audiences = audiences.follow();
        audiences.count_commit();
        assert_eq!(on_resolved.wait_either(&mut on_audiences, LONG), WaitOutcome::Woken);
        assert_eq!(on_resolved.wait_either(&mut on_audiences, Duration::from_millis(20)), WaitOutcome::TimedOut);
        let waiter = std::thread::spawn(move || on_resolved.wait_either(&mut on_audiences, LONG));
        std::thread::sleep(Duration::from_millis(50));
        resolved.publish(LogPosition(7));
        assert_eq!(waiter.join().unwrap(), WaitOutcome::Woken);
    }

    #[test]
    fn a_nudge_wakes_a_follower_without_moving_progress() {
        let progress = Progress::new(LogPosition(4));
        let mut follower = progress.follow();
        let waiter = std::thread::spawn(move || follower.wait(LONG));
        std::thread::sleep(Duration::from_millis(50));
        progress.nudge();
        assert_eq!(waiter.join().unwrap(), WaitOutcome::Woken);
        assert_eq!(progress.current(), LogPosition(4));
    }

    #[test]
    fn a_follower_whose_signal_is_gone_waits_its_timeout_instead_of_spinning() {
        let progress = Progress::new(LogPosition(1));
        let mut follower = progress.follow();
        drop(progress);
        let started = Instant::now();
        assert_eq!(follower.wait(Duration::from_millis(30)), WaitOutcome::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
}
