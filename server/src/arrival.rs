//! When a datagram reached this host: the kernel's receive timestamps.
//!
//! A clock-sync request's `t1` is when the server received it. Stamped when the session's
//! task gets to it, the request's wait inside the server (the socket's receive queue, the QUIC
//! endpoint, the runtime's run queue) counts as if it had been spent on the network on the
//! way in. Idle, that wait is tens of microseconds, about what the reply waits on its way out.
//! Under load it grows into milliseconds, all of it on the way in: every sample's offset is
//! off by half of it and its round trip grows by all of it. The clients' estimators then see
//! a slow, noisy path, none of them settles, and an unsettled client asks several times as
//! often as a settled one, which keeps the server loaded: 15,000 sessions on this machine
//! never settled (issue 15, eleventh round); with this, they settle at 45 % of a core.
//!
//! Linux stamps each datagram as it arrives once a socket has asked (`SIOCGSTAMPNS`), and
//! reports the stamp of the last datagram read from the socket. The server's QUIC driver
//! (`quic`) alone reads the WebTransport socket, in arrival order and in batches: after each
//! batch it asks when the batch's last datagram arrived (`Arrivals::last_read`), and each
//! connection with a packet in the batch keeps that instant. Every packet of the batch
//! arrived no later, and none was handled earlier. `t1` moves a request's `t1` back to that
//! instant plus `HAND_OFF`, never before the true arrival: by all of a queue's wait but the
//! batch's.
//!
//! The kernel turns stamping on for the host a moment after the socket first asks; the few
//! datagrams before read as arriving when they were asked about, as before.
//!
//! [`stamp_arrivals`] and [`since_last_read`] are public for the benchmark's load generator,
//! which dates its clients' sync replies the same way.
//!
//! Elsewhere (or if the socket cannot be asked) `t1` stays when the session's task got the
//! datagram, as it does for WebSocket sessions, whose bytes wait in TCP's order.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use downbeat_protocol::ServerNanos;

use crate::clock::ServerClock;

/// The wait between arriving and being handled that a request is left with, counted as path
/// as before: about what an idle server takes to hand a datagram from the socket to the
/// session's task (tens of microseconds on loopback here), which the reply takes on its way
/// out too, where no stamp can see it. Moving `t1` back by all of the wait would leave that
/// half: on loopback the estimate went from 10 µs ahead of the truth to 20 µs behind. Beyond
/// it the request waited in a queue, which replies do not.
const HAND_OFF: Duration = Duration::from_micros(100);

/// A wait beyond this is taken for a step of the wall clock, in which the kernel's stamps are
/// taken, between a stamp and its reading: no receive queue holds a datagram this long.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Asks the kernel to stamp each datagram `socket` receives from now on (Linux; elsewhere an
/// `Unsupported` error). The kernel turns stamping on for the host a moment later, from a work
/// queue.
pub fn stamp_arrivals(socket: impl AsFd) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // The first question turns the stamps on; until a datagram arrives there is none.
        match linux::last_read_stamp(socket.as_fd()) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => Ok(()),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// How long ago the last datagram read from `socket` reached this host, by the kernel's
/// stamp ([`stamp_arrivals`]). `None`: no stamp (not asked, or not Linux), or one more than
/// `MAX_WAIT` (5 s) old or in the future (the wall clock stepped between). A datagram read before
/// stamping came on reads as arriving now.
pub fn since_last_read(socket: impl AsFd) -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let stamp = linux::last_read_stamp(socket.as_fd()).ok()?;
        let wall = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
        linux::since(stamp, wall).filter(|wait| *wait <= MAX_WAIT)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}

/// Whether the WebTransport socket stamps what it receives; if it does, its reader asks it
/// when the last datagram read arrived.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Arrivals {
    stamped: bool,
}

impl Arrivals {
    /// Asks `socket` to stamp what it receives from now on.
    pub(crate) fn of(socket: impl AsFd) -> Self {
        match stamp_arrivals(socket) {
            Ok(()) => Self { stamped: true },
            Err(e) => {
                tracing::warn!(error = %e, "clock-sync requests are dated when handled, not on arrival");
                Self::none()
            }
        }
    }

    /// Stamps nothing.
    pub(crate) fn none() -> Self {
        Self { stamped: false }
    }

    /// When the last datagram read from `socket` (the one given to [`Arrivals::of`]) reached
    /// this host, if it was stamped: no later than `now`, the instant it is asked at.
    pub(crate) fn last_read(self, socket: impl AsFd, now: Instant) -> Option<Instant> {
        if !self.stamped {
            return None;
        }
        now.checked_sub(since_last_read(socket)?)
    }
}

/// The `t1` of a clock-sync request handed over at `handled` (read from `clock`) that reached
/// this host no later than `arrived`: that instant plus [`HAND_OFF`] if it is earlier, else
/// `handled` (also without a stamp).
pub(crate) fn t1(clock: ServerClock, handled: ServerNanos, arrived: Option<Instant>) -> ServerNanos {
    let Some(arrived) = arrived else { return handled };
    ServerNanos(clock.since_base(tokio::time::Instant::from_std(arrived + HAND_OFF)).0.min(handled.0))
}

#[cfg(target_os = "linux")]
mod linux {
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::time::Duration;

    /// `SIOCGSTAMPNS` on 64-bit Linux (`SIOCGSTAMPNS_OLD`, which is it there): the receive
    /// timestamp of the last datagram read, as a `struct timespec` of the wall clock.
    const SIOCGSTAMPNS: u64 = 0x8907;

    /// When the last datagram read from `socket` arrived, by the wall clock. The first call
    /// turns stamping on (`ENOENT` until a datagram arrives after it).
    #[allow(unsafe_code)]
    pub(super) fn last_read_stamp(socket: BorrowedFd<'_>) -> std::io::Result<libc::timespec> {
        let mut stamp = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: the descriptor is open while it is borrowed, and this request writes exactly
        // one `struct timespec` through the pointer, which points at one.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSTAMPNS as _, &raw mut stamp) };
        if rc == 0 { Ok(stamp) } else { Err(std::io::Error::last_os_error()) }
    }

    /// How long before `now` the `stamp` was, both of the wall clock; `None` if after.
    pub(super) fn since(stamp: libc::timespec, now: rustix::time::Timespec) -> Option<Duration> {
        let nanos = |sec: i64, nsec: i64| i128::from(sec) * 1_000_000_000 + i128::from(nsec);
        let wait = nanos(now.tv_sec, now.tv_nsec) - nanos(stamp.tv_sec, stamp.tv_nsec);
        u64::try_from(wait).ok().map(Duration::from_nanos)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    const MS: u64 = 1_000_000;

    /// The `t1` of a request handled at `handled`, the last datagram read from `receiver`.
    fn dated(receiver: &UdpSocket, arrivals: Arrivals, clock: ServerClock, handled: ServerNanos) -> ServerNanos {
        t1(clock, handled, arrivals.last_read(receiver, Instant::now()))
    }

    /// A receiving socket with its stamps on, a socket sending to it, and the server clock.
    fn pair() -> (UdpSocket, UdpSocket, Arrivals, ServerClock) {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.connect(receiver.local_addr().unwrap()).unwrap();
        let arrivals = Arrivals::of(&receiver);
        // The kernel turns stamping on for the host a moment after the first socket asks
        // (from a work queue); until then a datagram reads as arriving when it is asked about.
        // Wait until one that waited 2 ms reads as having waited.
        let clock = ServerClock::new();
        let on = (0..500).any(|_| {
            sender.send(b"warm-up").unwrap();
            std::thread::sleep(Duration::from_millis(2));
            receiver.recv(&mut [0; 16]).unwrap();
            let handled = clock.now();
            handled.0 - dated(&receiver, arrivals, clock, handled).0 >= MS
        });
        assert!(on, "the kernel never stamped a datagram");
        (receiver, sender, arrivals, clock)
    }

    #[test]
    fn a_datagram_that_waited_in_the_socket_is_dated_when_it_arrived() {
        let (receiver, sender, arrivals, clock) = pair();
        let before = clock.now();
        sender.send(b"sync").unwrap();
        let sent = clock.now();
        // The wait under test: the datagram sits in the receive queue, as under load.
        std::thread::sleep(Duration::from_millis(50));
        receiver.recv(&mut [0; 16]).unwrap();
        let handled = clock.now();
        let arrived = dated(&receiver, arrivals, clock, handled);
        assert!(arrived >= before, "dated {} ns before it was sent", before.0 - arrived.0);
        // Reading the two clocks one after the other may put it a little late, never 50 ms.
        assert!(arrived.0 <= sent.0 + MS, "dated {} µs after it was sent", (arrived.0 - sent.0) / 1_000);
        let hand_off = u64::try_from(HAND_OFF.as_nanos()).unwrap();
        assert!(handled.0 - arrived.0 >= 50 * MS - hand_off, "all but the ordinary hand-off is a queue's");
    }

    #[test]
    fn of_two_queued_datagrams_the_first_is_dated_no_earlier_than_it_arrived() {
        let (receiver, sender, arrivals, clock) = pair();
        let first = clock.now();
        sender.send(b"first").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let second = clock.now();
        sender.send(b"second").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        receiver.recv(&mut [0; 16]).unwrap();
        let handled = clock.now();
        // Read in the same batch, after it: the batch's stamp is its last datagram's.
        receiver.recv(&mut [0; 16]).unwrap();
        let arrived = dated(&receiver, arrivals, clock, handled);
        assert!(arrived >= second && arrived > first, "the stamp is the last datagram read");
        assert!(arrived < handled);
    }

    #[test]
    fn without_stamps_a_datagram_is_dated_when_it_was_handled() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        let clock = ServerClock::new();
        let handled = clock.now();
        assert_eq!(dated(&receiver, Arrivals::none(), clock, handled), handled);
        assert_eq!(t1(clock, handled, None), handled);
    }

    #[test]
    fn a_stamp_after_the_clock_reading_is_no_wait() {
        let now = rustix::time::Timespec { tv_sec: 100, tv_nsec: 5 };
        assert_eq!(linux::since(libc::timespec { tv_sec: 100, tv_nsec: 6 }, now), None);
        assert_eq!(
            linux::since(libc::timespec { tv_sec: 99, tv_nsec: 999_999_999 }, now),
            Some(Duration::from_nanos(6))
        );
    }
}
