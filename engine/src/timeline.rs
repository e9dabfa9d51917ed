//! A room's musical timeline, as exact integer math.
//!
//! The timeline is a short list of [`Segment`]s: the one in force and the changes already
//! announced. Within a running segment, beat `n` sounds at
//! `start + round((n - start_beat) * 60e9 * 1e6 / micro_bpm)` nanoseconds, computed from the
//! segment start each time in 128-bit integers. Nothing accumulates, so beat 100,000 is as
//! exact as beat 1 (a `div(60000, bpm)` millisecond timer drifts 0.54 ms per beat at 130 BPM).
//!
//! Every change takes effect at a future bar boundary at least `lead` after it is asked for,
//! so every client hears of it before it matters and switches on the same beat. Beat numbers
//! only ever increase: a tempo change keeps counting, and a restart resumes at the downbeat
//! where the room stopped, so a beat number names one instant for the life of a room.

use downbeat_protocol::{self as wire, BoundedVec, Change, ErrorCode, MicroBpm, ServerNanos};

/// Slowest tempo a room accepts.
pub const MIN_TEMPO: MicroBpm = MicroBpm::from_bpm(20);
/// Fastest tempo a room accepts.
pub const MAX_TEMPO: MicroBpm = MicroBpm::from_bpm(300);
/// Fewest beats per bar.
pub const MIN_BEATS_PER_BAR: u8 = 1;
/// Most beats per bar.
pub const MAX_BEATS_PER_BAR: u8 = 16;
/// Most bars of count-in a start may ask for.
pub const MAX_COUNT_IN_BARS: u8 = 8;
/// Most segments (in force plus announced) a timeline holds.
pub const MAX_SEGMENTS: usize = wire::MAX_SEGMENTS;

/// Nanoseconds per beat at 1 micro-BPM: 60 s * 1e9 ns * 1e6.
pub(crate) const NANOS_PER_BEAT_AT_ONE_MICRO_BPM: i128 = 60_000_000_000_000_000;

/// A change that was refused; the timeline is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimelineError {
    /// Tempo outside [`MIN_TEMPO`]..=[`MAX_TEMPO`].
    #[error("tempo {micro_bpm} micro-BPM is outside 20-300 BPM")]
    TempoOutOfRange {
        /// What was asked for.
        micro_bpm: u32,
    },
    /// Meter outside 1..=16 beats per bar.
    #[error("{beats_per_bar} beats per bar is outside 1-16")]
    MeterOutOfRange {
        /// What was asked for.
        beats_per_bar: u8,
    },
    /// Start asked while running (or with a start already announced).
    #[error("the room is already running")]
    AlreadyRunning,
    /// Stop asked while stopped (or with a stop already announced).
    #[error("the room is not running")]
    NotRunning,
    /// Count-in longer than [`MAX_COUNT_IN_BARS`].
    #[error("{bars} bars of count-in is more than 8")]
    CountInOutOfRange {
        /// What was asked for.
        bars: u8,
    },
    /// The timeline already holds [`MAX_SEGMENTS`] segments.
    #[error("too many changes are waiting to take effect")]
    TooManyPendingChanges,
    /// A received timeline was not well formed.
    #[error("malformed timeline: {0}")]
    Malformed(&'static str),
}

impl TimelineError {
    /// The stable code for the wire and the HTTP API.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::TempoOutOfRange { .. } => ErrorCode::TempoOutOfRange,
            Self::MeterOutOfRange { .. } => ErrorCode::MeterOutOfRange,
            Self::AlreadyRunning => ErrorCode::AlreadyRunning,
            Self::NotRunning => ErrorCode::NotRunning,
            Self::TooManyPendingChanges => ErrorCode::TooManyPendingChanges,
            Self::CountInOutOfRange { .. } => ErrorCode::BadRequest,
            Self::Malformed(_) => ErrorCode::MalformedFrame,
        }
    }
}

/// Checks a tempo against the room range.
pub const fn check_tempo(tempo: MicroBpm) -> Result<MicroBpm, TimelineError> {
    if tempo.0 < MIN_TEMPO.0 || tempo.0 > MAX_TEMPO.0 {
        return Err(TimelineError::TempoOutOfRange { micro_bpm: tempo.0 });
    }
    Ok(tempo)
}

/// Checks a meter against the room range.
pub const fn check_meter(beats_per_bar: u8) -> Result<u8, TimelineError> {
    if beats_per_bar < MIN_BEATS_PER_BAR || beats_per_bar > MAX_BEATS_PER_BAR {
        return Err(TimelineError::MeterOutOfRange { beats_per_bar });
    }
    Ok(beats_per_bar)
}

/// Checks a count-in length.
pub const fn check_count_in(bars: u8) -> Result<u8, TimelineError> {
    if bars > MAX_COUNT_IN_BARS {
        return Err(TimelineError::CountInOutOfRange { bars });
    }
    Ok(bars)
}

/// Converts a floating-point BPM (as typed by a person or sent as JSON) to an exact tempo,
/// rounded to the nearest micro-BPM, refusing non-finite or out-of-range values.
pub fn tempo_from_bpm_f64(bpm: f64) -> Result<MicroBpm, TimelineError> {
    if !bpm.is_finite() || !(20.0..=300.0).contains(&bpm) {
        let clamped = if bpm.is_finite() { bpm.clamp(0.0, f64::from(u32::MAX) / 1e6) } else { 0.0 };
        return Err(TimelineError::TempoOutOfRange { micro_bpm: (clamped * 1e6) as u32 });
    }
    // In range: 20e6..=300e6 fits u32 exactly.
    check_tempo(MicroBpm((bpm * 1e6).round() as u32))
}

/// One stretch of the timeline. See the module docs for the beat formula.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Segment {
    /// When the segment takes effect.
    pub start: ServerNanos,
    /// The beat sounding at `start` (a downbeat).
    pub start_beat: i64,
    /// Tempo in force.
    pub tempo: MicroBpm,
    /// Beats per bar in force.
    pub beats_per_bar: u8,
    /// Whether beats sound.
    pub running: bool,
    /// Bars of count-in at the start of this segment (see [`wire::Segment::count_in_bars`]).
    pub count_in_bars: u8,
}

fn clamp_u64(v: i128) -> u64 {
    v.clamp(0, i128::from(u64::MAX)) as u64
}

impl Segment {
    /// The instant beat `beat` sounds under this segment's tempo (also for beats outside it).
    pub fn time_of(&self, beat: i64) -> ServerNanos {
        let k = i128::from(beat) - i128::from(self.start_beat);
        let micro_bpm = i128::from(self.tempo.0.max(1));
        let scaled = k * NANOS_PER_BEAT_AT_ONE_MICRO_BPM;
        // Round half away from zero, exactly.
        let offset =
            if scaled >= 0 { (scaled + micro_bpm / 2) / micro_bpm } else { -((-scaled + micro_bpm / 2) / micro_bpm) };
        ServerNanos(clamp_u64(i128::from(self.start.0) + offset))
    }

    /// The last beat (under this segment's grid) sounding at or before `t`.
    pub fn beat_floor_at(&self, t: ServerNanos) -> i64 {
        let d = i128::from(t.0) - i128::from(self.start.0);
        let micro_bpm = i128::from(self.tempo.0.max(1));
        let mut k = (d * micro_bpm).div_euclid(NANOS_PER_BEAT_AT_ONE_MICRO_BPM);
        // `time_of` rounds, so the floor above can be one off either way: settle it exactly.
        let beat = |k: i128| (i128::from(self.start_beat) + k).clamp(i64::MIN.into(), i64::MAX.into()) as i64;
        while self.time_of(beat(k + 1)) <= t && beat(k + 1) != beat(k) {
            k += 1;
        }
        while self.time_of(beat(k)) > t && beat(k - 1) != beat(k) {
            k -= 1;
        }
        beat(k)
    }

    /// The first beat sounding at or after `t`.
    pub fn beat_ceil_at(&self, t: ServerNanos) -> i64 {
        let floor = self.beat_floor_at(t);
        if self.time_of(floor) == t { floor } else { floor.saturating_add(1) }
    }

    /// Position of `beat` in its bar, 0 for the downbeat.
    pub fn beat_in_bar(&self, beat: i64) -> u8 {
        let bpb = i64::from(self.beats_per_bar.max(1));
        // rem_euclid with a positive divisor is in 0..bpb <= 16.
        (beat.wrapping_sub(self.start_beat)).rem_euclid(bpb) as u8
    }

    /// The first downbeat at or after `beat`.
    pub fn downbeat_at_or_after(&self, beat: i64) -> i64 {
        let bpb = i64::from(self.beats_per_bar.max(1));
        let into_bar = (beat.wrapping_sub(self.start_beat)).rem_euclid(bpb);
        if into_bar == 0 { beat } else { beat.saturating_add(bpb - into_bar) }
    }

    /// Whether `beat` (of this segment) is a count-in click.
    pub fn is_count_in(&self, beat: i64) -> bool {
        let count_in = i128::from(self.count_in_bars) * i128::from(self.beats_per_bar);
        let k = i128::from(beat) - i128::from(self.start_beat);
        (0..count_in).contains(&k)
    }

    fn with_change(mut self, change: Change) -> Self {
        match change {
            Change::SetTempo(t) => self.tempo = t,
            Change::SetMeter(m) => self.beats_per_bar = m,
            Change::Start { count_in_bars } => {
                self.running = true;
                self.count_in_bars = count_in_bars;
            }
            Change::Stop => {
                self.running = false;
                self.count_in_bars = 0;
            }
        }
        self
    }

    /// The segment continuing this one from `start_beat` (a downbeat of this segment): the
    /// count-in bars not yet played carry over.
    fn continued_at(self, start: ServerNanos, start_beat: i64) -> Self {
        let bpb = i64::from(self.beats_per_bar.max(1));
        let bars_played = (start_beat.saturating_sub(self.start_beat) / bpb).clamp(0, 255) as u8;
        Self { start, start_beat, count_in_bars: self.count_in_bars.saturating_sub(bars_played), ..self }
    }

    fn to_wire(self) -> wire::Segment {
        wire::Segment {
            start: self.start,
            start_beat: self.start_beat,
            tempo: self.tempo,
            beats_per_bar: self.beats_per_bar,
            running: self.running,
            count_in_bars: self.count_in_bars,
        }
    }
}

/// A change that was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The timeline epoch carrying the change.
    pub epoch: u64,
    /// When it takes effect.
    pub effective_at: ServerNanos,
    /// The beat at which it takes effect (a downbeat).
    pub effective_beat: i64,
}

impl Applied {
    /// The wire form.
    pub fn to_wire(self) -> wire::Applied {
        wire::Applied { epoch: self.epoch, effective_at: self.effective_at, effective_beat: self.effective_beat }
    }
}

/// A room's timeline: the segment in force plus announced changes, and an epoch that grows
/// with every change.
///
/// As data (a room's state moving between processes) it is checked again when read back:
/// the same rules as [`Timeline::from_wire`], without its cap on segments not yet pruned.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "TimelineData")]
pub struct Timeline {
    epoch: u64,
    /// Never empty; strictly increasing `start`; non-decreasing `start_beat`.
    segments: Vec<Segment>,
}

/// A timeline as read back from data, before [`Timeline::checked`].
#[derive(serde::Deserialize)]
struct TimelineData {
    epoch: u64,
    segments: Vec<Segment>,
}

impl TryFrom<TimelineData> for Timeline {
    type Error = TimelineError;

    fn try_from(data: TimelineData) -> Result<Self, Self::Error> {
        Self::checked(data.epoch, data.segments)
    }
}

impl Timeline {
    /// A stopped timeline starting at `now` at beat 0.
    pub fn new(now: ServerNanos, tempo: MicroBpm, beats_per_bar: u8) -> Result<Self, TimelineError> {
        check_tempo(tempo)?;
        check_meter(beats_per_bar)?;
        Ok(Self {
            epoch: 1,
            segments: vec![Segment {
                start: now,
                start_beat: 0,
                tempo,
                beats_per_bar,
                running: false,
                count_in_bars: 0,
            }],
        })
    }

    /// Validates a timeline received from the wire.
    pub fn from_wire(timeline: &wire::Timeline) -> Result<Self, TimelineError> {
        let segments = timeline.segments.iter().map(|s| Segment {
            start: s.start,
            start_beat: s.start_beat,
            tempo: s.tempo,
            beats_per_bar: s.beats_per_bar,
            running: s.running,
            count_in_bars: s.count_in_bars,
        });
        Self::checked(timeline.epoch, segments.collect())
    }

    fn checked(epoch: u64, segments: Vec<Segment>) -> Result<Self, TimelineError> {
        for (i, s) in segments.iter().enumerate() {
            check_tempo(s.tempo)?;
            check_meter(s.beats_per_bar)?;
            check_count_in(s.count_in_bars)?;
            if let Some(prev) = i.checked_sub(1).map(|p| segments[p]) {
                if s.start <= prev.start {
                    return Err(TimelineError::Malformed("segment starts not increasing"));
                }
                if s.start_beat < prev.start_beat {
                    return Err(TimelineError::Malformed("segment beats decreasing"));
                }
            }
        }
        if segments.is_empty() {
            return Err(TimelineError::Malformed("no segments"));
        }
        Ok(Self { epoch, segments })
    }

    /// The wire form, every segment included.
    pub fn to_wire(&self) -> wire::Timeline {
        self.wire_from(0)
    }

    /// The wire form as of `now`: without the segments that stopped being in force before it
    /// (what [`Timeline::prune`] would drop), and without copying the timeline to get there.
    pub fn to_wire_at(&self, now: ServerNanos) -> wire::Timeline {
        self.wire_from(self.index_at(now))
    }

    fn wire_from(&self, first: usize) -> wire::Timeline {
        let mut segments = BoundedVec::new();
        for s in self.segments[first..].iter().take(MAX_SEGMENTS) {
            // Cannot fail: `take(MAX_SEGMENTS)` and the wire cap is MAX_SEGMENTS.
            let _ = segments.try_push(s.to_wire());
        }
        wire::Timeline { epoch: self.epoch, segments }
    }

    /// The version of this timeline.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// All segments, in force first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    fn index_at(&self, t: ServerNanos) -> usize {
        self.segments.iter().rposition(|s| s.start <= t).unwrap_or(0)
    }

    /// The segment in force at `t` (the first one for instants before it).
    pub fn segment_at(&self, t: ServerNanos) -> &Segment {
        &self.segments[self.index_at(t)]
    }

    /// The last segment: the state once every announced change has taken effect.
    pub fn last(&self) -> &Segment {
        // Invariant: never empty.
        &self.segments[self.segments.len() - 1]
    }

    /// Whether beats sound at `t`.
    pub fn is_running_at(&self, t: ServerNanos) -> bool {
        self.segment_at(t).running
    }

    /// The instant beat `beat` sounds, or `None` if it does not sound (stopped there, or
    /// earlier than this timeline remembers).
    pub fn time_of(&self, beat: i64) -> Option<ServerNanos> {
        let i = self.segments.iter().rposition(|s| s.start_beat <= beat)?;
        let s = &self.segments[i];
        s.running.then(|| s.time_of(beat))
    }

    /// The instant `beat + part / whole` of a beat sounds (between beat `beat` and the next,
    /// at the tempo of the segment `beat` belongs to), or `None` if `beat` does not sound.
    pub fn time_of_fraction(&self, beat: i64, part: u64, whole: u64) -> Option<ServerNanos> {
        let i = self.segments.iter().rposition(|s| s.start_beat <= beat)?;
        let s = &self.segments[i];
        if !s.running {
            return None;
        }
        let (at, next) = (s.time_of(beat), s.time_of(beat.saturating_add(1)));
        let within = u128::from(next.0.saturating_sub(at.0)) * u128::from(part) / u128::from(whole.max(1));
        Some(at.add_nanos(u64::try_from(within).unwrap_or(u64::MAX)))
    }

    /// The first bar boundary at least `lead_nanos` after `now` (and no earlier than any
    /// change announced), where a change asked now would take effect; `None` while the beat
    /// is (or will be) stopped.
    pub fn next_boundary(&self, now: ServerNanos, lead_nanos: u64) -> Option<(ServerNanos, i64)> {
        let last = self.last();
        if !last.running {
            return None;
        }
        let earliest = now.add_nanos(lead_nanos).max(last.start);
        let beat = last.downbeat_at_or_after(last.beat_ceil_at(earliest));
        Some((last.time_of(beat), beat))
    }

    /// The last beat that sounded at or before `t`, if the timeline is running at `t`.
    pub fn beat_at(&self, t: ServerNanos) -> Option<i64> {
        let s = self.segment_at(t);
        (s.running && t >= s.start).then(|| s.beat_floor_at(t))
    }

    /// Position within the bar of a sounding beat.
    pub fn beat_in_bar(&self, beat: i64) -> Option<u8> {
        let i = self.segments.iter().rposition(|s| s.start_beat <= beat)?;
        let s = &self.segments[i];
        s.running.then(|| s.beat_in_bar(beat))
    }

    /// The beats that sound in `[from, to)`, in order.
    pub fn beats_in(&self, from: ServerNanos, to: ServerNanos) -> impl Iterator<Item = wire::Beat> + '_ {
        self.segments.iter().enumerate().filter(|(_, s)| s.running).flat_map(move |(i, s)| {
            let next = self.segments.get(i + 1);
            let lo = from.max(s.start);
            let hi = next.map_or(to, |n| to.min(n.start));
            let end_beat = next.map_or(i64::MAX, |n| n.start_beat);
            let first = if lo < hi { s.beat_ceil_at(lo) } else { end_beat };
            (first..end_beat)
                .map(move |b| wire::Beat {
                    index: b,
                    at: s.time_of(b),
                    beat_in_bar: s.beat_in_bar(b),
                    count_in: s.is_count_in(b),
                })
                .take_while(move |b| b.at < hi)
        })
    }

    /// Forgets segments that stopped being in force before `now`.
    pub fn prune(&mut self, now: ServerNanos) {
        let i = self.index_at(now);
        if i > 0 {
            self.segments.drain(..i);
        }
    }

    /// Applies `change`, taking effect at the first bar boundary at least `lead_nanos` after
    /// `now` (and no earlier than any change already announced). A refused change leaves the
    /// timeline untouched.
    pub fn apply(&mut self, now: ServerNanos, change: Change, lead_nanos: u64) -> Result<Applied, TimelineError> {
        match change {
            Change::SetTempo(t) => {
                check_tempo(t)?;
            }
            Change::SetMeter(m) => {
                check_meter(m)?;
            }
            Change::Start { .. } if self.last().running => return Err(TimelineError::AlreadyRunning),
            Change::Start { count_in_bars } => {
                check_count_in(count_in_bars)?;
            }
            Change::Stop if !self.last().running => return Err(TimelineError::NotRunning),
            Change::Stop => {}
        }
        let earliest = now.add_nanos(lead_nanos);
        let last = *self.last();
        if last.start >= earliest {
            // The last change has not been relied on by anyone yet (nobody is told of beats
            // more than one lead ahead): fold this one into it, at the same boundary.
            let i = self.segments.len() - 1;
            self.segments[i] = last.with_change(change);
        } else {
            let (start, start_beat) = if last.running {
                let beat = last.downbeat_at_or_after(last.beat_ceil_at(earliest));
                (last.time_of(beat), beat)
            } else {
                // Nothing sounds while stopped: no grid to wait for.
                (earliest, last.start_beat)
            };
            // Checked before anything changes: a refused change leaves the timeline untouched.
            if self.segments.len() - self.index_at(now) >= MAX_SEGMENTS {
                return Err(TimelineError::TooManyPendingChanges);
            }
            self.prune(now);
            self.segments.push(last.continued_at(start, start_beat).with_change(change));
        }
        self.epoch += 1;
        let applied = self.last();
        Ok(Applied { epoch: self.epoch, effective_at: applied.start, effective_beat: applied.start_beat })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn running(bpm: u32, bpb: u8) -> Timeline {
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(bpm), bpb).unwrap();
        t.apply(ServerNanos(0), Change::Start { count_in_bars: 0 }, SEC).unwrap();
        t
    }

    #[test]
    fn beat_100k_at_130_bpm_is_exact() {
        let t = running(130, 4);
        let start = t.last().start.0;
        // Ideal: 100,000 beats of 60/130 s = 46,153,846,153.846... ns after the start.
        let ideal_ns = 100_000u128 * 60 * 1_000_000_000 * 1_000 / 130; // in picoseconds / 1000
        let got = u128::from(t.time_of(100_000).unwrap().0 - start) * 1_000;
        let err_ps = got.abs_diff(ideal_ns);
        assert!(err_ps <= 1_000, "error {err_ps} ps");
        // And no drift anywhere along the way: every beat within 1 ns of ideal.
        for beat in (0..=100_000i64).step_by(997) {
            let ideal_ps = i128::from(beat) * 60_000_000_000_000 / 130;
            let got_ps = i128::from(t.time_of(beat).unwrap().0 - start) * 1_000;
            assert!((got_ps - ideal_ps).abs() <= 500, "beat {beat}");
        }
    }

    #[test]
    fn beat_at_inverts_time_of_exactly() {
        let t = running(97, 3);
        let s = t.last().start;
        for beat in [0i64, 1, 2, 3, 1000, 99_999] {
            let at = t.time_of(beat).unwrap();
            assert_eq!(t.beat_at(at), Some(beat));
            assert_eq!(t.beat_at(ServerNanos(at.0 - 1)), if beat == 0 { None } else { Some(beat - 1) });
            assert_eq!(t.beat_at(ServerNanos(at.0 + 1)), Some(beat));
        }
        assert_eq!(t.beat_at(ServerNanos(s.0 - 1)), None);
    }

    fn check_refused(change: Change, expected: TimelineError) {
        let mut t = running(120, 4);
        let before = t.clone();
        assert_eq!(t.apply(ServerNanos(SEC), change, SEC), Err(expected));
        assert_eq!(t, before, "a refused change changes nothing");
    }

    #[test]
    fn out_of_range_changes_are_refused_and_change_nothing() {
        check_refused(Change::SetTempo(MicroBpm(19_999_999)), TimelineError::TempoOutOfRange { micro_bpm: 19_999_999 });
        check_refused(
            Change::SetTempo(MicroBpm(300_000_001)),
            TimelineError::TempoOutOfRange { micro_bpm: 300_000_001 },
        );
        check_refused(Change::SetMeter(0), TimelineError::MeterOutOfRange { beats_per_bar: 0 });
        check_refused(Change::SetMeter(17), TimelineError::MeterOutOfRange { beats_per_bar: 17 });
        check_refused(Change::Start { count_in_bars: 0 }, TimelineError::AlreadyRunning);
        assert!(Timeline::new(ServerNanos(0), MicroBpm::from_bpm(301), 4).is_err());
        assert!(tempo_from_bpm_f64(f64::NAN).is_err());
        assert!(tempo_from_bpm_f64(19.9).is_err());
        assert_eq!(tempo_from_bpm_f64(133.3333335).unwrap(), MicroBpm(133_333_334));
        let mut stopped = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        assert_eq!(stopped.apply(ServerNanos(0), Change::Stop, SEC), Err(TimelineError::NotRunning));
    }

    #[test]
    fn tempo_change_lands_on_a_bar_boundary_without_jumping_the_count() {
        let mut t = running(120, 4);
        let start = t.last().start; // 1 s
        // At 2.3 s (beat 2 of bar 1 at 120 BPM), with a 1 s lead: earliest 3.3 s = beat 4.6,
        // so the first downbeat at or after is beat 8 at 5 s.
        let now = ServerNanos(start.0 + 2_300_000_000);
        let applied = t.apply(now, Change::SetTempo(MicroBpm::from_bpm(60)), SEC).unwrap();
        assert_eq!(applied.effective_beat, 8);
        assert_eq!(applied.effective_at, ServerNanos(start.0 + 4 * SEC));
        assert_eq!(t.time_of(7), Some(ServerNanos(start.0 + 3_500_000_000)));
        assert_eq!(t.time_of(8), Some(ServerNanos(start.0 + 4 * SEC)));
        assert_eq!(t.time_of(9), Some(ServerNanos(start.0 + 5 * SEC)), "new tempo after the boundary");
        let beats: Vec<_> = t
            .beats_in(ServerNanos(start.0 + 3 * SEC), ServerNanos(start.0 + 6 * SEC))
            .map(|b| (b.index, b.beat_in_bar))
            .collect();
        assert_eq!(beats, vec![(6, 2), (7, 3), (8, 0), (9, 1)], "beat 10 at 6 s is outside [3 s, 6 s)");
    }

    #[test]
    fn stop_then_start_resumes_at_the_stopped_downbeat() {
        let mut t = running(120, 4);
        let start = t.last().start;
        let stop = t.apply(ServerNanos(start.0), Change::Stop, SEC).unwrap();
        assert_eq!(stop.effective_beat, 4);
        assert_eq!(t.time_of(3), Some(ServerNanos(start.0 + 1_500_000_000)));
        assert_eq!(t.time_of(4), None);
        let now = ServerNanos(start.0 + 10 * SEC);
        assert_eq!(t.beats_in(ServerNanos(0), now).count(), 4);
        let go = t.apply(now, Change::Start { count_in_bars: 0 }, SEC).unwrap();
        assert_eq!((go.effective_beat, go.effective_at), (4, ServerNanos(now.0 + SEC)));
        assert_eq!(t.time_of(4), Some(ServerNanos(now.0 + SEC)));
        assert_eq!(t.time_of(3), None, "history before the restart is pruned");
    }

    #[test]
    fn changes_announced_together_fold_into_one_boundary() {
        let mut t = running(120, 4);
        let now = t.last().start;
        let a = t.apply(now, Change::SetTempo(MicroBpm::from_bpm(90)), SEC).unwrap();
        let b = t.apply(now, Change::SetMeter(3), SEC).unwrap();
        assert_eq!((a.effective_at, a.effective_beat), (b.effective_at, b.effective_beat));
        assert_eq!(b.epoch, a.epoch + 1);
        assert_eq!(t.last().tempo, MicroBpm::from_bpm(90));
        assert_eq!(t.last().beats_per_bar, 3);
        // A change asked once the pending one is inside the lead goes to a later boundary.
        let later = ServerNanos(a.effective_at.0 - SEC / 2);
        let c = t.apply(later, Change::SetTempo(MicroBpm::from_bpm(150)), SEC).unwrap();
        assert!(c.effective_at > a.effective_at);
        assert_eq!((c.effective_beat - a.effective_beat) % 3, 0, "on a 3/4 bar boundary");
    }

    #[test]
    fn pending_changes_are_bounded() {
        let mut t = running(300, 1);
        let mut now = t.last().start;
        let mut refused = false;
        for _ in 0..20 {
            match t.apply(now, Change::SetTempo(MicroBpm::from_bpm(299)), 10 * SEC) {
                Ok(a) => now = ServerNanos(a.effective_at.0 - 10 * SEC + 1),
                Err(e) => {
                    assert_eq!(e, TimelineError::TooManyPendingChanges);
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused);
        assert!(t.segments().len() <= MAX_SEGMENTS);
    }

    #[test]
    fn wire_round_trip_and_validation() {
        let mut t = running(120, 4);
        t.apply(ServerNanos(SEC), Change::SetTempo(MicroBpm::from_bpm(100)), SEC).unwrap();
        let back = Timeline::from_wire(&t.to_wire()).unwrap();
        assert_eq!(back, t);
        // The wire form as of an instant equals pruning a copy first.
        for now in [0, SEC, 5 * SEC, 60 * SEC].map(ServerNanos) {
            let mut pruned = t.clone();
            pruned.prune(now);
            assert_eq!(t.to_wire_at(now), pruned.to_wire());
        }
        let mut bad = t.to_wire();
        let segs: Vec<_> = bad.segments.iter().rev().copied().collect();
        bad.segments = BoundedVec::try_from_vec(segs).unwrap();
        assert!(Timeline::from_wire(&bad).is_err());
        bad.segments = BoundedVec::new();
        assert!(Timeline::from_wire(&bad).is_err());
    }

    #[test]
    fn count_in_marks_the_first_bars_and_survives_a_tempo_change() {
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        assert_eq!(
            t.apply(ServerNanos(0), Change::Start { count_in_bars: 9 }, SEC),
            Err(TimelineError::CountInOutOfRange { bars: 9 })
        );
        assert_eq!(t.epoch(), 1, "a refused start changes nothing");
        let go = t.apply(ServerNanos(0), Change::Start { count_in_bars: 2 }, SEC).unwrap();
        let beats: Vec<_> = t.beats_in(ServerNanos(0), ServerNanos(7 * SEC)).collect();
        assert_eq!(beats[0].index, go.effective_beat);
        let count_in: Vec<_> = beats.iter().map(|b| b.count_in).collect();
        assert_eq!(count_in.iter().filter(|c| **c).count(), 8, "two bars of four");
        assert!(count_in[..8].iter().all(|c| *c) && !count_in[8..].iter().any(|c| *c));
        // A tempo change after the first bar of count-in keeps the second bar as count-in.
        let change = t.apply(ServerNanos(SEC + SEC / 10), Change::SetTempo(MicroBpm::from_bpm(60)), SEC).unwrap();
        assert_eq!(change.effective_beat, go.effective_beat + 4);
        let beats: Vec<_> = t.beats_in(ServerNanos(0), ServerNanos(20 * SEC)).collect();
        let count_in = beats.iter().filter(|b| b.count_in).count();
        assert_eq!(count_in, 8);
        assert!(beats.iter().take_while(|b| b.count_in).count() == 8);
        // A stop clears it; the next start without count-in has none.
        let mut t = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).unwrap();
        t.apply(ServerNanos(0), Change::Start { count_in_bars: 1 }, SEC).unwrap();
        t.apply(ServerNanos(5 * SEC), Change::Stop, SEC).unwrap();
        assert_eq!(t.last().count_in_bars, 0);
        let wire = t.to_wire();
        assert_eq!(Timeline::from_wire(&wire).unwrap(), t);
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let s = Segment {
            start: ServerNanos(u64::MAX),
            start_beat: i64::MAX,
            tempo: MicroBpm(1),
            beats_per_bar: 1,
            running: true,
            count_in_bars: 255,
        };
        let _ = s.is_count_in(i64::MIN);
        let _ = s.time_of(i64::MIN);
        let _ = s.beat_floor_at(ServerNanos(0));
        let _ = s.downbeat_at_or_after(i64::MAX);
    }
}
