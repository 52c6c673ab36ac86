//! The byte budget between two stages: the event channel is bounded by count, and
//! this bounds it by bytes too, so that 4096 rows of 10 MB each cannot take 40 GB. The
//! sender takes an event's weight before sending it and the receiver gives it back
//! once the event is handled (written to stdout, or in librdkafka's own bounded queue).
//! A single event heavier than the whole budget takes all of it, so it still passes,
//! alone.

use tokio::sync::Semaphore;

use crate::event::Event;

/// Default budget: 8 MiB of events in flight between the source and the next stage
/// (the producer's own queue is behind it; more here only costs memory).
pub const DEFAULT_BYTES: usize = 8 << 20;

/// Budget units are KiB, so a `u32` permit count covers any event.
const UNIT: usize = 1024;

#[derive(Debug)]
pub struct ByteBudget {
    permits: Semaphore,
    total: u32,
}

impl ByteBudget {
    pub fn new(bytes: usize) -> Self {
        let total = (bytes / UNIT).clamp(1, u32::MAX as usize >> 4) as u32;
        ByteBudget {
            permits: Semaphore::new(total as usize),
            total,
        }
    }

    fn units(&self, event: &Event) -> u32 {
        (event.weight().div_ceil(UNIT)).clamp(1, self.total as usize) as u32
    }

    /// Wait until `event` fits, and take its share.
    pub async fn take(&self, event: &Event) {
        if let Ok(p) = self.permits.acquire_many(self.units(event)).await {
            p.forget();
        }
    }

    /// Take `event`'s share if it fits now, without waiting.
    pub fn try_take(&self, event: &Event) -> bool {
        match self.permits.try_acquire_many(self.units(event)) {
            Ok(p) => {
                p.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Give back `event`'s share once it is handled.
    pub fn give(&self, event: &Event) {
        self.permits.add_permits(self.units(event) as usize);
    }

    /// A tally for giving shares back in handfuls (see [`Returns`]).
    pub fn returns(&self) -> Returns<'_> {
        Returns {
            budget: self,
            units: 0,
        }
    }

    /// Bytes (in whole KiB) taken now.
    pub fn in_use(&self) -> usize {
        (self.total as usize - self.permits.available_permits()) * UNIT
    }
}

/// Units a [`Returns`] holds before it gives them back.
const HANDFUL: u32 = 64;

/// Shares given back in handfuls: every return takes the semaphore's lock, and a
/// snapshot sends a million small events. At most [`HANDFUL`] KiB are held back, and
/// only while the holder is busy: it must [`Returns::settle`] before it waits for
/// another event, or a sender waiting for room could be waiting on it.
pub struct Returns<'a> {
    budget: &'a ByteBudget,
    units: u32,
}

impl Returns<'_> {
    /// `event` is handled: its share is owed back.
    pub fn give(&mut self, event: &Event) {
        self.units = self.units.saturating_add(self.budget.units(event));
        if self.units >= HANDFUL {
            self.settle();
        }
    }

    /// Give back everything owed.
    pub fn settle(&mut self) {
        if self.units > 0 {
            self.budget.permits.add_permits(self.units as usize);
            self.units = 0;
        }
    }
}

impl Drop for Returns<'_> {
    fn drop(&mut self) {
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Txn;
    use crate::lsn::Lsn;
    use crate::timestamp::PgTimestamp;

    fn begin() -> Event {
        Event::Begin(Txn {
            xid: 1,
            commit_lsn: Lsn(1),
            commit_ts: PgTimestamp(0),
            prev_commit_end: Lsn(0),
        })
    }

    #[tokio::test]
    async fn takes_and_gives_back() {
        let b = ByteBudget::new(4 * UNIT);
        for _ in 0..4 {
            b.take(&begin()).await;
        }
        assert_eq!(b.in_use(), 4 * UNIT);
        let blocked =
            tokio::time::timeout(std::time::Duration::from_millis(50), b.take(&begin())).await;
        assert!(blocked.is_err(), "a full budget makes the sender wait");
        b.give(&begin());
        b.take(&begin()).await;
        assert_eq!(b.in_use(), 4 * UNIT);
    }

    #[tokio::test]
    async fn returns_are_held_until_a_handful_or_settled() {
        let b = ByteBudget::new(256 * UNIT);
        for _ in 0..HANDFUL + 2 {
            b.take(&begin()).await;
        }
        let mut r = b.returns();
        for _ in 0..HANDFUL - 1 {
            r.give(&begin());
        }
        assert_eq!(b.in_use(), (HANDFUL as usize + 2) * UNIT, "held back");
        r.give(&begin());
        assert_eq!(b.in_use(), 2 * UNIT, "a handful goes back at once");
        r.give(&begin());
        r.settle();
        assert_eq!(b.in_use(), UNIT);
        r.give(&begin());
        drop(r);
        assert_eq!(b.in_use(), 0, "dropping settles");
    }
}
