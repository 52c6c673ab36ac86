//! End-to-end latency, from a change's source commit to the target commit that
//! applied it: the cumulative histogram for Prometheus, and a sliding window of the
//! last minute whose p50, p99 and max are published as gauges, which `pgferry status`
//! reads (a cumulative histogram only tells what happened since start).
//!
//! Both clocks are wall clocks: the source server's at commit, this host's after the
//! target commit. On different hosts, their skew is part of the number.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::metrics::{metrics, LATENCY_BUCKETS};

/// The window: `SLOTS` slots of `SLOT` each; the oldest is dropped as time moves on.
const SLOT: Duration = Duration::from_secs(10);
const SLOTS: usize = 6;

/// Counts per bucket (the last one is past the highest bound), and the max.
#[derive(Debug, Clone, Default)]
struct Counts {
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    max: f64,
}

impl Counts {
    fn add(&mut self, seconds: f64) {
        let i = LATENCY_BUCKETS.partition_point(|&b| b < seconds);
        self.buckets[i] += 1;
        self.max = self.max.max(seconds);
    }

    fn merge(&mut self, other: &Counts) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.max = self.max.max(other.max);
    }

    /// The `q` quantile, interpolated linearly inside its bucket (as Prometheus's
    /// `histogram_quantile` does) and never above the max seen. `None` when empty.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 || ((seen + n) as f64) < rank {
                seen += n;
                continue;
            }
            let low = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let high = LATENCY_BUCKETS.get(i).copied().unwrap_or(self.max);
            let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
            return Some((low + (high - low) * within).min(self.max));
        }
        Some(self.max)
    }
}

struct Window {
    start: Instant,
    /// (slot number since `start`, its counts), by slot number modulo `SLOTS`.
    slots: [(u64, Counts); SLOTS],
}

static WINDOW: Mutex<Option<Window>> = Mutex::new(None);

/// Record the latencies (seconds) of one committed batch, and publish the window.
/// The sink also calls it with none while idle, so that old numbers age out.
pub fn observe(latencies: impl IntoIterator<Item = f64>) {
    let m = metrics();
    let mut guard = WINDOW.lock().unwrap_or_else(|p| p.into_inner());
    let window = guard.get_or_insert_with(|| Window {
        start: Instant::now(),
        slots: Default::default(),
    });
    let now = (window.start.elapsed().as_secs_f64() / SLOT.as_secs_f64()) as u64;
    let (number, slot) = &mut window.slots[now as usize % SLOTS];
    if *number != now {
        *number = now;
        *slot = Counts::default();
    }
    for seconds in latencies {
        let seconds = seconds.max(0.0);
        m.end_to_end_latency.observe(seconds);
        slot.add(seconds);
    }
    let mut recent = Counts::default();
    for (number, counts) in &window.slots {
        if now - number < SLOTS as u64 {
            recent.merge(counts);
        }
    }
    for (label, q) in [("0.5", 0.5), ("0.99", 0.99), ("1", 1.0)] {
        match recent.quantile(q) {
            Some(v) => m
                .end_to_end_latency_recent
                .with_label_values(&[label])
                .set(v),
            // Nothing applied for a minute: no number, rather than a stale one.
            None => {
                let _ = m.end_to_end_latency_recent.remove_label_values(&[label]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(values: &[f64]) -> Counts {
        let mut c = Counts::default();
        for &v in values {
            c.add(v);
        }
        c
    }

    #[test]
    fn quantiles_fall_in_the_right_bucket() {
        // 98 fast changes and 2 slow ones: p50 is fast, p99 is slow.
        let mut v = vec![0.012; 98];
        v.extend([0.45, 0.46]);
        let c = counts(&v);
        let p50 = c.quantile(0.5).unwrap();
        assert!((0.01..=0.015).contains(&p50), "{p50}");
        let p99 = c.quantile(0.99).unwrap();
        assert!((0.3..=0.46).contains(&p99), "{p99}");
        assert_eq!(c.quantile(1.0), Some(0.46));
        assert_eq!(Counts::default().quantile(0.5), None);
    }

    #[test]
    fn a_value_past_the_last_bound_is_capped_by_the_max() {
        let c = counts(&[400.0, 500.0]);
        assert_eq!(c.quantile(1.0), Some(500.0));
        let p99 = c.quantile(0.99).unwrap();
        assert!((300.0..=500.0).contains(&p99), "{p99}");
    }
}
