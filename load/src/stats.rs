//! Counters shared by the tasks, latency histograms, and the per-subscriber count check.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Latencies above an hour are clamped: no run lasts that long.
const LATENCY_MAX_US: u64 = 3_600_000_000;
/// Three significant figures: p99.9 of a few ms is exact to a few µs.
const LATENCY_SIGFIGS: u8 = 3;
/// Histogram shards, so that subscriber tasks on different threads rarely wait for each other.
const HISTOGRAM_SHARDS: usize = 16;
/// A `dropped` count may include the one `issue` message each project produces (the server
/// decides which waiting message to drop), so the accounted total may exceed the events by it.
const ISSUE_MESSAGES_PER_PROJECT: u64 = 1;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIGS).expect("valid bounds")
}

/// Counters every task updates (once per read batch or per reply, not per message).
#[derive(Default)]
pub struct Counters {
    /// `event` messages received by subscribers.
    pub delivered: AtomicU64,
    /// Sum of the counts of `dropped` markers.
    pub dropped: AtomicU64,
    /// Events the server accepted.
    pub accepted: AtomicU64,
    pub publish_errors: AtomicU64,
    pub ready: AtomicUsize,
    pub setup_failed: AtomicUsize,
    /// Subscribers whose connection ended before the run did.
    pub ended_early: AtomicUsize,
    pub last_delivery_us: AtomicU64,
    /// Sequence number of the next event, shared by publishers to spread projects and levels.
    pub next_seq: AtomicU64,
}

impl Counters {
    pub fn add_deliveries(&self, events: u64, dropped: u64, now_us: u64) {
        if events > 0 {
            self.delivered.fetch_add(events, Ordering::Relaxed);
            self.last_delivery_us.fetch_max(now_us, Ordering::Relaxed);
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
            self.last_delivery_us.fetch_max(now_us, Ordering::Relaxed);
        }
    }
}

/// A histogram split in shards that tasks lock once per read batch.
pub struct ShardedHistogram {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for ShardedHistogram {
    fn default() -> Self {
        ShardedHistogram {
            shards: (0..HISTOGRAM_SHARDS)
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
        }
    }
}

impl ShardedHistogram {
    pub fn record_batch(&self, shard_hint: usize, latencies_us: &[u64]) {
        if latencies_us.is_empty() {
            return;
        }
        let mut shard = self.shards[shard_hint % HISTOGRAM_SHARDS]
            .lock()
            .expect("histogram lock");
        for &latency in latencies_us {
            shard.saturating_record(latency.max(1));
        }
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut total = new_histogram();
        for shard in &self.shards {
            total
                .add(&*shard.lock().expect("histogram lock"))
                .expect("same bounds");
        }
        total
    }
}

/// Per-project counts for the two kinds of subscriber, unfiltered and filtered to one level:
/// the accepted events each kind is owed (all of them, or those of the filtered level), or the
/// subscribers of each kind that are ready.
pub struct ProjectCounts {
    pub unfiltered: Vec<AtomicU64>,
    pub filtered: Vec<AtomicU64>,
}

impl ProjectCounts {
    pub fn new(projects: usize) -> Self {
        ProjectCounts {
            unfiltered: (0..projects).map(|_| AtomicU64::new(0)).collect(),
            filtered: (0..projects).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn snapshot(&self) -> (Vec<u64>, Vec<u64>) {
        let load = |v: &Vec<AtomicU64>| v.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        (load(&self.unfiltered), load(&self.filtered))
    }

    /// With these counting ready subscribers: the deliveries (events + dropped) owed to all of
    /// them for the accepted events of each kind.
    pub fn expected(&self, accepted_all: &[u64], accepted_filtered: &[u64]) -> u64 {
        (0..accepted_all.len())
            .map(|p| {
                self.unfiltered[p].load(Ordering::Relaxed) * accepted_all[p]
                    + self.filtered[p].load(Ordering::Relaxed) * accepted_filtered[p]
            })
            .sum()
    }
}

/// What one subscriber saw.
#[derive(Clone, Debug, Default)]
pub struct SubOutcome {
    pub project: usize,
    pub filtered: bool,
    pub slow: bool,
    pub ready: bool,
    pub events: u64,
    pub dropped: u64,
    pub dropped_markers: u64,
    pub issues: u64,
    /// Filtered subscriber received an event of another level.
    pub wrong: u64,
    pub error_messages: u64,
    /// Events without a readable `sent_us`.
    pub unstamped: u64,
    /// Why the connection ended before the run did (or setup failed).
    pub ended: Option<String>,
}

impl SubOutcome {
    pub fn expected(&self, accepted_all: &[u64], accepted_filtered: &[u64]) -> u64 {
        if self.filtered {
            accepted_filtered[self.project]
        } else {
            accepted_all[self.project]
        }
    }
}

/// Totals over subscribers, and whether each one's counts add up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Check {
    pub subscribers_ready: u64,
    pub expected: u64,
    pub received: u64,
    pub dropped: u64,
    pub dropped_markers: u64,
    /// Events neither received nor reported dropped.
    pub missing: u64,
    /// Events received beyond those published to the subscriber.
    pub excess: u64,
    pub wrong: u64,
    /// Subscribers whose `received + dropped` is not what was published to them (only checked
    /// for servers that report drops, and only for connections that lasted the whole run).
    pub violations: u64,
    pub first_violation: Option<String>,
    pub ended_early: u64,
}

pub fn check(
    outcomes: &[SubOutcome],
    accepted_all: &[u64],
    accepted_filtered: &[u64],
    drops_reported: bool,
) -> Check {
    let mut c = Check::default();
    for (index, o) in outcomes.iter().enumerate() {
        if !o.ready {
            continue;
        }
        c.subscribers_ready += 1;
        c.received += o.events;
        c.dropped += o.dropped;
        c.dropped_markers += o.dropped_markers;
        c.wrong += o.wrong;
        if o.ended.is_some() {
            // A connection the server closed (stall timeout, error) owes nothing after that.
            c.ended_early += 1;
            continue;
        }
        let expected = o.expected(accepted_all, accepted_filtered);
        let accounted = o.events + o.dropped;
        c.expected += expected;
        c.missing += expected.saturating_sub(accounted);
        c.excess += o.events.saturating_sub(expected);
        let adds_up = o.events <= expected
            && accounted >= expected
            && accounted <= expected + ISSUE_MESSAGES_PER_PROJECT;
        if drops_reported && !adds_up {
            c.violations += 1;
            if c.first_violation.is_none() {
                c.first_violation = Some(format!(
                    "subscriber {index} (project {}, filtered {}): sent {expected}, received {}, dropped {}",
                    o.project, o.filtered, o.events, o.dropped
                ));
            }
        }
    }
    c
}

/// p50/p99/p99.9 in µs, zeros for an empty histogram.
pub fn percentiles_us(h: &Histogram<u64>) -> (u64, u64, u64) {
    if h.is_empty() {
        return (0, 0, 0);
    }
    (
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(project: usize, filtered: bool, events: u64, dropped: u64) -> SubOutcome {
        SubOutcome {
            project,
            filtered,
            ready: true,
            events,
            dropped,
            ..SubOutcome::default()
        }
    }

    #[test]
    fn counts_that_add_up_pass() {
        let all = [10, 4];
        let filtered = [3, 1];
        let outcomes = vec![
            sub(0, false, 10, 0),
            sub(0, false, 6, 4),
            sub(0, true, 3, 0),
            sub(1, true, 0, 1),
            sub(1, false, 3, 2), // the extra drop is the project's issue message
        ];
        let c = check(&outcomes, &all, &filtered, true);
        assert_eq!(c.violations, 0, "{:?}", c.first_violation);
        assert_eq!(c.subscribers_ready, 5);
        assert_eq!(c.expected, 10 + 10 + 3 + 1 + 4);
        assert_eq!(c.received, 10 + 6 + 3 + 3);
        assert_eq!(c.dropped, 4 + 1 + 2);
        assert_eq!(c.missing, 0);
        assert_eq!(c.excess, 0);
    }

    #[test]
    fn lost_duplicated_and_overcounted_events_are_violations() {
        let all = [10];
        let filtered = [5];
        let lost = check(&[sub(0, false, 8, 1)], &all, &filtered, true);
        assert_eq!((lost.violations, lost.missing), (1, 1));
        assert!(lost
            .first_violation
            .unwrap()
            .contains("sent 10, received 8, dropped 1"));
        let duplicated = check(&[sub(0, true, 6, 0)], &all, &filtered, true);
        assert_eq!((duplicated.violations, duplicated.excess), (1, 1));
        let overcounted = check(&[sub(0, false, 5, 7)], &all, &filtered, true);
        assert_eq!(overcounted.violations, 1);
    }

    #[test]
    fn connections_ended_by_the_server_are_not_held_to_the_total() {
        let mut ended = sub(0, false, 2, 0);
        ended.ended = Some("closed by server".into());
        let c = check(&[ended, sub(0, false, 10, 0)], &[10], &[0], true);
        assert_eq!((c.violations, c.missing, c.ended_early), (0, 0, 1));
        assert_eq!((c.expected, c.received), (10, 12));
    }

    #[test]
    fn peers_report_missing_without_violations_and_unready_are_skipped() {
        let mut not_ready = sub(0, false, 0, 0);
        not_ready.ready = false;
        let c = check(&[sub(0, false, 7, 0), not_ready], &[10], &[0], false);
        assert_eq!(c.violations, 0);
        assert_eq!(c.missing, 3);
        assert_eq!(c.subscribers_ready, 1);
    }

    #[test]
    fn sharded_histogram_merges_every_shard() {
        let h = ShardedHistogram::default();
        for shard in 0..40 {
            h.record_batch(shard, &[100, 200, 0]);
        }
        let merged = h.merged();
        assert_eq!(merged.len(), 120);
        assert_eq!(merged.min(), 1);
        let (p50, p99, p999) = percentiles_us(&merged);
        assert!((100..=101).contains(&p50), "{p50}");
        assert!(p99 >= 200 && p999 >= p99);
        assert_eq!(percentiles_us(&new_histogram()), (0, 0, 0));
    }
}
