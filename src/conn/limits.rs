//! Bounds shared by every shard: open connections and the bytes of request bodies still
//! arriving. Each is one atomic count under a limit, so a hostile client spread over many
//! connections meets the same bound as one.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

/// A count that may not pass its limit.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `amount`; false (and nothing taken) if that would pass the limit.
    pub fn try_take(&self, amount: usize) -> bool {
        let before = self.used.fetch_add(amount, Relaxed);
        if before + amount > self.limit {
            self.used.fetch_sub(amount, Relaxed);
            return false;
        }
        true
    }

    pub fn give_back(&self, amount: usize) {
        self.used.fetch_sub(amount, Relaxed);
    }

    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// The shared bounds of one server.
#[derive(Debug)]
pub struct Limits {
    /// Open connections of every kind (`--max-connections`).
    pub connections: Budget,
    /// Bytes held by request bodies not yet complete (`--max-pending-body-bytes`).
    pub pending_body_bytes: Budget,
}

/// The part of a budget one holder has taken; what it holds goes back when it is dropped.
pub struct Share<'a> {
    budget: &'a Budget,
    held: usize,
}

impl<'a> Share<'a> {
    pub fn new(budget: &'a Budget) -> Share<'a> {
        Share { budget, held: 0 }
    }

    /// Grows the share to `total`; false if the budget has no room for the growth.
    pub fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.held {
            return true;
        }
        if !self.budget.try_take(total - self.held) {
            return false;
        }
        self.held = total;
        true
    }
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_never_passes_its_limit() {
        let budget = Budget::new(10);
        assert!(budget.try_take(6));
        assert!(!budget.try_take(5));
        assert_eq!(budget.used(), 6);
        assert!(budget.try_take(4));
        budget.give_back(10);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn shares_grow_and_give_everything_back() {
        let budget = Budget::new(100);
        {
            let mut first = Share::new(&budget);
            let mut second = Share::new(&budget);
            assert!(first.grow_to(60));
            assert!(first.grow_to(30), "shrinking asks nothing");
            assert!(!second.grow_to(41));
            assert!(second.grow_to(40));
            assert_eq!(budget.used(), 100);
        }
        assert_eq!(budget.used(), 0);
    }
}
