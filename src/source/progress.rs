//! Progress tracking: what the source may confirm to the slot.
//!
//! The rule (DESIGN §1): `flush` only ever moves to the end LSN of a transaction that
//! the next stage reports durable, or to a keepalive position received while nothing
//! was in flight. Confirming more loses data: on restart the server resumes from
//! `max(requested, confirmed_flush_lsn)`.
//!
//! Why keepalives count: since PostgreSQL 15 empty transactions are not sent, so a
//! publication whose tables are idle never sees a commit while other tables write WAL.
//! A keepalive's `walEnd` received outside a transaction means every transaction that
//! commits before it was already sent to us; once those are durable, `walEnd` is safe.
//! A keepalive inside a transaction is not: the transaction's commit is beyond it.
//!
//! Nothing here moves backwards.

use crate::lsn::Lsn;

#[derive(Debug, Clone)]
pub struct Progress {
    /// Highest flush position reported to the server.
    confirmed: Lsn,
    /// End LSN of the last commit handed to the next stage.
    forwarded: Lsn,
    /// Highest commit end the next stage reports durable.
    durable: Lsn,
    /// Highest WAL position received (reported as `write`).
    received: Lsn,
    /// A keepalive position that becomes confirmable once `forwarded`-at-that-time
    /// is durable: `(wal_end, required_durable)`.
    idle: Option<(Lsn, Lsn)>,
    in_txn: bool,
}

impl Progress {
    /// Start from the slot's `confirmed_flush_lsn`.
    pub fn new(confirmed: Lsn) -> Self {
        Progress {
            confirmed,
            forwarded: confirmed,
            durable: confirmed,
            received: confirmed,
            idle: None,
            in_txn: false,
        }
    }

    /// End LSN of the last commit handed to the next stage.
    pub fn forwarded(&self) -> Lsn {
        self.forwarded
    }

    pub fn received(&mut self, lsn: Lsn) {
        self.received = self.received.max(lsn);
    }

    pub fn begin(&mut self) {
        self.in_txn = true;
    }

    /// The transaction ending at `end` was handed to the next stage.
    pub fn commit(&mut self, end: Lsn) {
        self.in_txn = false;
        self.forwarded = self.forwarded.max(end);
        self.received(end);
    }

    /// A keepalive (or non-transactional message) at `wal_end`.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        self.received(wal_end);
        if self.in_txn {
            return;
        }
        match &mut self.idle {
            Some((end, required)) if wal_end > *end => {
                *end = wal_end;
                *required = self.forwarded;
            }
            Some(_) => {}
            None => self.idle = Some((wal_end, self.forwarded)),
        }
    }

    /// The next stage reports everything up to `lsn` durable.
    pub fn durable(&mut self, lsn: Lsn) {
        self.durable = self.durable.max(lsn);
    }

    /// The position that may be confirmed now.
    pub fn flush_position(&self) -> Lsn {
        let mut flush = self.confirmed.max(self.durable);
        if let Some((wal_end, required)) = self.idle {
            if self.durable >= required {
                flush = flush.max(wal_end);
            }
        }
        flush
    }

    pub fn write_position(&self) -> Lsn {
        self.received.max(self.flush_position())
    }

    /// Record that `flush` was reported to the server.
    pub fn confirmed(&mut self, flush: Lsn) {
        self.confirmed = self.confirmed.max(flush);
        if matches!(self.idle, Some((end, _)) if end <= self.confirmed) {
            self.idle = None;
        }
    }

    pub fn last_confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Where to restart streaming after a lost connection: everything forwarded will
    /// still become durable in this process, so it need not be sent again. A
    /// transaction cut off mid-way is sent again whole.
    pub fn resume_point(&self) -> Lsn {
        self.confirmed.max(self.forwarded)
    }

    /// The connection was lost: a partial transaction will be sent again.
    pub fn reset_transaction(&mut self) {
        self.in_txn = false;
    }

    /// Everything handed downstream is durable and no transaction is open.
    pub fn is_caught_up(&self) -> bool {
        !self.in_txn && self.durable >= self.forwarded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_durable_commits() {
        let mut p = Progress::new(Lsn(100));
        p.begin();
        p.commit(Lsn(200));
        assert_eq!(p.flush_position(), Lsn(100), "forwarded is not durable");
        p.durable(Lsn(200));
        assert_eq!(p.flush_position(), Lsn(200));
    }

    #[test]
    fn keepalive_inside_a_transaction_is_never_confirmed() {
        let mut p = Progress::new(Lsn(100));
        p.begin();
        p.keepalive(Lsn(500));
        p.durable(Lsn(100));
        assert_eq!(p.flush_position(), Lsn(100));
        assert_eq!(p.write_position(), Lsn(500));
    }

    #[test]
    fn idle_keepalive_waits_for_earlier_commits_to_be_durable() {
        let mut p = Progress::new(Lsn(100));
        p.begin();
        p.commit(Lsn(200));
        p.keepalive(Lsn(300));
        assert_eq!(p.flush_position(), Lsn(100));
        p.durable(Lsn(200));
        assert_eq!(p.flush_position(), Lsn(300));
        // A later transaction in flight does not un-confirm the idle point.
        p.begin();
        assert_eq!(p.flush_position(), Lsn(300));
    }

    #[test]
    fn never_moves_backwards() {
        let mut p = Progress::new(Lsn(100));
        p.confirmed(Lsn(400));
        p.durable(Lsn(50));
        assert_eq!(p.flush_position(), Lsn(400));
        p.confirmed(Lsn(10));
        assert_eq!(p.last_confirmed(), Lsn(400));
    }

    #[test]
    fn resumes_after_what_was_forwarded() {
        let mut p = Progress::new(Lsn(100));
        p.begin();
        p.commit(Lsn(200));
        p.begin();
        p.reset_transaction();
        assert_eq!(p.resume_point(), Lsn(200));
        assert!(!p.is_caught_up());
        p.durable(Lsn(200));
        assert!(p.is_caught_up());
    }
}
