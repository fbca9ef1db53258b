//! Hashed timer wheel: the per-shard clock for request timeouts, pings, stall checks and the
//! stream drain tick.
//!
//! Time is counted in whole ticks. A timer due at tick `d` lives in slot `d % slot_count`, in a
//! doubly linked list threaded through a slab of entries, so schedule and cancel are O(1) and need
//! no allocation once the slab has grown. Deadlines further than one revolution away simply stay
//! in their slot until the pass where their deadline matches. Every timer carries a sequence
//! number that never repeats, which both orders timers sharing a deadline (first scheduled, first
//! fired) and makes keys generation-checked: a key of a fired or cancelled timer can never cancel
//! a timer that later reuses its entry.

/// Largest wheel allowed. A bigger wheel only costs memory and makes a pass over every slot slow;
/// far deadlines are handled by staying in their slot for more revolutions.
pub const SLOT_COUNT_MAX: usize = 1 << 20;

/// Link value meaning "no entry"; entry indices stay below it.
const NIL: u32 = u32::MAX;

/// Most timers that may wait at once: entry indices are u32 and `NIL` is reserved.
pub const TIMERS_MAX: usize = NIL as usize;

/// Up to this many entries, debug builds check the whole wheel after each advance; beyond it the
/// check would dominate the loop of a debug server holding many connections.
const DEBUG_FULL_CHECK_ENTRIES_MAX: usize = 4_096;

/// Handle of a scheduled timer; stale once the timer fired or was cancelled.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TimerKey {
    index: u32,
    sequence: u64,
}

struct Entry<T> {
    /// `None` when the entry is free (then `next` links the free list).
    item: Option<T>,
    sequence: u64,
    deadline_tick: u64,
    prev: u32,
    next: u32,
}

#[derive(Copy, Clone)]
struct SlotList {
    head: u32,
    tail: u32,
}

const EMPTY_SLOT: SlotList = SlotList {
    head: NIL,
    tail: NIL,
};

/// Timers keyed by tick, fired in deadline order by [`TimerWheel::advance`].
pub struct TimerWheel<T> {
    entries: Vec<Entry<T>>,
    free_head: u32,
    slots: Box<[SlotList]>,
    slot_mask: u64,
    now_tick: u64,
    next_sequence: u64,
    len: usize,
}

impl<T> TimerWheel<T> {
    /// An empty wheel at tick 0; `slot_count` must be a power of two.
    pub fn new(slot_count: usize) -> Self {
        assert!(
            slot_count.is_power_of_two(),
            "slot_count {slot_count} must be a power of two"
        );
        assert!(
            slot_count <= SLOT_COUNT_MAX,
            "slot_count {slot_count} exceeds SLOT_COUNT_MAX {SLOT_COUNT_MAX}"
        );
        TimerWheel {
            entries: Vec::new(),
            free_head: NIL,
            slots: vec![EMPTY_SLOT; slot_count].into_boxed_slice(),
            slot_mask: slot_count as u64 - 1,
            now_tick: 0,
            next_sequence: 0,
            len: 0,
        }
    }

    pub fn now_tick(&self) -> u64 {
        self.now_tick
    }

    /// Schedules `item` to fire at `now_tick + max(after_ticks, 1)` (saturating at `u64::MAX`).
    pub fn schedule(&mut self, after_ticks: u64, item: T) -> TimerKey {
        let deadline_tick = self.now_tick.saturating_add(after_ticks.max(1));
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let index = self.allocate(Entry {
            item: Some(item),
            sequence,
            deadline_tick,
            prev: NIL,
            next: NIL,
        });
        self.link_at_tail(index);
        self.len += 1;
        TimerKey { index, sequence }
    }

    /// Removes the timer and returns its item; `None` if it already fired or was cancelled.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let entry = self.entries.get(key.index as usize)?;
        if entry.item.is_none() || entry.sequence != key.sequence {
            return None;
        }
        Some(self.remove(key.index))
    }

    /// Fires every timer due at or before `to_tick` onto `fired`, in deadline order (ties in
    /// scheduling order), then sets the clock to `to_tick`. A `to_tick` in the past is ignored:
    /// the shard clock never runs backwards.
    pub fn advance(&mut self, to_tick: u64, fired: &mut Vec<T>) {
        if to_tick <= self.now_tick {
            return;
        }
        let span_ticks = to_tick - self.now_tick;
        if self.len == 0 {
            // Nothing to fire.
        } else if span_ticks >= self.slots.len() as u64 {
            // Every slot would be visited at least once: one pass over all timers is cheaper.
            self.fire_all_due(to_tick, fired);
        } else {
            for tick in self.now_tick + 1..=to_tick {
                if self.len == 0 {
                    break;
                }
                self.fire_slot(tick, fired);
            }
        }
        self.now_tick = to_tick;
        if cfg!(debug_assertions) && self.entries.len() <= DEBUG_FULL_CHECK_ENTRIES_MAX {
            self.assert_invariants();
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_of(&self, deadline_tick: u64) -> usize {
        (deadline_tick & self.slot_mask) as usize
    }

    /// Fires the timers due exactly at `tick`. Only timers with that deadline fire: the others in
    /// the slot are due whole revolutions later.
    fn fire_slot(&mut self, tick: u64, fired: &mut Vec<T>) {
        let mut cursor = self.slots[self.slot_of(tick)].head;
        while cursor != NIL {
            let entry = &self.entries[cursor as usize];
            let next = entry.next;
            debug_assert!(entry.deadline_tick >= tick, "a timer was left behind");
            if entry.deadline_tick == tick {
                fired.push(self.remove(cursor));
            }
            cursor = next;
        }
    }

    fn fire_all_due(&mut self, to_tick: u64, fired: &mut Vec<T>) {
        let mut due: Vec<(u64, u64, u32)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.item.is_some() && entry.deadline_tick <= to_tick)
            .map(|(index, entry)| (entry.deadline_tick, entry.sequence, index as u32))
            .collect();
        due.sort_unstable();
        fired.reserve(due.len());
        for (_, _, index) in due {
            fired.push(self.remove(index));
        }
    }

    fn allocate(&mut self, entry: Entry<T>) -> u32 {
        if self.free_head != NIL {
            let index = self.free_head;
            let slot = &mut self.entries[index as usize];
            debug_assert!(slot.item.is_none());
            self.free_head = slot.next;
            *slot = entry;
            index
        } else {
            assert!(
                self.entries.len() < TIMERS_MAX,
                "more than TIMERS_MAX timers waiting"
            );
            self.entries.push(entry);
            (self.entries.len() - 1) as u32
        }
    }

    fn link_at_tail(&mut self, index: u32) {
        let slot = self.slot_of(self.entries[index as usize].deadline_tick);
        let old_tail = self.slots[slot].tail;
        self.entries[index as usize].prev = old_tail;
        self.entries[index as usize].next = NIL;
        if old_tail == NIL {
            self.slots[slot].head = index;
        } else {
            self.entries[old_tail as usize].next = index;
        }
        self.slots[slot].tail = index;
    }

    /// Unlinks a live entry, puts it on the free list and returns its item.
    fn remove(&mut self, index: u32) -> T {
        let (prev, next, deadline_tick) = {
            let entry = &self.entries[index as usize];
            (entry.prev, entry.next, entry.deadline_tick)
        };
        let slot = self.slot_of(deadline_tick);
        if prev == NIL {
            debug_assert_eq!(self.slots[slot].head, index);
            self.slots[slot].head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            debug_assert_eq!(self.slots[slot].tail, index);
            self.slots[slot].tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        let entry = &mut self.entries[index as usize];
        let item = entry.item.take().expect("removing a live timer");
        entry.prev = NIL;
        entry.next = self.free_head;
        self.free_head = index;
        self.len -= 1;
        item
    }

    /// Full consistency check: every live entry sits once in the list of its deadline's slot, in
    /// sequence order per deadline, and is due in the future; `len` counts the live entries.
    fn assert_invariants(&self) {
        let mut linked = 0;
        for (slot, list) in self.slots.iter().enumerate() {
            let mut prev = NIL;
            let mut cursor = list.head;
            while cursor != NIL {
                let entry = &self.entries[cursor as usize];
                assert!(
                    entry.item.is_some(),
                    "a free entry is linked in slot {slot}"
                );
                assert_eq!(entry.prev, prev, "broken back link in slot {slot}");
                assert_eq!(self.slot_of(entry.deadline_tick), slot);
                assert!(
                    entry.deadline_tick > self.now_tick,
                    "an overdue timer waits"
                );
                if prev != NIL {
                    let before = &self.entries[prev as usize];
                    assert!(
                        before.deadline_tick != entry.deadline_tick
                            || before.sequence < entry.sequence,
                        "timers with one deadline out of scheduling order"
                    );
                }
                linked += 1;
                prev = cursor;
                cursor = entry.next;
            }
            assert_eq!(list.tail, prev, "wrong tail in slot {slot}");
        }
        let live = self.entries.iter().filter(|e| e.item.is_some()).count();
        assert_eq!(linked, live);
        assert_eq!(live, self.len);
        let mut free = 0;
        let mut cursor = self.free_head;
        while cursor != NIL {
            assert!(self.entries[cursor as usize].item.is_none());
            free += 1;
            cursor = self.entries[cursor as usize].next;
        }
        assert_eq!(free + live, self.entries.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    fn advance(wheel: &mut TimerWheel<u32>, to_tick: u64) -> Vec<u32> {
        let mut fired = Vec::new();
        wheel.advance(to_tick, &mut fired);
        fired
    }

    #[test]
    fn fires_after_at_least_one_tick() {
        let mut wheel = TimerWheel::new(8);
        wheel.schedule(0, 1);
        wheel.schedule(1, 2);
        assert_eq!(advance(&mut wheel, 0), Vec::<u32>::new());
        assert_eq!(wheel.len(), 2);
        assert_eq!(advance(&mut wheel, 1), vec![1, 2]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.now_tick(), 1);
    }

    #[test]
    fn fires_exactly_at_deadline() {
        let mut wheel = TimerWheel::new(8);
        wheel.schedule(3, 7);
        assert_eq!(advance(&mut wheel, 2), Vec::<u32>::new());
        assert_eq!(advance(&mut wheel, 3), vec![7]);
        wheel.schedule(2, 8);
        assert_eq!(advance(&mut wheel, 4), Vec::<u32>::new());
        assert_eq!(advance(&mut wheel, 5), vec![8]);
    }

    #[test]
    fn fires_in_deadline_order_with_ties_in_scheduling_order() {
        let mut wheel = TimerWheel::new(4);
        wheel.schedule(3, 30);
        wheel.schedule(1, 10);
        wheel.schedule(3, 31);
        wheel.schedule(2, 20);
        wheel.schedule(1, 11);
        assert_eq!(advance(&mut wheel, 3), vec![10, 11, 20, 30, 31]);
    }

    #[test]
    fn far_deadlines_wait_whole_revolutions() {
        let mut wheel = TimerWheel::new(8);
        wheel.schedule(100, 1);
        wheel.schedule(4, 2);
        wheel.schedule(12, 3);
        let mut fired_at = Vec::new();
        for tick in 1..=200 {
            for item in advance(&mut wheel, tick) {
                fired_at.push((item, tick));
            }
        }
        assert_eq!(fired_at, vec![(2, 4), (3, 12), (1, 100)]);
    }

    #[test]
    fn large_advance_fires_everything_due_in_order() {
        let mut wheel = TimerWheel::new(16);
        wheel.schedule(1_000, 4);
        wheel.schedule(5, 1);
        wheel.schedule(37, 3);
        wheel.schedule(21, 2);
        wheel.schedule(5_000, 6);
        wheel.schedule(1_000, 5);
        assert_eq!(advance(&mut wheel, 1_000), vec![1, 2, 3, 4, 5]);
        assert_eq!(wheel.len(), 1);
        assert_eq!(advance(&mut wheel, 4_999), Vec::<u32>::new());
        assert_eq!(advance(&mut wheel, 5_000), vec![6]);
        // A jump far beyond anything scheduled.
        wheel.schedule(3, 7);
        assert_eq!(advance(&mut wheel, u64::MAX - 1), vec![7]);
        assert_eq!(wheel.now_tick(), u64::MAX - 1);
    }

    #[test]
    fn deadline_saturates_at_the_end_of_time() {
        let mut wheel = TimerWheel::new(8);
        wheel.advance(u64::MAX - 2, &mut Vec::new());
        wheel.schedule(u64::MAX, 1);
        wheel.schedule(1, 2);
        wheel.schedule(5, 3);
        assert_eq!(advance(&mut wheel, u64::MAX), vec![2, 1, 3]);
    }

    #[test]
    fn advance_into_the_past_is_ignored() {
        let mut wheel = TimerWheel::new(8);
        wheel.advance(10, &mut Vec::new());
        wheel.schedule(1, 1);
        assert_eq!(advance(&mut wheel, 5), Vec::<u32>::new());
        assert_eq!(wheel.now_tick(), 10);
        assert_eq!(advance(&mut wheel, 11), vec![1]);
    }

    #[test]
    fn cancel_returns_item_once() {
        let mut wheel = TimerWheel::new(8);
        let first = wheel.schedule(2, 1);
        let second = wheel.schedule(2, 2);
        assert_eq!(wheel.cancel(first), Some(1));
        assert_eq!(wheel.cancel(first), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(advance(&mut wheel, 2), vec![2]);
        assert_eq!(wheel.cancel(second), None);
    }

    #[test]
    fn stale_key_never_cancels_a_newer_timer() {
        let mut wheel = TimerWheel::new(8);
        let cancelled = wheel.schedule(5, 1);
        wheel.cancel(cancelled);
        let reused = wheel.schedule(5, 2);
        assert_eq!(reused.index, cancelled.index, "the entry is reused");
        assert_eq!(wheel.cancel(cancelled), None);

        let fired = wheel.schedule(1, 3);
        assert_eq!(advance(&mut wheel, 1), vec![3]);
        let newer = wheel.schedule(1, 4);
        assert_eq!(newer.index, fired.index, "the entry is reused");
        assert_eq!(wheel.cancel(fired), None);
        assert_eq!(wheel.len(), 2);
        assert_eq!(wheel.cancel(newer), Some(4));
        assert_eq!(wheel.cancel(reused), Some(2));
    }

    #[test]
    fn single_slot_wheel_works() {
        let mut wheel = TimerWheel::new(1);
        wheel.schedule(3, 3);
        wheel.schedule(1, 1);
        wheel.schedule(2, 2);
        assert_eq!(advance(&mut wheel, 1), vec![1]);
        assert_eq!(advance(&mut wheel, 3), vec![2, 3]);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn rejects_slot_count_not_power_of_two() {
        TimerWheel::<u32>::new(12);
    }

    #[test]
    fn matches_model_under_random_operations() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0002);
        for round in 0..60 {
            let slot_count = 1 << rng.random_range(0..6);
            let mut wheel = TimerWheel::new(slot_count);
            // (deadline, scheduling order) -> item, the order timers must fire in.
            let mut model: BTreeMap<(u64, u64), u32> = BTreeMap::new();
            let mut keys: Vec<(TimerKey, (u64, u64))> = Vec::new();
            let mut scheduled = 0u64;
            for step in 0..500 {
                match rng.random_range(0..100) {
                    0..=44 => {
                        let after = rng.random_range(0..slot_count as u64 * 3 + 2);
                        let item = round * 10_000 + step;
                        let key = wheel.schedule(after, item);
                        let model_key = (wheel.now_tick() + after.max(1), scheduled);
                        scheduled += 1;
                        model.insert(model_key, item);
                        keys.push((key, model_key));
                    }
                    45..=64 if !keys.is_empty() => {
                        // Keys of fired or cancelled timers stay in the list: stale cancels.
                        let (key, model_key) = keys[rng.random_range(0..keys.len())];
                        assert_eq!(wheel.cancel(key), model.remove(&model_key));
                    }
                    _ => {
                        let step_ticks = if rng.random_bool(0.1) {
                            rng.random_range(0..slot_count as u64 * 4 + 1)
                        } else {
                            rng.random_range(0..3)
                        };
                        let to_tick = wheel.now_tick() + step_ticks;
                        let mut fired = Vec::new();
                        wheel.advance(to_tick, &mut fired);
                        let later = model.split_off(&(to_tick + 1, 0));
                        let due: Vec<u32> = model.values().copied().collect();
                        model = later;
                        assert_eq!(fired, due, "round {round} step {step}");
                        assert_eq!(wheel.now_tick(), to_tick);
                    }
                }
                assert_eq!(wheel.len(), model.len());
                wheel.assert_invariants();
            }
        }
    }
}
