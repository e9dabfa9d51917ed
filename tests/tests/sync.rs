//! Thirty native clients with injected clock offsets and drift join one room over real
//! loopback sockets; after sync every one knows the server clock to within 0.5 ms and they all
//! place the same beats at the same true instant.

use std::sync::Arc;
use std::time::{Duration, Instant};

use downbeat_client::{Client, InjectedClock};
use downbeat_engine::sim::Rng;
use downbeat_protocol::ServerNanos;
use downbeat_tests::{TestServer, nanos_between};

const CLIENTS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_clients_agree_on_the_server_clock_and_the_beat() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let teacher = server.teacher("t-1");
    let room = server.create_room(&teacher, 120.0, 4).await?;
    let mut rng = Rng::new(2026);
    let base = Instant::now();
    let mut clients: Vec<(Client, InjectedClock)> = Vec::new();
    for i in 0..CLIENTS {
        let offset = rng.range(-500e6, 500e6) as i64;
        let drift = rng.range(-100.0, 100.0);
        let clock = InjectedClock::new(base, offset, drift);
        let client =
            Client::connect_with_clock(server.options(&room, &server.student(&format!("s-{i}"))), Arc::new(clock))
                .await?;
        clients.push((client, clock));
    }
    let (status, _) = server.http("POST", &format!("/api/rooms/{room}/start"), Some(&teacher), None).await?;
    assert_eq!(status, 200);
    for (client, _) in &clients {
        client.wait_synced(Duration::from_secs(10)).await?;
    }

    // Offset error against the truth: the server clock is `instant - server base`.
    let server_base = server.clock.base().into_std();
    let mut worst_offset = 0i64;
    for (client, clock) in &clients {
        let now = Instant::now();
        let est = client.server_time_at(clock.reading_at(now)).expect("synced");
        let truth = nanos_between(now, server_base);
        let err = est.0 as i64 - truth;
        worst_offset = worst_offset.max(err.abs());
        let e = client.estimate().expect("synced");
        println!(
            "offset error {err:>7} ns, est rtt {} ns, unc {} ns, drift {:.1} ppm",
            e.rtt_nanos, e.uncertainty_nanos, e.drift_ppm
        );
    }
    println!("worst offset error {worst_offset} ns");
    assert!(worst_offset <= 500_000, "worst offset error {worst_offset} ns");

    // What each client schedules: every 250 ms for 3 s, the beats due within the lead
    // (1.5 s), placed on its own clock and mapped back to true instants.
    let lead = Duration::from_nanos(clients[0].0.welcome().lead_nanos);
    let mut spreads = Vec::new();
    let mut worst_vs_truth = 0i64;
    for round in 0..12u32 {
        tokio::time::sleep_until((base + Duration::from_secs(3) + Duration::from_millis(250) * round).into()).await;
        let now = Instant::now();
        let timeline = clients[0].0.timeline().expect("timeline");
        let now_server = ServerNanos(nanos_between(now, server_base) as u64);
        let until = ServerNanos(now_server.0 + lead.as_nanos() as u64);
        for beat in timeline.beats_in(now_server, until) {
            let truth = server_base + Duration::from_nanos(beat.at.0);
            let mut instants = Vec::new();
            for (client, clock) in &clients {
                let local = client.local_time_of_beat(beat.index).expect("beat known");
                let at = downbeat_client::LocalClock::instant_at(clock, local);
                worst_vs_truth = worst_vs_truth.max(nanos_between(at, truth).abs());
                instants.push(at);
            }
            let (lo, hi) = (instants.iter().min().expect("clients"), instants.iter().max().expect("clients"));
            spreads.push((*hi - *lo).as_nanos() as u64);
        }
    }
    spreads.sort_unstable();
    let p99 = spreads[spreads.len() * 99 / 100];
    println!(
        "{} beats: onset spread p50 {} ns, p99 {p99} ns; worst vs truth {worst_vs_truth} ns",
        spreads.len(),
        spreads[spreads.len() / 2]
    );
    assert!(spreads.len() >= 30);
    assert!(p99 <= 1_000_000, "onset spread p99 {p99} ns");
    assert!(worst_vs_truth <= 1_000_000, "a beat {worst_vs_truth} ns from its true instant");

    // Beat frames really flowed on datagrams to everyone.
    for (client, _) in &clients {
        assert!(client.stats().frames > 0);
    }
    Ok(())
}

/// A member's clock-sync requests name the timeline it holds. Naming the room's own asks for
/// nothing; naming an older one (a member that lost every frame of a change) brings a beat
/// frame with the current timeline at once, though the stopped room's next frame is 10 s
/// away, and is counted.
#[tokio::test]
async fn a_sync_request_naming_an_older_timeline_brings_the_current_one_at_once() -> anyhow::Result<()> {
    use downbeat_protocol::{PROTOCOL_VERSION, ServerDatagram, ServerMessage, decode_server_datagram};
    use downbeat_tests::RawSession;

    let server = TestServer::start().await?;
    let teacher = server.teacher("t-1");
    let room = server.create_room(&teacher, 120.0, 4).await?;
    let mut raw = server.raw_session().await?;
    raw.write_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-1"), &room)).await?;
    let epoch = match raw.read_message().await? {
        Some(ServerMessage::Welcome(welcome)) => welcome.timeline.epoch,
        other => anyhow::bail!("expected a welcome, got {other:?}"),
    };
    assert!(epoch >= 1);
    // The next datagram within `within`, decoded.
    async fn next(raw: &RawSession, within: Duration) -> anyhow::Result<Option<ServerDatagram>> {
        match tokio::time::timeout(within, raw.conn.receive_datagram()).await {
            Ok(datagram) => Ok(Some(decode_server_datagram(&datagram?)?)),
            Err(_) => Ok(None),
        }
    }
    // The frame of its own a member gets on joining.
    match next(&raw, Duration::from_secs(5)).await? {
        Some(ServerDatagram::Beats(frame)) => assert_eq!(frame.timeline.epoch, epoch),
        other => anyhow::bail!("expected the joining frame, got {other:?}"),
    }
    let sync = |id: u32, epoch: u64| downbeat_tests::sync_request(id, u64::from(id), epoch);

    // Holding the room's timeline: a reply, and nothing else.
    raw.conn.send_datagram(sync(1, epoch)?)?;
    match next(&raw, Duration::from_secs(5)).await? {
        Some(ServerDatagram::SyncReply(reply)) => assert_eq!(reply.id, 1),
        other => anyhow::bail!("expected the reply, got {other:?}"),
    }
    assert_eq!(server.stats.timelines_repaired.get(), 0);

    // Holding an older one: the reply and a frame with the room's timeline, in either order.
    raw.conn.send_datagram(sync(2, epoch - 1)?)?;
    let (mut replied, mut repaired) = (false, false);
    while !(replied && repaired) {
        match next(&raw, Duration::from_secs(5)).await? {
            Some(ServerDatagram::SyncReply(reply)) if reply.id == 2 => replied = true,
            Some(ServerDatagram::Beats(frame)) if frame.timeline.epoch == epoch => repaired = true,
            other => anyhow::bail!("expected the reply and a repair, got {other:?}"),
        }
    }
    assert_eq!(server.stats.timelines_repaired.get(), 1);

    // A peer that keeps naming an old timeline asks the room at most every 100 ms: twenty
    // requests at once bring at most one more repair, not twenty.
    let started = Instant::now();
    for id in 10..30 {
        raw.conn.send_datagram(sync(id, 0)?)?;
    }
    let mut replies = 0;
    while replies < 20 {
        match next(&raw, Duration::from_secs(5)).await? {
            Some(ServerDatagram::SyncReply(_)) => replies += 1,
            Some(ServerDatagram::Beats(_)) => {}
            other => anyhow::bail!("expected replies, got {other:?} after {replies}"),
        }
    }
    let allowed = 1 + started.elapsed().as_millis() as u64 / 100;
    // The room answers a view after every command queued before it: the session queued its
    // repairs before it answered the requests.
    let (status, _) = server.http("GET", &format!("/api/rooms/{room}"), Some(&teacher), None).await?;
    assert_eq!(status, 200);
    let repairs = server.stats.timelines_repaired.get() - 1;
    assert!(repairs <= allowed, "{repairs} repairs for 20 requests in {:?}", started.elapsed());
    Ok(())
}

/// The same over WebSocket, where a sync request and its reply travel as tagged datagram
/// messages on the socket: naming the room's timeline asks for nothing, naming an older one
/// brings a beat frame with the current one at once.
#[tokio::test]
async fn over_websocket_a_sync_request_naming_an_older_timeline_brings_the_current_one() -> anyhow::Result<()> {
    use downbeat_protocol::ws::{Unit, datagram_message, split};
    use downbeat_protocol::{
        PROTOCOL_VERSION, ServerDatagram, ServerMessage, decode_frame_body, decode_server_datagram,
    };
    use downbeat_tests::{RawSession, RawWebSocket};
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;

    /// What the server sent next: a control message or a datagram.
    enum Next {
        Control(ServerMessage),
        Datagram(ServerDatagram),
    }
    async fn next(raw: &mut RawWebSocket) -> anyhow::Result<Next> {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), raw.socket.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("the socket ended"))??;
            if let Message::Binary(bytes) = message {
                return Ok(match split(&bytes)? {
                    Unit::Control(body) => Next::Control(decode_frame_body(body)?),
                    Unit::Datagram(datagram) => Next::Datagram(decode_server_datagram(datagram)?),
                });
            }
        }
    }
    let sync = |id: u32, epoch: u64| -> anyhow::Result<Message> {
        let request = downbeat_tests::sync_request(id, u64::from(id), epoch)?;
        Ok(Message::Binary(datagram_message(&request).into()))
    };

    let server = TestServer::start().await?;
    let teacher = server.teacher("t-1");
    let room = server.create_room(&teacher, 120.0, 4).await?;
    let mut raw = server.raw_websocket(None).await?;
    raw.send_message(&RawSession::hello(PROTOCOL_VERSION, &server.student("s-1"), &room)).await?;
    // The welcome and the frame of its own a member gets on joining, in either order; the
    // stopped room's next frame is 10 s away.
    let (mut epoch, mut joined) = (None, false);
    while epoch.is_none() || !joined {
        match next(&mut raw).await? {
            Next::Control(ServerMessage::Welcome(welcome)) => epoch = Some(welcome.timeline.epoch),
            Next::Datagram(ServerDatagram::Beats(_)) => joined = true,
            Next::Control(_) | Next::Datagram(_) => {}
        }
    }
    let epoch = epoch.unwrap_or_default();

    raw.send(sync(1, epoch)?).await?;
    loop {
        match next(&mut raw).await? {
            Next::Datagram(ServerDatagram::SyncReply(reply)) if reply.id == 1 => break,
            Next::Datagram(ServerDatagram::Beats(frame)) => anyhow::bail!("a frame nobody asked for: {frame:?}"),
            Next::Control(_) | Next::Datagram(_) => {}
        }
    }
    assert_eq!(server.stats.timelines_repaired.get(), 0);

    raw.send(sync(2, epoch - 1)?).await?;
    let (mut replied, mut repaired) = (false, false);
    while !(replied && repaired) {
        match next(&mut raw).await? {
            Next::Datagram(ServerDatagram::SyncReply(reply)) if reply.id == 2 => replied = true,
            Next::Datagram(ServerDatagram::Beats(frame)) if frame.timeline.epoch == epoch => repaired = true,
            Next::Control(_) | Next::Datagram(_) => {}
        }
    }
    assert_eq!(server.stats.timelines_repaired.get(), 1);
    Ok(())
}
