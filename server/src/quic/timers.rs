//! The connections' timers: a wheel of millisecond slots, one armed deadline per connection.
//!
//! Every packet a connection handles or sends moves its next timeout (an acknowledgement due,
//! a loss probe, the keep-alive, the idle timeout), most often later. A binary heap of
//! deadlines with stale entries skipped as they come up held several entries per connection,
//! at 17 levels for 20,000 connections, and its pops took 6.5 % of the server (BENCHMARKS.md,
//! thirteenth round). Here a deadline costs a push onto its slot's list, and a passed slot is
//! taken whole.
//!
//! Deadlines are rounded up to the next millisecond, as the runtime's own timers round them:
//! a connection is never run before its timeout. A connection has one armed deadline. Arming a
//! later one keeps the earlier: when it comes up the driver finds the connection's timeout
//! has moved, and arms that instead, without running it. Arming an earlier one leaves the
//! later entry stale, and it is dropped when its slot comes up. Deadlines past the wheel's
//! span wait in a heap until they come within it.
//!
//! A slot is a list threaded through one pool of entries, so the wheel holds as much memory
//! as the most entries ever live at once. A vector per slot kept, in each of its 8,192 slots,
//! room for the most entries that slot ever held, and grew the server by about a kilobyte a
//! session (32.5 KiB a session against 31.4 at 5,177 settled sessions).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Slots in the wheel, one a millisecond: 8.2 s, beyond the keep-alive (3 s by default) that
/// bounds an idle connection's next timeout.
const SLOTS: usize = 8192;
const WORD: usize = u64::BITS as usize;

/// A millisecond since the wheel's origin; the first is 1.
type Tick = u64;

/// The end of a slot's list, or of the free list.
const NIL: u32 = u32::MAX;

/// A deadline in a slot's list (or a free place in the pool).
#[derive(Clone, Copy)]
struct Entry {
    tick: Tick,
    k: usize,
    next: u32,
}

/// See the module's documentation.
pub(super) struct Timers {
    origin: Instant,
    /// The last tick whose slot was taken; slots hold the ticks after it, up to [`SLOTS`] on.
    done: Tick,
    /// The first entry of each slot's list, by `tick % SLOTS`.
    slots: Vec<u32>,
    /// Every slot's entries, and the free places.
    pool: Vec<Entry>,
    /// The first free place in the pool.
    free: u32,
    /// One bit per slot with an entry, to find the next without looking at each.
    occupied: Vec<u64>,
    /// Deadlines beyond the wheel's span.
    far: BinaryHeap<Reverse<(Tick, usize)>>,
    /// Each connection's armed tick (0: none), by connection.
    armed: Vec<Tick>,
}

impl Timers {
    pub(super) fn new(origin: Instant) -> Self {
        Self {
            origin,
            done: 0,
            slots: vec![NIL; SLOTS],
            pool: Vec::new(),
            free: NIL,
            occupied: vec![0; SLOTS / WORD],
            far: BinaryHeap::new(),
            armed: Vec::new(),
        }
    }

    /// The tick at or after `at`.
    fn tick(&self, at: Instant) -> Tick {
        let since = at.saturating_duration_since(self.origin);
        let ms = since.as_millis() + u128::from(!since.subsec_nanos().is_multiple_of(1_000_000));
        Tick::try_from(ms).unwrap_or(Tick::MAX)
    }

    /// The instant `tick` begins.
    fn instant(&self, tick: Tick) -> Instant {
        self.origin + Duration::from_millis(tick)
    }

    /// Connection `k` wants to run at `at`. An earlier deadline already armed stands. Returns
    /// when the armed deadline comes up.
    pub(super) fn arm(&mut self, k: usize, at: Instant) -> Instant {
        // A deadline already passed comes up with the next slot taken.
        let tick = self.tick(at).max(self.done + 1);
        if self.armed.len() <= k {
            self.armed.resize(k + 1, 0);
        }
        let armed = self.armed[k];
        if armed != 0 && armed <= tick {
            return self.instant(armed);
        }
        self.armed[k] = tick;
        self.insert(tick, k);
        self.instant(tick)
    }

    /// Connection `k` has gone: its entries are stale.
    pub(super) fn disarm(&mut self, k: usize) {
        if let Some(armed) = self.armed.get_mut(k) {
            *armed = 0;
        }
    }

    fn insert(&mut self, tick: Tick, k: usize) {
        if tick - self.done > SLOTS as Tick {
            self.far.push(Reverse((tick, k)));
            return;
        }
        let slot = slot(tick);
        let entry = Entry { tick, k, next: self.slots[slot] };
        let place = if self.free == NIL {
            self.pool.push(entry);
            u32::try_from(self.pool.len() - 1).expect("fewer live deadlines than u32::MAX")
        } else {
            let place = self.free;
            self.free = self.pool[place as usize].next;
            self.pool[place as usize] = entry;
            place
        };
        self.slots[slot] = place;
        self.occupied[slot / WORD] |= 1 << (slot % WORD);
    }

    /// When the earliest entry comes up (perhaps a stale one), if any.
    pub(super) fn next(&self) -> Option<Instant> {
        let near = self.next_occupied().map(|slot| self.tick_of(slot));
        let far = self.far.peek().map(|&Reverse((tick, _))| tick);
        near.into_iter().chain(far).min().map(|tick| self.instant(tick))
    }

    /// The tick `slot` holds: the first after `done` that falls in it.
    fn tick_of(&self, slot: usize) -> Tick {
        self.done + 1 + ((slot + SLOTS - self::slot(self.done + 1)) % SLOTS) as Tick
    }

    /// The first occupied slot from the one after `done`, going round once.
    fn next_occupied(&self) -> Option<usize> {
        let start = slot(self.done + 1);
        let words = self.occupied.len();
        for i in 0..=words {
            let w = (start / WORD + i) % words;
            let mut bits = self.occupied[w];
            if i == 0 {
                bits &= !0 << (start % WORD);
            } else if i == words {
                bits &= !(!0 << (start % WORD));
            }
            if bits != 0 {
                return Some(w * WORD + bits.trailing_zeros() as usize);
            }
        }
        None
    }

    /// Takes every entry whose tick has begun by `now`, and adds each connection whose armed
    /// deadline it was to `due`, disarmed.
    pub(super) fn expire(&mut self, now: Instant, due: &mut Vec<usize>) {
        let begun = Tick::try_from(now.saturating_duration_since(self.origin).as_millis()).unwrap_or(Tick::MAX);
        while self.done < begun {
            let Some(slot) = self.next_occupied() else { break };
            let tick = self.tick_of(slot);
            if tick > begun {
                break;
            }
            self.occupied[slot / WORD] &= !(1 << (slot % WORD));
            let mut place = std::mem::replace(&mut self.slots[slot], NIL);
            while place != NIL {
                let entry = self.pool[place as usize];
                self.fire(entry.tick, entry.k, due);
                self.pool[place as usize].next = self.free;
                self.free = place;
                place = entry.next;
            }
            self.done = tick;
        }
        self.done = self.done.max(begun);
        // Far deadlines now due, then those now within the span.
        while let Some(&Reverse((tick, k))) = self.far.peek() {
            if tick <= self.done {
                self.far.pop();
                self.fire(tick, k, due);
            } else if tick - self.done <= SLOTS as Tick {
                self.far.pop();
                self.insert(tick, k);
            } else {
                break;
            }
        }
    }

    fn fire(&mut self, tick: Tick, k: usize, due: &mut Vec<usize>) {
        if self.armed.get(k) == Some(&tick) {
            self.armed[k] = 0;
            due.push(k);
        }
    }
}

fn slot(tick: Tick) -> usize {
    (tick % SLOTS as Tick) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1000.0)
    }

    fn expired(timers: &mut Timers, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        timers.expire(now, &mut due);
        due.sort_unstable();
        due
    }

    #[test]
    fn a_deadline_comes_up_at_the_next_millisecond_never_before() {
        let t0 = Instant::now();
        let mut timers = Timers::new(t0);
        assert_eq!(timers.next(), None);
        timers.arm(7, t0 + ms(2.5));
        assert_eq!(timers.next(), Some(t0 + ms(3.0)));
        assert_eq!(expired(&mut timers, t0 + ms(2.9)), Vec::<usize>::new());
        assert_eq!(expired(&mut timers, t0 + ms(3.0)), vec![7]);
        assert_eq!(timers.next(), None);
        assert_eq!(expired(&mut timers, t0 + ms(100.0)), Vec::<usize>::new());
    }

    #[test]
    fn a_later_deadline_keeps_the_earlier_and_an_earlier_one_replaces_it() {
        let t0 = Instant::now();
        let mut timers = Timers::new(t0);
        assert_eq!(timers.arm(1, t0 + ms(10.0)), t0 + ms(10.0));
        assert_eq!(timers.arm(1, t0 + ms(20.0)), t0 + ms(10.0));
        assert_eq!(timers.arm(2, t0 + ms(19.2)), t0 + ms(20.0));
        assert_eq!(timers.arm(2, t0 + ms(5.0)), t0 + ms(5.0));
        assert_eq!(timers.next(), Some(t0 + ms(5.0)));
        assert_eq!(expired(&mut timers, t0 + ms(5.0)), vec![2]);
        // 2's entry at 20 ms is stale: it comes up, and nothing is due.
        assert_eq!(expired(&mut timers, t0 + ms(10.0)), vec![1]);
        assert_eq!(timers.next(), Some(t0 + ms(20.0)));
        assert_eq!(expired(&mut timers, t0 + ms(30.0)), Vec::<usize>::new());
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn a_passed_deadline_comes_up_at_once_and_a_gone_connection_never() {
        let t0 = Instant::now();
        let mut timers = Timers::new(t0);
        assert_eq!(expired(&mut timers, t0 + ms(50.0)), Vec::<usize>::new());
        timers.arm(3, t0 + ms(10.0));
        timers.arm(4, t0 + ms(60.0));
        timers.disarm(4);
        assert_eq!(timers.next(), Some(t0 + ms(51.0)));
        assert_eq!(expired(&mut timers, t0 + ms(51.0)), vec![3]);
        assert_eq!(expired(&mut timers, t0 + ms(70.0)), Vec::<usize>::new());
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn a_deadline_past_the_wheel_waits_and_comes_up_on_time() {
        let t0 = Instant::now();
        let mut timers = Timers::new(t0);
        timers.arm(5, t0 + ms(20_000.0));
        timers.arm(6, t0 + ms(9_000.0));
        assert_eq!(timers.next(), Some(t0 + ms(9_000.0)));
        assert_eq!(expired(&mut timers, t0 + ms(8_999.0)), Vec::<usize>::new());
        assert_eq!(expired(&mut timers, t0 + ms(9_000.0)), vec![6]);
        assert_eq!(timers.next(), Some(t0 + ms(20_000.0)));
        assert_eq!(expired(&mut timers, t0 + ms(19_999.5)), Vec::<usize>::new());
        assert_eq!(expired(&mut timers, t0 + ms(25_000.0)), vec![5]);
    }

    /// Many connections arming over a minute, round the wheel several times, against the
    /// plain rule: each armed deadline comes up at the first look at or after its millisecond.
    #[test]
    fn many_deadlines_round_the_wheel_come_up_as_the_rule_says() {
        let t0 = Instant::now();
        let mut timers = Timers::new(t0);
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // Each connection's armed tick in the model (0: none).
        let mut model = vec![0u64; 500];
        let mut now_us = 0u64;
        let mut fired = 0;
        while now_us < 60_000_000 {
            for _ in 0..random(20) {
                let k = random(model.len() as u64) as usize;
                let at_us = now_us + random(12_000_000);
                timers.arm(k, t0 + Duration::from_micros(at_us));
                let tick = at_us.div_ceil(1000).max(now_us / 1000 + 1);
                if model[k] == 0 || tick < model[k] {
                    model[k] = tick;
                }
            }
            let next = timers.next().map(|at| at.duration_since(t0).as_micros() as u64);
            let earliest = model.iter().copied().filter(|&t| t != 0).min();
            if let Some(tick) = earliest {
                // Stale entries may come up first, never after the earliest armed one.
                assert!(next.is_some_and(|n| n <= tick * 1000), "next {next:?} after {tick} ms");
            }
            now_us += random(30_000);
            let due = expired(&mut timers, t0 + Duration::from_micros(now_us));
            let mut want: Vec<usize> =
                (0..model.len()).filter(|&k| model[k] != 0 && model[k] * 1000 <= now_us).collect();
            want.sort_unstable();
            for &k in &want {
                model[k] = 0;
            }
            fired += want.len();
            assert_eq!(due, want, "at {now_us} µs");
        }
        assert!(fired > 1000, "{fired} deadlines came up");
    }
}
