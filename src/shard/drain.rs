//! Keeping stream sockets moving and ending the shard: the periodic drain tick that wakes
//! writers and cuts off stalled clients, and the shutdown drain.

use std::os::fd::RawFd;

use super::{Shard, Timer};
use crate::metrics::CloseReason;

impl Shard {
    /// Shutdown, first step: no new connections; WebSockets get 1001; idle HTTP connections close.
    pub(super) fn begin_drain(&self) {
        self.draining.set(true);
        let ids = self.conns.borrow().ids();
        for id in ids {
            let (is_socket, busy) = match self.conns.borrow().get(id) {
                Some(entry) => (entry.socket.is_some(), entry.busy),
                None => continue,
            };
            if is_socket {
                self.close_for_shutdown(id);
            } else if !busy {
                self.force_close(id, CloseReason::Shutdown);
            }
        }
        if self.conns.borrow().is_empty() {
            self.report_drained();
        }
    }

    pub(super) fn report_drained(&self) {
        if !self.drained_reported.replace(true) {
            let _ = self.drained.send(self.index);
        }
    }

    pub(super) fn drain_tick(&self) {
        let now = self.now_tick();
        let stall_ticks = Self::ticks(self.config.stall_timeout_ms);
        let mut stalled = Vec::new();
        for (id, entry) in self.conns_mut().iter_mut() {
            let fd = entry.fd;
            let Some(socket) = &mut entry.socket else {
                continue;
            };
            if socket.held {
                // Nothing may go out yet; it is not the client that is slow.
                continue;
            }
            // A write waits for room in the kernel's buffer, which a slow reader frees a little
            // at a time, long before the write completes: that is progress too.
            if socket.writing
                && now > socket.last_progress_tick
                && peer_took_bytes(fd, &mut socket.send_queue_seen)
            {
                socket.last_progress_tick = now;
            }
            let queued = !socket.ring.is_empty() || !socket.ahead.is_empty();
            let waiting = socket.writing || queued;
            if waiting && now.saturating_sub(socket.last_progress_tick) >= stall_ticks {
                stalled.push(id);
            } else if queued && !socket.writing {
                socket.wake.notify_one();
            }
        }
        for id in stalled {
            self.disconnect_slow(id);
        }
        self.schedule(self.config.drain_interval_ms, Timer::Drain);
    }
}

/// Whether the kernel's send queue of `fd` shrank since `seen` was taken (the peer acknowledged
/// bytes, so it reads); updates `seen`. While a write waits nothing is added to the queue, so it
/// can only shrink as the peer takes bytes.
fn peer_took_bytes(fd: RawFd, seen: &mut Option<u32>) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: ioctl on the fd of a live connection with a pointer to a live c_int.
    let ok = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } == 0;
    let now = ok.then_some(queued as u32);
    let took = matches!((*seen, now), (Some(before), Some(now)) if now < before);
    *seen = now;
    took
}
