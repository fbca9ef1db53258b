//! The shard's one clock: a timer wheel ticking every `TICK_MS`, for connection deadlines,
//! pings, close grace, the drain tick and the sleeps of tasks.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::wheel::{TimerKey, TimerWheel};
use super::{ConnEntry, Deadline, Shard};
use crate::conn::registry::ConnId;
use crate::conn::ring::Kind;
use crate::metrics::CloseReason;

/// Resolution of the shard's timer wheel; every timeout and the drain tick round up to it. Fine
/// enough for the shortest drain interval (`DRAIN_INTERVAL_MS_MIN`); an idle shard wakes 100
/// times a second for it, which costs next to nothing.
pub const TICK_MS: u64 = 10;
const _: () = assert!(TICK_MS == crate::config::DRAIN_INTERVAL_MS_MIN);
/// Wheel slots: one revolution covers 2^12 x 10 ms = 41 s, longer timers take extra rounds.
const WHEEL_SLOTS: usize = 4096;
/// How long a client has to answer our close frame before the socket is shut anyway.
pub const CLOSE_GRACE_MS: u64 = 2000;
/// A server ping frame with an empty payload.
const PING_FRAME: &[u8] = &[0x89, 0x00];

/// What a timer does when it fires.
#[derive(Debug)]
pub enum Timer {
    /// An HTTP connection's deadline may have passed (see `Shard::set_deadline`).
    Deadline(ConnId),
    /// Time to ping a WebSocket client.
    Ping(ConnId),
    /// The client did not answer the ping.
    Pong(ConnId),
    /// Our close frame went out and the client has not closed its side in time.
    CloseGrace(ConnId),
    /// The periodic drain of waiting stream messages.
    Drain,
    /// A task's `Shard::sleep` is over.
    Wake(oneshot::Sender<()>),
}

pub(super) fn new_wheel() -> TimerWheel<Timer> {
    TimerWheel::new(WHEEL_SLOTS)
}

impl Shard {
    pub fn now_tick(&self) -> u64 {
        self.wheel.borrow().now_tick()
    }

    /// The shard clock in milliseconds (the wheel's tick, so in steps of `TICK_MS`).
    pub fn now_ms(&self) -> u64 {
        self.now_tick() * TICK_MS
    }

    pub fn ticks(duration_ms: u64) -> u64 {
        duration_ms.div_ceil(TICK_MS).max(1)
    }

    pub fn schedule(&self, after_ms: u64, timer: Timer) -> TimerKey {
        self.schedule_ticks(Self::ticks(after_ms), timer)
    }

    fn schedule_ticks(&self, after_ticks: u64, timer: Timer) -> TimerKey {
        self.wheel.borrow_mut().schedule(after_ticks, timer)
    }

    pub fn cancel(&self, key: Option<TimerKey>) {
        if let Some(key) = key {
            self.wheel.borrow_mut().cancel(key);
        }
    }

    /// A future that is ready `after_ms` from now (rounded up to the tick), timed by the wheel
    /// like every other timer of the shard. Dropping it early takes its timer off the wheel.
    pub fn sleep(&self, after_ms: u64) -> Sleep<'_> {
        Sleep::new(&self.wheel, Self::ticks(after_ms))
    }

    /// Runs `future` for at most `after_ms`: None if the time ran out first.
    pub async fn timeout<F: Future>(&self, after_ms: u64, future: F) -> Option<F::Output> {
        until(self.sleep(after_ms), future).await
    }

    /// Sets or clears an HTTP connection's deadline, `after_ms` from now. Every request moves
    /// the deadline, so the wheel is not told each time: the connection's one timer stays armed
    /// at or before the deadline and, firing early, re-arms itself for the deadline of the
    /// moment. Only a deadline earlier than the armed timer schedules a new one.
    pub fn set_deadline(&self, id: ConnId, deadline: Option<(Deadline, u64)>) {
        let now = self.now_tick();
        let mut conns = self.conns_mut();
        let Some(entry) = conns.get_mut(id) else {
            return;
        };
        entry.deadline = deadline.map(|(what, after_ms)| (what, now + Self::ticks(after_ms)));
        let Some((_, at)) = entry.deadline else {
            return;
        };
        if entry.timer.is_some() && entry.timer_tick <= at {
            return;
        }
        self.cancel(entry.timer.take());
        self.arm_deadline_timer(entry, id, now, at);
    }

    /// Arms the connection's timer to fire at tick `at`.
    fn arm_deadline_timer(&self, entry: &mut ConnEntry, id: ConnId, now: u64, at: u64) {
        entry.timer = Some(self.schedule_ticks(at - now, Timer::Deadline(id)));
        entry.timer_tick = at;
    }

    /// An HTTP connection's timer fired: end the connection if its deadline has passed, else
    /// wait for the deadline as it stands now.
    fn check_deadline(&self, id: ConnId) {
        let now = self.now_tick();
        let passed = {
            let mut conns = self.conns_mut();
            let Some(entry) = conns.get_mut(id) else {
                return;
            };
            entry.timer = None;
            match entry.deadline {
                None => return,
                Some((what, at)) if at <= now => what,
                Some((_, at)) => {
                    self.arm_deadline_timer(entry, id, now, at);
                    return;
                }
            }
        };
        match passed {
            Deadline::Request => self.interrupt_read(id, CloseReason::RequestTimeout),
            Deadline::Idle => self.force_close(id, CloseReason::IdleTimeout),
            // An answered connection stops discarding what its client still sends; it closes
            // for the reason it already has.
            Deadline::Linger => self.stop_reading(id),
        }
    }

    /// Starts a WebSocket's pings; the first goes out `--ping-interval-ms` from now.
    pub fn start_pings(&self, id: ConnId) {
        let ping = self.schedule(self.config.ping_interval_ms, Timer::Ping(id));
        let old = self
            .conns_mut()
            .get_mut(id)
            .map(|entry| entry.timer.replace(ping));
        match old {
            Some(old) => self.cancel(old),
            None => self.cancel(Some(ping)),
        }
    }

    /// The client answered a ping.
    pub fn pong_received(&self, id: ConnId) {
        let key = self
            .with_socket(id, |socket| socket.pong_timer.take())
            .flatten();
        self.cancel(key);
    }

    fn ping(&self, id: ConnId) {
        if !self.conns.borrow().contains(id) {
            return;
        }
        let pong_key = self.schedule(self.config.pong_timeout_ms, Timer::Pong(id));
        let next_ping = self.schedule(self.config.ping_interval_ms, Timer::Ping(id));
        let old_pong = {
            let mut conns = self.conns_mut();
            let entry = conns.get_mut(id).expect("checked above");
            entry.timer = Some(next_ping);
            entry
                .socket
                .as_mut()
                .and_then(|socket| socket.pong_timer.replace(pong_key))
        };
        self.cancel(old_pong);
        self.enqueue(id, Bytes::from_static(PING_FRAME), Kind::Control);
    }

    /// One wheel tick: fire due timers; on the drain tick, write what waits and find stalled clients.
    pub(super) fn on_tick(self: &Rc<Self>, tick: u64) {
        let mut fired = Vec::new();
        self.wheel.borrow_mut().advance(tick, &mut fired);
        for timer in fired {
            match timer {
                Timer::Deadline(id) => self.check_deadline(id),
                Timer::Ping(id) => self.ping(id),
                Timer::Pong(id) => self.force_close(id, CloseReason::PongTimeout),
                Timer::CloseGrace(id) => self.force_close(id, CloseReason::Normal),
                Timer::Drain => self.drain_tick(),
                Timer::Wake(wake) => {
                    let _ = wake.send(());
                }
            }
        }
    }
}

/// See [`Shard::sleep`].
pub struct Sleep<'a> {
    wheel: &'a RefCell<TimerWheel<Timer>>,
    key: TimerKey,
    woken: oneshot::Receiver<()>,
}

impl<'a> Sleep<'a> {
    fn new(wheel: &'a RefCell<TimerWheel<Timer>>, after_ticks: u64) -> Self {
        let (wake, woken) = oneshot::channel();
        let key = wheel.borrow_mut().schedule(after_ticks, Timer::Wake(wake));
        Sleep { wheel, key, woken }
    }
}

impl Future for Sleep<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // An error means the wheel dropped the timer, which only happens as the shard ends.
        Pin::new(&mut self.woken).poll(cx).map(|_| ())
    }
}

impl Drop for Sleep<'_> {
    fn drop(&mut self) {
        // A no-op once the timer fired (keys are generation-checked).
        self.wheel.borrow_mut().cancel(self.key);
    }
}

/// `future`'s output, or None if `sleep` ends first.
async fn until<F: Future>(mut sleep: Sleep<'_>, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        Pin::new(&mut sleep).poll(cx).map(|()| None)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DRAIN_INTERVAL_MS_MAX, DRAIN_INTERVAL_MS_MIN};
    use std::task::Waker;

    /// Moves the wheel to `tick` and ends the sleeps due, as `on_tick` does.
    fn advance(wheel: &RefCell<TimerWheel<Timer>>, tick: u64) {
        let mut fired = Vec::new();
        wheel.borrow_mut().advance(tick, &mut fired);
        for timer in fired {
            if let Timer::Wake(wake) = timer {
                let _ = wake.send(());
            }
        }
    }

    #[test]
    fn every_drain_interval_is_kept_to_within_a_tick() {
        // `--drain-interval-ms` has always accepted 10: the tick has to stay that fine.
        assert_eq!(DRAIN_INTERVAL_MS_MIN, 10);
        assert_eq!(
            Shard::ticks(DRAIN_INTERVAL_MS_MIN) * TICK_MS,
            DRAIN_INTERVAL_MS_MIN
        );
        for interval_ms in DRAIN_INTERVAL_MS_MIN..=DRAIN_INTERVAL_MS_MAX {
            let period_ms = Shard::ticks(interval_ms) * TICK_MS;
            assert!(
                (interval_ms..interval_ms + TICK_MS).contains(&period_ms),
                "a {interval_ms} ms interval drains every {period_ms} ms"
            );
        }
    }

    #[test]
    fn the_shortest_drain_interval_drains_at_that_rate() {
        // As `drain_tick` does: each drain schedules the next one interval later.
        let mut wheel = TimerWheel::new(WHEEL_SLOTS);
        wheel.schedule(Shard::ticks(DRAIN_INTERVAL_MS_MIN), Timer::Drain);
        let mut drains = 0;
        for tick in 1..=1000 / TICK_MS {
            let mut fired = Vec::new();
            wheel.advance(tick, &mut fired);
            for timer in fired {
                assert!(matches!(timer, Timer::Drain));
                drains += 1;
                wheel.schedule(Shard::ticks(DRAIN_INTERVAL_MS_MIN), Timer::Drain);
            }
        }
        assert_eq!(drains, 1000 / DRAIN_INTERVAL_MS_MIN);
    }

    #[test]
    fn a_sleep_ends_at_its_tick_and_leaves_the_wheel_when_dropped() {
        let wheel = RefCell::new(TimerWheel::new(WHEEL_SLOTS));
        let mut cx = Context::from_waker(Waker::noop());
        let mut sleep = Sleep::new(&wheel, 3);
        advance(&wheel, 2);
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_pending());
        advance(&wheel, 3);
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_ready());
        drop(sleep);

        let abandoned = Sleep::new(&wheel, 3);
        assert_eq!(wheel.borrow().len(), 1);
        drop(abandoned);
        assert!(wheel.borrow().is_empty());
    }

    #[test]
    fn until_gives_the_output_or_none_once_the_sleep_ends() {
        let wheel = RefCell::new(TimerWheel::new(WHEEL_SLOTS));
        let mut cx = Context::from_waker(Waker::noop());
        let answered = pin!(until(Sleep::new(&wheel, 5), std::future::ready(7)));
        assert_eq!(answered.poll(&mut cx), Poll::Ready(Some(7)));
        assert!(wheel.borrow().is_empty(), "the answer cancels the timer");

        let mut unanswered = pin!(until(Sleep::new(&wheel, 5), std::future::pending::<u32>()));
        assert!(unanswered.as_mut().poll(&mut cx).is_pending());
        advance(&wheel, 4);
        assert!(unanswered.as_mut().poll(&mut cx).is_pending());
        advance(&wheel, 5);
        assert_eq!(unanswered.as_mut().poll(&mut cx), Poll::Ready(None));
    }
}
