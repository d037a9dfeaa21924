//! The tracker thread's loop: `poll` over the uffd, the interval timer, the
//! stop eventfd and the VMM's pidfd; messages read in batches and
//! dispatched; a busy-poll after each event; and, whatever ends the loop
//! (the VMM gone, a stop, an error, a panic), `release` leaves the guest as
//! if the tracker had never been there.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;

use super::{MSG_BATCH, StopReport, Tracker};
use crate::shared::TrackerState;
use crate::sys;
use crate::uffd::Event;

/// Why the loop ended.
type End = (TrackerState, String);

impl Tracker {
    pub(super) fn run(&mut self, stop: RawFd) -> StopReport {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.event_loop(stop)));
        let (state, reason) = match outcome {
            Ok(Ok(end)) => end,
            Ok(Err(e)) => (TrackerState::Failed, format!("tracker error: {e}")),
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                (TrackerState::Failed, format!("tracker panicked: {msg}"))
            }
        };
        let vmm_alive = state != TrackerState::Retired;
        self.finish_recording(true);
        let left = self.release(vmm_alive);
        let reason = if left > 0 {
            format!(
                "{reason}; {left} pages could not be put back and remain in {}",
                self.pages.path_display()
            )
        } else {
            reason
        };
        self.shared.end(state, reason.clone());
        StopReport {
            state,
            reason,
            pages_left_in_custody: left,
        }
    }

    fn event_loop(&mut self, stop: RawFd) -> io::Result<End> {
        let pollin = |fd: RawFd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            pollin(self.uffd.as_raw_fd()),
            pollin(self.timer.as_raw_fd()),
            pollin(stop),
            pollin(self.pidfd.as_ref().map_or(-1, AsRawFd::as_raw_fd)),
        ];
        // Busy-poll for `spin_ns` after each event before sleeping: faults
        // come in bursts (after every tick), and waking a halted CPU for each
        // one costs the guest far more than the spin costs us.
        let mut spin_until = 0u64;
        loop {
            let timeout = if !self.deferred.is_empty() {
                1
            } else if self.prefetching() || (self.spin_ns > 0 && sys::now_ns() < spin_until) {
                0
            } else {
                -1
            };
            match sys::poll(&mut fds, timeout) {
                Ok(0) => {}
                Ok(_) => spin_until = sys::now_ns() + self.spin_ns,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if fds[2].revents != 0 {
                return Ok((TrackerState::Stopped, "stopped by the agent".into()));
            }
            if fds[0].revents & libc::POLLIN != 0
                && let Some(end) = self.drain()?
            {
                return Ok(end);
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Ok((
                    TrackerState::Retired,
                    "the uffd reported an error or hang-up".into(),
                ));
            }
            if !self.deferred.is_empty() {
                self.retry_deferred()?;
            }
            if fds[1].revents != 0 {
                self.timer.consume();
                self.tick()?;
                self.finish_recording(false);
            }
            // Faults first: a prefetch chunk only once the queue is empty.
            if self.prefetching() {
                self.prefetch_step()?;
            }
            if fds[3].revents != 0 {
                return Ok((TrackerState::Retired, "the VMM process exited".into()));
            }
        }
    }

    /// Read and handle messages. A short batch means the queue was empty, so
    /// poll again instead of spending a read that would return EAGAIN (with
    /// one vCPU faulting at a time, that read would double the syscalls).
    fn drain(&mut self) -> io::Result<Option<End>> {
        loop {
            let n = match self.uffd.read_msgs(&mut self.msgs[..]) {
                Ok(n) => n,
                Err(e) => {
                    return Ok(Some((
                        TrackerState::Retired,
                        format!("reading the uffd failed: {e}"),
                    )));
                }
            };
            if n == 0 {
                return Ok(None);
            }
            let t0 = sys::now_ns();
            for i in 0..n {
                let ev = self.msgs[i].decode();
                if let Some(end) = self.handle(ev, t0)? {
                    return Ok(Some(end));
                }
            }
            if n < MSG_BATCH {
                return Ok(None);
            }
        }
    }

    fn handle(&mut self, ev: Event, t0: u64) -> io::Result<Option<End>> {
        match ev {
            Event::PageFault { flags, address, .. } => self.fault(address, flags, t0)?,
            Event::Remove { start, end } => {
                self.shared.counters.remove_events.fetch_add(1, Relaxed);
                // Only granules wholly inside the range were dropped.
                for g in self.map.wholly_within(start, end) {
                    self.removed[g] = true;
                }
            }
            Event::Unmap { start, end } => {
                if self.map.overlaps(start, end) {
                    return Ok(Some((
                        TrackerState::Retired,
                        format!("the VMM unmapped guest memory {start:#x}..{end:#x}"),
                    )));
                }
            }
            Event::Remap { from, to, len } => {
                return Ok(Some((
                    TrackerState::Retired,
                    format!(
                        "the VMM moved guest memory {from:#x}+{len:#x} to {to:#x}; re-register to track it"
                    ),
                )));
            }
            // We do not track the VMM's children; close the child's uffd.
            Event::Fork { fd } => sys::close_received(fd),
            Event::Unknown { .. } => {
                self.shared.counters.events_dropped.fetch_add(1, Relaxed);
            }
        }
        Ok(None)
    }
}
