//! The connection pool: at most a fixed number of connections to one
//! database, opened when first needed and kept for reuse. The bound matters
//! because the server calls the store from a blocking-thread pool that can
//! grow to hundreds of threads, while PostgreSQL admits 100 connections by
//! default for every node together; a caller that finds every connection
//! busy waits for one to come back (up to [`Pool::WAIT`]) instead.
//!
//! A connection that saw a storage failure is checked before it goes back,
//! because the client only notices a dead server on its next use; one that
//! fails the check (or whose caller panicked) is closed and frees its slot.

use super::tls::Connector;
use crate::StoreError;
use postgres::{Client, Config};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a connection that saw a failure gets to answer before it is
/// closed instead of pooled.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Every connection stayed busy for as long as a caller may wait.
#[derive(Debug, thiserror::Error)]
#[error("all {max} postgresql connections stayed busy for {waited:?}")]
pub struct PoolExhausted {
    pub max: usize,
    pub waited: Duration,
}

pub(super) struct Pool {
    config: Config,
    connector: Connector,
    max: usize,
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Client>,
    /// Connections open, idle or lent out.
    open: usize,
}

impl Pool {
    /// How long a caller waits for a busy pool before giving up.
    pub const WAIT: Duration = Duration::from_secs(30);

    pub fn new(config: Config, connector: Connector, max: usize) -> Self {
        Pool {
            config,
            connector,
            max: max.max(1),
            state: Mutex::new(PoolState { idle: Vec::new(), open: 0 }),
            returned: Condvar::new(),
        }
    }

    /// The settings every connection of this pool is opened with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// How this pool's connections are opened (with TLS or without).
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Runs `work` on a pooled connection (opening one while under the
    /// bound). A transaction `work` left open is rolled back when it is
    /// dropped, so a returned connection is always outside a transaction.
    pub fn run<T>(&self, work: impl FnOnce(&mut Client) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut client = self.acquire()?;
        let slot = Slot { pool: self };
        let result = work(&mut client);
        let healthy = !client.is_closed()
            && (!matches!(result, Err(StoreError::Backend(_))) || client.is_valid(HEALTH_CHECK_TIMEOUT).is_ok());
        if healthy {
            slot.give_back(client);
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn acquire(&self) -> Result<Client, StoreError> {
        let deadline = Instant::now() + Self::WAIT;
        let mut state = self.lock();
        loop {
            while let Some(client) = state.idle.pop() {
                if !client.is_closed() {
                    return Ok(client);
                }
                state.open -= 1;
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return self.connector.connect(&self.config).inspect_err(|_| {
                    self.lock().open -= 1;
                    self.returned.notify_one();
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Backend(Box::new(PoolExhausted { max: self.max, waited: Self::WAIT })));
            }
            state = self.returned.wait_timeout(state, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Connections open now, idle or lent out.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.lock().open
    }
}

/// The place of a connection lent out. Dropped, it frees the place (the
/// connection was closed: broken, or its user panicked); a healthy
/// connection is given back to the idle list instead.
struct Slot<'pool> {
    pool: &'pool Pool,
}

impl Slot<'_> {
    fn give_back(self, client: Client) {
        self.pool.lock().idle.push(client);
        self.pool.returned.notify_one();
        std::mem::forget(self);
    }
}

impl Drop for Pool {
    /// Closes the idle connections on a thread of their own: the synchronous
    /// client closes by blocking on its own runtime, which panics when the
    /// last holder of the store drops it on an async runtime's thread (a
    /// server that fails to start, say).
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.state.get_mut().unwrap_or_else(PoisonError::into_inner).idle);
        if !idle.is_empty() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pool.lock().open -= 1;
        self.pool.returned.notify_one();
    }
}
