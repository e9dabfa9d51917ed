//! The room on virtual time: seats, presence, controls, notes, abuse, expiry, SEL decisions,
//! and its state moved through serde.

use std::collections::BTreeMap;

use downbeat_protocol::{Change, MicroBpm, PartName, PromptText, ReflectionText, ServerDatagram};

use super::*;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;
const GRACE_MS: u64 = 15_000;

fn at(ms: u64) -> ServerNanos {
    ServerNanos(ms * MS)
}

fn config() -> Config {
    Config { seat_grace_nanos: GRACE_MS * MS, idle_expiry_nanos: 600 * SEC, max_members: 4, ..Config::default() }
}

fn room_with(config: Config) -> Room {
    let timeline = Timeline::new(ServerNanos(0), MicroBpm::from_bpm(120), 4).expect("timeline");
    Room::new(
        config,
        ServerNanos(0),
        BoundedString::truncating("K7QFM3XP"),
        BoundedString::truncating("Band"),
        timeline,
    )
}

fn room() -> Room {
    room_with(config())
}

fn join(subject: &str, role: Role, session: u64) -> Join {
    Join {
        session,
        subject: subject.to_owned(),
        name: BoundedString::truncating(subject),
        role,
        token_expires_at: 99,
        transport: Transport::WebTransport,
        sel_feed: role == Role::Teacher,
    }
}

fn drain(r: &mut Room) -> Vec<Output> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

/// Joins and drains; the member id.
fn seat(r: &mut Room, now: ServerNanos, subject: &str, role: Role, session: u64) -> u64 {
    let joined = r.handle_join(now, join(subject, role, session)).expect("joined");
    drain(r);
    joined.welcome.member_id
}

/// The control messages session `session` was given, in order.
fn heard(outputs: &[Output], session: u64) -> Vec<ServerMessage> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Message { to, message } | Output::Feed { to, message }
                if to.iter().any(|r| r.session == session) =>
            {
                Some(message.clone())
            }
            _ => None,
        })
        .collect()
}

fn ends(outputs: &[Output]) -> Vec<(Recipient, EndReason)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::End { to, reason } => Some((*to, *reason)),
            _ => None,
        })
        .collect()
}

fn note_frames(outputs: &[Output]) -> Vec<(Vec<Recipient>, NoteFrame)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Notes { to, frame } => Some((to.clone(), frame.clone())),
            _ => None,
        })
        .collect()
}

fn note(seq: u32, played_at: ServerNanos) -> Note {
    Note { seq, midi: 60, velocity: 100, instrument: 0, played_at }
}

fn error_codes(messages: &[ServerMessage]) -> Vec<ErrorCode> {
    messages
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Error(e) => Some(e.code),
            _ => None,
        })
        .collect()
}

fn member(r: &Room, id: u64) -> Option<(Member, bool)> {
    r.members().find(|(m, _)| m.id == id).map(|(m, attached)| (m.clone(), attached))
}

#[test]
fn a_lost_connection_resumes_its_seat_without_anyone_seeing_it_leave_or_join() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(10), "s", Role::Student, 2);
    r.handle_depart(at(1_000), student, 2, Departure::Lost);
    assert_eq!(member(&r, student).map(|(_, attached)| attached), Some(false), "held, not attached");
    r.handle_timeout(at(1_000 + GRACE_MS - 1));
    let joined = r.handle_join(at(1_000 + GRACE_MS - 1), join("s", Role::Student, 3)).expect("resumed");
    assert_eq!((joined.welcome.member_id, joined.seated), (student, Seated::Resumed));
    let ids: Vec<u64> = joined.welcome.members.iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![teacher, student]);
    let outputs = drain(&mut r);
    assert!(ends(&outputs).is_empty());
    let teacher_heard = heard(&outputs, 1);
    assert!(
        !teacher_heard.iter().any(|m| matches!(m, ServerMessage::MemberLeft { .. } | ServerMessage::MemberJoined(_))),
        "{teacher_heard:?}"
    );
    // The grace period no longer runs: nothing expires later.
    let tick = r.handle_timeout(at(1_000 + GRACE_MS + 10_000));
    assert_eq!(tick.seats_expired, 0);
    assert_eq!(member(&r, student).map(|(_, attached)| attached), Some(true));
}

#[test]
fn a_grace_period_that_ends_frees_the_seat_and_everyone_hears_it() {
    let mut r = room();
    seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    r.handle_depart(at(1_000), student, 2, Departure::Lost);
    drain(&mut r);
    let due = at(1_000 + GRACE_MS);
    assert!(r.poll_timeout().is_some_and(|t| t <= due));
    assert_eq!(r.handle_timeout(ServerNanos(due.0 - 1)).seats_expired, 0);
    drain(&mut r);
    assert_eq!(r.handle_timeout(due).seats_expired, 1);
    let outputs = drain(&mut r);
    assert!(heard(&outputs, 1).contains(&ServerMessage::MemberLeft { member_id: student, reason: LeaveReason::Left }));
    assert!(member(&r, student).is_none());
    // Coming back now is a new seat with a new id, and the teacher hears the join.
    let joined = r.handle_join(at(20_000), join("s", Role::Student, 3)).expect("joined");
    assert_eq!(joined.seated, Seated::New);
    assert_ne!(joined.welcome.member_id, student);
    assert!(heard(&drain(&mut r), 1).iter().any(|m| matches!(m, ServerMessage::MemberJoined(_))));
}

#[test]
fn a_second_session_takes_the_seat_over_and_the_first_is_replaced() {
    let mut r = room();
    seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    let joined = r.handle_join(at(500), join("s", Role::Student, 3)).expect("took over");
    assert_eq!((joined.welcome.member_id, joined.seated), (student, Seated::Replaced));
    let outputs = drain(&mut r);
    let replaced = Recipient { member: student, session: 2 };
    assert_eq!(ends(&outputs), vec![(replaced, EndReason::Replaced)]);
    assert_eq!(EndReason::Replaced.code(), ErrorCode::SessionReplaced);
    assert!(!heard(&outputs, 1).iter().any(|m| matches!(m, ServerMessage::MemberLeft { .. })));
    // The replaced session's late messages and its departure change nothing.
    let late = [note(1, at(600))];
    assert_eq!(r.handle_notes(at(600), student, 2, &late), None);
    assert_eq!(r.handle_report(at(600), student, 2, ClientReport::default()), None);
    r.handle_depart(at(700), student, 2, Departure::Left);
    assert!(drain(&mut r).is_empty());
    assert_eq!(member(&r, student).map(|(_, attached)| attached), Some(true));
    // The new one's notes are heard, numbered from 1 again.
    let handled = r.handle_notes(at(800), student, 3, &[note(1, at(800))]).expect("holds the seat");
    assert_eq!(handled.accepted, 1);
    let frames = note_frames(&drain(&mut r));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, vec![Recipient { member: 1, session: 1 }]);
}

/// Presence as one session rebuilds it: the welcome's snapshot, then the events it heard.
fn presence(welcome: &Welcome, heard: &[ServerMessage]) -> BTreeMap<u64, Member> {
    let mut members: BTreeMap<u64, Member> = welcome.members.iter().map(|m| (m.id, m.clone())).collect();
    for message in heard {
        match message {
            ServerMessage::MemberJoined(m) | ServerMessage::MemberUpdated(m) => {
                members.insert(m.id, m.clone());
            }
            ServerMessage::MemberLeft { member_id, .. } => {
                members.remove(member_id);
            }
            _ => {}
        }
    }
    members
}

#[test]
fn presence_from_the_welcome_and_the_events_agrees_everywhere() {
    let mut r = room();
    let mut outputs = Vec::new();
    let mut welcomes = BTreeMap::new();
    let mut join_at = |r: &mut Room, outputs: &mut Vec<Output>, ms: u64, subject: &str, role: Role, session: u64| {
        let joined = r.handle_join(at(ms), join(subject, role, session)).expect("joined");
        welcomes.insert(session, joined.welcome.clone());
        outputs.extend(drain(r));
        joined.welcome.member_id
    };
    join_at(&mut r, &mut outputs, 0, "t", Role::Teacher, 1);
    let a = join_at(&mut r, &mut outputs, 10, "a", Role::Student, 2);
    r.handle_control(at(20), ControlOp::Mute { member: a, muted: true }, None).expect("muted");
    outputs.extend(drain(&mut r));
    let b = join_at(&mut r, &mut outputs, 30, "b", Role::Student, 3);
    let sync = SyncQuality { synced: true, rtt_micros: 4_000, uncertainty_micros: 300 };
    r.handle_report(at(40), b, 3, ClientReport { sync, ..ClientReport::default() });
    let reported = drain(&mut r);
    // A change of sync quality is the teacher's to see, not the class's.
    assert!(matches!(&heard(&reported, 1)[..], [ServerMessage::MemberUpdated(m)] if m.id == b && m.sync == sync));
    for student in [2, 3] {
        assert!(heard(&reported, student).is_empty(), "{reported:?}");
    }
    outputs.extend(reported);
    join_at(&mut r, &mut outputs, 50, "c", Role::Student, 4);
    r.handle_depart(at(60), a, 2, Departure::Left);
    outputs.extend(drain(&mut r));
    let assignment = Assignment { part: Some(PartName::truncating("drums")), beats: BoundedVec::default() };
    r.handle_control(at(70), ControlOp::Assign { member: b, assignment }, None).expect("assigned");
    outputs.extend(drain(&mut r));

    // b's sync quality reached the class with b's part; c had it from the welcome.
    let truth: BTreeMap<u64, Member> = r.members().map(|(m, _)| (m.id, m.clone())).collect();
    assert_eq!(truth.len(), 3);
    assert!(truth[&b].sync.synced && truth[&b].assignment.part.is_some());
    for session in [1, 3, 4] {
        assert_eq!(presence(&welcomes[&session], &heard(&outputs, session)), truth, "session {session}");
    }
}

#[test]
fn a_muted_student_is_heard_by_nobody_even_after_resuming_the_seat() {
    let mut r = room();
    seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    r.handle_control(at(10), ControlOp::Mute { member: student, muted: true }, Some((1, 7))).expect("muted");
    let outputs = drain(&mut r);
    assert!(heard(&outputs, 1).contains(&ServerMessage::ControlAck(ControlAck { request_id: 7, applied: None })));
    assert_eq!(member(&r, student).map(|(m, _)| m.muted), Some(true));

    let handled = r.handle_notes(at(100), student, 2, &[note(1, at(100)), note(2, at(100))]).expect("seat");
    assert_eq!((handled.accepted, handled.dropped, handled.refusal), (0, 2, Some(NoteRefusal::Muted)));
    let outputs = drain(&mut r);
    assert!(note_frames(&outputs).is_empty());
    assert_eq!(error_codes(&heard(&outputs, 2)), vec![ErrorCode::Forbidden]);

    // The connection blips; the seat comes back still muted.
    r.handle_depart(at(200), student, 2, Departure::Lost);
    r.handle_join(at(300), join("s", Role::Student, 3)).expect("resumed");
    drain(&mut r);
    assert_eq!(member(&r, student).map(|(m, _)| m.muted), Some(true));
    let handled = r.handle_notes(at(400), student, 3, &[note(1, at(400))]).expect("seat");
    assert_eq!(handled.refusal, Some(NoteRefusal::Muted));
    assert!(note_frames(&drain(&mut r)).is_empty());

    r.handle_control(at(500), ControlOp::Mute { member: student, muted: false }, None).expect("unmuted");
    drain(&mut r);
    let handled = r.handle_notes(at(600), student, 3, &[note(2, at(600))]).expect("seat");
    assert_eq!(handled.accepted, 1);
    assert_eq!(note_frames(&drain(&mut r)).len(), 1);
}

#[test]
fn controls_check_their_target_and_refusals_change_nothing() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    let before: Vec<(Member, bool)> = r.members().map(|(m, a)| (m.clone(), a)).collect();
    let part = |name: &str| Some(PartName::truncating(name));
    let beats = |b: &[u8]| BoundedVec::try_from_vec(b.to_vec()).expect("few beats");
    let refused = [
        (
            ControlOp::Assign { member: student, assignment: Assignment { part: part("  "), beats: beats(&[]) } },
            ErrorCode::BadRequest,
        ),
        (
            ControlOp::Assign { member: student, assignment: Assignment { part: part("a\nb"), beats: beats(&[]) } },
            ErrorCode::BadRequest,
        ),
        (
            ControlOp::Assign { member: student, assignment: Assignment { part: None, beats: beats(&[0, 16]) } },
            ErrorCode::BadRequest,
        ),
        (ControlOp::Assign { member: 99, assignment: Assignment::default() }, ErrorCode::MemberNotFound),
        (ControlOp::Mute { member: teacher, muted: true }, ErrorCode::Forbidden),
        (ControlOp::Mute { member: 99, muted: true }, ErrorCode::MemberNotFound),
        (ControlOp::Remove { member: teacher }, ErrorCode::Forbidden),
        (ControlOp::Prompt { text: PromptText::truncating("why\u{7}") }, ErrorCode::BadRequest),
        (ControlOp::Timeline(Change::SetTempo(MicroBpm(1))), ErrorCode::TempoOutOfRange),
    ];
    for (i, (op, code)) in refused.into_iter().enumerate() {
        let request_id = i as u32;
        let result = r.handle_control(at(10), op.clone(), Some((teacher, request_id)));
        assert_eq!(result.map_err(|e| e.code), Err(code), "{op:?}");
        let outputs = drain(&mut r);
        assert_eq!(outputs.len(), 1, "only the answer: {outputs:?}");
        let ServerMessage::Error(e) = &heard(&outputs, 1)[0] else { panic!("{outputs:?}") };
        assert_eq!((e.code, e.request_id), (code, Some(request_id)));
        assert_eq!(r.members().map(|(m, a)| (m.clone(), a)).collect::<Vec<_>>(), before);
    }
    // Within the limits: beat 15 for a student, and a teacher may hold a part too.
    for member in [student, teacher] {
        let assignment = Assignment { part: part("bass"), beats: beats(&[0, 15]) };
        assert_eq!(r.handle_control(at(20), ControlOp::Assign { member, assignment }, None), Ok(None));
    }
    let outputs = drain(&mut r);
    let updates = heard(&outputs, 2).into_iter().filter(|m| matches!(m, ServerMessage::MemberUpdated(_))).count();
    assert_eq!(updates, 2);
    // Removing a student ends their session and everyone hears why they left.
    assert_eq!(r.handle_control(at(30), ControlOp::Remove { member: student }, None), Ok(None));
    let outputs = drain(&mut r);
    assert!(
        heard(&outputs, 1).contains(&ServerMessage::MemberLeft { member_id: student, reason: LeaveReason::Removed })
    );
    assert_eq!(ends(&outputs), vec![(Recipient { member: student, session: 2 }, EndReason::Removed)]);
}

#[test]
fn a_flood_of_refused_notes_ends_the_session_and_errors_are_throttled() {
    let mut r = room();
    seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    let bad = |seq: u32, now: ServerNanos| Note { midi: 200, ..note(seq, now) };
    let mut errors = Vec::new();
    // All at one instant: the abuse bucket does not refill.
    let now = at(1_000);
    for seq in 1..=ABUSE_BURST {
        let handled = r.handle_notes(now, student, 2, &[bad(seq, now)]).expect("seat");
        assert_eq!((handled.refusal, handled.expelled), (Some(NoteRefusal::OutOfRange), false));
        errors.extend(error_codes(&heard(&drain(&mut r), 2)));
    }
    assert_eq!(errors, vec![ErrorCode::NoteOutOfRange], "one error per second");
    let handled = r.handle_notes(now, student, 2, &[bad(99, now)]).expect("seat");
    assert!(handled.expelled);
    let outputs = drain(&mut r);
    assert_eq!(ends(&outputs), vec![(Recipient { member: student, session: 2 }, EndReason::NoteAbuse)]);
    assert_eq!(EndReason::NoteAbuse.code(), ErrorCode::RateLimited);
    assert!(
        heard(&outputs, 1).contains(&ServerMessage::MemberLeft { member_id: student, reason: LeaveReason::Closed })
    );
    assert!(member(&r, student).is_none());
    assert_eq!(r.handle_notes(now, student, 2, &[note(1, now)]), None);
}

#[test]
fn refused_notes_at_the_tolerated_rate_never_end_the_session() {
    let mut r = room();
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    for k in 0..(3 * ABUSE_BURST) {
        let now = at(u64::from(k) * 1_000 / u64::from(ABUSE_PER_SECOND));
        let handled = r.handle_notes(now, student, 2, &[Note { velocity: 0, ..note(k + 1, now) }]).expect("seat");
        assert!(!handled.expelled, "refusal {k}");
    }
}

#[test]
fn an_empty_room_expires_and_a_held_seat_keeps_it_open() {
    let mut r = room();
    let expiry = config().idle_expiry_nanos;
    assert_eq!(r.poll_timeout(), Some(ServerNanos(0)), "the room session opens at once");
    r.handle_timeout(ServerNanos(0));
    drain(&mut r);
    assert_eq!(r.poll_timeout(), Some(ServerNanos(expiry)));
    // Someone comes and goes, their seat held for the grace period: the expiry counts from
    // when the seat is freed.
    let student = seat(&mut r, at(1_000), "s", Role::Student, 2);
    r.handle_depart(at(2_000), student, 2, Departure::Lost);
    r.handle_timeout(at(2_000 + GRACE_MS));
    drain(&mut r);
    let freed = at(2_000 + GRACE_MS);
    r.handle_timeout(ServerNanos(freed.0 + expiry - 1));
    assert!(!drain(&mut r).contains(&Output::Closed));
    assert!(!r.is_closed());
    r.handle_timeout(ServerNanos(freed.0 + expiry));
    assert!(drain(&mut r).contains(&Output::Closed));
    assert!(r.is_closed());
    assert_eq!(r.poll_timeout(), None);
    assert!(r.handle_join(ServerNanos(freed.0 + expiry), join("s", Role::Student, 3)).is_err());
}

#[test]
fn a_teacher_closing_the_room_is_answered_then_everyone_is_ended() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    assert_eq!(r.handle_control(at(10), ControlOp::Close, Some((teacher, 3))), Ok(None));
    let outputs = drain(&mut r);
    let closing = EndReason::RoomClosed(Closing::Teacher);
    let recipients = [Recipient { member: teacher, session: 1 }, Recipient { member: student, session: 2 }];
    assert_eq!(ends(&outputs), recipients.iter().map(|&r| (r, closing)).collect::<Vec<_>>());
    let teacher_heard = heard(&outputs, 1);
    assert!(matches!(teacher_heard[0], ServerMessage::RoomClosed { .. }));
    assert_eq!(teacher_heard[1], ServerMessage::ControlAck(ControlAck { request_id: 3, applied: None }));
    assert_eq!(outputs.last(), Some(&Output::Closed), "last, after the answer");
    // The last flush: both students' leave (one seated), and the session's end.
    let work = r.finish(at(20));
    let [SelWork::Flush(flush)] = work.as_slice() else { panic!("one flush to write, got {work:?}") };
    assert!(flush.closes);
    assert!(flush.records.iter().any(|rec| rec.kind == RecordKind::Left && rec.subject == "s"));
}

#[test]
fn a_slow_member_is_dropped_before_anything_else_goes_out() {
    let mut r = room();
    seat(&mut r, at(0), "t", Role::Teacher, 1);
    let a = seat(&mut r, at(0), "a", Role::Student, 2);
    let b = seat(&mut r, at(0), "b", Role::Student, 3);
    r.handle_control(at(10), ControlOp::Prompt { text: PromptText::truncating("How did it go?") }, None).expect("set");
    r.handle_control(at(10), ControlOp::Mute { member: a, muted: true }, None).expect("muted");
    let Some(Output::Message { to, .. }) = r.poll_output() else { panic!("the prompt first") };
    assert_eq!(to.len(), 3);
    // `b`'s queue was full for the prompt.
    let slow = Recipient { member: b, session: 3 };
    assert_eq!(r.handle_slow(at(10), &[slow]), 1);
    assert_eq!(r.handle_slow(at(10), &[slow]), 0, "already gone");
    let rest = drain(&mut r);
    assert_eq!(rest[0], Output::End { to: slow, reason: EndReason::Backlog });
    let left = ServerMessage::MemberLeft { member_id: b, reason: LeaveReason::Closed };
    assert_eq!(
        rest[1],
        Output::Message {
            to: vec![Recipient { member: 1, session: 1 }, Recipient { member: a, session: 2 }],
            message: left
        }
    );
    assert!(matches!(&rest[2], Output::Message { message: ServerMessage::MemberUpdated(_), .. }));
    assert!(EndReason::Backlog.at_once());
}

/// The participation flush handed out by the timeout at `now`, if any.
fn flush_at(r: &mut Room, now: ServerNanos) -> Option<Flush> {
    r.handle_timeout(now);
    drain(r).into_iter().find_map(|o| match o {
        Output::Sel(SelWork::Flush(f)) => Some(f),
        _ => None,
    })
}

#[test]
fn participation_is_counted_flushed_and_folded_back_when_the_queue_is_full() {
    let mut r = room();
    r.handle_timeout(ServerNanos(0));
    let Some(Output::Sel(SelWork::Flush(first))) = r.poll_output() else { panic!("the opening flush") };
    assert!(first.opens && first.records.is_empty());
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    r.handle_control(at(0), ControlOp::Timeline(Change::Start { count_in_bars: 0 }), None).expect("started");
    drain(&mut r);
    // Three notes at 2 s (well into the run).
    for seq in 1..=3 {
        r.handle_notes(at(2_000), student, 2, &[note(seq, at(2_000))]).expect("seat");
    }
    let flush = flush_at(&mut r, at(2_000)).expect("a flush");
    let kinds: Vec<RecordKind> = flush.records.iter().map(|rec| rec.kind).collect();
    assert_eq!(kinds, vec![RecordKind::Joined, RecordKind::Notes]);
    let seqs: Vec<i64> = flush.records.iter().map(|rec| rec.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // The start landed on the bar at 2 s: all three on the beat (the timeline decides).
    assert_eq!(r.timeline().beat_at(at(2_000)).map(|b| r.timeline().time_of(b)), Some(Some(at(2_000))));
    assert_eq!((flush.records[1].tally.notes, flush.records[1].tally.on_beat), (3, 3));
    assert!(matches!(flush.feed(), Some(ServerMessage::Participation(n)) if n[0].notes == 3));
    // The writer's queue was full: everything comes back in the next flush.
    r.handle_sel_refused(at(2_100), SelWork::Flush(flush.clone()));
    let again = flush_at(&mut r, at(3_100)).expect("flushed again");
    assert_eq!(again.records[0], flush.records[0], "the joined record as it was");
    assert_eq!(again.records[1].tally, flush.records[1].tally);
    assert_eq!(again.notices, flush.notices);
}

#[test]
fn reflections_answer_a_recent_prompt_and_only_students_write_them() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    let reflection = |prompt_id: u32, mood: Option<u8>, text: &str| Reflection {
        request_id: 5,
        id: [7; 16],
        prompt_id,
        mood,
        text: Some(ReflectionText::truncating(text)),
    };
    assert_eq!(r.handle_reflection(at(1), student, 2, &reflection(1, Some(2), "fun")), Some(ErrorCode::NoPrompt));
    r.handle_control(at(2), ControlOp::Prompt { text: PromptText::truncating("How was it?") }, None).expect("set");
    drain(&mut r);
    assert_eq!(r.handle_reflection(at(3), student, 2, &reflection(1, Some(9), "")), Some(ErrorCode::BadRequest));
    assert_eq!(r.handle_reflection(at(3), student, 2, &reflection(1, None, "  ")), Some(ErrorCode::BadRequest));
    assert_eq!(r.handle_reflection(at(3), teacher, 1, &reflection(1, Some(2), "hm")), Some(ErrorCode::Forbidden));
    assert_eq!(r.handle_reflection(at(3), student, 9, &reflection(1, Some(2), "x")), None, "not its seat");
    assert_eq!(error_codes(&heard(&drain(&mut r), 2)).len(), 2);
    assert_eq!(r.handle_reflection(at(4), student, 2, &reflection(1, Some(3), "  ")), None);
    let Some(Output::Sel(SelWork::Reflection(work))) = r.poll_output() else { panic!("reflection work") };
    assert_eq!(
        (work.subject.as_str(), work.prompt.as_str(), work.mood, work.text.clone()),
        ("s", "How was it?", Some(3), None)
    );
    // Committed: the author hears it is saved and the teacher sees it.
    r.handle_reflection_saved(student, work.request_id, work.notice.clone());
    let outputs = drain(&mut r);
    assert_eq!(heard(&outputs, 2), vec![ServerMessage::ReflectionSaved { request_id: 5, id: [7; 16] }]);
    assert_eq!(heard(&outputs, 1), vec![ServerMessage::Reflection(work.notice.clone())]);
    // The teacher's copy is a feed update (one a full queue may leave out), the author's
    // acknowledgement is not.
    assert!(outputs.iter().any(|o| matches!(o, Output::Feed { message: ServerMessage::Reflection(_), .. })));
    assert!(
        outputs.iter().any(|o| matches!(o, Output::Message { message: ServerMessage::ReflectionSaved { .. }, .. }))
    );
    // Refused by a full queue: the author hears why.
    r.handle_sel_refused(at(5), SelWork::Reflection(work));
    assert_eq!(error_codes(&heard(&drain(&mut r), 2)), vec![ErrorCode::StoreUnavailable]);
}

#[test]
fn the_sel_feed_reaches_only_the_members_marked_for_it() {
    let mut r = room();
    seat(&mut r, at(0), "owner", Role::Teacher, 1);
    // A teacher the server did not mark (another class's teacher visiting).
    r.handle_join(at(0), Join { sel_feed: false, ..join("visitor", Role::Teacher, 2) }).expect("seated");
    drain(&mut r);
    let student = seat(&mut r, at(0), "s", Role::Student, 3);
    let notice =
        |mood| ReflectionNotice { member_id: student, id: [1; 16], prompt_id: 1, mood: Some(mood), text: None };
    r.handle_feed(ServerMessage::Reflection(notice(1)));
    let outputs = drain(&mut r);
    assert_eq!(heard(&outputs, 1), vec![ServerMessage::Reflection(notice(1))]);
    assert!(heard(&outputs, 2).is_empty() && heard(&outputs, 3).is_empty());
    // Made a co-teacher, then not any more.
    r.handle_sel_feed("visitor", true);
    r.handle_feed(ServerMessage::Reflection(notice(2)));
    assert_eq!(heard(&drain(&mut r), 2), vec![ServerMessage::Reflection(notice(2))]);
    r.handle_sel_feed("visitor", false);
    r.handle_feed(ServerMessage::Reflection(notice(3)));
    let outputs = drain(&mut r);
    assert!(heard(&outputs, 2).is_empty());
    assert_eq!(heard(&outputs, 1), vec![ServerMessage::Reflection(notice(3))]);
    // A resumed seat takes its new join's mark.
    r.handle_join(at(1), join("visitor", Role::Teacher, 4)).expect("resumed");
    drain(&mut r);
    r.handle_feed(ServerMessage::Reflection(notice(4)));
    assert_eq!(heard(&drain(&mut r), 4), vec![ServerMessage::Reflection(notice(4))]);
}

/// A scripted class: inputs at given instants, every output recorded with its instant.
fn play(r: &mut Room, script: &[(u64, Input)]) -> Vec<(u64, Output)> {
    let mut log = Vec::new();
    for (ms, input) in script {
        let now = at(*ms);
        while let Some(due) = r.poll_timeout().filter(|&t| t <= now) {
            r.handle_timeout(due);
            log.extend(drain(r).into_iter().map(|o| (due.0, o)));
        }
        match input {
            Input::Join(j) => {
                let joined = r.handle_join(now, j.clone()).map(|j| (j.welcome, j.seated));
                log.push((
                    now.0,
                    Output::Message { to: vec![], message: ServerMessage::Welcome(joined.expect("joined").0) },
                ));
            }
            Input::Depart(member, session, how) => r.handle_depart(now, *member, *session, *how),
            Input::Notes(member, session, notes) => {
                r.handle_notes(now, *member, *session, notes);
            }
            Input::Control(op) => {
                let _ = r.handle_control(now, op.clone(), Some((1, 1)));
            }
            Input::Report(member, session, report) => {
                r.handle_report(now, *member, *session, *report);
            }
            Input::HeldEpoch(member, session, epoch) => {
                r.handle_held_epoch(now, *member, *session, *epoch);
            }
        }
        log.extend(drain(r).into_iter().map(|o| (now.0, o)));
    }
    log
}

#[derive(Clone, Debug)]
enum Input {
    Join(Join),
    Depart(u64, u64, Departure),
    Notes(u64, u64, Vec<Note>),
    Control(ControlOp),
    Report(u64, u64, ClientReport),
    HeldEpoch(u64, u64, u64),
}

#[test]
fn a_room_serialized_mid_song_and_restored_gives_the_same_next_outputs() {
    let mut r = room();
    let before = [
        (0, Input::Join(join("t", Role::Teacher, 1))),
        (10, Input::Join(join("a", Role::Student, 2))),
        (20, Input::Join(join("b", Role::Student, 3))),
        (30, Input::Join(join("c", Role::Student, 4))),
        (40, Input::Control(ControlOp::Timeline(Change::Start { count_in_bars: 1 }))),
        (50, Input::Control(ControlOp::Prompt { text: PromptText::truncating("Who kept time?") })),
        (60, Input::Control(ControlOp::Mute { member: 3, muted: true })),
        (3_000, Input::Notes(2, 2, vec![note(1, at(2_990)), note(2, at(3_000))])),
        (3_100, Input::Notes(3, 3, vec![note(1, at(3_100))])),
        (3_200, Input::Depart(4, 4, Departure::Lost)),
        (3_300, Input::Notes(2, 2, vec![note(2, at(3_000)), note(3, at(3_290))])),
    ];
    let played = play(&mut r, &before);
    assert!(played.iter().any(|(_, o)| matches!(o, Output::Beats { .. })));
    assert_eq!(member(&r, 4).map(|(_, attached)| attached), Some(false), "c's seat is held in grace");

    let bytes = postcard::to_allocvec(&r).expect("serializes");
    let mut restored: Room = postcard::from_bytes(&bytes).expect("deserializes");

    let after = [
        (3_400, Input::Notes(2, 2, vec![note(4, at(3_390))])),
        (
            3_500,
            Input::Report(
                2,
                2,
                ClientReport {
                    sync: SyncQuality { synced: true, rtt_micros: 3_000, uncertainty_micros: 400 },
                    notes_played: 4,
                    notes_late: 0,
                },
            ),
        ),
        (4_000, Input::Join(join("c", Role::Student, 5))),
        (4_100, Input::Control(ControlOp::Timeline(Change::SetTempo(MicroBpm::from_bpm(90))))),
        (5_000, Input::Depart(3, 3, Departure::Lost)),
        (6_000, Input::Notes(4, 5, vec![note(1, at(5_990))])),
        // a says it holds the timeline before the tempo change: a frame of its own.
        (20_000, Input::HeldEpoch(2, 2, 1)),
        (25_000, Input::Control(ControlOp::Assign { member: 2, assignment: Assignment::default() })),
    ];
    let original = play(&mut r, &after);
    let copy = play(&mut restored, &after);
    assert!(original.iter().any(|(_, o)| matches!(o, Output::Sel(_))), "a flush in the window");
    assert!(
        original
            .iter()
            .any(|(_, o)| matches!(o, Output::Message { message: ServerMessage::MemberLeft { member_id: 3, .. }, .. })),
        "b's grace ended"
    );
    // Beat frames among them: a burst after the tempo change at 4.1 s, then one every 10 s,
    // and a's repair.
    assert!(original.len() > 50, "{}", original.len());
    assert!(
        original.iter().any(|(at, o)| *at == 20_000 * MS && matches!(o, Output::Beats { to, .. } if to.len() == 1)),
        "a's repair"
    );
    assert_eq!(original, copy);
    assert_eq!(postcard::to_allocvec(&r).expect("serializes"), postcard::to_allocvec(&restored).expect("serializes"));
}

#[test]
fn a_restored_timeline_is_checked_again() {
    let timeline = Timeline::new(ServerNanos(5), MicroBpm::from_bpm(120), 4).expect("timeline");
    let bytes = postcard::to_allocvec(&timeline).expect("serializes");
    assert_eq!(postcard::from_bytes::<Timeline>(&bytes).expect("deserializes"), timeline);
    let empty = postcard::to_allocvec(&(7u64, Vec::<crate::timeline::Segment>::new())).expect("serializes");
    assert!(postcard::from_bytes::<Timeline>(&empty).is_err());
}

#[test]
fn a_beat_frame_is_trimmed_to_the_datagram_size_and_keeps_its_timeline() {
    let mut r = room();
    seat(&mut r, at(0), "s", Role::Student, 2);
    r.handle_control(at(0), ControlOp::Timeline(Change::Start { count_in_bars: 0 }), None).expect("started");
    drain(&mut r);
    r.handle_timeout(at(2_500));
    let Some(Output::Beats { frame, .. }) = drain(&mut r).into_iter().find(|o| matches!(o, Output::Beats { .. }))
    else {
        panic!("a beat frame")
    };
    assert!(frame.beats.len() >= 2);
    let (whole, trimmed) = encode_beats_to_fit(frame.clone(), 1_200).expect("fits");
    assert!(!trimmed);
    let (smaller, trimmed) = encode_beats_to_fit(frame.clone(), whole.len() - 1).expect("fits with fewer beats");
    assert!(trimmed && smaller.len() < whole.len());
    let Ok(ServerDatagram::Beats(decoded)) = downbeat_protocol::decode_server_datagram(&smaller) else {
        panic!("decodes")
    };
    assert_eq!((decoded.timeline, decoded.beats.len()), (frame.timeline.clone(), frame.beats.len() - 1));
    assert_eq!(encode_beats_to_fit(frame, 10), None, "not even the timeline fits");
}

#[test]
fn a_student_answers_a_prompt_a_few_times_and_retries_are_no_new_answers() {
    let mut r = room();
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    let other = seat(&mut r, at(0), "o", Role::Student, 3);
    r.handle_control(at(1), ControlOp::Prompt { text: PromptText::truncating("How was it?") }, None).expect("set");
    drain(&mut r);
    let reflection = |id: u8| Reflection {
        request_id: u32::from(id),
        id: [id; 16],
        prompt_id: 1,
        mood: Some(2),
        text: Some(ReflectionText::truncating("fun")),
    };
    let works =
        |outputs: &[Output]| outputs.iter().filter(|o| matches!(o, Output::Sel(SelWork::Reflection(_)))).count();
    for id in 1..=u8::try_from(MAX_REFLECTIONS_PER_PROMPT).expect("small") {
        assert_eq!(r.handle_reflection(at(2), student, 2, &reflection(id)), None);
    }
    // A retry of one already counted is handed out again (the store keeps it once).
    assert_eq!(r.handle_reflection(at(3), student, 2, &reflection(1)), None);
    assert_eq!(works(&drain(&mut r)), MAX_REFLECTIONS_PER_PROMPT + 1);
    // One more is refused with its own code and nothing is handed out.
    assert_eq!(r.handle_reflection(at(4), student, 2, &reflection(99)), Some(ErrorCode::TooManyReflections));
    let outputs = drain(&mut r);
    assert_eq!(works(&outputs), 0);
    assert_eq!(error_codes(&heard(&outputs, 2)), vec![ErrorCode::TooManyReflections]);
    // Another student and another prompt count on their own.
    assert_eq!(r.handle_reflection(at(5), other, 3, &reflection(99)), None);
    r.handle_control(at(6), ControlOp::Prompt { text: PromptText::truncating("And now?") }, None).expect("set");
    drain(&mut r);
    assert_eq!(r.handle_reflection(at(7), student, 2, &Reflection { prompt_id: 2, ..reflection(99) }), None);
}

#[test]
fn joining_and_leaving_again_and_again_is_capped_but_reconnects_are_not() {
    let mut r = room_with(Config { seat_grace_nanos: 0, ..config() });
    let mut session = 10;
    let mut join_and_leave = |r: &mut Room, now: ServerNanos| {
        session += 1;
        let joined = r.handle_join(now, join("s", Role::Student, session));
        if let Ok(joined) = &joined {
            r.handle_depart(now, joined.welcome.member_id, session, Departure::Left);
        }
        drain(r);
        joined.map(|_| ()).map_err(|refused| refused.code)
    };
    for i in 0..MAX_JOINS_PER_WINDOW {
        assert_eq!(join_and_leave(&mut r, at(1_000 * i as u64)), Ok(()));
    }
    assert_eq!(join_and_leave(&mut r, at(20_000)), Err(ErrorCode::RateLimited));
    assert!(r.members().next().is_none(), "the refused join took no seat");
    // Someone else is not held back.
    assert_eq!(r.handle_join(at(20_000), join("o", Role::Student, 99)).map(|_| ()).map_err(|e| e.code), Ok(()));
    drain(&mut r);
    // Once the first joins leave the window, joining works again.
    assert_eq!(join_and_leave(&mut r, ServerNanos(JOIN_WINDOW_NANOS + 1)), Ok(()));

    // Reconnects to a held seat are no new seats: a flaky Chromebook is never refused.
    let mut r = room();
    let member = seat(&mut r, at(0), "s", Role::Student, 1);
    for session in 2..(2 + 3 * MAX_JOINS_PER_WINDOW as u64) {
        r.handle_depart(at(session), member, session - 1, Departure::Lost);
        let joined = r.handle_join(at(session), join("s", Role::Student, session)).expect("resumed");
        assert_eq!(joined.seated, Seated::Resumed);
        drain(&mut r);
    }
}

/// Joins a full room refuses take no seat, so they count nothing against the join cap: a
/// student waiting at the door of a full class gets in once a seat frees.
#[test]
fn joins_refused_by_a_full_room_do_not_count_against_the_join_cap() {
    let mut r = room_with(Config { max_members: 1, ..config() });
    let holder = seat(&mut r, at(0), "holder", Role::Student, 1);
    for i in 0..(2 * MAX_JOINS_PER_WINDOW as u64) {
        let refused = r.handle_join(at(i), join("s", Role::Student, 10 + i)).map(|_| ()).map_err(|e| e.code);
        assert_eq!(refused, Err(ErrorCode::RoomFull));
    }
    r.handle_depart(at(100), holder, 1, Departure::Left);
    drain(&mut r);
    let joined = r.handle_join(at(200), join("s", Role::Student, 99)).map(|j| j.seated).map_err(|e| e.code);
    assert_eq!(joined, Ok(Seated::New));
}

#[test]
fn a_student_whose_data_is_deleted_loses_their_seat_and_nothing_more_is_written() {
    let mut r = room();
    r.handle_timeout(ServerNanos(0));
    drain(&mut r);
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    r.handle_control(at(0), ControlOp::Timeline(Change::Start { count_in_bars: 0 }), None).expect("started");
    r.handle_control(at(0), ControlOp::Prompt { text: PromptText::truncating("How was it?") }, None).expect("set");
    drain(&mut r);
    r.handle_notes(at(2_000), student, 2, &[note(1, at(2_000))]).expect("seat");

    r.handle_forget(at(2_100), "s");
    let outputs = drain(&mut r);
    assert_eq!(ends(&outputs), vec![(Recipient { member: student, session: 2 }, EndReason::DataDeleted)]);
    assert_eq!(EndReason::DataDeleted.code(), ErrorCode::DataDeleted);
    assert!(
        heard(&outputs, 1).contains(&ServerMessage::MemberLeft { member_id: student, reason: LeaveReason::Closed }),
        "the class sees them leave"
    );
    assert!(member(&r, student).is_none() && member(&r, teacher).is_some());
    // Their session's late messages change nothing, and no flush names them, their leave
    // included.
    let reflection = Reflection { request_id: 1, id: [1; 16], prompt_id: 1, mood: Some(1), text: None };
    assert_eq!(r.handle_reflection(at(2_200), student, 2, &reflection), None);
    assert!(r.handle_notes(at(2_200), student, 2, &[note(2, at(2_200))]).is_none());
    r.handle_depart(at(2_300), student, 2, Departure::Left);
    for now in [at(3_000), at(4_000)] {
        r.handle_timeout(now);
        for output in drain(&mut r) {
            if let Output::Sel(work) = output {
                let SelWork::Flush(flush) = work else { panic!("no reflection of theirs is handed out") };
                assert!(flush.records.iter().all(|rec| rec.subject != "s"), "{flush:?}");
            }
        }
    }
    for work in r.finish(at(5_000)) {
        let SelWork::Flush(f) = work else { panic!("only participation to write") };
        assert!(f.records.iter().all(|rec| rec.subject != "s"));
    }
}

/// Every recording row handed to the writer in `outputs`.
fn take_rows(outputs: &[Output]) -> Vec<TakeRow> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Sel(SelWork::Recording(work)) => Some(work.rows.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[test]
fn a_take_records_every_accepted_note_and_timeline_once_and_everyone_sees_it_run() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    let muted = seat(&mut r, at(0), "m", Role::Student, 3);
    r.handle_control(at(0), ControlOp::Mute { member: muted, muted: true }, None).expect("muted");
    let part = Assignment { part: Some(PartName::truncating("drums")), beats: BoundedVec::default() };
    r.handle_control(at(0), ControlOp::Assign { member: student, assignment: part }, None).expect("assigned");
    // Played before any take: not recorded.
    r.handle_notes(at(100), student, 2, &[note(1, at(100))]).expect("seat");
    drain(&mut r);

    assert_eq!(r.handle_control(at(1_000), ControlOp::StartRecording, Some((teacher, 5))), Ok(None));
    let outputs = drain(&mut r);
    let running = RecordingInfo { take: 1, started_at: at(1_000) };
    for session in [1, 2, 3] {
        assert!(heard(&outputs, session).contains(&ServerMessage::Recording(Some(running))), "session {session}");
    }
    assert_eq!(r.recording(), Some(running));
    // A second start is refused and changes nothing.
    let refused = r.handle_control(at(1_001), ControlOp::StartRecording, None).expect_err("already");
    assert_eq!(refused.code, ErrorCode::AlreadyRecording);
    // A latecomer hears the take runs, after its welcome.
    let late = r.handle_join(at(1_100), join("late", Role::Student, 4)).expect("joined").welcome.member_id;
    assert!(heard(&drain(&mut r), 4).contains(&ServerMessage::Recording(Some(running))));

    // Notes: the student's (two new, one a copy), the teacher's, the muted student's
    // (refused), one played before the start that arrives late (not in the take).
    r.handle_notes(at(1_200), student, 2, &[note(2, at(1_150)), note(3, at(1_200))]).expect("seat");
    r.handle_notes(at(1_210), student, 2, &[note(3, at(1_200))]).expect("seat");
    r.handle_notes(at(1_300), teacher, 1, &[note(1, at(1_290))]).expect("seat");
    r.handle_notes(at(1_300), muted, 3, &[note(1, at(1_300))]).expect("seat");
    r.handle_notes(at(1_400), late, 4, &[note(1, at(990))]).expect("seat");
    r.handle_control(at(1_500), ControlOp::Timeline(Change::Start { count_in_bars: 0 }), None).expect("started");
    drain(&mut r);
    r.handle_control(at(4_000), ControlOp::StopRecording, Some((teacher, 6))).expect("stopped");
    let outputs = drain(&mut r);
    assert!(heard(&outputs, 3).contains(&ServerMessage::Recording(None)));
    assert_eq!(r.recording(), None);
    // The rows are handed out before anyone hears the take stopped: whoever reads the store
    // after that finds them queued.
    let queued = outputs.iter().position(|o| matches!(o, Output::Sel(SelWork::Recording(_)))).expect("rows");
    let told = outputs
        .iter()
        .position(|o| matches!(o, Output::Message { message: ServerMessage::Recording(None), .. }))
        .expect("told");
    assert!(queued < told, "rows at {queued}, the stop told at {told}");
    let stopped_again = r.handle_control(at(4_001), ControlOp::StopRecording, None).expect_err("not recording");
    assert_eq!(stopped_again.code, ErrorCode::NotRecording);

    // Everything the take holds went to the writer by the stop, in order.
    let mut rows = take_rows(&outputs);
    r.handle_timeout(at(3_000));
    rows.splice(0..0, take_rows(&drain(&mut r)));
    let rows_before_stop: Vec<TakeRow> = rows.clone();
    assert!(matches!(rows_before_stop[0], TakeRow::Started { take: 1, at: started } if started == at(1_000)));
    let timelines: Vec<u64> = rows
        .iter()
        .filter_map(|row| match row {
            TakeRow::Timeline { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect();
    assert_eq!(timelines.len(), 2, "as it started and after the start");
    assert!(timelines[0] < timelines[1]);
    let notes: Vec<(u32, u64, Option<String>, i64)> = rows
        .iter()
        .filter_map(|row| match row {
            TakeRow::Note(n) => Some((n.seq, n.member, n.part.as_ref().map(ToString::to_string), n.offset_nanos)),
            _ => None,
        })
        .collect();
    assert_eq!(
        notes,
        vec![
            (1, student, Some("drums".to_owned()), (150 * MS) as i64),
            (2, student, Some("drums".to_owned()), (200 * MS) as i64),
            (3, teacher, None, (290 * MS) as i64),
        ]
    );
    assert!(
        matches!(rows.last(), Some(TakeRow::Stopped { take: 1, notes: 3, length_nanos, .. }) if *length_nanos == 3 * SEC)
    );
}

#[test]
fn a_take_the_writer_refused_comes_back_whole_and_a_deleted_students_notes_are_forgotten() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let a = seat(&mut r, at(0), "a", Role::Student, 2);
    let b = seat(&mut r, at(0), "b", Role::Student, 3);
    r.handle_control(at(0), ControlOp::StartRecording, None).expect("started");
    r.handle_notes(at(10), a, 2, &[note(1, at(10))]).expect("seat");
    r.handle_notes(at(20), b, 3, &[note(1, at(20))]).expect("seat");
    r.handle_timeout(at(1_000));
    let first = take_rows(&drain(&mut r));
    assert_eq!(first.len(), 4, "started, timeline, two notes");
    r.handle_sel_refused(at(1_000), SelWork::Recording(RecordingWork { rows: first.clone() }));
    r.handle_notes(at(1_100), a, 2, &[note(2, at(1_100))]).expect("seat");
    r.handle_forget(at(1_200), "b");
    r.handle_control(at(1_300), ControlOp::StopRecording, Some((teacher, 1))).expect("stopped");
    let again = take_rows(&drain(&mut r));
    let subjects: Vec<&str> = again
        .iter()
        .filter_map(|row| match row {
            TakeRow::Note(n) => Some(n.subject.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(subjects, vec!["a", "a"], "the refused rows first, b's note forgotten");
    assert_eq!(again[..2], first[..2]);
}

#[test]
fn a_full_take_stops_by_itself_and_a_closing_room_stops_its_take() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    r.handle_control(at(0), ControlOp::StartRecording, None).expect("started");
    drain(&mut r);
    let mut stopped = None;
    for seq in 1..=MAX_TAKE_NOTES {
        let now = ServerNanos(u64::from(seq) * 50 * MS);
        r.handle_notes(now, teacher, 1, &[note(seq, now)]).expect("seat");
        let outputs = drain(&mut r);
        if heard(&outputs, 1).contains(&ServerMessage::Recording(None)) {
            stopped = Some((seq, take_rows(&outputs)));
            break;
        }
    }
    let (seq, rows) = stopped.expect("the take stopped");
    assert_eq!(seq, MAX_TAKE_NOTES);
    assert!(matches!(rows.last(), Some(TakeRow::Stopped { notes, .. }) if *notes == MAX_TAKE_NOTES));

    // A take running when the room closes stops with it, before the last participation.
    r.handle_control(at(6_000_000), ControlOp::StartRecording, None).expect("second take");
    r.handle_control(at(6_000_001), ControlOp::Close, None).expect("closed");
    drain(&mut r);
    let work = r.finish(at(6_000_002));
    assert!(
        matches!(&work[0], SelWork::Recording(w) if matches!(w.rows.last(), Some(TakeRow::Stopped { take: 2, .. })))
    );
    assert!(matches!(&work[1], SelWork::Flush(f) if f.closes));
}

/// Every playback note frame in `outputs`: (recipients, note) per note.
fn playback_notes(outputs: &[Output]) -> Vec<(Vec<Recipient>, Note)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Notes { to, frame } if frame.from == PLAYBACK_FROM => {
                Some(frame.notes.iter().map(|n| (to.clone(), *n)).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

/// Runs the room from `from` to `to` in steps of `step_ms`, returning every output with the
/// instant it came out.
fn run(r: &mut Room, from: u64, to: u64, step_ms: u64) -> Vec<(ServerNanos, Output)> {
    let mut seen = Vec::new();
    let mut t = from;
    while t <= to {
        r.handle_timeout(at(t));
        seen.extend(drain(r).into_iter().map(|o| (at(t), o)));
        t += step_ms;
    }
    seen
}

fn pnote(tick: u64, midi: u8) -> PlaybackNote {
    PlaybackNote { tick, midi, velocity: 90, instrument: 0 }
}

#[test]
fn a_playback_starts_the_beat_on_a_boundary_and_every_member_gets_each_note_twice_ahead_of_its_instant() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    seat(&mut r, at(0), "a", Role::Student, 2);
    seat(&mut r, at(0), "b", Role::Student, 3);
    // Stopped: the playback starts the beat, at 60 BPM, one lead away.
    let notes = vec![pnote(0, 60), pnote(240, 62), pnote(480, 64), pnote(1_920 + 120, 65)];
    let applied = r
        .handle_playback(at(100), 1, Some(MicroBpm::from_bpm(60)), Ok(notes.clone()), Some((teacher, 9)))
        .expect("playing");
    let lead = r.config().lead_nanos;
    assert!(applied.effective_at.0 >= 100 * MS + lead);
    assert_eq!(r.timeline().beat_in_bar(applied.effective_beat), Some(0), "a bar boundary");
    let outputs = drain(&mut r);
    let info = r.playback().expect("playing");
    assert_eq!((info.take, info.start_beat, info.starts_at), (1, applied.effective_beat, applied.effective_at));
    for session in [1, 2, 3] {
        let heard = heard(&outputs, session);
        assert!(heard.contains(&ServerMessage::Playback(Some(info))), "session {session}");
        assert!(heard.iter().any(|m| matches!(m, ServerMessage::Timeline(_))), "the beat starts for everyone");
    }
    assert!(
        heard(&outputs, 1).contains(&ServerMessage::ControlAck(ControlAck { request_id: 9, applied: Some(applied) }))
    );
    // A second one is refused, and one of a take that is not there.
    assert_eq!(
        r.handle_playback(at(101), 1, None, Ok(Vec::new()), None).map_err(|e| e.code),
        Err(ErrorCode::AlreadyPlaying)
    );
    assert_eq!(
        r.handle_playback(at(101), 2, None, Err(Refused::new(ErrorCode::RecordingNotFound, "none")), None)
            .map_err(|e| e.code),
        Err(ErrorCode::RecordingNotFound)
    );

    let mut seen: Vec<(ServerNanos, Output)> = outputs.into_iter().map(|o| (at(100), o)).collect();
    seen.extend(run(&mut r, 100, 12_000, 5));
    let mut copies: BTreeMap<u32, Vec<ServerNanos>> = BTreeMap::new();
    for (now, o) in &seen {
        for (to, n) in playback_notes(std::slice::from_ref(o)) {
            assert_eq!(to.iter().map(|r| r.session).collect::<Vec<_>>(), vec![1, 2, 3], "every member");
            let want = notes[n.seq as usize - 1];
            assert_eq!(n.midi, want.midi);
            // At 60 BPM a beat is a second: tick 240 is half a beat.
            let sounds = applied.effective_at.0 + want.tick * SEC / 480;
            assert_eq!(n.played_at.0 + r.config().playout_delay_nanos, sounds, "note {}", n.seq);
            assert!(now.0 + lead / 2 <= sounds, "sent at least half a lead ahead");
            copies.entry(n.seq).or_default().push(*now);
        }
    }
    assert_eq!(copies.len(), 4);
    assert!(copies.values().all(|c| c.len() == 2), "each note twice: {copies:?}");
    // Over once the last note sounded: everyone hears it.
    let over = seen.iter().find(|(_, o)| heard(std::slice::from_ref(o), 2).contains(&ServerMessage::Playback(None)));
    let last = applied.effective_at.0 + (1_920 + 120) * SEC / 480;
    assert!(over.is_some_and(|(t, _)| t.0 >= last && t.0 < last + 10 * MS), "{over:?}");
    assert_eq!(r.playback(), None);
}

#[test]
fn a_stopped_playback_sends_nothing_from_the_stop_boundary_on() {
    let mut r = room();
    seat(&mut r, at(0), "t", Role::Teacher, 1);
    r.handle_control(at(0), ControlOp::Timeline(Change::Start { count_in_bars: 0 }), None).expect("started");
    drain(&mut r);
    // 120 BPM: a note every half beat for 40 beats.
    let notes: Vec<PlaybackNote> = (0..80).map(|i| pnote(i * 240, 60)).collect();
    let applied = r.handle_playback(at(3_000), 1, None, Ok(notes), None).expect("playing");
    let mut seen = run(&mut r, 3_000, 8_000, 5);
    let stop = r.handle_control(at(8_000), ControlOp::StopPlayback, None).expect("stopping").expect("a boundary");
    assert_eq!(r.timeline().beat_in_bar(stop.effective_beat), Some(0));
    assert!(stop.effective_at.0 >= 8 * SEC + r.config().lead_nanos);
    assert_eq!(
        r.handle_control(at(8_001), ControlOp::StopPlayback, None).map_err(|e| e.code),
        Err(ErrorCode::NotPlaying)
    );
    seen.extend(run(&mut r, 8_000, 30_000, 5));
    let sent: Vec<Note> =
        seen.iter().flat_map(|(_, o)| playback_notes(std::slice::from_ref(o))).map(|(_, n)| n).collect();
    let sounds = |n: &Note| n.played_at.0 + r.config().playout_delay_nanos;
    assert!(sent.iter().all(|n| sounds(n) < stop.effective_at.0), "nothing at or after the stop");
    let last = sent.iter().map(|n| n.seq).max().expect("notes");
    // Every note before the stop went out (twice): beats from the start to the stop, two a beat.
    assert_eq!(i64::from(last), (stop.effective_beat - applied.effective_beat) * 2);
    assert_eq!(sent.len(), last as usize * 2);
    assert_eq!(r.playback(), None, "over at the stop");
}

#[test]
fn an_operators_test_note_reaches_every_member_on_the_next_beat_from_nobody_in_the_room() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let student = seat(&mut r, at(0), "s", Role::Student, 2);
    let (lead, delay) = (r.config().lead_nanos, r.config().playout_delay_nanos);

    // Stopped: one lead from now.
    let sounds_at = r.handle_test_note(at(1_000), 72, 0).expect("sent");
    assert_eq!(sounds_at, at(1_000).add_nanos(lead));
    let frames = note_frames(&drain(&mut r));
    let [(to, frame)] = frames.as_slice() else { panic!("{frames:?}") };
    let mut members: Vec<u64> = to.iter().map(|t| t.member).collect();
    members.sort_unstable();
    assert_eq!(members, [teacher, student]);
    assert_eq!((frame.from, frame.generation), (TEST_NOTE_FROM, 1));
    let [note] = frame.notes.as_slice() else { panic!("{frame:?}") };
    assert_eq!((note.seq, note.midi, note.velocity), (1, 72, TEST_NOTE_VELOCITY));
    assert_eq!(crate::notes::playout_instant(note, delay), sounds_at);

    // Running: on the first beat at least one lead away; a new generation each time.
    r.handle_control(at(2_000), ControlOp::Timeline(Change::Start { count_in_bars: 0 }), None).expect("started");
    drain(&mut r);
    let now = at(5_123);
    let sounds_at = r.handle_test_note(now, 60, 9).expect("sent");
    let timeline = r.timeline();
    let beat = timeline.beat_at(sounds_at).expect("on a beat");
    assert_eq!(timeline.time_of(beat), Some(sounds_at));
    assert!(sounds_at >= now.add_nanos(lead));
    assert!(timeline.time_of(beat - 1).expect("beat before") < now.add_nanos(lead));
    let frames = note_frames(&drain(&mut r));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].1.generation, 2);

    // Out of range or closed: refused, nothing sent.
    assert_eq!(r.handle_test_note(now, 128, 0).unwrap_err().code, ErrorCode::NoteOutOfRange);
    assert_eq!(r.handle_test_note(now, 60, 200).unwrap_err().code, ErrorCode::NoteOutOfRange);
    assert!(drain(&mut r).is_empty());

    // The inspector's view of the seats: each member with its session and last report.
    let report = ClientReport {
        sync: SyncQuality { synced: true, rtt_micros: 2_500, uncertainty_micros: 300 },
        notes_played: 4,
        notes_late: 1,
    };
    r.handle_report(now, student, 2, report).expect("reported");
    let seats: Vec<(u64, Option<(u64, ClientReport)>)> = r.seats().map(|s| (s.member.id, s.session)).collect();
    assert_eq!(seats, [(teacher, Some((1, ClientReport::default()))), (student, Some((2, report)))]);

    r.handle_control(now, ControlOp::Close, None).expect("closed");
    drain(&mut r);
    assert_eq!(r.handle_test_note(now, 60, 0).unwrap_err().code, ErrorCode::RoomClosed);
}

#[test]
fn a_room_handed_over_resumes_with_the_same_beats_seats_and_prompt() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let a = seat(&mut r, at(0), "a", Role::Student, 2);
    let b = seat(&mut r, at(0), "b", Role::Student, 3);
    r.handle_control(at(10), ControlOp::Timeline(Change::Start { count_in_bars: 1 }), None).expect("started");
    let written = r.essentials();

    // A report or a note changes nothing a takeover must keep.
    let sync = SyncQuality { synced: true, rtt_micros: 2_000, uncertainty_micros: 300 };
    r.handle_report(at(40), a, 2, ClientReport { sync, ..ClientReport::default() });
    r.handle_notes(at(2_100), a, 2, &[note(1, at(2_100))]);
    drain(&mut r);
    assert_eq!(r.essentials(), written);
    // A control does.
    r.handle_control(at(2_200), ControlOp::Mute { member: b, muted: true }, None).expect("muted");
    r.handle_control(at(2_200), ControlOp::Prompt { text: PromptText::truncating("How did it go?") }, None)
        .expect("prompt");
    r.handle_control(at(2_300), ControlOp::StartRecording, None).expect("recording");
    r.handle_control(at(2_400), ControlOp::Timeline(Change::SetTempo(MicroBpm::from_bpm(90))), None).expect("tempo");
    drain(&mut r);
    assert_ne!(r.essentials(), written);

    // Handed over through bytes, and resumed on another node a second later.
    let handover = r.handover();
    let bytes = postcard::to_allocvec(&handover).expect("serializes");
    let handover: Handover = postcard::from_bytes(&bytes).expect("deserializes");
    assert_eq!(handover.seats(), 3);
    let mut resumed = Room::from_handover(handover, at(3_400));
    assert!(drain(&mut resumed).is_empty(), "nobody is told anything until they reconnect");
    for beat in -4..64 {
        assert_eq!(resumed.timeline().time_of(beat), r.timeline().time_of(beat), "beat {beat}");
    }
    assert_eq!(resumed.prompt(), r.prompt());
    assert_eq!(resumed.recording(), r.recording());
    assert!(resumed.members().all(|(_, attached)| !attached), "every seat is held for its reconnect");
    assert_eq!(resumed.essentials(), r.essentials());

    // The members come back to their own seats; nobody hears anyone leave or join.
    for (subject, role, member, session) in [("t", Role::Teacher, teacher, 11), ("a", Role::Student, a, 12)] {
        let joined = resumed.handle_join(at(3_500), join(subject, role, session)).expect("rejoined");
        assert_eq!((joined.welcome.member_id, joined.seated), (member, Seated::Resumed));
        assert_eq!(joined.welcome.timeline.epoch, r.timeline().epoch());
    }
    let outputs = drain(&mut resumed);
    assert!(
        !outputs.iter().any(|o| matches!(
            o,
            Output::Message { message: ServerMessage::MemberJoined(_) | ServerMessage::MemberLeft { .. }, .. }
        )),
        "{outputs:?}"
    );
    assert_eq!(member(&resumed, b).map(|(m, attached)| (m.muted, attached)), Some((true, false)));
    // A newcomer gets the next id, not one already given.
    let c = seat(&mut resumed, at(3_600), "c", Role::Student, 14);
    assert_eq!(c, b + 1);
    // b never comes back: the seat is freed once the grace period ends.
    resumed.handle_timeout(at(3_400 + GRACE_MS));
    assert!(member(&resumed, b).is_none());

    // Rows written here are numbered past any the old node wrote after the handover.
    resumed.handle_notes(at(3_700), a, 12, &[note(1, at(3_700))]);
    let rows: Vec<i64> = resumed
        .finish(at(4_000))
        .into_iter()
        .filter_map(|w| match w {
            SelWork::Flush(f) => Some(f.records.into_iter().map(|r| r.seq)),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(!rows.is_empty() && rows.iter().all(|&seq| seq > 1 << 32), "{rows:?}");
}

#[test]
fn a_room_that_moved_tells_its_members_where_and_keeps_its_room_session_open() {
    let mut r = room();
    let teacher = seat(&mut r, at(0), "t", Role::Teacher, 1);
    let a = seat(&mut r, at(0), "a", Role::Student, 2);
    r.handle_notes(at(100), a, 2, &[note(1, at(100))]);
    drain(&mut r);
    let to = downbeat_protocol::Moved {
        webtransport_url: BoundedString::truncating("https://node-2.example:4433"),
        websocket_url: BoundedString::truncating("wss://node-2.example/api/ws"),
        certificate_hashes: BoundedVec::default(),
    };
    let work = r.handle_moved(at(200), to.clone());
    let outputs = drain(&mut r);
    for session in [1, 2] {
        assert_eq!(heard(&outputs, session), vec![ServerMessage::Moved(to.clone())]);
    }
    let ended: Vec<(u64, ErrorCode)> = ends(&outputs).into_iter().map(|(to, why)| (to.member, why.code())).collect();
    assert_eq!(ended, vec![(teacher, ErrorCode::Moved), (a, ErrorCode::Moved)]);
    assert!(r.is_closed());
    // The pending notes go to the writer; the room session is not closed (the other node
    // carries it on).
    let flush = work.iter().find_map(|w| match w {
        SelWork::Flush(f) => Some(f),
        _ => None,
    });
    assert!(flush.is_some_and(|f| !f.closes && !f.records.is_empty()), "{work:?}");
    assert!(r.handle_moved(at(300), to).is_empty(), "once");
}
