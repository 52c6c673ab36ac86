//! The remembered source state and the trait of the stores that keep it: shared by the
//! source stage (which decides with it and records positions) and the stores (a file,
//! a Kafka topic), so that neither depends on the other. See `source::state`.

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::lsn::Lsn;

/// The remembered source, as stored (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    /// `IDENTIFY_SYSTEM`'s systemid: which cluster the slot lives on.
    pub system_identifier: String,
    pub timeline: u32,
    pub database: String,
    pub slot: String,
    /// The highest position the slot may have been confirmed to (`X/Y`).
    pub confirmed_lsn: String,
    /// Snapshot progress: which tables are still to be copied, and how far.
    #[serde(default, skip_serializing_if = "SnapshotState::is_empty")]
    pub snapshot: SnapshotState,
}

/// What snapshots remain and how far they got, by table (`schema.table`). Recorded
/// only once what it claims is durable on Kafka.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotState {
    pub tables: BTreeMap<String, TableSnapshot>,
}

impl SnapshotState {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Tables still to copy, in name order.
    pub fn unfinished(&self) -> impl Iterator<Item = (&String, &TableSnapshot)> {
        self.tables
            .iter()
            .filter(|(_, t)| matches!(t.phase, Phase::Pending | Phase::Copying))
    }
}

/// One table's snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSnapshot {
    pub phase: Phase,
    /// `initial` (inside the slot's exported snapshot) or `incremental` (key-ordered
    /// chunks between watermarks while the stream runs).
    pub method: Method,
    /// Incremental: the key (text of each key column) of the last row copied; the
    /// next chunk starts after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key: Option<Vec<Option<String>>>,
    /// Rows and chunks on Kafka so far (this copy).
    #[serde(default)]
    pub rows: u64,
    #[serde(default)]
    pub chunks: u64,
    /// Why it cannot be copied (phase `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Pending,
    Copying,
    Done,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Copying => "copying",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    #[default]
    Initial,
    Incremental,
}

impl SourceState {
    pub fn confirmed(&self) -> Result<Lsn, Error> {
        self.confirmed_lsn.parse().map_err(|e| {
            Error::operator(format!(
                "the remembered state of slot {} has a malformed confirmed_lsn",
                self.slot
            ))
            .with_source(e)
        })
    }
}

/// Durable storage of one [`SourceState`].
pub trait StateStore: Send + 'static {
    /// Where the state lives, for messages ("state file /x", "topic t, key k").
    fn describe(&self) -> String;
    fn load(&mut self) -> impl Future<Output = Result<Option<SourceState>, Error>> + Send;
    /// Returns once the state is durable.
    fn save(&mut self, state: &SourceState) -> impl Future<Output = Result<(), Error>> + Send;
}
