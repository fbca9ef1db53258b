//! Issue grouping and lifecycle: the state of one project, owned by exactly one shard.
//!
//! Only the owner shard touches a project's `ProjectState`, so grouping, counting, rate limiting
//! and status changes need no lock and no database round trip; the store gets a full row of
//! every issue that changed.

use serde::Serialize;
use uuid::Uuid;

use crate::ingest::event::{cut_at_char_boundary, Level, TITLE_BYTES_MAX};
use crate::ingest::fingerprint::FingerprintHash;
use crate::store::{IssueRow, RECENT_EVENT_IDS_MAX, RECENT_EVENT_IDS_TTL_US};
use crate::IdMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Status {
    Unresolved,
    Resolved,
    Archived,
    Discarded,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unresolved => "unresolved",
            Status::Resolved => "resolved",
            Status::Archived => "archived",
            Status::Discarded => "discarded",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "unresolved" => Some(Status::Unresolved),
            "resolved" => Some(Status::Resolved),
            "archived" => Some(Status::Archived),
            "discarded" => Some(Status::Discarded),
            _ => None,
        }
    }
    /// The status an API action sets: `resolve` -> resolved, and so on.
    pub fn from_action(action: &str) -> Option<Status> {
        match action {
            "resolve" => Some(Status::Resolved),
            "archive" => Some(Status::Archived),
            "unresolve" => Some(Status::Unresolved),
            "discard" => Some(Status::Discarded),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Issue {
    pub id: Uuid,
    pub project_id: Uuid,
    pub fingerprint: FingerprintHash,
    pub title: String,
    pub level: Level,
    pub status: Status,
    pub event_count: u64,
    pub first_seen_us: i64,
    pub last_seen_us: i64,
}

/// The issue as the API and the stream show it.
#[derive(Serialize)]
pub struct IssueView<'a> {
    pub id: Uuid,
    pub project_id: Uuid,
    pub title: &'a str,
    pub level: &'static str,
    pub status: &'static str,
    pub event_count: u64,
    pub first_seen: String,
    pub last_seen: String,
}

impl Issue {
    pub fn view(&self) -> IssueView<'_> {
        IssueView {
            id: self.id,
            project_id: self.project_id,
            title: &self.title,
            level: self.level.as_str(),
            status: self.status.as_str(),
            event_count: self.event_count,
            first_seen: rfc3339(self.first_seen_us),
            last_seen: rfc3339(self.last_seen_us),
        }
    }

    pub fn row(&self) -> IssueRow {
        IssueRow {
            id: self.id,
            project_id: self.project_id,
            fingerprint: self.fingerprint,
            title: self.title.clone(),
            level: self.level.as_str().to_string(),
            status: self.status.as_str().to_string(),
            event_count: self.event_count,
            first_seen_us: self.first_seen_us,
            last_seen_us: self.last_seen_us,
        }
    }

    pub fn from_row(row: &IssueRow) -> Issue {
        Issue {
            id: row.id,
            project_id: row.project_id,
            fingerprint: row.fingerprint,
            // Rows written before titles were bounded may hold longer ones.
            title: cut_at_char_boundary(&row.title, TITLE_BYTES_MAX).to_owned(),
            level: Level::parse(&row.level).unwrap_or(Level::Error),
            status: Status::parse(&row.status).unwrap_or(Status::Unresolved),
            event_count: row.event_count,
            first_seen_us: row.first_seen_us,
            last_seen_us: row.last_seen_us,
        }
    }
}

/// Issues a project may have unless `--max-issues-per-project` says otherwise. Every issue of a
/// project stays in memory on its owner shard (about 220 bytes plus its title, see PERF.md).
pub const MAX_ISSUES_PER_PROJECT_DEFAULT: usize = 100_000;

/// A new time-ordered (v7) id. Each thread keeps its own clock context: the crate's shared one
/// is a process-wide lock that every shard would take for every event. Ids stay ordered per
/// thread, and a project's events and issues are all made on its owner shard.
pub fn new_id() -> Uuid {
    thread_local! {
        static CONTEXT: uuid::ContextV7 = const { uuid::ContextV7::new() };
    }
    CONTEXT.with(|context| Uuid::new_v7(uuid::Timestamp::now(context)))
}

pub fn rfc3339(unix_us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_us as i128 * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// What grouping one event did to its issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouped {
    Created,
    Regressed,
    Counted,
    Discarded,
}

/// A listing position: issues strictly after (last_seen, id) in newest-first order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub last_seen_us: i64,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}.{}", self.last_seen_us, self.id.simple())
    }
    pub fn decode(s: &str) -> Option<Cursor> {
        let (at, id) = s.split_once('.')?;
        Some(Cursor {
            last_seen_us: at.parse().ok()?,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

/// Per-minute ingest budget of a project.
#[derive(Default)]
struct RateWindow {
    minute: i64,
    used: u64,
}

/// The event ids a project took within the last `RECENT_EVENT_IDS_TTL_US`, oldest first.
#[derive(Default)]
pub struct RecentEventIds {
    order: std::collections::VecDeque<(i64, Uuid)>,
    ids: crate::IdSet<Uuid>,
}

impl RecentEventIds {
    pub fn contains(&mut self, id: &Uuid, now_us: i64) -> bool {
        self.expire(now_us);
        self.ids.contains(id)
    }

    pub fn insert(&mut self, id: Uuid, now_us: i64) {
        self.expire(now_us);
        if !self.ids.insert(id) {
            return;
        }
        if self.order.len() == RECENT_EVENT_IDS_MAX {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
        self.order.push_back((now_us, id));
        debug_assert_eq!(self.order.len(), self.ids.len());
        debug_assert!(self.order.len() <= RECENT_EVENT_IDS_MAX);
    }

    /// Forgets an id taken whose event was then not stored (rare: the cost is a scan).
    pub fn forget(&mut self, id: &Uuid) {
        if self.ids.remove(id) {
            self.order.retain(|(_, kept)| kept != id);
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn expire(&mut self, now_us: i64) {
        let cutoff_us = now_us.saturating_sub(RECENT_EVENT_IDS_TTL_US);
        while let Some(&(seen_us, id)) = self.order.front() {
            if seen_us > cutoff_us {
                break;
            }
            self.order.pop_front();
            self.ids.remove(&id);
        }
        // A burst's memory goes back once its ids have expired.
        if self.order.is_empty() && self.order.capacity() > 1024 {
            self.order = Default::default();
            self.ids = Default::default();
        }
    }
}

#[derive(Default)]
pub struct ProjectState {
    issues: IdMap<Uuid, Issue>,
    by_fingerprint: IdMap<FingerprintHash, Uuid>,
    unresolved: u64,
    /// Discarded issues: while there are none, no event needs the check before grouping.
    discarded: u64,
    rate: RateWindow,
    /// Ids of events taken lately, for dedupe of SDK retries.
    pub recent_event_ids: RecentEventIds,
}

impl ProjectState {
    pub fn restore(&mut self, issue: Issue) {
        if let Some(count) = self.count_of(issue.status) {
            *count += 1;
        }
        self.by_fingerprint.insert(issue.fingerprint, issue.id);
        self.issues.insert(issue.id, issue);
    }

    pub fn unresolved_count(&self) -> u64 {
        self.unresolved
    }

    pub fn issue(&self, id: &Uuid) -> Option<&Issue> {
        self.issues.get(id)
    }

    /// Issues of the project, of every status: each is held in memory.
    pub fn issue_count(&self) -> usize {
        self.issues.len()
    }

    /// Whether an event with this fingerprint belongs to an existing issue.
    pub fn has_fingerprint(&self, fingerprint: &FingerprintHash) -> bool {
        self.by_fingerprint.contains_key(fingerprint)
    }

    /// Takes `events` from this minute's budget, or says in how many seconds the next minute starts.
    pub fn take_rate(
        &mut self,
        limit_per_minute: u32,
        events: u64,
        now_us: i64,
    ) -> Result<(), u64> {
        if limit_per_minute == 0 {
            return Ok(());
        }
        let minute = now_us.div_euclid(60_000_000);
        if self.rate.minute != minute {
            self.rate = RateWindow { minute, used: 0 };
        }
        if self.rate.used + events > limit_per_minute as u64 {
            let next_minute_us = (minute + 1) * 60_000_000;
            return Err(((next_minute_us - now_us + 999_999) / 1_000_000).max(1) as u64);
        }
        self.rate.used += events;
        Ok(())
    }

    /// Returns what `take_rate` took at `now_us` for a request that was then refused.
    pub fn give_back_rate(&mut self, limit_per_minute: u32, events: u64, now_us: i64) {
        if limit_per_minute > 0 && self.rate.minute == now_us.div_euclid(60_000_000) {
            self.rate.used = self.rate.used.saturating_sub(events);
        }
    }

    /// The count kept of issues in `status`, for the statuses that have one.
    fn count_of(&mut self, status: Status) -> Option<&mut u64> {
        match status {
            Status::Unresolved => Some(&mut self.unresolved),
            Status::Discarded => Some(&mut self.discarded),
            Status::Resolved | Status::Archived => None,
        }
    }

    pub fn has_discarded(&self) -> bool {
        self.discarded > 0
    }

    /// The position of the first fingerprint that would open an issue past `limit`, counting
    /// the issues the fingerprints before it open; None when all fit.
    pub fn first_past_limit<'a>(
        &self,
        fingerprints: impl IntoIterator<Item = (usize, &'a FingerprintHash)>,
        limit: usize,
    ) -> Option<usize> {
        // A request holds at most 100 events: a list is enough.
        let mut opened: Vec<&FingerprintHash> = Vec::new();
        for (index, fingerprint) in fingerprints {
            if self.has_fingerprint(fingerprint) || opened.contains(&fingerprint) {
                continue;
            }
            if self.issues.len() + opened.len() >= limit {
                return Some(index);
            }
            opened.push(fingerprint);
        }
        None
    }

    /// Whether an event with this fingerprint would be discarded (checked before any state changes).
    pub fn is_discarded(&self, fingerprint: &FingerprintHash) -> bool {
        self.has_discarded()
            && self
                .by_fingerprint
                .get(fingerprint)
                .and_then(|id| self.issues.get(id))
                .is_some_and(|issue| issue.status == Status::Discarded)
    }

    /// Groups one event into its issue; returns what happened and the issue.
    pub fn group(
        &mut self,
        project_id: Uuid,
        fingerprint: &FingerprintHash,
        title: &str,
        level: Level,
        seen_us: i64,
    ) -> (Grouped, &Issue) {
        let id = match self.by_fingerprint.get(fingerprint) {
            Some(id) => *id,
            None => {
                let id = new_id();
                let issue = Issue {
                    id,
                    project_id,
                    fingerprint: *fingerprint,
                    title: title.to_string(),
                    level,
                    status: Status::Unresolved,
                    event_count: 1,
                    first_seen_us: seen_us,
                    last_seen_us: seen_us,
                };
                self.unresolved += 1;
                self.by_fingerprint.insert(*fingerprint, id);
                return (Grouped::Created, self.issues.entry(id).or_insert(issue));
            }
        };
        let issue = self
            .issues
            .get_mut(&id)
            .expect("fingerprint index points at a live issue");
        let grouped = match issue.status {
            Status::Discarded => return (Grouped::Discarded, issue),
            Status::Resolved => {
                issue.status = Status::Unresolved;
                self.unresolved += 1;
                Grouped::Regressed
            }
            Status::Unresolved | Status::Archived => Grouped::Counted,
        };
        issue.event_count += 1;
        issue.first_seen_us = issue.first_seen_us.min(seen_us);
        issue.last_seen_us = issue.last_seen_us.max(seen_us);
        (grouped, issue)
    }

    /// Sets an issue's status; None if the issue is not in this project, else whether it changed.
    pub fn set_status(&mut self, id: &Uuid, status: Status) -> Option<(bool, &Issue)> {
        let old = std::mem::replace(&mut self.issues.get_mut(id)?.status, status);
        let changed = old != status;
        if changed {
            if let Some(count) = self.count_of(old) {
                *count -= 1;
            }
            if let Some(count) = self.count_of(status) {
                *count += 1;
            }
        }
        Some((changed, &self.issues[id]))
    }

    /// Newest `last_seen` first, after `cursor`, at most `limit`; also whether more follow.
    pub fn list(
        &self,
        status: Option<Status>,
        level: Option<Level>,
        limit: usize,
        cursor: Option<Cursor>,
    ) -> (Vec<&Issue>, bool) {
        let after = |issue: &Issue| match cursor {
            None => true,
            Some(c) => (issue.last_seen_us, issue.id) < (c.last_seen_us, c.id),
        };
        let mut found: Vec<&Issue> = self
            .issues
            .values()
            .filter(|i| {
                status.is_none_or(|s| i.status == s)
                    && level.is_none_or(|l| i.level == l)
                    && after(i)
            })
            .collect();
        found.sort_unstable_by_key(|i| std::cmp::Reverse((i.last_seen_us, i.id)));
        let has_more = found.len() > limit;
        found.truncate(limit);
        (found, has_more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: FingerprintHash = [7; 16];

    #[test]
    fn new_ids_are_version_7_and_increase_on_a_thread() {
        let ids: Vec<Uuid> = (0..10_000).map(|_| new_id()).collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    }

    fn state() -> (ProjectState, Uuid) {
        (ProjectState::default(), Uuid::new_v4())
    }

    #[test]
    fn lifecycle_counts_unresolved() {
        let (mut s, p) = state();
        let (g, issue) = s.group(p, &FP, "boom", Level::Error, 1);
        let id = issue.id;
        assert_eq!(g, Grouped::Created);
        assert_eq!(s.unresolved_count(), 1);
        assert_eq!(s.group(p, &FP, "boom", Level::Error, 2).0, Grouped::Counted);
        assert_eq!(s.set_status(&id, Status::Resolved).map(|r| r.0), Some(true));
        assert_eq!(
            s.set_status(&id, Status::Resolved).map(|r| r.0),
            Some(false)
        );
        assert_eq!(s.unresolved_count(), 0);
        let (g, issue) = s.group(p, &FP, "boom", Level::Error, 3);
        assert_eq!(
            (g, issue.event_count, issue.status),
            (Grouped::Regressed, 3, Status::Unresolved)
        );
        assert_eq!(s.unresolved_count(), 1);
        s.set_status(&id, Status::Archived);
        assert_eq!(s.group(p, &FP, "boom", Level::Error, 4).0, Grouped::Counted);
        assert_eq!(s.issue(&id).unwrap().status, Status::Archived);
        s.set_status(&id, Status::Discarded);
        assert!(s.is_discarded(&FP));
        assert_eq!(
            s.group(p, &FP, "boom", Level::Error, 5).0,
            Grouped::Discarded
        );
        assert_eq!(s.issue(&id).unwrap().event_count, 4);
        assert!(s.has_discarded());
        s.set_status(&id, Status::Unresolved);
        assert!(!s.has_discarded() && !s.is_discarded(&FP));
    }

    #[test]
    fn restored_discarded_issues_are_known_as_discarded() {
        let (mut source, p) = state();
        let id = source.group(p, &FP, "boom", Level::Error, 1).1.id;
        source.set_status(&id, Status::Discarded);
        let (mut restored, _) = state();
        restored.restore(source.issue(&id).unwrap().clone());
        assert!(restored.has_discarded() && restored.is_discarded(&FP));
        assert_eq!(restored.unresolved_count(), 0);
    }

    #[test]
    fn an_issue_holds_104_bytes_besides_its_title() {
        // The figure README and PERF.md give per issue starts from this.
        assert_eq!(std::mem::size_of::<Issue>(), 104);
        assert_eq!(std::mem::size_of::<(Uuid, Issue)>(), 120);
        assert_eq!(std::mem::size_of::<(FingerprintHash, Uuid)>(), 32);
    }

    #[test]
    fn the_first_fingerprint_past_the_limit_is_found() {
        let (mut s, p) = state();
        s.group(p, &[1; 16], "t", Level::Error, 1);
        s.group(p, &[2; 16], "t", Level::Error, 1);
        let request = [[1; 16], [3; 16], [3; 16], [2; 16], [4; 16], [5; 16]];
        let at = |limit| s.first_past_limit(request.iter().enumerate(), limit);
        assert_eq!(at(2), Some(1));
        assert_eq!(at(3), Some(4));
        assert_eq!(at(4), Some(5));
        assert_eq!(at(5), None);
        assert_eq!(s.issue_count(), 2);
    }

    #[test]
    fn rate_window_resets_each_minute() {
        let (mut s, _) = state();
        assert_eq!(s.take_rate(2, 2, 60_000_000), Ok(()));
        assert_eq!(s.take_rate(2, 1, 61_000_000), Err(59));
        assert_eq!(s.take_rate(2, 1, 120_000_000), Ok(()));
        assert_eq!(s.take_rate(0, 1_000, 120_000_000), Ok(()));
        s.give_back_rate(2, 1, 120_000_000);
        assert_eq!(s.take_rate(2, 2, 121_000_000), Ok(()));
        s.give_back_rate(2, 2, 121_000_000);
        assert_eq!(s.take_rate(2, 2, 122_000_000), Ok(()));
    }

    #[test]
    fn listing_pages_newest_first() {
        let (mut s, p) = state();
        for n in 0..5 {
            s.group(p, &[n as u8; 16], "t", Level::Error, n);
        }
        let (page, more) = s.list(None, None, 2, None);
        assert!(more);
        assert_eq!(
            page.iter().map(|i| i.last_seen_us).collect::<Vec<_>>(),
            vec![4, 3]
        );
        let cursor = Cursor {
            last_seen_us: page[1].last_seen_us,
            id: page[1].id,
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        let (page, more) = s.list(None, None, 10, Some(cursor));
        assert!(!more);
        assert_eq!(
            page.iter().map(|i| i.last_seen_us).collect::<Vec<_>>(),
            vec![2, 1, 0]
        );
        assert_eq!(Cursor::decode("garbage"), None);
    }

    #[test]
    fn recent_event_ids_expire_after_the_window_and_stay_bounded() {
        let mut recent = RecentEventIds::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        recent.insert(a, 0);
        recent.insert(b, 1_000_000);
        assert!(recent.contains(&a, RECENT_EVENT_IDS_TTL_US - 1));
        // `a` was seen five minutes ago: forgotten; `b` a second later: still known.
        assert!(!recent.contains(&a, RECENT_EVENT_IDS_TTL_US));
        assert!(recent.contains(&b, RECENT_EVENT_IDS_TTL_US));
        assert_eq!(recent.len(), 1);
        for n in 0..(RECENT_EVENT_IDS_MAX as u128 + 10) {
            recent.insert(Uuid::from_u128(1000 + n), 2_000_000);
        }
        assert_eq!(recent.len(), RECENT_EVENT_IDS_MAX);
        assert!(!recent.contains(&b, 2_000_000), "the oldest goes first");
        assert!(recent.contains(&Uuid::from_u128(1000 + 10), 2_000_000));
        assert!(!recent.contains(&Uuid::from_u128(1000 + 9), 2_000_000));
        assert!(!recent.contains(&Uuid::from_u128(1000), 2_000_000 + RECENT_EVENT_IDS_TTL_US));
        assert!(recent.is_empty());
    }

    #[test]
    fn a_forgotten_event_id_is_taken_again() {
        let mut recent = RecentEventIds::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        recent.insert(a, 0);
        recent.insert(b, 0);
        recent.forget(&a);
        recent.forget(&Uuid::from_u128(3));
        assert!(!recent.contains(&a, 1));
        assert!(recent.contains(&b, 1));
        recent.insert(a, 2);
        assert_eq!(recent.len(), 2);
        assert!(recent.contains(&a, 3));
    }
}
