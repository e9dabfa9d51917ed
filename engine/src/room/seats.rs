//! A room's seats: one per token subject, held through a lost connection for the grace
//! period, with the member everyone sees and the per-seat note policy.

use std::collections::{BTreeMap, VecDeque};

use downbeat_protocol::{ClientReport, ErrorCode, Member, ServerNanos};
use serde::{Deserialize, Serialize};

use super::output::Refused;
use crate::limit::TokenBucket;

/// New seats one person may take in a room within [`JOIN_WINDOW_NANOS`]: a reconnect to a
/// seat still held is no new seat, so only joining and leaving again and again reaches it.
pub const MAX_JOINS_PER_WINDOW: usize = 12;
/// The window [`MAX_JOINS_PER_WINDOW`] counts over: ten minutes.
pub const JOIN_WINDOW_NANOS: u64 = 600_000_000_000;

/// Refused note datagrams a member may send in a burst before the session is ended...
pub const ABUSE_BURST: u32 = 50;
/// ...and the sustained rate of refusals tolerated.
pub const ABUSE_PER_SECOND: u32 = 5;
/// At most one note error per this interval is told to a member (the rest are counted).
pub const NOTE_ERROR_INTERVAL_NANOS: u64 = 1_000_000_000;

/// One seat. Its member (id, part, mute) outlives a lost connection for the grace period.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Seat {
    /// What everyone sees; `muted` is the one place mute is kept.
    pub(crate) member: Member,
    pub(crate) subject: String,
    /// `None` while the connection is lost and the seat is held.
    pub(crate) attached: Option<Attached>,
    pub(crate) grace_until: Option<ServerNanos>,
    pub(crate) last_note_error: Option<ServerNanos>,
    /// Refused note datagrams tolerated before the session is ended.
    pub(crate) abuse: TokenBucket,
    /// Whether this member hears the SEL feed (set by each join of the subject).
    #[serde(default)]
    pub(crate) sel_feed: bool,
}

/// The session holding a seat.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct Attached {
    pub(crate) session: u64,
    /// Playout counts last reported by this session (reports are cumulative).
    pub(crate) reported: ClientReport,
}

impl Seat {
    pub(crate) fn new(now: ServerNanos, member: Member, subject: String, session: u64) -> Self {
        Self {
            member,
            subject,
            attached: Some(Attached { session, reported: ClientReport::default() }),
            grace_until: None,
            last_note_error: None,
            abuse: TokenBucket::new(ABUSE_PER_SECOND, ABUSE_BURST, now.0),
            sel_feed: false,
        }
    }

    /// Whether session `session` holds this seat now.
    pub(crate) fn held_by(&self, session: u64) -> bool {
        self.attached.is_some_and(|a| a.session == session)
    }

    pub(crate) fn is_student(&self) -> bool {
        self.member.role == downbeat_protocol::Role::Student
    }
}

/// When each person recently took a new seat, to cap join and leave churn: every new seat
/// writes participation rows and tells the whole class.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Churn {
    joins: BTreeMap<String, VecDeque<ServerNanos>>,
}

impl Churn {
    /// Refuses a new seat for `subject` at `now` with `rate_limited` if they took
    /// [`MAX_JOINS_PER_WINDOW`] within the window; [`Churn::record`] counts one once taken (a
    /// join refused for another reason, such as a full room, takes nothing). `seats` bounds
    /// what is kept: past a few times that many people, those whose joins all left the window
    /// are forgotten.
    pub(crate) fn check(&mut self, now: ServerNanos, subject: &str, seats: usize) -> Result<(), Refused> {
        let in_window = |t: &ServerNanos| t.0.saturating_add(JOIN_WINDOW_NANOS) > now.0;
        if self.joins.len() > seats.saturating_mul(4) {
            self.joins.retain(|_, times| times.back().is_some_and(in_window));
        }
        let Some(times) = self.joins.get_mut(subject) else { return Ok(()) };
        while times.front().is_some_and(|t| !in_window(t)) {
            times.pop_front();
        }
        if times.len() >= MAX_JOINS_PER_WINDOW {
            return Err(Refused::new(
                ErrorCode::RateLimited,
                "you joined and left this class too often; wait a few minutes and join again",
            ));
        }
        Ok(())
    }

    /// Counts a new seat `subject` took at `now` (after [`Churn::check`]).
    pub(crate) fn record(&mut self, now: ServerNanos, subject: &str) {
        self.joins.entry(subject.to_owned()).or_default().push_back(now);
    }

    /// Forgets `subject` (their data is being deleted).
    pub(crate) fn remove(&mut self, subject: &str) {
        self.joins.remove(subject);
    }
}
