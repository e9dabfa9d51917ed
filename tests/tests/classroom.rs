//! A class over real loopback sockets: a teacher and thirty students (native clients with
//! injected clock offsets and drift) join by code; start with count-in, a tempo change and stop
//! land on bar boundaries in every client; a muted student's notes reach nobody; a note from
//! one student is scheduled by every classmate at the same true instant; and presence is the
//! same for everyone after joins, a leave, and a reconnect inside the grace period. Every test
//! runs over WebTransport and over WebSocket.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use downbeat_client::{Client, Event, InjectedClock, LocalClock};
use downbeat_engine::sim::Rng;
use downbeat_protocol::{Change, ControlOp, ErrorCode, LeaveReason, Member, MicroBpm, Role, SyncQuality};
use downbeat_tests::relay::Relay;
use downbeat_tests::{TestServer, Transport, events_until, over_both_transports};
use tokio::sync::watch;

const STUDENTS: usize = 30;
const WAIT: Duration = Duration::from_secs(15);

/// Everything one client was told on its control stream, in order, kept by a task so that
/// waiting for one thing never loses another.
struct Recorded {
    client: Arc<Client>,
    clock: InjectedClock,
    events: Arc<Mutex<Vec<Event>>>,
    epoch: watch::Receiver<u64>,
}

impl Recorded {
    fn new(client: Client, clock: InjectedClock) -> Self {
        let client = Arc::new(client);
        let events = Arc::new(Mutex::new(Vec::new()));
        let (epoch_tx, epoch) = watch::channel(0);
        let (c, log) = (client.clone(), events.clone());
        tokio::spawn(async move {
            while let Some(event) = c.next_event().await {
                let epoch = if let Event::Timeline(e) = event { Some(e) } else { None };
                // Logged before it is announced, so a waiter always finds it.
                log.lock().unwrap().push(event);
                if let Some(e) = epoch {
                    epoch_tx.send_replace(e);
                }
            }
        });
        Self { client, clock, events, epoch }
    }

    async fn wait_epoch(&self, epoch: u64) -> Result<()> {
        let mut rx = self.epoch.clone();
        let waited = tokio::time::timeout(WAIT, rx.wait_for(|e| *e >= epoch)).await.context("timeline epoch")?;
        if waited.is_err() {
            let why = tokio::time::timeout(Duration::from_secs(1), self.client.closed()).await;
            bail!("member {} ended before epoch {epoch}: {why:?}", self.client.member_id());
        }
        Ok(())
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Presence rebuilt from the welcome and the events up to the timeline of `epoch`.
    fn presence_at(&self, epoch: u64) -> Result<BTreeMap<u64, Member>> {
        let mut members: BTreeMap<u64, Member> =
            self.client.welcome().members.iter().map(|m| (m.id, m.clone())).collect();
        for event in self.events() {
            match event {
                Event::MemberJoined(m) | Event::MemberUpdated(m) => {
                    members.insert(m.id, m);
                }
                Event::MemberLeft(id, _) => {
                    members.remove(&id);
                }
                Event::Timeline(e) if e == epoch => return Ok(members),
                _ => {}
            }
        }
        bail!("no timeline {epoch} in the events")
    }
}

/// The teacher, then every student.
fn everyone<'a>(teacher: &'a Recorded, students: &'a [Recorded]) -> impl Iterator<Item = &'a Recorded> {
    std::iter::once(teacher).chain(students)
}

fn true_instant(r: &Recorded, local: downbeat_protocol::ClientNanos) -> Instant {
    r.clock.instant_at(local)
}

fn spread(instants: &[Instant]) -> Duration {
    let lo = instants.iter().min().expect("instants");
    let hi = instants.iter().max().expect("instants");
    *hi - *lo
}

async fn a_teacher_and_thirty_students_play_together(transport: Transport) -> Result<()> {
    let server = TestServer::start_with(|c| {
        c.seat_grace_ms = 20_000;
        // A lost connection is noticed within a second.
        c.idle_timeout_ms = 1_000;
        c.keep_alive_ms = 200;
    })
    .await?
    .over(transport);
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 120.0, 4).await?;
    let relay = Relay::start_for(&server).await?;

    let mut rng = Rng::new(31);
    let base = Instant::now();
    let mut clock = || InjectedClock::new(base, rng.range(-500e6, 500e6) as i64, rng.range(-100.0, 100.0));
    let teacher_clock = clock();
    let teacher = Recorded::new(
        Client::connect_with_clock(server.options(&code, &teacher_token), Arc::new(teacher_clock)).await?,
        teacher_clock,
    );
    let mut students = Vec::new();
    for i in 0..STUDENTS {
        let clock = clock();
        let mut options = server.options(&code, &server.student(&format!("s-{i}")));
        if i == 0 {
            // Student 0 goes through a relay the test can cut, like a Chromebook's Wi-Fi.
            options.url = relay.url(&server);
        }
        students.push(Recorded::new(Client::connect_with_clock(options, Arc::new(clock)).await?, clock));
    }
    assert_eq!(students[STUDENTS - 1].client.welcome().members.len(), STUDENTS + 1, "the whole class");
    assert_eq!(teacher.client.welcome().role, Role::Teacher);
    for r in std::iter::once(&teacher).chain(&students) {
        r.client.wait_synced(WAIT).await?;
    }

    // Start with a bar of count-in: on a bar boundary, the same instant for all 31.
    let start = teacher.client.change(Change::Start { count_in_bars: 1 }).await?.applied.context("boundary")?;
    assert_eq!(start.effective_beat % 4, 0, "a bar boundary");
    for r in everyone(&teacher, &students) {
        r.wait_epoch(start.epoch).await?;
    }
    // A tempo change lands on one beat for everyone.
    let tempo = teacher.client.change(Change::SetTempo(MicroBpm::from_bpm(96))).await?.applied.context("boundary")?;
    assert_eq!((tempo.effective_beat - start.effective_beat) % 4, 0, "a bar boundary");
    for r in everyone(&teacher, &students) {
        r.wait_epoch(tempo.epoch).await?;
    }
    let reference = teacher.client.timeline().context("timeline")?;
    for r in everyone(&teacher, &students) {
        let t = r.client.timeline().context("timeline")?;
        assert_eq!(t.epoch(), tempo.epoch);
        for beat in start.effective_beat..tempo.effective_beat + 8 {
            assert_eq!(t.time_of(beat), reference.time_of(beat), "beat {beat}");
        }
        assert_eq!(t.beat_in_bar(tempo.effective_beat), Some(0));
        let count_in: Vec<_> =
            t.beats_in(start.effective_at, tempo.effective_at).filter(|b| b.count_in).map(|b| b.index).collect();
        assert_eq!(count_in, (start.effective_beat..start.effective_beat + 4).collect::<Vec<_>>(), "one bar");
    }

    // A note from student 1 is scheduled by the other 29 students and the teacher at the
    // same true instant.
    let note = students[1].client.play_note(64, 100, 0)?;
    let mut heard = Vec::new();
    for (i, r) in everyone(&teacher, &students).enumerate() {
        if i == 2 {
            continue; // students[1] itself.
        }
        let scheduled = tokio::time::timeout(WAIT, r.client.next_note()).await?.context("session closed")?;
        assert_eq!((scheduled.from, scheduled.note), (students[1].client.member_id(), note));
        heard.push(true_instant(r, scheduled.local_at));
    }
    assert_eq!(heard.len(), STUDENTS);
    let note_spread = spread(&heard);
    println!("one note scheduled by {} classmates within {note_spread:?}", heard.len());
    assert!(note_spread <= Duration::from_millis(1), "{note_spread:?}");

    // Muting student 5: shown to them, enforced by the server.
    let muted = students[5].client.member_id();
    teacher.client.control(ControlOp::Mute { member: muted, muted: true }).await?;
    let refused_before = server.stats.notes_dropped.get(ErrorCode::Forbidden);
    students[5].client.play_note(60, 100, 0)?;
    let marker = students[6].client.play_note(72, 100, 0)?;
    for (i, r) in everyone(&teacher, &students).enumerate() {
        if i == 7 {
            continue; // students[6] itself.
        }
        let scheduled = tokio::time::timeout(WAIT, r.client.next_note()).await?.context("session closed")?;
        assert_eq!(scheduled.from, students[6].client.member_id(), "only the unmuted student's note arrives");
        assert_eq!(scheduled.note, marker);
    }
    // The marker can overtake the muted note (another connection; over WebSocket another
    // TCP stream): wait for the server to have refused it.
    let deadline = Instant::now() + WAIT;
    while server.stats.notes_dropped.get(ErrorCode::Forbidden) < refused_before + 1 {
        anyhow::ensure!(Instant::now() < deadline, "the muted student's note was never refused");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(server.stats.notes_dropped.get(ErrorCode::Forbidden), refused_before + 1);
    let told = students[5].events();
    assert!(told.iter().any(|e| matches!(e, Event::MemberUpdated(m) if m.id == muted && m.muted)), "{told:?}");

    // Where everyone sounds the second bar at the new tempo, placed as an audio scheduler
    // would: a moment before it sounds (waiting for that moment is the measurement, not
    // synchronisation).
    let beat = tempo.effective_beat + 4;
    let sounds = true_instant(&teacher, teacher.client.local_time_of_beat(beat).context("beat placed")?);
    tokio::time::sleep_until((sounds - Duration::from_millis(200)).into()).await;
    let mut onsets = Vec::new();
    for r in everyone(&teacher, &students) {
        let local = r.client.local_time_of_beat(beat).context("beat placed")?;
        onsets.push(true_instant(r, local));
    }
    let onset_spread = spread(&onsets);
    println!("onset spread of beat {beat} across 31 clients: {onset_spread:?}");
    assert!(onset_spread <= Duration::from_millis(1), "{onset_spread:?}");

    // Stop lands on a bar boundary too.
    let stop = teacher.client.change(Change::Stop).await?.applied.context("boundary")?;
    assert_eq!((stop.effective_beat - tempo.effective_beat) % 4, 0);

    // Student 29 leaves; student 0's Wi-Fi drops and comes back within the grace period.
    let leaving = students.pop().context("a student")?;
    let left_id = leaving.client.member_id();
    leaving.client.close();
    let blip_id = students[0].client.member_id();
    relay.cut();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, room) = server.http("GET", &format!("/api/rooms/{code}"), Some(&teacher_token), None).await?;
        let members = room["members"].as_array().context("members")?;
        let blipped = members.iter().find(|m| m["id"] == blip_id).context("the seat is held")?;
        if blipped["connected"] == false {
            break;
        }
        if Instant::now() > deadline {
            bail!("the server never noticed the lost connection: {room}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let clock0 = students[0].clock;
    let back = Client::connect_with_clock(server.options(&code, &server.student("s-0")), Arc::new(clock0)).await?;
    assert_eq!(back.member_id(), blip_id, "the same seat");
    students[0] = Recorded::new(back, clock0);

    // A marker change: at its timeline every client's presence must be the same, sync
    // quality aside: changes of it are told to the teacher alone.
    let marker = teacher.client.change(Change::SetMeter(3)).await?.applied.context("boundary")?;
    teacher.wait_epoch(marker.epoch).await?;
    let expected = teacher.presence_at(marker.epoch)?;
    let without_sync = |mut presence: BTreeMap<u64, Member>| {
        presence.values_mut().for_each(|m| m.sync = SyncQuality::default());
        presence
    };
    for r in everyone(&teacher, &students) {
        r.wait_epoch(marker.epoch).await?;
        let presence = without_sync(r.presence_at(marker.epoch)?);
        assert_eq!(presence, without_sync(expected.clone()), "member {}", r.client.member_id());
    }
    assert_eq!(expected.len(), STUDENTS, "the teacher and 29 students");
    assert!(expected.values().all(|m| m.transport == transport), "presence shows each one's transport");
    assert!(!expected.contains_key(&left_id));
    assert!(expected[&muted].muted);
    assert!(expected.contains_key(&blip_id));
    // Nobody saw the blip: no leave or second join of that seat.
    for r in everyone(&teacher, &students).skip(1) {
        for event in r.events() {
            match event {
                Event::MemberLeft(id, reason) => {
                    assert_eq!((id, reason), (left_id, LeaveReason::Left), "only the leaver left");
                }
                Event::MemberJoined(m) => assert_ne!(m.id, blip_id, "the reconnect was not a join"),
                _ => {}
            }
        }
    }
    assert_eq!(server.stats.seats_resumed.get(), 1);
    Ok(())
}

async fn a_lost_seat_is_freed_when_the_grace_period_ends_and_an_empty_room_expires(transport: Transport) -> Result<()> {
    let server = TestServer::start_with(|c| {
        c.seat_grace_ms = 300;
        c.idle_timeout_ms = 1_000;
        c.keep_alive_ms = 200;
        c.room_idle_expiry_secs = 1;
    })
    .await?
    .over(transport);
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 120.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let relay = Relay::start_for(&server).await?;
    let mut options = server.options(&code, &server.student("s-1"));
    options.url = relay.url(&server);
    let student = Client::connect(options).await?;
    let id = student.member_id();
    relay.cut();
    // Nobody hears of the lost connection until the grace period is over; then it is a leave.
    let events = events_until(&teacher, |e| matches!(e, Event::MemberLeft(..))).await?;
    assert_eq!(events.last(), Some(&Event::MemberLeft(id, LeaveReason::Left)), "{events:?}");
    assert_eq!(server.stats.seats_expired.get(), 1);

    // The teacher leaves too; a second after the room is empty, it closes itself.
    teacher.close();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = server.http("GET", &format!("/api/rooms/{code}"), Some(&teacher_token), None).await?;
        if status == 410 {
            assert_eq!(body["error"]["code"], "room_closed");
            break;
        }
        assert_eq!(status, 200, "{body}");
        if Instant::now() > deadline {
            bail!("the empty room never expired");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.stats.rooms_active.get(), 0);
    Ok(())
}

async fn a_teacher_creates_on_the_control_stream_assigns_parts_and_removes_a_student(
    transport: Transport,
) -> Result<()> {
    use downbeat_protocol::{Assignment, BoundedVec, Name, PartName, RoomSettings};
    let server = TestServer::start().await?.over(transport);
    let settings = RoomSettings { name: Name::truncating("Room 12"), tempo: MicroBpm::from_bpm(100), beats_per_bar: 3 };
    let mut options =
        downbeat_client::ConnectOptions::create(server.url("127.0.0.1"), server.teacher("t-1"), settings.clone());
    options.cert_hashes = server.hashes.clone();
    let teacher = Client::connect(options.clone()).await?;
    let code = teacher.welcome().room.code.to_string();
    assert_eq!((code.len(), teacher.welcome().room.name.as_str()), (8, "Room 12"));
    // A student may not create a room.
    options.token = server.student("s-9");
    match Client::connect(options).await {
        Err(downbeat_client::ClientError::Refused { code, .. }) => assert_eq!(code, ErrorCode::Forbidden),
        other => bail!("a student created a room: {other:?}"),
    }

    let student = server.connect(&code, &server.student("s-1")).await?;
    let id = student.member_id();
    let drums = Assignment { part: Some(PartName::truncating("drums")), beats: BoundedVec::try_from_vec(vec![0])? };
    let ack = teacher.control(ControlOp::Assign { member: id, assignment: drums.clone() }).await?;
    assert_eq!(ack.applied, None);
    let events = events_until(&student, |e| matches!(e, Event::MemberUpdated(m) if m.id == id)).await?;
    let Some(Event::MemberUpdated(updated)) = events.last() else { bail!("{events:?}") };
    assert_eq!(updated.assignment, drums, "the student sees their part");

    teacher.control(ControlOp::Remove { member: id }).await?;
    let mut told = Vec::new();
    while let Some(event) = tokio::time::timeout(WAIT, student.next_event()).await? {
        told.push(event);
    }
    assert!(matches!(told.last(), Some(Event::Error(ErrorCode::Removed, _))), "{told:?}");
    let (_, room) = server.http("GET", &format!("/api/rooms/{code}"), Some(&server.teacher("t-1")), None).await?;
    assert_eq!(room["members"].as_array().map(Vec::len), Some(1), "{room}");
    Ok(())
}

async fn the_server_wide_member_cap_applies_within_every_tenant(transport: Transport) -> Result<()> {
    // The demo tenant allows 40; the server allows 2.
    let server = TestServer::start_with(|c| c.max_members_per_room = 2).await?.over(transport);
    let teacher = server.teacher("t-1");
    let code = server.create_room(&teacher, 120.0, 4).await?;
    let _first = server.connect(&code, &teacher).await?;
    let _second = server.connect(&code, &server.student("s-1")).await?;
    match server.connect(&code, &server.student("s-2")).await {
        Err(e) => match e.downcast::<downbeat_client::ClientError>()? {
            downbeat_client::ClientError::Refused { code, .. } => assert_eq!(code, ErrorCode::RoomFull),
            other => bail!("expected room_full, got {other}"),
        },
        Ok(_) => bail!("a third member joined a room capped at two"),
    }
    Ok(())
}

over_both_transports!(
    a_teacher_and_thirty_students_play_together,
    a_lost_seat_is_freed_when_the_grace_period_ends_and_an_empty_room_expires,
    a_teacher_creates_on_the_control_stream_assigns_parts_and_removes_a_student,
    the_server_wide_member_cap_applies_within_every_tenant
);

/// A page whose tab was replaced by another must learn why, however late it reads: a QUIC
/// close throws away stream data the peer has not read yet, even acknowledged data, so the
/// server keeps a WebTransport session it said goodbye to open until the peer closes it (every
/// client does once it read the error frame), and only then, or after a bound, closes it with
/// the goodbye's code. A page that missed the goodbye would read a lost connection and take
/// the seat back from the new tab.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_webtransport_session_reads_why_however_late_it_reads() -> Result<()> {
    let server = TestServer::start().await?;
    let teacher = server.teacher("t-1");
    let code = server.create_room(&teacher, 120.0, 4).await?;
    let mut first = server.raw_session().await?;
    first
        .write_message(&downbeat_tests::RawSession::hello(downbeat_protocol::PROTOCOL_VERSION, &teacher, &code))
        .await?;
    let Some(downbeat_protocol::ServerMessage::Welcome(welcome)) = first.read_message().await? else {
        bail!("the first session was not welcomed");
    };
    let second = server.connect(&code, &teacher).await?;
    assert_eq!(second.member_id(), welcome.member_id, "the second session took the same seat");

    // The first session reads nothing for a while: its goodbye was written and acknowledged
    // long before the end of this wait, and the server must not close the session meanwhile.
    let early = tokio::time::timeout(Duration::from_millis(500), first.conn.closed()).await;
    assert!(early.is_err(), "the server closed a session whose peer had not read its goodbye: {early:?}");
    assert_eq!(first.expect_error().await?, ErrorCode::SessionReplaced);

    // A peer that reads the goodbye but never closes is closed by the server, with its code.
    let closed = tokio::time::timeout(WAIT, first.conn.closed()).await.context("the server never closed")?;
    match closed {
        wtransport::error::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.code().into_inner(), u64::from(ErrorCode::SessionReplaced.as_u16()));
        }
        other => bail!("closed, but not by the server with a code: {other}"),
    }
    Ok(())
}
