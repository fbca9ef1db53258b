//! Per-connection queue of outgoing frames with drop-oldest and per-key replacement.
//!
//! A stream subscriber that reads slower than messages arrive must never make the server hold an
//! unbounded backlog for it. What may wait is bounded per kind of message:
//! - events: at most `capacity`; a new one at a full ring drops the oldest waiting event, and the
//!   drop is counted with its offset range, so the client can be told what it missed;
//! - the unresolved count: only the newest matters, so at most one waits;
//! - issue messages: the newest state of an issue replaces the one already waiting for it (at the
//!   tail, with its offset), so they never pile up per issue; more than `ISSUES_WAITING_MAX`
//!   distinct issues waiting is an overflow (the caller closes the client: 1013);
//! - replies and other control frames: at most `capacity`, never dropped; one more is an
//!   overflow (the caller cuts the client off).
//!
//! Waiting messages form a doubly linked list over a slab of nodes, so popping the oldest,
//! dropping the oldest event and replacing a waiting count or issue are all O(1). The slab is
//! allocated on the first push and grows with what waits; a ring that empties after holding
//! more than `SLOTS_KEPT_MAX` gives its memory back, so 18,000 idle dashboards cost little more
//! than the struct each.

use std::collections::VecDeque;

use crate::IdMap;

/// Largest `capacity` a connection may get (events waiting). Bounds the memory of one slow
/// client to `capacity` shared frame handles plus its waiting issue messages.
pub const CAPACITY_MAX: usize = 65_536;

/// Distinct issues whose newest message may wait for one client. Past it the client is too far
/// behind to be worth feeding (PROTOCOL.md section 6: closed with 1013, it may resume).
pub const ISSUES_WAITING_MAX: usize = 10_000;

/// A ring that empties while holding more nodes than this frees them (a burst is over).
const SLOTS_KEPT_MAX: usize = 256;

/// A link to no node.
const NIL: u32 = u32::MAX;

/// Lists walked whole by the debug-build invariant check; longer ones get the O(1) checks only,
/// so debug builds stay usable with thousands of waiting issues.
const CHECKED_LEN_MAX: usize = 512;

/// How a waiting message may be treated under backpressure.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// A message the client can afford to miss (counted in `dropped`): dropped oldest-first.
    Event,
    /// A running count where only the newest value matters: at most one waits.
    Count,
    /// The state of the issue with this id: the newest replaces the one waiting.
    Issue(u128),
    /// A message the client must see: never dropped.
    Control,
}

/// Outcome of [`Ring::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    /// The item waits; nothing was lost (a superseded count or issue state is not a loss).
    Queued,
    /// The ring was full of events: its oldest event was dropped (and counted) to queue the item.
    DroppedOldest,
    /// The item would pass a bound on what may not be dropped (control frames, or distinct
    /// issues): it was not queued.
    Overflow,
}

/// Events dropped since the client was last told: how many, and the first and last offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub count: u64,
    pub from_offset: u64,
    pub to_offset: u64,
}

struct Waiting<T> {
    item: T,
    kind: Kind,
    /// The message's offset in its project's stream; 0 for frames outside it (replies).
    offset: u64,
}

struct Node<T> {
    /// None while the node is on the free list.
    waiting: Option<Waiting<T>>,
    prev: u32,
    next: u32,
}

/// Bounded FIFO of outgoing items (see the module docs).
pub struct Ring<T> {
    nodes: Vec<Node<T>>,
    /// First free node (linked through `next`).
    free: u32,
    head: u32,
    tail: u32,
    len: usize,
    capacity: usize,
    issues_max: usize,
    /// Nodes of the waiting events, oldest first: the one to drop is at the front.
    events: VecDeque<u32>,
    controls_waiting: usize,
    /// Node of the waiting count, or NIL.
    count_at: u32,
    /// Node of the waiting message of each issue.
    issues: IdMap<u128, u32>,
    dropped_pending: Option<Dropped>,
    dropped_total: u64,
    /// Highest offset taken out by `pop`: the client has been handed every stream message up
    /// to it that it will get from this ring.
    taken_through: u64,
}

impl<T> Ring<T> {
    /// A ring holding at most `capacity` events (and as many control frames); allocates nothing
    /// until the first push.
    pub fn new(capacity: usize) -> Self {
        Self::with_issues_max(capacity, ISSUES_WAITING_MAX)
    }

    fn with_issues_max(capacity: usize, issues_max: usize) -> Self {
        assert!(capacity >= 1, "a ring must hold at least one item");
        assert!(
            capacity <= CAPACITY_MAX,
            "ring capacity {capacity} exceeds CAPACITY_MAX {CAPACITY_MAX}"
        );
        Ring {
            nodes: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            capacity,
            issues_max,
            events: VecDeque::new(),
            controls_waiting: 0,
            count_at: NIL,
            issues: IdMap::default(),
            dropped_pending: None,
            dropped_total: 0,
            taken_through: 0,
        }
    }

    /// Queues `item` (a stream message at `offset`, or a reply with offset 0) at the tail,
    /// applying replacement and drop-oldest (see module docs).
    pub fn push(&mut self, item: T, kind: Kind, offset: u64) -> Push {
        let mut outcome = Push::Queued;
        match kind {
            Kind::Count => {
                if self.count_at != NIL {
                    // The old count is superseded, not lost: it is not reported as dropped.
                    self.unlink(self.count_at);
                }
            }
            Kind::Issue(key) => match self.issues.get(&key) {
                Some(&at) => {
                    self.unlink(at);
                }
                None if self.issues.len() >= self.issues_max => return Push::Overflow,
                None => {}
            },
            Kind::Event => {
                if self.events.len() >= self.capacity {
                    let oldest = self
                        .events
                        .pop_front()
                        .expect("a full ring has a waiting event");
                    let dropped = self.unlink(oldest);
                    self.count_dropped(dropped.offset);
                    outcome = Push::DroppedOldest;
                }
            }
            Kind::Control => {
                if self.controls_waiting >= self.capacity {
                    return Push::Overflow;
                }
            }
        }
        let at = self.link_at_tail(Waiting { item, kind, offset });
        match kind {
            Kind::Event => self.events.push_back(at),
            Kind::Count => self.count_at = at,
            Kind::Issue(key) => {
                self.issues.insert(key, at);
            }
            Kind::Control => self.controls_waiting += 1,
        }
        debug_assert!(self.invariants_hold());
        outcome
    }

    /// Removes and returns the oldest waiting item.
    pub fn pop(&mut self) -> Option<T> {
        if self.head == NIL {
            return None;
        }
        let at = self.head;
        if self.kind_at(at) == Kind::Event {
            let front = self.events.pop_front();
            debug_assert_eq!(front, Some(at), "the oldest event is the head's");
        }
        let waiting = self.unlink(at);
        if waiting.kind != Kind::Control {
            self.taken_through = self.taken_through.max(waiting.offset);
        }
        self.release_if_empty();
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

    /// Events dropped since the previous call (None if none); resets the pending count.
    pub fn take_dropped(&mut self) -> Option<Dropped> {
        self.dropped_pending.take()
    }

    /// Empties the ring: the control frames waiting go to `out` in order; stream messages and
    /// the pending drop count are forgotten (a resume sends what they carried again).
    pub fn take_controls_into(&mut self, out: &mut VecDeque<T>) {
        let mut at = self.head;
        while at != NIL {
            let node = &mut self.nodes[at as usize];
            let next = node.next;
            let waiting = node.waiting.take().expect("linked nodes hold an item");
            if waiting.kind == Kind::Control {
                out.push_back(waiting.item);
            }
            at = next;
        }
        self.forget_all();
    }

    /// Empties the ring, forgetting everything waiting (the client is being closed).
    pub fn clear(&mut self) {
        self.forget_all();
    }

    /// Events dropped over the ring's whole life.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }

    /// The highest stream offset popped so far (0 if none).
    pub fn taken_through(&self) -> u64 {
        self.taken_through
    }

    /// Distinct issues with a message waiting.
    pub fn issues_waiting(&self) -> usize {
        self.issues.len()
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

    fn count_dropped(&mut self, offset: u64) {
        self.dropped_total += 1;
        let dropped = self.dropped_pending.get_or_insert(Dropped {
            count: 0,
            from_offset: offset,
            to_offset: offset,
        });
        dropped.count += 1;
        dropped.from_offset = dropped.from_offset.min(offset);
        dropped.to_offset = dropped.to_offset.max(offset);
    }

    fn kind_at(&self, at: u32) -> Kind {
        self.nodes[at as usize]
            .waiting
            .as_ref()
            .expect("linked nodes hold an item")
            .kind
    }

    fn link_at_tail(&mut self, waiting: Waiting<T>) -> u32 {
        let node = Node {
            waiting: Some(waiting),
            prev: self.tail,
            next: NIL,
        };
        let at = if self.free != NIL {
            let at = self.free;
            self.free = self.nodes[at as usize].next;
            self.nodes[at as usize] = node;
            at
        } else {
            let at = u32::try_from(self.nodes.len()).expect("fewer than 2^32 nodes");
            self.nodes.push(node);
            at
        };
        if self.tail == NIL {
            self.head = at;
        } else {
            self.nodes[self.tail as usize].next = at;
        }
        self.tail = at;
        self.len += 1;
        at
    }

    /// Takes the node at `at` out of the list (and out of the count and issue indexes; the
    /// caller keeps `events` right) and puts it on the free list.
    fn unlink(&mut self, at: u32) -> Waiting<T> {
        let node = &mut self.nodes[at as usize];
        let waiting = node.waiting.take().expect("linked nodes hold an item");
        let (prev, next) = (node.prev, node.next);
        node.next = self.free;
        self.free = at;
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        self.len -= 1;
        match waiting.kind {
            Kind::Event => {}
            Kind::Count => self.count_at = NIL,
            Kind::Issue(key) => {
                self.issues.remove(&key);
            }
            Kind::Control => self.controls_waiting -= 1,
        }
        waiting
    }

    /// Gives a large, empty slab back: a burst is over.
    fn release_if_empty(&mut self) {
        if self.len == 0 && self.nodes.len() > SLOTS_KEPT_MAX {
            let dropped = self.dropped_pending.take();
            self.forget_all();
            self.dropped_pending = dropped;
        }
    }

    /// Forgets every waiting item and the pending drop count; frees a large slab.
    fn forget_all(&mut self) {
        let large = self.nodes.len() > SLOTS_KEPT_MAX;
        if large {
            self.nodes = Vec::new();
            self.issues = IdMap::default();
        } else {
            self.nodes.clear();
            self.issues.clear();
        }
        self.free = NIL;
        self.head = NIL;
        self.tail = NIL;
        self.len = 0;
        self.events.clear();
        self.controls_waiting = 0;
        self.count_at = NIL;
        self.dropped_pending = None;
    }

    /// Consistency check for debug builds: whole for short lists, O(1) parts for long ones.
    fn invariants_hold(&self) -> bool {
        let counted = self.events.len()
            + self.controls_waiting
            + self.issues.len()
            + usize::from(self.count_at != NIL);
        if counted != self.len
            || self.events.len() > self.capacity
            || self.controls_waiting > self.capacity
            || self.issues.len() > self.issues_max
            || (self.len == 0) != (self.head == NIL)
            || (self.len == 0) != (self.tail == NIL)
        {
            return false;
        }
        if self.len > CHECKED_LEN_MAX {
            return true;
        }
        let (mut events, mut controls, mut counts, mut issues) = (0, 0, 0, 0);
        let mut seen = 0;
        let mut prev = NIL;
        let mut at = self.head;
        while at != NIL {
            let node = &self.nodes[at as usize];
            let Some(waiting) = &node.waiting else {
                return false;
            };
            if node.prev != prev {
                return false;
            }
            match waiting.kind {
                Kind::Event => {
                    if self.events.get(events) != Some(&at) {
                        return false;
                    }
                    events += 1;
                }
                Kind::Count => {
                    counts += 1;
                    if self.count_at != at {
                        return false;
                    }
                }
                Kind::Issue(key) => {
                    issues += 1;
                    if self.issues.get(&key) != Some(&at) {
                        return false;
                    }
                }
                Kind::Control => controls += 1,
            }
            seen += 1;
            prev = at;
            at = node.next;
        }
        seen == self.len
            && prev == self.tail
            && events == self.events.len()
            && controls == self.controls_waiting
            && counts == usize::from(self.count_at != NIL)
            && issues == self.issues.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    /// Waiting items, oldest first, without popping.
    fn contents<T: Copy>(ring: &Ring<T>) -> Vec<T> {
        let mut out = Vec::new();
        let mut at = ring.head;
        while at != NIL {
            let node = &ring.nodes[at as usize];
            out.push(node.waiting.as_ref().unwrap().item);
            at = node.next;
        }
        out
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
            assert_eq!(ring.push(value, Kind::Event, value), Push::Queued);
        }
        assert_eq!(ring.len(), 5);
        assert_eq!(pop_all(&mut ring), vec![1, 2, 3, 4, 5]);
        assert!(ring.is_empty());
        assert_eq!(ring.pop(), None);
        assert_eq!(ring.dropped_total(), 0);
        assert_eq!(ring.taken_through(), 5);
    }

    #[test]
    fn storage_is_allocated_on_first_push_and_a_large_one_freed_when_empty() {
        let mut ring: Ring<u64> = Ring::new(100);
        assert_eq!(ring.nodes.capacity(), 0);
        assert_eq!(ring.pop(), None);
        assert_eq!(ring.nodes.capacity(), 0);
        ring.push(1, Kind::Control, 0);
        assert!(ring.nodes.capacity() >= 1);
        for n in 0..1000 {
            ring.push(n, Kind::Issue(n as u128), n);
        }
        assert!(ring.nodes.capacity() > SLOTS_KEPT_MAX);
        pop_all(&mut ring);
        assert_eq!(
            ring.nodes.capacity(),
            0,
            "an emptied large ring frees its slab"
        );
        assert_eq!(ring.issues.capacity(), 0);
    }

    #[test]
    fn full_ring_drops_oldest_event_and_counts_its_offsets() {
        let mut ring = Ring::new(3);
        assert_eq!(ring.push(1, Kind::Event, 11), Push::Queued);
        assert_eq!(ring.push(2, Kind::Event, 12), Push::Queued);
        assert_eq!(ring.push(3, Kind::Event, 13), Push::Queued);
        assert_eq!(ring.push(4, Kind::Event, 14), Push::DroppedOldest);
        assert_eq!(ring.push(5, Kind::Event, 15), Push::DroppedOldest);
        assert_eq!(contents(&ring), vec![3, 4, 5]);
        assert_eq!(
            ring.take_dropped(),
            Some(Dropped {
                count: 2,
                from_offset: 11,
                to_offset: 12
            })
        );
        assert_eq!(ring.take_dropped(), None);
        assert_eq!(ring.push(6, Kind::Event, 16), Push::DroppedOldest);
        assert_eq!(ring.take_dropped().map(|d| d.count), Some(1));
        assert_eq!(ring.dropped_total(), 3);
        assert_eq!(pop_all(&mut ring), vec![4, 5, 6]);
    }

    #[test]
    fn events_are_bounded_apart_from_other_kinds() {
        let mut ring = Ring::new(2);
        ring.push(10, Kind::Control, 0);
        ring.push(20, Kind::Count, 1);
        ring.push(1, Kind::Event, 2);
        ring.push(30, Kind::Issue(7), 3);
        ring.push(2, Kind::Event, 4);
        assert_eq!(ring.push(3, Kind::Event, 5), Push::DroppedOldest);
        assert_eq!(contents(&ring), vec![10, 20, 30, 2, 3]);
        ring.push(11, Kind::Control, 0);
        assert_eq!(ring.push(12, Kind::Control, 0), Push::Overflow);
        assert_eq!(contents(&ring), vec![10, 20, 30, 2, 3, 11]);
        assert_eq!(ring.dropped_total(), 1);
    }

    #[test]
    fn newest_count_replaces_waiting_count_at_the_tail() {
        let mut ring = Ring::new(10);
        ring.push(1, Kind::Event, 1);
        ring.push(100, Kind::Count, 2);
        ring.push(2, Kind::Event, 3);
        ring.push(3, Kind::Control, 0);
        assert_eq!(ring.push(101, Kind::Count, 4), Push::Queued);
        assert_eq!(contents(&ring), vec![1, 2, 3, 101]);
        assert_eq!(ring.take_dropped(), None);
        // Once the count was sent, a new one waits on its own again.
        assert_eq!(pop_all(&mut ring), vec![1, 2, 3, 101]);
        ring.push(102, Kind::Count, 5);
        ring.push(4, Kind::Event, 6);
        assert_eq!(contents(&ring), vec![102, 4]);
        ring.push(103, Kind::Count, 7);
        assert_eq!(contents(&ring), vec![4, 103]);
        assert_eq!(ring.dropped_total(), 0);
    }

    #[test]
    fn newest_issue_state_replaces_the_waiting_one_at_the_tail() {
        let mut ring = Ring::new(10);
        ring.push(1, Kind::Issue(1), 1);
        ring.push(2, Kind::Event, 2);
        ring.push(3, Kind::Issue(2), 3);
        assert_eq!(ring.push(4, Kind::Issue(1), 4), Push::Queued);
        assert_eq!(contents(&ring), vec![2, 3, 4]);
        assert_eq!(ring.issues_waiting(), 2);
        assert_eq!(ring.dropped_total(), 0, "a superseded state is not a drop");
        assert_eq!(ring.pop(), Some(2));
        assert_eq!(ring.pop(), Some(3));
        ring.push(5, Kind::Issue(2), 5);
        assert_eq!(contents(&ring), vec![4, 5]);
    }

    #[test]
    fn too_many_distinct_issues_overflow_but_known_ones_still_replace() {
        let mut ring = Ring::with_issues_max(4, 3);
        for key in 0..3u64 {
            assert_eq!(ring.push(key, Kind::Issue(key as u128), key), Push::Queued);
        }
        assert_eq!(ring.push(9, Kind::Issue(9), 9), Push::Overflow);
        assert_eq!(ring.push(10, Kind::Issue(1), 10), Push::Queued);
        assert_eq!(contents(&ring), vec![0, 2, 10]);
        ring.pop();
        assert_eq!(ring.push(9, Kind::Issue(9), 11), Push::Queued);
    }

    #[test]
    fn taking_controls_keeps_replies_in_order_and_forgets_the_rest() {
        let mut ring = Ring::new(2);
        ring.push(1, Kind::Event, 1);
        ring.push(10, Kind::Control, 0);
        ring.push(2, Kind::Event, 2);
        ring.push(3, Kind::Event, 3);
        ring.push(4, Kind::Issue(1), 4);
        ring.push(11, Kind::Control, 0);
        ring.push(5, Kind::Count, 5);
        let mut out = VecDeque::new();
        ring.take_controls_into(&mut out);
        assert_eq!(out, [10, 11]);
        assert!(ring.is_empty());
        assert_eq!(ring.take_dropped(), None, "what was dropped is sent again");
        ring.push(6, Kind::Issue(1), 6);
        ring.push(7, Kind::Count, 7);
        assert_eq!(pop_all(&mut ring), vec![6, 7]);
        assert_eq!(ring.taken_through(), 7);
    }

    #[test]
    fn capacity_one() {
        let mut ring = Ring::new(1);
        assert_eq!(ring.push(1, Kind::Event, 1), Push::Queued);
        assert_eq!(ring.push(2, Kind::Event, 2), Push::DroppedOldest);
        assert_eq!(contents(&ring), vec![2]);
        assert_eq!(ring.push(3, Kind::Count, 3), Push::Queued);
        assert_eq!(ring.push(4, Kind::Count, 4), Push::Queued);
        assert_eq!(ring.push(5, Kind::Control, 0), Push::Queued);
        assert_eq!(ring.push(6, Kind::Control, 0), Push::Overflow);
        assert_eq!(contents(&ring), vec![2, 4, 5]);
        assert_eq!(ring.take_dropped().map(|d| d.count), Some(1));
    }

    #[test]
    fn drain_into_moves_up_to_max_in_order() {
        let mut ring = Ring::new(8);
        for value in 0..6 {
            ring.push(value, Kind::Event, value);
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
        let mut ring = Ring::new(1);
        ring.push(frame.clone(), Kind::Event, 1);
        ring.push(frame.clone(), Kind::Count, 2);
        ring.push(frame.clone(), Kind::Count, 3);
        ring.push(frame.clone(), Kind::Issue(1), 4);
        ring.push(frame.clone(), Kind::Issue(1), 5);
        ring.push(frame.clone(), Kind::Event, 6);
        ring.push(frame.clone(), Kind::Control, 0);
        assert_eq!(ring.push(frame.clone(), Kind::Control, 0), Push::Overflow);
        assert_eq!(Arc::strong_count(&frame), 5);
        ring.clear();
        assert_eq!(Arc::strong_count(&frame), 1);
        ring.push(frame.clone(), Kind::Event, 7);
        drop(ring);
        assert_eq!(Arc::strong_count(&frame), 1);
    }

    /// Straightforward model of the documented semantics.
    struct Model {
        capacity: usize,
        issues_max: usize,
        waiting: VecDeque<(u64, Kind, u64)>,
        dropped_pending: Option<Dropped>,
        dropped_total: u64,
    }

    impl Model {
        fn push(&mut self, item: u64, kind: Kind, offset: u64) -> Push {
            let count_of = |model: &Model, wanted: fn(&Kind) -> bool| {
                model.waiting.iter().filter(|w| wanted(&w.1)).count()
            };
            let mut outcome = Push::Queued;
            match kind {
                Kind::Count | Kind::Issue(_) => {
                    if let Some(index) = self.waiting.iter().position(|w| w.1 == kind) {
                        self.waiting.remove(index);
                    } else if matches!(kind, Kind::Issue(_))
                        && count_of(self, |k| matches!(k, Kind::Issue(_))) >= self.issues_max
                    {
                        return Push::Overflow;
                    }
                }
                Kind::Event => {
                    if count_of(self, |k| *k == Kind::Event) >= self.capacity {
                        let index = self
                            .waiting
                            .iter()
                            .position(|w| w.1 == Kind::Event)
                            .unwrap();
                        let (_, _, dropped) = self.waiting.remove(index).unwrap();
                        let pending = self.dropped_pending.get_or_insert(Dropped {
                            count: 0,
                            from_offset: dropped,
                            to_offset: dropped,
                        });
                        pending.count += 1;
                        pending.to_offset = dropped;
                        self.dropped_total += 1;
                        outcome = Push::DroppedOldest;
                    }
                }
                Kind::Control => {
                    if count_of(self, |k| *k == Kind::Control) >= self.capacity {
                        return Push::Overflow;
                    }
                }
            }
            self.waiting.push_back((item, kind, offset));
            outcome
        }
    }

    #[test]
    fn matches_model_under_random_operations() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0002);
        for round in 0..200 {
            let capacity = rng.random_range(1..=12);
            let issues_max = rng.random_range(1..=6);
            let mut ring = Ring::with_issues_max(capacity, issues_max);
            let mut model = Model {
                capacity,
                issues_max,
                waiting: VecDeque::new(),
                dropped_pending: None,
                dropped_total: 0,
            };
            for step in 0..400u64 {
                let item = round * 1_000 + step;
                let offset = step + 1;
                let kind = match rng.random_range(0..100) {
                    0..=34 => Some(Kind::Event),
                    35..=44 => Some(Kind::Count),
                    45..=59 => Some(Kind::Issue(rng.random_range(0..9))),
                    60..=66 => Some(Kind::Control),
                    _ => None,
                };
                match (kind, rng.random_range(0..30)) {
                    (Some(kind), _) => {
                        let offset = if kind == Kind::Control { 0 } else { offset };
                        assert_eq!(
                            ring.push(item, kind, offset),
                            model.push(item, kind, offset),
                            "round {round} step {step}"
                        );
                    }
                    (None, 0..=19) => {
                        assert_eq!(ring.pop(), model.waiting.pop_front().map(|w| w.0))
                    }
                    (None, 20..=25) => {
                        let max = rng.random_range(0..=capacity + 1);
                        let mut out = Vec::new();
                        let moved = ring.drain_into(&mut out, max);
                        let expected: Vec<u64> = (0..max.min(model.waiting.len()))
                            .map(|_| model.waiting.pop_front().unwrap().0)
                            .collect();
                        assert_eq!(moved, expected.len());
                        assert_eq!(out, expected);
                    }
                    (None, _) => assert_eq!(ring.take_dropped(), model.dropped_pending.take()),
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
