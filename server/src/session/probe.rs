//! Network checks (*probes*): sessions that need no token and may only sync their clock for a
//! while, so a check page can tell whether a school's network reaches the server on each
//! transport before anyone signs in.
//!
//! A probe holds no seat and counts toward no tenant; it is a session like any other for the
//! server's session limit. [`Probes`] caps how many run at once, per client network (an IPv4
//! address, or an IPv6 /64) and in all; a [`ProbeSlot`] holds one place and gives it back
//! when dropped, however the session ends.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use downbeat_protocol::{ClientMessage, ErrorCode, Transport};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{End, ReadError, SessionContext, read_failure};
use crate::limits::{NetworkPlace, PerNetwork};
use crate::stats::Stats;

/// The caps and the probes running now.
#[derive(Debug)]
pub(crate) struct Probes {
    per_network: PerNetwork,
    total: Arc<Semaphore>,
    /// How long a probe may sync before the server ends it with [`ErrorCode::ProbeOver`].
    pub(crate) duration: Duration,
}

/// One running probe's places under the caps; given back when dropped.
#[derive(Debug)]
pub(crate) struct ProbeSlot {
    _network: NetworkPlace,
    _total: OwnedSemaphorePermit,
    stats: Arc<Stats>,
}

impl Probes {
    /// At most `per_network` probes from one client network and `total` in all, each for at
    /// most `duration`.
    pub(crate) fn new(per_network: usize, total: usize, duration: Duration) -> Self {
        Self { per_network: PerNetwork::new(per_network), total: Arc::new(Semaphore::new(total)), duration }
    }

    /// A place for a probe from `peer` over `carrier`, unless a cap is reached (counted either
    /// way).
    pub(crate) fn admit(&self, peer: IpAddr, carrier: Transport, stats: &Arc<Stats>) -> Option<ProbeSlot> {
        let places = self.per_network.try_take(peer).zip(self.total.clone().try_acquire_owned().ok());
        let Some((network, total)) = places else {
            stats.probes_refused.get(carrier).inc();
            return None;
        };
        stats.probes_started.get(carrier).inc();
        stats.probes_active.inc();
        Some(ProbeSlot { _network: network, _total: total, stats: stats.clone() })
    }
}

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        self.stats.probes_active.dec();
    }
}

/// Why a probe that sent something other than clock sync is ended.
const ONLY_SYNC: &str = "a network check may only sync its clock";

/// A probe's control frames: none is allowed (a frame that does not decode ends it as it would
/// any session).
pub(super) fn control(ctx: &SessionContext, read: Result<ClientMessage, ReadError>) -> End {
    match read_failure(ctx, read) {
        Err(end) => end,
        Ok(_) => {
            ctx.stats.refused.inc(ErrorCode::ProbeOnly);
            End::Fatal(ErrorCode::ProbeOnly, ONLY_SYNC)
        }
    }
}

/// A probe sent a datagram that is not clock sync (notes).
pub(super) fn not_sync(ctx: &SessionContext) -> End {
    ctx.stats.refused.inc(ErrorCode::ProbeOnly);
    End::Fatal(ErrorCode::ProbeOnly, ONLY_SYNC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_network_and_in_all_and_places_come_back_when_dropped() {
        let stats = Arc::new(Stats::default());
        let probes = Probes::new(2, 3, Duration::from_secs(1));
        let admit = |ip: &str| probes.admit(ip.parse().unwrap(), Transport::WebSocket, &stats);
        let a = admit("10.0.0.1").expect("first");
        let _b = admit("10.0.0.1").expect("second from the same address");
        assert!(admit("10.0.0.1").is_none(), "a third from the same address");
        // One IPv6 /64 is one network.
        let c = admit("2001:db8::1").expect("another network");
        assert!(admit("10.0.0.2").is_none(), "over the total");
        assert_eq!(stats.probes_active.get(), 3);
        drop(c);
        let _d = admit("2001:db8::ffff").expect("a place in all came back");
        assert!(admit("2001:db8::2").is_none(), "over the total again");
        drop(a);
        let _e = admit("10.0.0.1").expect("a place of the address came back");
        assert_eq!(stats.probes_refused.get(Transport::WebSocket).get(), 3);
        assert_eq!(stats.probes_started.get(Transport::WebSocket).get(), 5);
        assert_eq!(stats.probes_active.get(), 3);
    }

    #[test]
    fn a_mapped_ipv4_address_is_the_same_network() {
        let stats = Arc::new(Stats::default());
        let probes = Probes::new(1, 10, Duration::from_secs(1));
        let _a = probes.admit("192.0.2.7".parse().unwrap(), Transport::WebTransport, &stats).unwrap();
        assert!(probes.admit("::ffff:192.0.2.7".parse().unwrap(), Transport::WebTransport, &stats).is_none());
        assert!(probes.admit("2001:db8:0:1::1".parse().unwrap(), Transport::WebTransport, &stats).is_some());
    }
}
