//! Rate limits kept per caller: a token bucket for each key (a person, a network), places
//! held per client network ([`PerNetwork`]: handshakes and sessions in progress), and the
//! network a client address stands for.
//!
//! A [`Buckets`] map remembers at most a fixed number of keys. A full bucket is the same as a
//! new one, so when the map is full the full buckets are forgotten first; only callers who
//! have spent tokens recently are remembered, and forgetting never lets anyone spend more.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};

use downbeat_engine::limit::TokenBucket;

/// How fast a bucket refills: `tokens` every `secs` seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Refill {
    pub(crate) tokens: u32,
    pub(crate) secs: u64,
}

/// One token bucket per key, all with the same burst and refill. See the module docs.
#[derive(Debug)]
pub(crate) struct Buckets<K> {
    refill: Refill,
    burst: u32,
    max_keys: usize,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Hash + Eq> Buckets<K> {
    /// Buckets of `burst` tokens refilled at `refill`, for at most `max_keys` keys at once.
    pub(crate) fn new(burst: u32, refill: Refill, max_keys: usize) -> Self {
        Self { refill, burst, max_keys, buckets: HashMap::new() }
    }

    /// The bucket's clock: `now_nanos` slowed down `secs` times, so that refilling `tokens`
    /// a second on it is refilling `tokens` every `secs` seconds.
    fn clock(&self, now_nanos: u64) -> u64 {
        now_nanos / self.refill.secs.max(1)
    }

    /// Tokens `key` has at `now_nanos` (a full bucket if it has none yet).
    pub(crate) fn available(&self, key: &K, now_nanos: u64) -> u32 {
        self.buckets.get(key).map_or(self.burst, |bucket| bucket.available(self.clock(now_nanos)))
    }

    /// Takes a token from `key`'s bucket at `now_nanos`; false (and nothing taken) if it has
    /// none.
    pub(crate) fn try_take(&mut self, key: K, now_nanos: u64) -> bool {
        let now = self.clock(now_nanos);
        if self.buckets.len() >= self.max_keys && !self.buckets.contains_key(&key) {
            let burst = self.burst;
            self.buckets.retain(|_, bucket| bucket.available(now) < burst);
        }
        let Refill { tokens, .. } = self.refill;
        let burst = self.burst;
        self.buckets.entry(key).or_insert_with(|| TokenBucket::new(tokens, burst, now)).try_take(now)
    }
}

/// Places held per key (a tenant, a client network), each given back when its [`Place`]
/// drops, however its holder ends.
#[derive(Debug)]
pub(crate) struct Places<K: Hash + Eq> {
    held: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Hash + Eq> Default for Places<K> {
    fn default() -> Self {
        Self { held: Arc::default() }
    }
}

/// Another handle on the same places.
impl<K: Hash + Eq> Clone for Places<K> {
    fn clone(&self) -> Self {
        Self { held: self.held.clone() }
    }
}

/// One place taken from [`Places`].
#[derive(Debug)]
pub(crate) struct Place<K: Hash + Eq> {
    held: Arc<Mutex<HashMap<K, usize>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Places<K> {
    /// A place for `key`, unless it already holds `cap`.
    pub(crate) fn try_take(&self, key: &K, cap: usize) -> Option<Place<K>> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.get(key).copied().unwrap_or_default() >= cap {
            return None;
        }
        *held.entry(key.clone()).or_default() += 1;
        Some(Place { held: self.held.clone(), key: key.clone() })
    }

    /// Places `key` holds now.
    #[cfg(test)]
    pub(crate) fn held_by(&self, key: &K) -> usize {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(key).copied().unwrap_or_default()
    }

    /// Places held now, by key (keys holding none left out).
    pub(crate) fn snapshot(&self) -> Vec<(K, usize)> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.iter().filter(|(_, n)| **n > 0).map(|(k, n)| (k.clone(), *n)).collect()
    }
}

impl<K: Hash + Eq> Drop for Place<K> {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// At most `cap` places held at once per client network ([`network`]).
#[derive(Debug)]
pub(crate) struct PerNetwork {
    places: Places<IpAddr>,
    cap: usize,
}

/// One place under a [`PerNetwork`] cap.
pub(crate) type NetworkPlace = Place<IpAddr>;

impl PerNetwork {
    pub(crate) fn new(cap: usize) -> Self {
        Self { places: Places::default(), cap }
    }

    /// A place for `peer`, unless its network already holds `cap`.
    pub(crate) fn try_take(&self, peer: IpAddr) -> Option<NetworkPlace> {
        self.places.try_take(&network(Some(peer)), self.cap)
    }

    /// Places `peer`'s network holds now.
    #[cfg(test)]
    pub(crate) fn held_by(&self, peer: IpAddr) -> usize {
        self.places.held_by(&network(Some(peer)))
    }
}

/// The network a client address stands for in rate limits: IPv4 addresses (also when mapped
/// into IPv6) as they are, IPv6 addresses by their /64 (what one household or device is
/// given). Callers whose address is unknown count as one network.
pub(crate) fn network(peer: Option<IpAddr>) -> IpAddr {
    let Some(ip) = peer else { return IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn networks_group_ipv6_by_64() {
        let a = "2001:db8:1:2:aaaa::1".parse().ok();
        let b = "2001:db8:1:2:bbbb::2".parse().ok();
        let c = "2001:db8:1:3::1".parse().ok();
        assert_eq!(network(a), network(b));
        assert_ne!(network(a), network(c));
        assert_eq!(network("::ffff:10.0.0.7".parse().ok()), "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(network(None), network(None));
        assert_ne!(network(None), network(a));
    }

    #[test]
    fn each_key_has_its_own_bucket_refilled_slowly() {
        let mut buckets = Buckets::new(2, Refill { tokens: 1, secs: 10 }, 100);
        let t0 = 1_000 * SECOND;
        assert!(buckets.try_take("ana", t0) && buckets.try_take("ana", t0));
        assert!(!buckets.try_take("ana", t0));
        assert_eq!((buckets.available(&"ana", t0), buckets.available(&"ben", t0)), (0, 2));
        assert!(buckets.try_take("ben", t0));
        // One token every 10 s.
        assert!(!buckets.try_take("ana", t0 + 9 * SECOND));
        assert!(buckets.try_take("ana", t0 + 10 * SECOND));
        assert!(!buckets.try_take("ana", t0 + 10 * SECOND));
    }

    #[test]
    fn a_full_map_forgets_full_buckets_only() {
        let mut buckets = Buckets::new(1, Refill { tokens: 1, secs: 1 }, 2);
        assert!(buckets.try_take(1, 0));
        assert!(buckets.try_take(2, 0));
        // Key 3 needs room: both are empty, so nothing is forgotten and 1 stays limited.
        assert!(buckets.try_take(3, 0));
        assert!(!buckets.try_take(1, 0));
        // A second later every bucket is full again and may be forgotten.
        assert!(buckets.try_take(4, SECOND));
        assert_eq!(buckets.buckets.len(), 1);
    }

    #[test]
    fn places_per_network_are_capped_and_come_back_when_dropped() {
        let caps = PerNetwork::new(2);
        let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
        let a = caps.try_take(ip("10.0.0.1")).expect("first");
        let _b = caps.try_take(ip("10.0.0.1")).expect("second");
        assert!(caps.try_take(ip("10.0.0.1")).is_none(), "a third from one address");
        assert!(caps.try_take(ip("::ffff:10.0.0.1")).is_none(), "the same address, mapped");
        let _c = caps.try_take(ip("10.0.0.2")).expect("another address");
        let _d = caps.try_take(ip("2001:db8::1")).expect("an IPv6 /64");
        let _e = caps.try_take(ip("2001:db8::2")).expect("the same /64, second");
        assert!(caps.try_take(ip("2001:db8::ffff")).is_none(), "the same /64, third");
        drop(a);
        assert_eq!(caps.held_by(ip("10.0.0.1")), 1);
        let _f = caps.try_take(ip("10.0.0.1")).expect("a place came back");
        assert_eq!(caps.held_by(ip("192.0.2.9")), 0);
        assert!(PerNetwork::new(0).try_take(ip("10.0.0.1")).is_none());
    }
}
