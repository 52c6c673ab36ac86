//! The remembered source state and the trait of the stores that keep it: shared by the
//! source stage (which decides with it and records positions) and the stores (a file,
//! a Kafka topic), so that neither depends on the other. See `source::state`.

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
