//! Per-connection outgoing ring buffer with drop-oldest backpressure.
//!
//! A stream subscriber that reads slower than messages arrive must never make the server hold an
//! unbounded backlog for it. The ring keeps at most `capacity` waiting messages; when it is full,
//! the oldest event-type message makes room and is counted, so the client can be told how many it
//! missed. Only the newest `issue_count` matters, so at most one waits. Messages the client must
//! see (status changes, replies) are never dropped: if only those fill the ring, the push reports
//! `Overflow` and the caller disconnects the client.
//!
//! Storage is a slot array with a head and a length, allocated on the first push and grown by
//! doubling up to `capacity`, so idle connections cost only the struct itself plus a few slots
//! (a slot holds a shared frame handle, tens of bytes, and 18,000 idle dashboards must fit). Push and pop are O(1); dropping an event or replacing
//! the count removes from the middle, which shifts the shorter side (O(capacity), capacity ~100).

/// Largest ring a connection may get. A middle removal shifts up to half the ring; beyond this the
/// drop path stops being cheap, and a client that far behind is better cut by the stall timeout.
pub const CAPACITY_MAX: usize = 65_536;

/// Slots allocated at the first push; most connections never have more waiting at once.
const SLOTS_INITIAL: usize = 4;

/// How a waiting message may be treated under backpressure.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A message the client can afford to miss (counted in `dropped`): dropped oldest-first.
    Event,
    /// A running count where only the newest value matters: at most one waits.
    Count,
    /// A message the client must see: never dropped.
    Control,
}

/// Outcome of [`Ring::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// The item waits; nothing was lost.
    Queued,
    /// The ring was full: its oldest `Event` was dropped (and counted) to queue the item.
    DroppedOldest,
    /// The ring is full of messages that may not be dropped: the item was not queued.
    Overflow,
}

struct Waiting<T> {
    item: T,
    kind: Kind,
}

/// Bounded FIFO of outgoing items with drop-oldest-event and count conflation.
pub struct Ring<T> {
    /// Empty until the first push, then at most `capacity` slots; `None` outside the waiting range.
    slots: Box<[Option<Waiting<T>>]>,
    capacity: usize,
    /// Physical index of the oldest waiting item.
    head: usize,
    len: usize,
    /// Waiting items of kind `Event`, so a full ring knows in O(1) whether it can drop one.
    events_waiting: usize,
    count_waiting: bool,
    dropped_pending: u64,
    dropped_total: u64,
}

impl<T> Ring<T> {
    /// A ring holding at most `capacity` items; allocates nothing until the first push.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity >= 1, "a ring must hold at least one item");
        assert!(
            capacity <= CAPACITY_MAX,
            "ring capacity {capacity} exceeds CAPACITY_MAX {CAPACITY_MAX}"
        );
        Ring {
            slots: Box::new([]),
            capacity,
            head: 0,
            len: 0,
            events_waiting: 0,
            count_waiting: false,
            dropped_pending: 0,
            dropped_total: 0,
        }
    }

    /// Queues `item` at the tail, applying count conflation and drop-oldest (see module docs).
    pub fn push(&mut self, item: T, kind: Kind) -> Push {
        if self.len == self.slots.len() && self.len < self.capacity {
            self.grow();
        }
        let mut outcome = Push::Queued;
        if kind == Kind::Count && self.count_waiting {
            // The old count is superseded, not lost: it is not reported as dropped.
            let position = self
                .position_from_tail(Kind::Count)
                .expect("count_waiting implies a waiting Count");
            self.remove_at(position);
        } else if self.len == self.capacity {
            if self.events_waiting == 0 {
                return Push::Overflow;
            }
            let position = self
                .position_from_head(Kind::Event)
                .expect("events_waiting > 0 implies a waiting Event");
            self.remove_at(position);
            self.dropped_pending += 1;
            self.dropped_total += 1;
            outcome = Push::DroppedOldest;
        }
        debug_assert!(self.len < self.slots.len());
        let tail = self.physical(self.len);
        debug_assert!(self.slots[tail].is_none());
        self.slots[tail] = Some(Waiting { item, kind });
        self.len += 1;
        match kind {
            Kind::Event => self.events_waiting += 1,
            Kind::Count => self.count_waiting = true,
            Kind::Control => {}
        }
        debug_assert!(self.invariants_hold());
        outcome
    }

    /// Removes and returns the oldest waiting item.
    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let waiting = self.slots[self.head]
            .take()
            .expect("slots in the waiting range hold an item");
        self.head = self.physical(1);
        self.len -= 1;
        self.forget_kind(waiting.kind);
        debug_assert!(self.invariants_hold());
        Some(waiting.item)
    }

    /// Pops up to `max` items in order onto `out`; returns how many were moved.
    pub fn drain_into(&mut self, out: &mut Vec<T>, max: usize) -> usize {
        let moved = max.min(self.len);
        out.reserve(moved);
        for _ in 0..moved {
            let item = self.pop().expect("moved <= len");
            out.push(item);
        }
        moved
    }

    /// Items dropped since the previous call; resets the pending count to 0.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped_pending)
    }

    /// Items dropped over the ring's whole life.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Doubles the slots (at most to `capacity`), laying the waiting items out from index 0.
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).max(SLOTS_INITIAL).min(self.capacity);
        let mut slots: Box<[Option<Waiting<T>>]> = (0..size).map(|_| None).collect();
        for (logical, slot) in slots.iter_mut().enumerate().take(self.len) {
            let from = self.physical(logical);
            *slot = self.slots[from].take();
        }
        self.slots = slots;
        self.head = 0;
    }

    /// Physical slot of the item `logical` places after the head.
    fn physical(&self, logical: usize) -> usize {
        let size = self.slots.len();
        debug_assert!(logical <= size);
        let index = self.head + logical;
        if index >= size {
            index - size
        } else {
            index
        }
    }

    fn kind_at(&self, logical: usize) -> Kind {
        self.slots[self.physical(logical)]
            .as_ref()
            .expect("slots in the waiting range hold an item")
            .kind
    }

    /// Oldest waiting item of `kind`; events to drop are usually near the head.
    fn position_from_head(&self, kind: Kind) -> Option<usize> {
        (0..self.len).find(|&logical| self.kind_at(logical) == kind)
    }

    /// Newest waiting item of `kind`; the count was pushed last, so it is usually near the tail.
    fn position_from_tail(&self, kind: Kind) -> Option<usize> {
        (0..self.len)
            .rev()
            .find(|&logical| self.kind_at(logical) == kind)
    }

    /// Removes the item at `logical` and closes the gap by shifting the shorter side.
    fn remove_at(&mut self, logical: usize) -> Waiting<T> {
        debug_assert!(logical < self.len);
        let removed = self.slots[self.physical(logical)]
            .take()
            .expect("slots in the waiting range hold an item");
        if logical < self.len / 2 {
            // Move the older items one step toward the tail; the hole ends up at the head.
            for position in (0..logical).rev() {
                let from = self.physical(position);
                let to = self.physical(position + 1);
                self.slots.swap(from, to);
            }
            self.head = self.physical(1);
        } else {
            // Move the newer items one step toward the head; the hole ends up past the tail.
            for position in logical + 1..self.len {
                let from = self.physical(position);
                let to = self.physical(position - 1);
                self.slots.swap(from, to);
            }
        }
        self.len -= 1;
        self.forget_kind(removed.kind);
        removed
    }

    fn forget_kind(&mut self, kind: Kind) {
        match kind {
            Kind::Event => self.events_waiting -= 1,
            Kind::Count => self.count_waiting = false,
            Kind::Control => {}
        }
    }

    /// Full consistency check, used in debug builds (O(capacity), capacity is small).
    fn invariants_hold(&self) -> bool {
        if self.len > self.capacity {
            return false;
        }
        if self.slots.is_empty() {
            return self.len == 0 && self.events_waiting == 0 && !self.count_waiting;
        }
        if self.slots.len() > self.capacity
            || self.head >= self.slots.len()
            || self.len > self.slots.len()
        {
            return false;
        }
        let mut events = 0;
        let mut counts = 0;
        for logical in 0..self.slots.len() {
            match (&self.slots[self.physical(logical)], logical < self.len) {
                (Some(waiting), true) => match waiting.kind {
                    Kind::Event => events += 1,
                    Kind::Count => counts += 1,
                    Kind::Control => {}
                },
                (None, false) => {}
                _ => return false,
            }
        }
        events == self.events_waiting && counts == usize::from(self.count_waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::VecDeque;
    use std::sync::Arc;

    /// Waiting items, oldest first, without popping.
    fn contents<T: Copy>(ring: &Ring<T>) -> Vec<T> {
        (0..ring.len())
            .map(|logical| ring.slots[ring.physical(logical)].as_ref().unwrap().item)
            .collect()
    }

    fn pop_all<T>(ring: &mut Ring<T>) -> Vec<T> {
        let mut out = Vec::new();
        while let Some(item) = ring.pop() {
            out.push(item);
        }
        out
    }

    #[test]
    fn pops_in_push_order() {
        let mut ring = Ring::new(8);
        for value in 1..=5 {
            assert_eq!(ring.push(value, Kind::Event), Push::Queued);
        }
        assert_eq!(ring.len(), 5);
        assert_eq!(pop_all(&mut ring), vec![1, 2, 3, 4, 5]);
        assert!(ring.is_empty());
        assert_eq!(ring.pop(), None);
        assert_eq!(ring.dropped_total(), 0);
    }

    #[test]
    fn storage_is_allocated_on_first_push_only() {
        let mut ring: Ring<u32> = Ring::new(100);
        assert!(ring.slots.is_empty());
        assert_eq!(ring.pop(), None);
        assert!(ring.slots.is_empty());
        ring.push(1, Kind::Control);
        assert_eq!(ring.slots.len(), SLOTS_INITIAL);
        for n in 2..=100 {
            ring.push(n, Kind::Event);
        }
        assert_eq!(
            ring.slots.len(),
            100,
            "grows by doubling, never past capacity"
        );
        assert_eq!(ring.push(101, Kind::Event), Push::DroppedOldest);
        assert_eq!(ring.slots.len(), 100);
        assert_eq!(ring.pop(), Some(1));
        assert_eq!(ring.pop(), Some(3), "the oldest event made room");
        assert_eq!(ring.capacity(), 100);
    }

    #[test]
    fn full_ring_drops_oldest_event_and_counts_it() {
        let mut ring = Ring::new(3);
        assert_eq!(ring.push(1, Kind::Event), Push::Queued);
        assert_eq!(ring.push(2, Kind::Event), Push::Queued);
        assert_eq!(ring.push(3, Kind::Event), Push::Queued);
        assert_eq!(ring.push(4, Kind::Event), Push::DroppedOldest);
        assert_eq!(ring.push(5, Kind::Event), Push::DroppedOldest);
        assert_eq!(contents(&ring), vec![3, 4, 5]);
        assert_eq!(ring.take_dropped(), 2);
        assert_eq!(ring.take_dropped(), 0);
        assert_eq!(ring.push(6, Kind::Event), Push::DroppedOldest);
        assert_eq!(ring.take_dropped(), 1);
        assert_eq!(ring.dropped_total(), 3);
        assert_eq!(pop_all(&mut ring), vec![4, 5, 6]);
    }

    #[test]
    fn drop_skips_control_and_count() {
        let mut ring = Ring::new(4);
        ring.push(10, Kind::Control);
        ring.push(20, Kind::Count);
        ring.push(1, Kind::Event);
        ring.push(11, Kind::Control);
        assert_eq!(ring.push(2, Kind::Event), Push::DroppedOldest);
        assert_eq!(contents(&ring), vec![10, 20, 11, 2]);
        assert_eq!(ring.push(12, Kind::Control), Push::DroppedOldest);
        assert_eq!(contents(&ring), vec![10, 20, 11, 12]);
        assert_eq!(ring.dropped_total(), 2);
    }

    #[test]
    fn newest_count_replaces_waiting_count_at_the_tail() {
        let mut ring = Ring::new(10);
        ring.push(1, Kind::Event);
        ring.push(100, Kind::Count);
        ring.push(2, Kind::Event);
        ring.push(3, Kind::Control);
        assert_eq!(ring.push(101, Kind::Count), Push::Queued);
        assert_eq!(contents(&ring), vec![1, 2, 3, 101]);
        assert_eq!(ring.take_dropped(), 0);
        // Once the count was sent, a new one waits on its own again.
        assert_eq!(pop_all(&mut ring), vec![1, 2, 3, 101]);
        ring.push(102, Kind::Count);
        ring.push(4, Kind::Event);
        assert_eq!(contents(&ring), vec![102, 4]);
        ring.push(103, Kind::Count);
        assert_eq!(contents(&ring), vec![4, 103]);
        assert_eq!(ring.dropped_total(), 0);
    }

    #[test]
    fn count_replacement_in_full_ring_drops_nothing() {
        let mut ring = Ring::new(3);
        ring.push(1, Kind::Event);
        ring.push(100, Kind::Count);
        ring.push(2, Kind::Event);
        assert_eq!(ring.push(101, Kind::Count), Push::Queued);
        assert_eq!(contents(&ring), vec![1, 2, 101]);
        assert_eq!(ring.dropped_total(), 0);
    }

    #[test]
    fn full_ring_without_events_overflows_and_keeps_contents() {
        let mut ring = Ring::new(2);
        ring.push(10, Kind::Control);
        ring.push(20, Kind::Count);
        assert_eq!(ring.push(1, Kind::Event), Push::Overflow);
        assert_eq!(ring.push(11, Kind::Control), Push::Overflow);
        assert_eq!(contents(&ring), vec![10, 20]);
        // A newer count still replaces the waiting one.
        assert_eq!(ring.push(21, Kind::Count), Push::Queued);
        assert_eq!(contents(&ring), vec![10, 21]);
        assert_eq!(ring.dropped_total(), 0);
    }

    #[test]
    fn capacity_one() {
        let mut ring = Ring::new(1);
        assert_eq!(ring.push(1, Kind::Event), Push::Queued);
        assert_eq!(ring.push(2, Kind::Event), Push::DroppedOldest);
        assert_eq!(contents(&ring), vec![2]);
        assert_eq!(ring.push(3, Kind::Count), Push::DroppedOldest);
        assert_eq!(ring.push(4, Kind::Count), Push::Queued);
        assert_eq!(ring.push(5, Kind::Control), Push::Overflow);
        assert_eq!(contents(&ring), vec![4]);
        assert_eq!(ring.take_dropped(), 2);
    }

    #[test]
    fn wrap_around_keeps_order_and_drops() {
        let mut ring = Ring::new(4);
        let mut next = 0;
        // Advance the head past the end of the slot array several times.
        for _ in 0..10 {
            ring.push(next, Kind::Event);
            ring.push(next + 1, Kind::Event);
            next += 2;
            ring.pop();
        }
        assert_eq!(ring.len(), 3);
        assert_eq!(ring.dropped_total(), 7);
        assert_ne!(ring.head, 0);
        assert_eq!(contents(&ring), vec![17, 18, 19]);
        // Removals from the middle of a wrapped ring: one near the tail, one near the head.
        for head in 0..4 {
            let mut ring = Ring::new(4);
            for filler in 0..head {
                ring.push(filler, Kind::Control);
                ring.pop();
            }
            ring.push(50, Kind::Control);
            ring.push(51, Kind::Control);
            ring.push(1, Kind::Event);
            ring.push(60, Kind::Count);
            assert_eq!(ring.push(2, Kind::Event), Push::DroppedOldest);
            assert_eq!(contents(&ring), vec![50, 51, 60, 2]);
            assert_eq!(ring.push(61, Kind::Count), Push::Queued);
            assert_eq!(contents(&ring), vec![50, 51, 2, 61]);
            ring.pop();
            ring.push(70, Kind::Control);
            assert_eq!(ring.push(3, Kind::Event), Push::DroppedOldest);
            assert_eq!(pop_all(&mut ring), vec![51, 61, 70, 3]);
        }
    }

    #[test]
    fn drain_into_moves_up_to_max_in_order() {
        let mut ring = Ring::new(8);
        for value in 0..6 {
            ring.push(value, Kind::Event);
        }
        let mut out = vec![99];
        assert_eq!(ring.drain_into(&mut out, 4), 4);
        assert_eq!(out, vec![99, 0, 1, 2, 3]);
        assert_eq!(ring.drain_into(&mut out, 10), 2);
        assert_eq!(out, vec![99, 0, 1, 2, 3, 4, 5]);
        assert_eq!(ring.drain_into(&mut out, 10), 0);
        assert!(ring.is_empty());
    }

    #[test]
    fn dropped_and_replaced_items_are_released() {
        let frame: Arc<[u8]> = Arc::from(&b"frame"[..]);
        let mut ring = Ring::new(2);
        ring.push(frame.clone(), Kind::Event);
        ring.push(frame.clone(), Kind::Count);
        ring.push(frame.clone(), Kind::Count);
        ring.push(frame.clone(), Kind::Event);
        assert_eq!(ring.push(frame.clone(), Kind::Control), Push::DroppedOldest);
        assert_eq!(ring.push(frame.clone(), Kind::Control), Push::Overflow);
        assert_eq!(Arc::strong_count(&frame), 3);
        drop(ring);
        assert_eq!(Arc::strong_count(&frame), 1);
    }

    /// Straightforward model of the documented semantics.
    struct Model {
        capacity: usize,
        waiting: VecDeque<(u64, Kind)>,
        dropped_pending: u64,
        dropped_total: u64,
    }

    impl Model {
        fn push(&mut self, item: u64, kind: Kind) -> Push {
            let mut outcome = Push::Queued;
            let count = self.waiting.iter().position(|w| w.1 == Kind::Count);
            if let (Kind::Count, Some(index)) = (kind, count) {
                self.waiting.remove(index);
            } else if self.waiting.len() == self.capacity {
                match self.waiting.iter().position(|w| w.1 == Kind::Event) {
                    Some(index) => {
                        self.waiting.remove(index);
                        self.dropped_pending += 1;
                        self.dropped_total += 1;
                        outcome = Push::DroppedOldest;
                    }
                    None => return Push::Overflow,
                }
            }
            self.waiting.push_back((item, kind));
            outcome
        }
    }

    #[test]
    fn matches_model_under_random_operations() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0001);
        for round in 0..200 {
            let capacity = rng.random_range(1..=12);
            let mut ring = Ring::new(capacity);
            let mut model = Model {
                capacity,
                waiting: VecDeque::new(),
                dropped_pending: 0,
                dropped_total: 0,
            };
            for step in 0..400u64 {
                let item = round * 1_000 + step;
                match rng.random_range(0..100) {
                    0..=44 => {
                        let kind = Kind::Event;
                        assert_eq!(ring.push(item, kind), model.push(item, kind));
                    }
                    45..=59 => {
                        let kind = Kind::Count;
                        assert_eq!(ring.push(item, kind), model.push(item, kind));
                    }
                    60..=69 => {
                        let kind = Kind::Control;
                        assert_eq!(ring.push(item, kind), model.push(item, kind));
                    }
                    70..=89 => assert_eq!(ring.pop(), model.waiting.pop_front().map(|w| w.0)),
                    90..=95 => {
                        let max = rng.random_range(0..=capacity + 1);
                        let mut out = Vec::new();
                        let moved = ring.drain_into(&mut out, max);
                        let expected: Vec<u64> = (0..max.min(model.waiting.len()))
                            .map(|_| model.waiting.pop_front().unwrap().0)
                            .collect();
                        assert_eq!(moved, expected.len());
                        assert_eq!(out, expected);
                    }
                    _ => assert_eq!(
                        ring.take_dropped(),
                        std::mem::take(&mut model.dropped_pending)
                    ),
                }
                let expected: Vec<u64> = model.waiting.iter().map(|w| w.0).collect();
                assert_eq!(contents(&ring), expected, "round {round} step {step}");
                assert_eq!(ring.len(), model.waiting.len());
                assert_eq!(ring.dropped_total(), model.dropped_total);
                assert!(ring.invariants_hold());
            }
        }
    }
}
