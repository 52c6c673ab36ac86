//! Checkpoints in the target: per (consumer, topic, partition) the next offset to read
//! and the last applied `(commit_lsn, ordinal)`. Written in the same transaction as
//! the rows they cover, so the target never holds rows without their checkpoint or a
//! checkpoint without its rows. Start offsets come from here, never from Kafka's group
//! offsets; the position makes re-sent events (at-least-once into Kafka) no-ops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_postgres::{Client, Statement, Transaction};

use crate::error::Error;
use crate::lsn::Lsn;

/// Serializes DDL of concurrent sinks (`create … if not exists` races otherwise).
pub const DDL_LOCK: &str = "select pg_advisory_xact_lock(7012202611)";

pub const DDL: &str = "begin; select pg_advisory_xact_lock(7012202611);
create schema if not exists pgferry;
create table if not exists pgferry.checkpoints (
  consumer text not null,
  topic text not null,
  partition int not null,
  next_offset bigint not null,
  commit_lsn pg_lsn not null,
  ordinal int not null,
  updated_at timestamptz not null default now(),
  primary key (consumer, topic, partition)
);
commit";

/// Where one partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub next_offset: i64,
    pub position: (Lsn, u32),
}

/// What this process knows is applied, per (topic, partition): one map shared by the
/// sink's workers. A partition is applied by one worker at a time, so no entry has two
/// writers; the lock is never held across an await.
#[derive(Debug, Clone, Default)]
pub struct Applied(Arc<Mutex<HashMap<(String, i32), Checkpoint>>>);

impl Applied {
    pub fn new(loaded: HashMap<(String, i32), Checkpoint>) -> Applied {
        Applied(Arc::new(Mutex::new(loaded)))
    }

    pub fn get(&self, topic: &str, partition: i32) -> Option<Checkpoint> {
        // A panic elsewhere cannot leave a half-written Copy value behind.
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(topic.to_string(), partition)).copied()
    }

    pub fn insert(&self, topic: String, partition: i32, cp: Checkpoint) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert((topic, partition), cp);
    }
}

pub async fn ensure_table(client: &Client) -> Result<(), Error> {
    client.batch_execute(DDL).await.map_err(|e| {
        Error::postgres(
            "creating the checkpoint table pgferry.checkpoints in the target",
            e,
        )
    })
}

/// All checkpoints of `consumer`, by (topic, partition).
pub async fn load(
    client: &Client,
    consumer: &str,
) -> Result<HashMap<(String, i32), Checkpoint>, Error> {
    let rows = client
        .query(
            "select topic, partition, next_offset, commit_lsn::text, ordinal from pgferry.checkpoints where consumer = $1",
            &[&consumer],
        )
        .await
        .map_err(|e| Error::postgres("reading checkpoints from the target", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let lsn: String = r.get(3);
            let ordinal: i32 = r.get(4);
            (
                (r.get::<_, String>(0), r.get::<_, i32>(1)),
                Checkpoint {
                    next_offset: r.get(2),
                    position: (lsn.parse().unwrap_or_default(), ordinal as u32),
                },
            )
        })
        .collect())
}

/// The statement [`save`] runs, for [`super::statements::Statements`].
pub const SAVE: &str =
    "insert into pgferry.checkpoints (consumer, topic, partition, next_offset, commit_lsn, ordinal, updated_at)
     values ($1, $2, $3, $4, $5::text::pg_lsn, $6, now())
     on conflict (consumer, topic, partition) do update
     set next_offset = excluded.next_offset, commit_lsn = excluded.commit_lsn,
         ordinal = excluded.ordinal, updated_at = now()";

/// Store `cp` with `save`, the prepared [`SAVE`].
pub async fn save(
    tx: &Transaction<'_>,
    save: &Statement,
    consumer: &str,
    topic: &str,
    partition: i32,
    cp: &Checkpoint,
) -> Result<(), tokio_postgres::Error> {
    let lsn = cp.position.0.to_string();
    tx.execute(
        save,
        &[
            &consumer,
            &topic,
            &partition,
            &cp.next_offset,
            &lsn,
            &(cp.position.1 as i32),
        ],
    )
    .await
    .map(|_| ())
}
