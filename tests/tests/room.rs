//! Rooms over real sockets: HTTP creation and control, dual-stack addresses, presence, and
//! timeline changes that land on the same beat in every client.

use downbeat_protocol::{Change, LeaveReason, MicroBpm};
use downbeat_tests::{TestServer, wait_for_epoch};
use serde_json::json;

#[tokio::test]
async fn http_api_answers_with_json_and_stable_codes() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let teacher = server.teacher("t-1");
    let t = Some(teacher.as_str());
    assert_eq!(server.http("GET", "/api/ping", None, None).await?, (200, json!({"status": "ok"})));

    let (status, body) = server.http("GET", "/api/cert-hashes", None, None).await?;
    assert_eq!(status, 200);
    let published: Vec<String> =
        body["hashes"].as_array().expect("hashes").iter().map(|h| h["hex"].as_str().expect("hex").to_owned()).collect();
    let expected: Vec<String> = server.hashes.iter().map(hex_of).collect();
    assert_eq!(published, expected, "current then next");
    assert_eq!(published.len(), 2);

    let (status, body) =
        server.http("POST", "/api/rooms", t, Some(json!({"tempo_bpm": 400.0, "beats_per_bar": 4}))).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("tempo_out_of_range")));
    let (status, body) =
        server.http("POST", "/api/rooms", t, Some(json!({"tempo_bpm": 120.0, "beats_per_bar": 0}))).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("meter_out_of_range")));
    let (status, body) = server.http("GET", "/api/rooms/nope", t, None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("room_not_found")));

    let room = server.create_room(&teacher, 120.0, 4).await?;
    let (status, body) = server.http("POST", &format!("/api/rooms/{room}/stop"), t, None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("not_running")));
    assert_eq!(server.stats.refused.get(downbeat_protocol::ErrorCode::NotRunning), 1, "counted once");
    let (status, body) = server.http("POST", &format!("/api/rooms/{room}/start"), t, None).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["effective_at_ns"].as_u64().is_some());
    let (status, body) = server.http("GET", &format!("/api/rooms/{room}"), t, None).await?;
    assert_eq!(status, 200);
    assert_eq!(body["timeline"]["segments"].as_array().map(Vec::len), Some(2), "stopped, then the start");

    let metrics = reqwest::get(format!("http://{}/metrics", server.http)).await?.text().await?;
    assert!(metrics.contains("downbeat_rooms_active 1"), "{metrics}");
    Ok(())
}

fn hex_of(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn localhost_ipv4_and_ipv6_all_reach_the_webtransport_endpoint() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let room = server.create_room(&server.teacher("t-1"), 120.0, 4).await?;
    for host in ["localhost", "127.0.0.1", "[::1]"] {
        let mut options = server.options(&room, &server.student(host));
        options.url = server.url(host);
        let client = downbeat_client::Client::connect(options).await?;
        assert_eq!(client.welcome().room.code.as_str(), room.replace('-', ""));
    }
    Ok(())
}

#[tokio::test]
async fn presence_is_announced_to_the_room() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let room = server.create_room(&server.teacher("t-1"), 120.0, 4).await?;
    let first = server.connect(&room, &server.student("first")).await?;
    let second = server.connect(&room, &server.student("second")).await?;
    assert_eq!(second.welcome().members.len(), 2);
    match first.next_event().await {
        Some(downbeat_client::Event::MemberJoined(m)) => assert_eq!(m.id, second.member_id()),
        other => panic!("expected a join, got {other:?}"),
    }
    let id = second.member_id();
    drop(second);
    loop {
        match first.next_event().await {
            Some(downbeat_client::Event::MemberLeft(left, reason)) => {
                assert_eq!((left, reason), (id, LeaveReason::Left), "closed by the client: no grace");
                break;
            }
            Some(_) => continue,
            None => panic!("session ended"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tempo_and_meter_changes_land_on_the_same_beat_in_every_client() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let token = server.teacher("t-1");
    let room = server.create_room(&token, 120.0, 4).await?;
    let mut clients = vec![server.connect(&room, &token).await?];
    for i in 1..8 {
        clients.push(server.connect(&room, &server.student(&format!("s-{i}"))).await?);
    }
    let teacher = &clients[0];
    let start = teacher.change(Change::Start { count_in_bars: 0 }).await?;
    let asked = server.clock.now();
    let tempo = teacher.change(Change::SetTempo(MicroBpm::from_bpm(90))).await?;
    let meter = teacher.change(Change::SetMeter(3)).await?;
    let (start, tempo, meter) =
        (start.applied.expect("a boundary"), tempo.applied.expect("a boundary"), meter.applied.expect("a boundary"));
    assert!(tempo.effective_at.0 >= start.effective_at.0);
    assert_eq!(tempo.effective_beat % 4, 0, "a bar boundary of the 4/4 bar");
    assert_eq!(meter.effective_at, tempo.effective_at, "announced together, applied together");
    let lead = teacher.welcome().lead_nanos;
    for c in &clients {
        wait_for_epoch(c, meter.epoch).await?;
    }
    // The server's own view, over HTTP, and every client's view agree beat for beat.
    let reference = teacher.timeline().expect("timeline");
    assert!(tempo.effective_at.0 >= asked.0 + lead, "announced at least one lead ahead");
    for c in &clients {
        let t = c.timeline().expect("timeline");
        assert_eq!(t.epoch(), meter.epoch);
        for beat in tempo.effective_beat - 4..tempo.effective_beat + 12 {
            assert_eq!(t.time_of(beat), reference.time_of(beat));
            assert_eq!(t.beat_in_bar(beat), reference.beat_in_bar(beat));
        }
        assert_eq!(t.beat_in_bar(tempo.effective_beat), Some(0));
        assert_eq!(t.beat_in_bar(tempo.effective_beat + 3), Some(0), "3/4 from the boundary on");
        // Beat spacing is 0.5 s before the boundary and 2/3 s after it: no jump in the count.
        let before = t.time_of(tempo.effective_beat).unwrap().0 - t.time_of(tempo.effective_beat - 1).unwrap().0;
        let after = t.time_of(tempo.effective_beat + 1).unwrap().0 - t.time_of(tempo.effective_beat).unwrap().0;
        assert_eq!(before, 500_000_000);
        assert_eq!(after, 666_666_667);
    }
    Ok(())
}
