//! A project's stream as its owner keeps it: the epoch, the offsets, and the history of the
//! last messages sent, from which a reconnecting client resumes (PROTOCOL.md section 9).
//!
//! The history holds the very `Published` messages that were fanned out: handles to the same
//! reference-counted frames, never copies. It is a contiguous run of offsets ending at the last
//! one produced (or empty), bounded by count, bytes and age.
//!
//! Frames cost time to build, so the owner builds them only while someone could want them:
//! while the project has subscribers (here, or on another node that mirrors the stream), and
//! for the history's age bound after the last one left (a client that left longer ago could
//! not recover anyway: what followed its leaving has expired). Meanwhile offsets still advance, and the history is emptied, so a resume across
//! that stretch is told it did not recover.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Published, Since};

/// The history's bounds (`--stream-history`, `--stream-history-bytes`, `--stream-history-ttl`).
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    /// Messages kept per project; 0 keeps none.
    pub messages_max: usize,
    /// Bytes of frames kept per project.
    pub bytes_max: usize,
    /// How long a message is kept.
    pub ttl_ms: u64,
}

struct Kept {
    message: Published,
    at_ms: u64,
}

/// What a resume found: whether the client's place is still covered, and if so the kept
/// messages after it (handles to the shared frames, not yet filtered for the client).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Resumption {
    pub recovered: bool,
    pub epoch: Arc<str>,
    /// The last offset produced when the resume was served: live delivery goes on after it.
    pub last_offset: u64,
    pub replay: Vec<Published>,
}

/// One project's stream state on its owner shard.
pub struct ProjectStream {
    epoch: Arc<str>,
    last_offset: u64,
    kept: VecDeque<Kept>,
    kept_bytes: usize,
    /// When the last subscriber left (shard clock, ms); None while subscribers are there or
    /// when none ever was.
    left_at_ms: Option<u64>,
    watched: bool,
    /// One of several nodes: until when another node is known to mirror the stream (0: never).
    mirrored_until_ms: u64,
}

impl Default for ProjectStream {
    fn default() -> Self {
        ProjectStream::new()
    }
}

impl ProjectStream {
    /// A stream starting now, under a new epoch: offsets restart from 1.
    pub fn new() -> ProjectStream {
        ProjectStream {
            epoch: Arc::from(format!("{:016x}", rand::random::<u64>())),
            last_offset: 0,
            kept: VecDeque::new(),
            kept_bytes: 0,
            left_at_ms: None,
            watched: false,
            mirrored_until_ms: 0,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn epoch_shared(&self) -> Arc<str> {
        self.epoch.clone()
    }

    /// Drops the history (the project left this node).
    pub fn forget(&mut self) {
        self.kept.clear();
        self.kept_bytes = 0;
    }

    /// The last offset produced (0 before the first message).
    pub fn last_offset(&self) -> u64 {
        self.last_offset
    }

    /// Bytes of frames the history holds.
    pub fn kept_bytes(&self) -> usize {
        self.kept_bytes
    }

    /// The offset of the next message.
    pub fn next_offset(&mut self) -> u64 {
        self.last_offset += 1;
        self.last_offset
    }

    /// Whether subscribers are there: while they are, and for the history's age bound after
    /// the last one left, messages are built and kept.
    pub fn set_watched(&mut self, watched: bool, now_ms: u64) {
        if self.watched && !watched {
            self.left_at_ms = Some(now_ms);
        }
        if watched {
            self.left_at_ms = None;
        }
        self.watched = watched;
    }

    /// Another node mirrors the stream until `until_ms` (its interest's lease).
    pub fn set_mirrored_until(&mut self, until_ms: u64) {
        self.mirrored_until_ms = until_ms;
    }

    /// Whether another node mirrors the stream: then its messages are published for it.
    pub fn is_mirrored(&self, now_ms: u64) -> bool {
        now_ms < self.mirrored_until_ms
    }

    /// Whether messages are to be built now (see the module docs).
    pub fn builds(&self, now_ms: u64, limits: &HistoryLimits) -> bool {
        if self.watched || self.is_mirrored(now_ms) {
            return true;
        }
        // Unwatched since the later of the last subscriber leaving and the last lease ending.
        let mirror_left = (self.mirrored_until_ms > 0).then_some(self.mirrored_until_ms);
        let left = self.left_at_ms.max(mirror_left);
        limits.messages_max > 0
            && left.is_some_and(|left| now_ms.saturating_sub(left) < limits.ttl_ms)
    }

    /// `messages` were produced without being built: their offsets are taken, and the history
    /// no longer joins up with the present, so it is emptied.
    pub fn skip(&mut self, messages: u64) {
        self.last_offset += messages;
        self.kept.clear();
        self.kept_bytes = 0;
    }

    /// Keeps the messages just published (in offset order), then applies the bounds.
    pub fn keep(&mut self, messages: &[Published], now_ms: u64, limits: &HistoryLimits) {
        if limits.messages_max == 0 {
            return;
        }
        for message in messages {
            debug_assert!(self
                .kept
                .back()
                .is_none_or(|last| last.message.offset + 1 == message.offset));
            self.kept_bytes += message.frame.len();
            self.kept.push_back(Kept {
                message: message.clone(),
                at_ms: now_ms,
            });
        }
        self.expire(now_ms, limits);
    }

    /// Forgets the oldest messages past any bound.
    pub fn expire(&mut self, now_ms: u64, limits: &HistoryLimits) {
        while let Some(oldest) = self.kept.front() {
            let over = self.kept.len() > limits.messages_max
                || self.kept_bytes > limits.bytes_max
                || now_ms.saturating_sub(oldest.at_ms) >= limits.ttl_ms;
            if !over {
                break;
            }
            self.kept_bytes -= oldest.message.frame.len();
            self.kept.pop_front();
        }
        if self.kept.is_empty() && self.kept.capacity() > 0 {
            self.kept = VecDeque::new();
        }
    }

    /// Serves a resume from `since`: recovered when the epoch is this one and every message
    /// after `since.offset` is still kept (or there is none).
    pub fn resume(&mut self, since: &Since, now_ms: u64, limits: &HistoryLimits) -> Resumption {
        self.expire(now_ms, limits);
        let last = self.last_offset;
        let first_kept = self.kept.front().map(|k| k.message.offset);
        let recovered = *since.epoch == *self.epoch
            && since.offset <= last
            && (since.offset == last || first_kept.is_some_and(|first| first <= since.offset + 1));
        let replay = match first_kept {
            Some(first) if recovered => {
                let skip = (since.offset + 1).saturating_sub(first) as usize;
                self.kept
                    .iter()
                    .skip(skip)
                    .map(|kept| kept.message.clone())
                    .collect()
            }
            _ => Vec::new(),
        };
        debug_assert!(replay.iter().all(|m| m.offset > since.offset));
        Resumption {
            recovered,
            epoch: self.epoch.clone(),
            last_offset: last,
            replay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::issue_count_message;
    use uuid::Uuid;

    const LIMITS: HistoryLimits = HistoryLimits {
        messages_max: 4,
        bytes_max: 1 << 20,
        ttl_ms: 1_000,
    };

    fn produce(stream: &mut ProjectStream, count: usize, now_ms: u64, limits: &HistoryLimits) {
        let messages: Vec<Published> = (0..count)
            .map(|_| issue_count_message(stream.next_offset(), Uuid::nil(), 1))
            .collect();
        stream.keep(&messages, now_ms, limits);
    }

    fn since(stream: &ProjectStream, offset: u64) -> Since {
        Since {
            epoch: stream.epoch().to_owned(),
            offset,
        }
    }

    fn offsets(resumption: &Resumption) -> Vec<u64> {
        resumption.replay.iter().map(|m| m.offset).collect()
    }

    #[test]
    fn resumes_within_the_history_and_not_before_it() {
        let mut stream = ProjectStream::new();
        produce(&mut stream, 6, 0, &LIMITS);
        assert_eq!(stream.last_offset(), 6);
        let from_2 = stream.resume(&since(&stream, 2), 0, &LIMITS);
        assert!(from_2.recovered);
        assert_eq!(offsets(&from_2), [3, 4, 5, 6]);
        let from_1 = stream.resume(&since(&stream, 1), 0, &LIMITS);
        assert!(!from_1.recovered, "offset 2 is no longer kept");
        assert!(from_1.replay.is_empty());
        let current = stream.resume(&since(&stream, 6), 0, &LIMITS);
        assert!(current.recovered && current.replay.is_empty());
        assert!(!stream.resume(&since(&stream, 7), 0, &LIMITS).recovered);
        let other_epoch = Since {
            epoch: "elsewhere".into(),
            offset: 5,
        };
        let moved = stream.resume(&other_epoch, 0, &LIMITS);
        assert!(!moved.recovered);
        assert_eq!(&*moved.epoch, stream.epoch());
        assert_eq!(moved.last_offset, 6);
        assert_ne!(ProjectStream::new().epoch(), stream.epoch());
    }

    #[test]
    fn bounded_by_bytes_and_age() {
        let mut stream = ProjectStream::new();
        let frame_bytes = issue_count_message(1, Uuid::nil(), 1).frame.len();
        let limits = HistoryLimits {
            bytes_max: frame_bytes * 2,
            ..LIMITS
        };
        produce(&mut stream, 3, 0, &limits);
        assert_eq!(stream.kept_bytes(), frame_bytes * 2);
        assert_eq!(
            offsets(&stream.resume(&since(&stream, 1), 0, &limits)),
            [2, 3]
        );
        produce(&mut stream, 1, 500, &limits);
        assert_eq!(
            offsets(&stream.resume(&since(&stream, 2), 999, &limits)),
            [3, 4]
        );
        // Offset 3 was kept at 0 ms and expires at 1,000.
        assert!(!stream.resume(&since(&stream, 2), 1_000, &limits).recovered);
        assert_eq!(
            offsets(&stream.resume(&since(&stream, 3), 1_000, &limits)),
            [4]
        );
        stream.expire(1_500, &limits);
        assert_eq!(stream.kept_bytes(), 0);
        assert!(stream.resume(&since(&stream, 4), 1_500, &limits).recovered);
    }

    #[test]
    fn built_while_watched_and_for_the_age_bound_after() {
        let mut stream = ProjectStream::new();
        assert!(!stream.builds(0, &LIMITS), "never watched");
        stream.set_watched(true, 0);
        assert!(stream.builds(5_000, &LIMITS));
        stream.set_watched(false, 5_000);
        assert!(stream.builds(5_999, &LIMITS));
        assert!(!stream.builds(6_000, &LIMITS));
        let none = HistoryLimits {
            messages_max: 0,
            ..LIMITS
        };
        assert!(
            !stream.builds(5_001, &none),
            "no history: only while watched"
        );
        produce(&mut stream, 2, 5_500, &LIMITS);
        stream.skip(3);
        assert_eq!(stream.last_offset(), 5);
        assert_eq!(stream.kept_bytes(), 0);
        assert!(!stream.resume(&since(&stream, 2), 5_500, &LIMITS).recovered);
        assert!(stream.resume(&since(&stream, 5), 5_500, &LIMITS).recovered);
    }

    #[test]
    fn built_while_mirrored_and_for_the_age_bound_after_the_lease() {
        let mut stream = ProjectStream::new();
        stream.set_mirrored_until(3_000);
        assert!(stream.is_mirrored(2_999) && stream.builds(2_999, &LIMITS));
        assert!(!stream.is_mirrored(3_000));
        assert!(
            stream.builds(3_999, &LIMITS),
            "within the age bound after the lease"
        );
        assert!(!stream.builds(4_000, &LIMITS));
        stream.set_watched(true, 3_500);
        stream.set_watched(false, 3_600);
        assert!(
            stream.builds(4_599, &LIMITS),
            "the later of leaving and the lease"
        );
        assert!(!stream.builds(4_600, &LIMITS));
    }
}
