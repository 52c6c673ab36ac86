//! The truncate barrier: a TRUNCATE is applied once, after every partition of its
//! topic has reached it.
//!
//! Why: the source sends a truncate to every partition of the table's topic, each copy
//! in its place among that partition's changes. Applied as each copy arrives, the copy
//! on a partition that lags would wipe rows that other partitions inserted *after* the
//! truncate. So a partition that reaches a truncate stops there (it is paused, and
//! whatever was read past it is dropped, to be read again), and once every partition
//! of the topic holds its copy, one target transaction applies the truncate and moves
//! all their checkpoints past it. A crash before that leaves every checkpoint before
//! the truncate, and the barrier forms again on restart.

use std::collections::{BTreeMap, HashMap};

use crate::lsn::Lsn;

/// Held truncate copies, per topic.
#[derive(Debug)]
pub struct Barrier<T> {
    held: HashMap<String, Held<T>>,
}

#[derive(Debug)]
struct Held<T> {
    position: (Lsn, u32),
    copies: BTreeMap<i32, T>,
}

impl<T> Default for Barrier<T> {
    fn default() -> Self {
        Barrier {
            held: HashMap::new(),
        }
    }
}

impl<T> Barrier<T> {
    /// Whether `partition` of `topic` waits at a truncate.
    pub fn blocks(&self, topic: &str, partition: i32) -> bool {
        self.held
            .get(topic)
            .is_some_and(|h| h.copies.contains_key(&partition))
    }

    /// Hold the copy of the truncate at `position` that `partition` reached. Each
    /// partition carries the topic's truncates in the same order and stops at the
    /// first, so every held copy of a topic is of the same truncate; a copy of
    /// another one means the partitions disagree, which is reported.
    pub fn hold(
        &mut self,
        topic: &str,
        partition: i32,
        position: (Lsn, u32),
        copy: T,
    ) -> Result<(), (Lsn, u32)> {
        let h = self.held.entry(topic.to_string()).or_insert_with(|| Held {
            position,
            copies: BTreeMap::new(),
        });
        if h.position != position {
            return Err(h.position);
        }
        h.copies.insert(partition, copy);
        Ok(())
    }

    /// Remove and return the topics whose every partition (`partitions(topic)` of
    /// them) holds its copy, with the copies in partition order.
    pub fn complete(&mut self, partitions: impl Fn(&str) -> usize) -> Vec<(String, Vec<T>)> {
        let done: Vec<String> = self
            .held
            .iter()
            .filter(|(topic, h)| h.copies.len() >= partitions(topic))
            .map(|(topic, _)| topic.clone())
            .collect();
        done.into_iter()
            .filter_map(|topic| {
                self.held
                    .remove(&topic)
                    .map(|h| (topic, h.copies.into_values().collect()))
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncate_completes_once_every_partition_holds_it() {
        let mut b = Barrier::default();
        let at = (Lsn(100), 0);
        b.hold("t", 1, at, "p1").unwrap();
        assert!(b.blocks("t", 1));
        assert!(!b.blocks("t", 0));
        assert!(b.complete(|_| 3).is_empty());
        b.hold("t", 0, at, "p0").unwrap();
        b.hold("t", 2, at, "p2").unwrap();
        assert_eq!(
            b.complete(|_| 3),
            vec![("t".into(), vec!["p0", "p1", "p2"])]
        );
        assert!(b.is_empty());
        assert!(!b.blocks("t", 1));
    }

    #[test]
    fn copies_of_different_truncates_are_refused() {
        let mut b = Barrier::default();
        b.hold("t", 0, (Lsn(100), 0), ()).unwrap();
        assert_eq!(b.hold("t", 1, (Lsn(200), 0), ()), Err((Lsn(100), 0)));
    }
}
