//! What the API's handlers share: the registry, tenants, limits, and the pages' settings.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use downbeat_engine::limit::TokenBucket;
use downbeat_protocol::ErrorCode;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::error::ApiError;
use super::extract::PeerAddr;
use crate::auth::{Principal, Tenants};
use crate::authz::{Operation, Refusal, authorize};
use crate::clock::ServerClock;
use crate::config::{Config, DemoSecret};
use crate::identity::{PublishedHashes, TlsHealth};
use crate::limits::{Buckets, Refill, network};
use crate::room::{RoomHandle, Rooms};
use crate::sel::Sel;
use crate::session::SessionContext;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Principals whose request buckets are remembered before idle ones are forgotten.
const MAX_TRACKED_PRINCIPALS: usize = 10_000;

/// Per-principal request buckets for the HTTP API.
pub(crate) type RequestLimits = Arc<Mutex<HashMap<(Arc<str>, String), TokenBucket>>>;

/// What the handlers share.
#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub(crate) rooms: Arc<Rooms>,
    pub(crate) tenants: Arc<Tenants>,
    pub(crate) hashes: Arc<PublishedHashes>,
    pub(crate) tls: Arc<TlsHealth>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) clock: ServerClock,
    pub(crate) limits: RequestLimits,
    pub(crate) sel: Sel,
    pub(crate) web: Arc<Web>,
    /// What WebSocket sessions share with WebTransport ones.
    pub(crate) sessions: Arc<SessionContext>,
    /// Ends WebSocket sessions when the server shuts down.
    pub(crate) shutdown: Shutdown,
}

impl AppState {
    /// Takes one request from the principal's bucket (its tenant's control limits).
    pub(super) fn take_request(&self, who: &Principal) -> bool {
        let Some(limits) = self.tenants.limits_of(&who.tenant) else { return false };
        let now = self.clock.now().0;
        let mut buckets = self.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED_PRINCIPALS {
            // Full buckets are the same as new ones: forgetting them changes nothing.
            buckets.retain(|_, b| b.available(now) < limits.control_burst);
        }
        buckets
            .entry((who.tenant.clone(), who.subject.clone()))
            .or_insert_with(|| TokenBucket::new(limits.controls_per_second, limits.control_burst, now))
            .try_take(now)
    }

    /// Takes a request without a (verified) token from the bucket of `peer`'s network.
    pub(super) fn take_anonymous(&self, peer: Option<IpAddr>) -> bool {
        let now = self.clock.now().0;
        self.web.anonymous.lock().unwrap_or_else(std::sync::PoisonError::into_inner).try_take(network(peer), now)
    }

    /// Counts a refusal made here and turns it into the response. (Refusals made by a room
    /// task are counted there, for HTTP and the control stream alike.)
    pub(crate) fn refused(&self, r: Refusal) -> ApiError {
        self.stats.refused.inc(r.code);
        r.into()
    }

    /// Whether `who` may do `op` (on no room), counting a refusal.
    pub(crate) fn authorize(&self, who: &Principal, op: Operation<'_>) -> Result<(), ApiError> {
        authorize(who, None, op).map_err(|r| self.refused(r))
    }

    /// The room `code` names for `who` (asking from `peer`), if `who` may do `op` there.
    pub(crate) fn room_for(
        &self,
        who: &Principal,
        peer: PeerAddr,
        code: &str,
        op: Operation<'_>,
    ) -> Result<RoomHandle, ApiError> {
        let tenant =
            self.tenants.tenant(&who.tenant).ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown school"))?;
        let room = self.rooms.lookup(tenant, who, peer.0, code).map_err(|r| self.refused(r))?;
        authorize(who, Some(room.meta()), op).map_err(|r| self.refused(r))?;
        Ok(room)
    }
}

/// Demo tokens per client network: sustained rate (per second) and burst. A whole class
/// behind one school NAT signs in at once, so the burst covers a class and its teacher.
const DEMO_TOKENS_PER_SECOND: u32 = 1;
const DEMO_TOKEN_BURST: u32 = 60;
/// Requests without a token per client network: burst and sustained rate. A class behind one
/// school NAT loading the pages at once (a dozen files each) fits in the burst.
const ANONYMOUS_BURST: u32 = 1000;
const ANONYMOUS_PER_SECOND: u32 = 100;
/// Client networks whose buckets are remembered before full ones are forgotten.
const MAX_TRACKED_NETWORKS: usize = 10_000;

/// What the browser routes need beyond the API's state.
#[derive(Debug)]
pub(crate) struct Web {
    pub(super) web_dir: PathBuf,
    pub(super) pkg_dir: PathBuf,
    pub(super) public_wt_url: Option<String>,
    pub(super) wt_port: u16,
    demo_buckets: Mutex<Buckets<IpAddr>>,
    anonymous: Mutex<Buckets<IpAddr>>,
    demo_teacher: Option<SecretDigest>,
}

/// The SHA-256 of a secret: what a presented secret is compared with, in constant time and
/// whatever its length (`Debug` shows nothing of it).
struct SecretDigest([u8; 32]);

impl SecretDigest {
    fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }
}

impl std::fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretDigest(<redacted>)")
    }
}

impl Web {
    /// `demo_teacher_secret`: what demo teachers must present (`None`: not the demo tenant).
    pub(crate) fn new(config: &Config, wt_port: u16, demo_teacher_secret: Option<&DemoSecret>) -> Self {
        Self {
            web_dir: config.web_dir.clone(),
            pkg_dir: config.pkg_dir.clone(),
            public_wt_url: config.public_wt_url.clone(),
            wt_port,
            demo_teacher: demo_teacher_secret.map(|s| SecretDigest::of(s.expose())),
            demo_buckets: Mutex::new(Buckets::new(
                DEMO_TOKEN_BURST,
                Refill { tokens: DEMO_TOKENS_PER_SECOND, secs: 1 },
                MAX_TRACKED_NETWORKS,
            )),
            anonymous: Mutex::new(Buckets::new(
                ANONYMOUS_BURST,
                Refill { tokens: ANONYMOUS_PER_SECOND, secs: 1 },
                MAX_TRACKED_NETWORKS,
            )),
        }
    }

    /// Takes one demo token from the bucket of `peer`'s network (an IPv4 address, or an IPv6
    /// /64). Requests without a known peer share one bucket.
    pub(super) fn take_demo_token(&self, peer: Option<IpAddr>, now: u64) -> bool {
        self.demo_buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).try_take(network(peer), now)
    }

    /// Whether `given` is the demo teacher secret. Both are hashed and the digests compared in
    /// constant time, so neither the time taken nor an early exit tells how much of a guess
    /// was right, or how long the secret is.
    pub(super) fn is_demo_teacher_secret(&self, given: Option<&str>) -> bool {
        match (&self.demo_teacher, given) {
            (Some(expected), Some(given)) => bool::from(SecretDigest::of(given).0.ct_eq(&expected.0)),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_tokens_are_limited_per_network() {
        let web = Web::new(&Config::default(), 4433, None);
        let one = Some("10.0.0.1".parse().unwrap());
        let other = Some("10.0.0.2".parse().unwrap());
        for _ in 0..DEMO_TOKEN_BURST {
            assert!(web.take_demo_token(one, 0));
        }
        assert!(!web.take_demo_token(one, 0));
        assert!(web.take_demo_token(other, 0));
        assert!(web.take_demo_token(one, 1_000_000_000));
    }

    #[test]
    fn only_the_demo_teacher_secret_itself_passes() {
        let secret: DemoSecret = "sixteen-chars-ok-and-more".parse().unwrap();
        let web = Web::new(&Config::default(), 4433, Some(&secret));
        assert!(web.is_demo_teacher_secret(Some("sixteen-chars-ok-and-more")));
        for wrong in [None, Some(""), Some("sixteen-chars-ok-and-mor"), Some("sixteen-chars-ok-and-more "), Some("x")] {
            assert!(!web.is_demo_teacher_secret(wrong), "{wrong:?}");
        }
        // Without a demo tenant there is no secret to match.
        assert!(!Web::new(&Config::default(), 4433, None).is_demo_teacher_secret(Some("sixteen-chars-ok-and-more")));
        assert!(!format!("{web:?}").contains("sixteen"));
    }
}
