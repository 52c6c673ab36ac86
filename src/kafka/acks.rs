//! Durable-ack tracking: a transaction's commit end LSN becomes durable when all of
//! its messages, and those of every earlier transaction, are acknowledged by Kafka
//! (`acks=all`). Only then may the source confirm it to the slot (DESIGN §1).
//!
//! Pure bookkeeping; the producer calls it from its delivery callback.

use std::collections::VecDeque;

use crate::lsn::Lsn;

#[derive(Debug)]
struct Pending {
    seq: u64,
    outstanding: u64,
    /// Set when the transaction's commit was seen.
    end: Option<Lsn>,
    /// A snapshot mark (see `Event::Mark`) that is durable with this entry.
    mark: Option<u64>,
}

#[derive(Debug, Default)]
pub struct AckTracker {
    pending: VecDeque<Pending>,
    next_seq: u64,
    durable: Lsn,
    durable_mark: u64,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A transaction begins; returns its sequence number.
    pub fn begin(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back(Pending {
            seq,
            outstanding: 0,
            end: None,
            mark: None,
        });
        seq
    }

    /// A snapshot mark: durable once everything handed over before it is. Returns the
    /// new durable mark if it is at once.
    pub fn mark(&mut self, mark: u64) -> Option<u64> {
        let seq = self.begin();
        if let Some(p) = self.get(seq) {
            p.mark = Some(mark);
        }
        let before = self.durable_mark;
        // Ends at LSN 0: durable moves by nothing but the mark.
        self.commit(seq, Lsn::ZERO);
        (self.durable_mark > before).then_some(self.durable_mark)
    }

    /// The highest snapshot mark that is durable.
    pub fn durable_mark(&self) -> u64 {
        self.durable_mark
    }

    fn get(&mut self, seq: u64) -> Option<&mut Pending> {
        let front = self.pending.front()?.seq;
        let index = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.pending.get_mut(index)
    }

    /// A message of transaction `seq` was handed to the producer.
    pub fn sent(&mut self, seq: u64) {
        if let Some(p) = self.get(seq) {
            p.outstanding += 1;
        }
    }

    /// A message of `seq` was acknowledged. Returns the new durable LSN if it moved.
    pub fn acked(&mut self, seq: u64) -> Option<Lsn> {
        if let Some(p) = self.get(seq) {
            p.outstanding = p.outstanding.saturating_sub(1);
        }
        self.advance()
    }

    /// Transaction `seq` is complete and ends at `end`. Returns the new durable LSN if
    /// it moved (a transaction without messages is durable at once, in order).
    pub fn commit(&mut self, seq: u64, end: Lsn) -> Option<Lsn> {
        if let Some(p) = self.get(seq) {
            p.end = Some(end);
        }
        // A transaction that sent nothing, right after a complete one, adds only its
        // end: fold it into that one, so that a stream of such transactions (changes
        // of unconfigured tables) does not grow the queue while the brokers are down.
        // Its sequence number is handed out again: nothing refers to it any more.
        let n = self.pending.len();
        if n >= 2 {
            let (last, prev) = (&self.pending[n - 1], &self.pending[n - 2]);
            if last.seq == seq && last.outstanding == 0 && prev.end.is_some() {
                let mark = last.mark;
                self.pending.pop_back();
                self.next_seq -= 1;
                if let Some(p) = self.pending.back_mut() {
                    p.end = p.end.max(Some(end));
                    p.mark = p.mark.max(mark);
                }
            }
        }
        self.advance()
    }

    /// Transactions still waiting for acknowledgements.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn advance(&mut self) -> Option<Lsn> {
        let before = self.durable;
        while let Some(front) = self.pending.front() {
            match front.end {
                Some(end) if front.outstanding == 0 => {
                    self.durable = self.durable.max(end);
                    if let Some(m) = front.mark {
                        self.durable_mark = self.durable_mark.max(m);
                    }
                    self.pending.pop_front();
                }
                _ => break,
            }
        }
        (self.durable > before).then_some(self.durable)
    }

    pub fn durable(&self) -> Lsn {
        self.durable
    }

    /// Messages handed over and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.pending.iter().map(|p| p.outstanding).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_is_durable_when_all_its_messages_are_acked() {
        let mut t = AckTracker::new();
        let a = t.begin();
        t.sent(a);
        t.sent(a);
        assert_eq!(t.commit(a, Lsn(100)), None);
        assert_eq!(t.acked(a), None);
        assert_eq!(t.acked(a), Some(Lsn(100)));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_later_transaction_waits_for_earlier_ones() {
        let mut t = AckTracker::new();
        let a = t.begin();
        t.sent(a);
        t.commit(a, Lsn(100));
        let b = t.begin();
        t.sent(b);
        t.commit(b, Lsn(200));
        assert_eq!(t.acked(b), None, "b is acked but a is not");
        assert_eq!(t.durable(), Lsn(0));
        assert_eq!(t.acked(a), Some(Lsn(200)), "both become durable together");
    }

    #[test]
    fn empty_transactions_are_durable_in_order() {
        let mut t = AckTracker::new();
        let a = t.begin();
        t.sent(a);
        t.commit(a, Lsn(100));
        let b = t.begin();
        assert_eq!(t.commit(b, Lsn(200)), None);
        assert_eq!(t.acked(a), Some(Lsn(200)));
        let c = t.begin();
        assert_eq!(t.commit(c, Lsn(300)), Some(Lsn(300)));
    }

    #[test]
    fn empty_transactions_do_not_grow_the_queue_while_nothing_is_acked() {
        let mut t = AckTracker::new();
        let a = t.begin();
        t.sent(a);
        t.commit(a, Lsn(100));
        for i in 0..10_000u64 {
            let e = t.begin();
            assert_eq!(t.commit(e, Lsn(200 + i)), None);
        }
        assert_eq!(t.pending(), 1, "folded into the waiting transaction");
        let b = t.begin();
        t.sent(b);
        t.commit(b, Lsn(20_000));
        assert_eq!(
            t.acked(a),
            Some(Lsn(10_199)),
            "durable up to the last empty one"
        );
        assert_eq!(t.acked(b), Some(Lsn(20_000)));
    }

    #[test]
    fn a_mark_is_durable_after_everything_before_it() {
        let mut t = AckTracker::new();
        let a = t.begin();
        t.sent(a);
        t.commit(a, Lsn::ZERO);
        assert_eq!(t.mark(1), None, "a is not acked yet");
        let b = t.begin();
        t.commit(b, Lsn(50));
        assert_eq!(t.durable_mark(), 0);
        t.acked(a);
        assert_eq!(t.durable_mark(), 1, "folded marks survive");
        assert_eq!(t.durable(), Lsn(50));
        assert_eq!(t.mark(2), Some(2), "nothing in flight: durable at once");
    }

    /// The incremental snapshot's case: the high watermark's transaction sends its
    /// rows, then the mark, and every row is acknowledged before the commit arrives.
    /// The commit alone makes the mark durable (the producer must publish it then:
    /// no delivery is left to do it).
    #[test]
    fn a_commit_after_all_acks_makes_a_later_mark_durable() {
        let mut t = AckTracker::new();
        let a = t.begin();
        t.sent(a);
        assert_eq!(t.mark(7), None, "the transaction is still open");
        t.acked(a);
        assert_eq!(t.durable_mark(), 0, "no commit yet");
        assert_eq!(t.commit(a, Lsn(90)), Some(Lsn(90)));
        assert_eq!(t.durable_mark(), 7, "the commit moved the mark");
    }

    #[test]
    fn an_open_transaction_is_never_durable() {
        let mut t = AckTracker::new();
        let a = t.begin();
        t.sent(a);
        assert_eq!(t.acked(a), None);
        assert_eq!(t.durable(), Lsn(0));
    }
}
