//! What one reactor turn gives the store. One submission per turn instead of one per event
//! (each submission may wake the writer), and one row per touched issue however many events it
//! took: rows are full snapshots, so only the newest matters.

use std::cell::RefMut;

use uuid::Uuid;

use super::Shard;
use crate::store::{Ack, Change, EventRow};
use crate::IdSet;

/// Builds the rows of the touched (project, issue) pairs from their newest state, appending
/// them to the changes; handed to the runtime by the owner of the issues.
pub type IssueRows = fn(&[(Uuid, Uuid)], &mut Vec<Change>);

#[derive(Default)]
pub struct StoreTurn {
    /// (project, issue) in the order first touched.
    issues: Vec<(Uuid, Uuid)>,
    touched: IdSet<Uuid>,
    events: Vec<EventRow>,
}

impl StoreTurn {
    pub fn touch(&mut self, project_id: Uuid, issue_id: Uuid) {
        if self.touched.insert(issue_id) {
            self.issues.push((project_id, issue_id));
        }
    }

    pub fn event(&mut self, row: EventRow) {
        self.events.push(row);
    }
}

impl Shard {
    /// Hands this turn's rows to the store writer: each touched issue's row, built now from its
    /// newest state, then the events in the order they were accepted. `ack` fires after the
    /// commit that holds them (`--ack durable`).
    pub fn flush_store(&self, ack: Option<Ack>) {
        let turn = std::mem::take(&mut *self.turn.borrow_mut());
        if turn.events.is_empty() && turn.issues.is_empty() && ack.is_none() {
            return;
        }
        let mut changes = Vec::with_capacity(turn.issues.len() + turn.events.len());
        (self.issue_rows)(&turn.issues, &mut changes);
        changes.extend(turn.events.into_iter().map(Change::Event));
        self.store.submit(changes, ack);
    }

    /// This turn's rows for the store, to add to. Their hand-over (`flush_store`) is made
    /// once the reactor has run the tasks that are ready now, so that everything one turn
    /// accepts, from connections and mesh messages alike, goes to the store together.
    pub fn store_turn(&self) -> RefMut<'_, StoreTurn> {
        if !self.turn_due.replace(true) {
            self.turn_wanted.notify_one();
        }
        self.turn.borrow_mut()
    }
}
