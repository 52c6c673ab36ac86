//! The statements an applier prepares once per target connection.
//!
//! Every batch runs the same few statements: a table's column types and its COPY, the
//! checkpoint, the ledger's lock and row. Sent as plain text, each cost a round trip to
//! prepare it before the one that runs it, and a parse and plan on the target; a
//! 5000-row batch of a snapshot waited on about fourteen round trips. Prepared once,
//! each is one round trip, and the ones a batch sends back to back are pipelined.
//!
//! A prepared statement lives in the connection's session. Behind a proxy that pools
//! by transaction (PgBouncer in `pool_mode = transaction` without
//! `max_prepared_statements`), the next batch may run on a server session that never
//! saw it: the target answers `26000`, the batch is retried, and from then on this
//! applier prepares its statements in each batch's own transaction, as a pooled
//! session keeps them that long.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Statement, Transaction};

/// More distinct statements than this (a COPY per table and column list) empty the
/// cache rather than grow it without end.
const MAX_STATEMENTS: usize = 1024;

/// Prepared statements by their text, valid for the connection they were prepared on:
/// its owner clears them when it connects anew.
#[derive(Default)]
pub struct Statements {
    by_text: HashMap<String, Statement>,
    /// Set by [`Statements::lost`] where a batch's error is classified.
    lost: Arc<AtomicBool>,
    /// Kept for one transaction only, once one was lost between two.
    per_transaction: bool,
}

impl Statements {
    /// Forget every statement: the connection they belong to is gone.
    pub fn clear(&mut self) {
        self.by_text.clear();
    }

    /// Call before each batch's transaction.
    pub fn begin(&mut self) {
        if self.lost.swap(false, Ordering::Relaxed) && !self.per_transaction {
            tracing::warn!(
                "a statement prepared on the target connection was gone in the next transaction: \
                 a proxy pools the target's sessions by transaction; statements are prepared \
                 per batch from now on (set max_prepared_statements in PgBouncer 1.21+ to keep them)"
            );
            self.per_transaction = true;
        }
        if self.per_transaction {
            self.by_text.clear();
        }
    }

    /// A check for errors of the batch: whether `e` says a prepared statement is gone,
    /// noted for the next [`Statements::begin`]. Owned, to live in an error mapping.
    pub fn lost(&self) -> impl Fn(&tokio_postgres::Error) -> bool + Send + Sync + 'static {
        let flag = self.lost.clone();
        move |e| {
            let gone = e.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME);
            if gone {
                flag.store(true, Ordering::Relaxed);
            }
            gone
        }
    }

    /// `sql` prepared on `tx`'s connection, the first time it is asked for.
    /// (A statement prepared in a transaction that rolls back stays prepared.)
    pub async fn get(
        &mut self,
        tx: &Transaction<'_>,
        sql: &str,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(s) = self.by_text.get(sql) {
            return Ok(s.clone());
        }
        let s = tx.prepare(sql).await?;
        if self.by_text.len() >= MAX_STATEMENTS {
            self.by_text.clear();
        }
        self.by_text.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}
