//! [`race`]: two futures until either finishes, each polled only when its own waker fired.
//!
//! `tokio::select!` polls every branch whenever its task wakes. A session's task wakes for
//! each datagram (a beat's acknowledgement, a clock-sync request), and polling its control
//! stream, its HTTP/3 streams and its timers each time costs a lock of the QUIC connection and
//! a waker registration apiece. With `race` the datagram reader is polled alone when a
//! datagram woke it, and the rest only when something of theirs did.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;

/// Runs `a` and `b` until either finishes, and returns its output; the other is dropped
/// unfinished. Each is polled first at once, then only after its own waker was woken.
/// Neither is favoured: when both were woken, the one polled first alternates.
pub(crate) fn race<T, A: Future<Output = T>, B: Future<Output = T>>(a: A, b: B) -> Race<A, B> {
    let (branch_a, branch_b) = (Arc::new(Branch::new()), Arc::new(Branch::new()));
    Race {
        a,
        b,
        waker_a: Waker::from(branch_a.clone()),
        waker_b: Waker::from(branch_b.clone()),
        branches: [branch_a, branch_b],
        a_first: false,
    }
}

pin_project! {
    /// The future [`race`] returns. The two futures live inline in it (an `async fn` would
    /// hold them twice: as its arguments and pinned).
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct Race<A, B> {
        #[pin]
        a: A,
        #[pin]
        b: B,
        waker_a: Waker,
        waker_b: Waker,
        branches: [Arc<Branch>; 2],
        a_first: bool,
    }
}

impl<T, A: Future<Output = T>, B: Future<Output = T>> Future for Race<A, B> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let this = self.project();
        *this.a_first = !*this.a_first;
        let [branch_a, branch_b] = &*this.branches;
        if *this.a_first {
            if let Poll::Ready(out) = branch_a.poll(this.waker_a, this.a, cx) {
                return Poll::Ready(out);
            }
            branch_b.poll(this.waker_b, this.b, cx)
        } else {
            if let Poll::Ready(out) = branch_b.poll(this.waker_b, this.b, cx) {
                return Poll::Ready(out);
            }
            branch_a.poll(this.waker_a, this.a, cx)
        }
    }
}

/// One branch's waker: marks the branch as woken, then wakes the task polling the race.
#[derive(Debug)]
struct Branch {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Branch {
    fn new() -> Self {
        Self { woken: AtomicBool::new(true), task: AtomicWaker::new() }
    }

    /// Polls `future` with this branch's `waker` if the branch was woken since its last poll.
    fn poll<T>(&self, waker: &Waker, future: Pin<&mut impl Future<Output = T>>, cx: &Context<'_>) -> Poll<T> {
        // Registered before the flag is read: a wake-up after the read finds this task's waker.
        self.task.register(cx.waker());
        if !self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        future.poll(&mut Context::from_waker(waker))
    }
}

impl Wake for Branch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::future::{pending, poll_fn};
    use std::pin::pin;

    use tokio::sync::mpsc;

    use super::*;

    /// A future that counts its polls and otherwise behaves as `inner`.
    async fn counted<T>(polls: &Cell<u32>, inner: impl Future<Output = T>) -> T {
        let mut inner = pin!(inner);
        poll_fn(|cx| {
            polls.set(polls.get() + 1);
            inner.as_mut().poll(cx)
        })
        .await
    }

    #[tokio::test]
    async fn a_branch_is_polled_only_when_its_own_waker_fired() {
        let (tx, mut rx) = mpsc::unbounded_channel::<u32>();
        let (quiet_polls, busy_polls) = (Cell::new(0), Cell::new(0));
        let quiet = counted(&quiet_polls, pending::<u32>());
        let busy = counted(&busy_polls, async {
            let mut sum = 0;
            while let Some(n) = rx.recv().await {
                sum += n;
                if sum >= 10 {
                    return sum;
                }
            }
            0
        });
        let sender = async {
            for _ in 0..10 {
                tx.send(1).unwrap();
                tokio::task::yield_now().await;
            }
            pending::<u32>().await
        };
        // The sender is a third branch so that each send wakes the race anew.
        let sum = race(race(quiet, busy), sender).await;
        assert_eq!(sum, 10);
        assert_eq!(quiet_polls.get(), 1, "the quiet branch was polled once, at the start");
        assert!(busy_polls.get() >= 2, "the busy branch was polled for its messages: {}", busy_polls.get());
    }

    #[tokio::test]
    async fn the_first_to_finish_wins_and_the_other_is_dropped() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        struct Dropped<'a>(&'a Cell<bool>);
        impl Drop for Dropped<'_> {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let dropped = Cell::new(false);
        let guard = Dropped(&dropped);
        let loser = async move {
            let _guard = guard;
            pending::<u32>().await
        };
        let winner = async { rx.await.unwrap() };
        tx.send(7).unwrap();
        assert_eq!(race(loser, winner).await, 7);
        assert!(dropped.get());
    }

    #[tokio::test]
    async fn both_branches_are_polled_at_first_and_a_later_wake_is_heard() {
        // Both branches ready at once: whichever is polled first wins, neither hangs. Then a
        // branch pending at its first poll finishes once its waker fires.
        assert_eq!(race(async { 1 }, async { 1 }).await, 1);
        let (tx, mut rx) = mpsc::unbounded_channel::<u32>();
        let task = tokio::spawn(async move { race(pending(), async move { rx.recv().await.unwrap() }).await });
        tokio::task::yield_now().await;
        tx.send(3).unwrap();
        assert_eq!(task.await.unwrap(), 3);
    }
}
