//! Stage leases on PostgreSQL: one session-level advisory lock per stage,
//! taken with `pg_try_advisory_lock` on a connection opened for that lease
//! alone (never a pooled one, which other work would share and which could
//! be closed or handed to another caller). The lock lives exactly as long as
//! that session: dropping the lease closes the connection, and a node that
//! dies has its connection closed by the server, so a waiting node can take
//! the lock within its next retry. Who holds a lock is visible to every node
//! in `pg_locks` (advisory locks there show the key's high 32 bits as
//! `classid`, the low ones as `objid`, and `objsubid = 1`).

use super::PostgresStore;
use crate::{Coordination, LeaseHolder, LeaseKeeper, LeaseLost, Stage, StageLease, StoreError, StoreKind};
use postgres::Client;
use std::time::Duration;

/// The high half of every stage lease's advisory-lock key ("tdm\0"); the
/// low half is the FNV-1a hash of the stage's name.
const LEASE_KEY_PREFIX: u32 = 0x7464_6d00;

/// Idle time before a lease connection is probed, the time between probes,
/// and the unanswered probes after which it counts as dead: a vanished
/// holder frees its lease within about [`DEAD_AFTER`].
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
const DEAD_AFTER: Duration = Duration::from_secs(11);

/// The advisory-lock key of `stage`'s lease.
pub(super) fn lease_key(stage: Stage) -> (u32, u32) {
    let hash = stage.0.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    (LEASE_KEY_PREFIX, hash)
}

fn as_bigint((high, low): (u32, u32)) -> i64 {
    (i64::from(high) << 32) | i64::from(low)
}

/// Advisory locks on `(classid, objid)` in this database, granted.
const HOLDERS: &str = "SELECT COUNT(*) FROM pg_locks
     WHERE locktype = 'advisory' AND granted AND objsubid = 1
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND classid::bigint = $1 AND objid::bigint = $2";

/// The connection holding one stage's advisory lock.
struct LockSession {
    stage: Stage,
    client: Client,
}

impl LeaseKeeper for LockSession {
    /// Asks the server whether this session still holds the lock: a closed
    /// connection, or a lock released behind its back, is a lost lease.
    fn check(&mut self) -> Result<(), LeaseLost> {
        let (high, low) = lease_key(self.stage);
        let lost = |reason: String| LeaseLost { stage: self.stage.0, reason };
        let held: i64 = self
            .client
            .query_one(&format!("{HOLDERS} AND pid = pg_backend_pid()"), &[&i64::from(high), &i64::from(low)])
            .and_then(|row| row.try_get(0))
            .map_err(|error| lost(format!("its connection failed: {error}")))?;
        if held == 1 {
            Ok(())
        } else {
            Err(lost("the advisory lock was released".to_owned()))
        }
    }
}

impl Drop for LockSession {
    /// Releases the lock before the connection closes: closing alone frees
    /// it only once the server has ended the session, a moment later, and a
    /// node asking at once would be refused a lease nobody holds.
    fn drop(&mut self) {
        let _ = self.client.execute("SELECT pg_advisory_unlock($1)", &[&as_bigint(lease_key(self.stage))]);
    }
}

impl Coordination for PostgresStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Postgres
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.with_client(|client| Ok(client.batch_execute("SELECT 1")?))
    }

    fn try_lease(&self, stage: Stage) -> Result<Option<StageLease>, StoreError> {
        let mut config = self.pool.config().clone();
        // A holder that vanishes without closing its connection (power
        // loss, a partition) must not keep the lock for the operating
        // system's default two hours: both ends probe the idle connection
        // every few seconds and give up after DEAD_AFTER, and the client does
        // not wait longer than that for an unacknowledged write.
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(DEAD_AFTER);
        let mut client = self.pool.connector().connect(&config)?;
        client.batch_execute(&format!(
            "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; SET tcp_keepalives_count = {};
             SET tcp_user_timeout = {}; SET idle_session_timeout = 0",
            KEEPALIVE_IDLE.as_secs(),
            KEEPALIVE_INTERVAL.as_secs(),
            KEEPALIVE_RETRIES,
            DEAD_AFTER.as_millis()
        ))?;
        let taken: bool =
            client.query_one("SELECT pg_try_advisory_lock($1)", &[&as_bigint(lease_key(stage))])?.try_get(0)?;
        if !taken {
            return Ok(None);
        }
        Ok(Some(StageLease::kept_by(stage, Box::new(LockSession { stage, client }))))
    }

    fn lease_holder(&self, stage: Stage) -> Result<LeaseHolder, StoreError> {
        let (high, low) = lease_key(stage);
        let holders: i64 = self
            .with_client(|client| Ok(client.query_one(HOLDERS, &[&i64::from(high), &i64::from(low)])?.try_get(0)?))?;
        Ok(if holders > 0 { LeaseHolder::Held } else { LeaseHolder::Vacant })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::testing;
    use std::time::Instant;

    #[test]
    fn one_node_holds_a_stage_lease_until_it_lets_go() {
        let Some(first) = testing::fresh_store() else { return };
        let second = PostgresStore::connect_with(first.pool.config().clone(), 4).unwrap();
        assert_eq!(first.lease_holder(Stage::RESOLVE).unwrap(), LeaseHolder::Vacant);
        let mut lease = first.try_lease(Stage::RESOLVE).unwrap().expect("a vacant lease is granted");
        assert!(second.try_lease(Stage::RESOLVE).unwrap().is_none(), "held elsewhere, refused");
        assert_eq!(second.lease_holder(Stage::RESOLVE).unwrap(), LeaseHolder::Held);
        lease.check().unwrap();
        drop(lease);
        let taken_over = second.try_lease(Stage::RESOLVE).unwrap();
        assert!(taken_over.is_some(), "released by dropping, so the other node takes it");
    }

    #[test]
    fn a_dead_holder_loses_the_lease_and_another_node_takes_it() {
        let Some(first) = testing::fresh_store() else { return };
        let second = PostgresStore::connect_with(first.pool.config().clone(), 4).unwrap();
        let mut lease = first.try_lease(Stage::RESOLVE).unwrap().unwrap();
        // The holder's session ends as if its node died.
        let (high, low) = lease_key(Stage::RESOLVE);
        second
            .with_client(|client| {
                client.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'
                     AND classid::bigint = $1 AND objid::bigint = $2",
                    &[&i64::from(high), &i64::from(low)],
                )?;
                Ok(())
            })
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let taken = loop {
            if let Some(lease) = second.try_lease(Stage::RESOLVE).unwrap() {
                break lease;
            }
            assert!(Instant::now() < deadline, "the lease was never freed");
            std::thread::sleep(Duration::from_millis(100));
        };
        let lost = lease.check().unwrap_err();
        assert!(lost.to_string().contains("resolve lease was lost"), "{lost}");
        assert_eq!(taken.stage(), Stage::RESOLVE);
        assert_eq!(first.lease_holder(Stage::RESOLVE).unwrap(), LeaseHolder::Held);
    }

    #[test]
    fn the_store_answers_a_ping_and_says_its_kind() {
        let Some(store) = testing::fresh_store() else { return };
        store.ping().unwrap();
        assert_eq!(store.kind(), StoreKind::Postgres);
    }

    #[test]
    fn stage_keys_differ_by_name() {
        assert_ne!(lease_key(Stage::RESOLVE), lease_key(Stage("audience")));
        assert_eq!(lease_key(Stage::RESOLVE).0, LEASE_KEY_PREFIX);
    }
}
