//! Per-shard table of live connections, addressed by generation-checked ids.
//!
//! Connections live in a slab so that lookups are an index and freed slots are reused. Timers,
//! subscriptions and in-flight replies refer to a connection by [`ConnId`], and may outlive it;
//! the id therefore carries the generation its connection was inserted with, drawn from a counter
//! that never repeats, so an id whose slot now holds a newer connection resolves to nothing.

use slab::Slab;

/// Most connections one registry can hold: ids carry the slot as a u32.
pub const CONNECTIONS_MAX: usize = u32::MAX as usize;

/// Identifies one connection for its whole life; never matches a later one in the same slot.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    slot: u32,
    generation: u64,
}

impl ConnId {
    /// The slab slot, useful as a compact index (not unique over time).
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

struct Entry<T> {
    generation: u64,
    value: T,
}

/// Slab of connections with stale-id protection.
pub struct Registry<T> {
    slab: Slab<Entry<T>>,
    /// Generation for the next insert; a u64 counter cannot wrap in the life of a process.
    next_generation: u64,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Registry<T> {
    pub fn new() -> Self {
        Registry {
            slab: Slab::new(),
            next_generation: 0,
        }
    }

    pub fn insert(&mut self, value: T) -> ConnId {
        let slot = self.slab.vacant_key();
        assert!(
            slot < CONNECTIONS_MAX,
            "more than CONNECTIONS_MAX connections in one registry"
        );
        let generation = self.next_generation;
        self.next_generation += 1;
        let inserted = self.slab.insert(Entry { generation, value });
        debug_assert_eq!(inserted, slot);
        ConnId {
            slot: slot as u32,
            generation,
        }
    }

    pub fn get(&self, id: ConnId) -> Option<&T> {
        self.slab
            .get(id.slot as usize)
            .filter(|entry| entry.generation == id.generation)
            .map(|entry| &entry.value)
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        self.slab
            .get_mut(id.slot as usize)
            .filter(|entry| entry.generation == id.generation)
            .map(|entry| &mut entry.value)
    }

    /// Removes the connection; `None` (and nothing removed) if the id is stale.
    pub fn remove(&mut self, id: ConnId) -> Option<T> {
        if !self.contains(id) {
            return None;
        }
        let entry = self.slab.remove(id.slot as usize);
        debug_assert!(entry.generation < self.next_generation);
        Some(entry.value)
    }

    pub fn contains(&self, id: ConnId) -> bool {
        self.get(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Live connections in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (ConnId, &T)> {
        self.slab.iter().map(|(slot, entry)| {
            let id = ConnId {
                slot: slot as u32,
                generation: entry.generation,
            };
            (id, &entry.value)
        })
    }

    /// Live connections in slot order, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ConnId, &mut T)> {
        self.slab.iter_mut().map(|(slot, entry)| {
            let id = ConnId {
                slot: slot as u32,
                generation: entry.generation,
            };
            (id, &mut entry.value)
        })
    }

    /// Ids of the live connections, for walks that remove or mutate while iterating.
    pub fn ids(&self) -> Vec<ConnId> {
        self.iter().map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    #[test]
    fn insert_get_remove() {
        let mut registry = Registry::new();
        assert!(registry.is_empty());
        let a = registry.insert("a");
        let b = registry.insert("b");
        assert_ne!(a, b);
        assert_eq!(registry.len(), 2);
        assert_eq!(registry.get(a), Some(&"a"));
        *registry.get_mut(b).unwrap() = "B";
        assert_eq!(registry.get(b), Some(&"B"));
        assert_eq!(registry.remove(a), Some("a"));
        assert_eq!(registry.remove(a), None);
        assert!(!registry.contains(a));
        assert!(registry.contains(b));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn stale_id_never_reaches_the_connection_reusing_its_slot() {
        let mut registry = Registry::default();
        let old = registry.insert(1);
        assert_eq!(registry.remove(old), Some(1));
        let new = registry.insert(2);
        assert_eq!(new.slot(), old.slot(), "the slot is reused");
        assert_ne!(new, old);
        assert_eq!(registry.get(old), None);
        assert_eq!(registry.get_mut(old), None);
        assert!(!registry.contains(old));
        assert_eq!(registry.remove(old), None);
        assert_eq!(registry.get(new), Some(&2));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn iter_and_ids_list_live_connections() {
        let mut registry = Registry::new();
        let ids: Vec<ConnId> = (0..5).map(|value| registry.insert(value)).collect();
        registry.remove(ids[1]);
        registry.remove(ids[3]);
        let reused = registry.insert(10);
        assert!(reused.slot() == ids[1].slot() || reused.slot() == ids[3].slot());
        let mut expected = vec![(ids[0], 0), (ids[2], 2), (ids[4], 4), (reused, 10)];
        expected.sort_by_key(|(id, _)| id.slot());
        let listed: Vec<(ConnId, i32)> = registry.iter().map(|(id, v)| (id, *v)).collect();
        assert_eq!(listed, expected);
        let expected_ids: Vec<ConnId> = expected.iter().map(|(id, _)| *id).collect();
        assert_eq!(registry.ids(), expected_ids);
        for id in registry.ids() {
            assert!(registry.contains(id));
        }
    }

    #[test]
    fn matches_model_under_random_operations() {
        let mut rng = StdRng::seed_from_u64(0x5eed_0003);
        let mut registry = Registry::new();
        let mut model: HashMap<ConnId, u32> = HashMap::new();
        // Every id ever issued, so stale ids keep being tried against reused slots.
        let mut issued: Vec<ConnId> = Vec::new();
        for step in 0..5_000u32 {
            if issued.is_empty() || rng.random_bool(0.4) {
                let id = registry.insert(step);
                assert!(!issued.contains(&id), "an id was issued twice");
                model.insert(id, step);
                issued.push(id);
            } else {
                let id = issued[rng.random_range(0..issued.len())];
                match rng.random_range(0..3) {
                    0 => assert_eq!(registry.remove(id), model.remove(&id)),
                    1 => assert_eq!(registry.get(id), model.get(&id)),
                    _ => assert_eq!(registry.get_mut(id), model.get_mut(&id)),
                }
            }
            assert_eq!(registry.len(), model.len());
        }
        let mut listed = registry.ids();
        let mut expected: Vec<ConnId> = model.keys().copied().collect();
        listed.sort_by_key(|id| id.slot());
        expected.sort_by_key(|id| id.slot());
        assert_eq!(listed, expected);
    }
}
