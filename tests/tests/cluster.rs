//! A cluster of servers over a real NATS server (`nats-server` with JetStream) and a shared
//! PostgreSQL: the room directory gives one code one owner however many nodes claim it at
//! once, a lease that runs out can be taken over and its old holder learns it lost the room,
//! codes are unique across nodes, a hello on a node that does not hold the room is answered
//! with where it lives, which native clients follow over WebTransport and WebSocket, and the
//! room's HTTP calls there are forwarded to its node.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use downbeat_client::{Client, ClientError, Event};
use downbeat_protocol::ErrorCode;
use downbeat_protocol::Transport;
use downbeat_server::auth::Role;
use downbeat_server::cluster::{Cluster, Located, NodeEntry};
use downbeat_server::config::TenantLimits;
use downbeat_tests::db::{Backend, TestDatabase};
use downbeat_tests::nats::NatsServer;
use downbeat_tests::{TestServer, events_until, operators, school};

const SECRET_A: &[u8; 32] = b"school-a-secret-0123456789abcdef";
const SECRET_OPS: &[u8; 32] = b"operators-secret-0123456789abcde";

fn node(id: &str) -> NodeEntry {
    NodeEntry {
        id: id.to_owned(),
        http_url: format!("http://{id}.example:4480"),
        webtransport_url: format!("https://{id}.example:4433/"),
        websocket_url: format!("ws://{id}.example:4480/api/ws"),
        certificate_hashes: Vec::new(),
        lease_until_ms: 0,
        usage: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_code_has_one_owner_and_a_lapsed_lease_is_taken_over_and_fenced() -> Result<()> {
    let nats = NatsServer::start().await?;
    let lease = Duration::from_secs(5);
    let mut nodes = Vec::new();
    for id in ["node-a", "node-b", "node-c"] {
        nodes.push(Cluster::connect(&nats.url, node(id), lease).await?);
    }
    // Three nodes claim the same 100 codes at the same time: each code gets one owner.
    let mut owners = [0_usize; 3];
    for i in 0..100 {
        let code = format!("CODE{i:04}");
        let (a, b, c) = tokio::join!(
            nodes[0].claim("school", &code),
            nodes[1].claim("school", &code),
            nodes[2].claim("school", &code)
        );
        let won: Vec<bool> = vec![a?, b?, c?];
        ensure!(won.iter().filter(|w| **w).count() == 1, "{code}: {won:?}");
        let owner = won.iter().position(|w| *w).context("an owner")?;
        owners[owner] += 1;
        // The others see where it lives.
        for (n, other) in nodes.iter().enumerate().filter(|(n, _)| *n != owner) {
            let found =
                other.locate("school", &code).await?.elsewhere().with_context(|| format!("node {n} finds {code}"))?;
            ensure!(found.id == nodes[owner].node_id(), "{code} found on {}", found.id);
        }
        ensure!(nodes[owner].locate("school", &code).await? == Located::Nowhere, "the owner is not told to move");
    }
    println!("claims won by node: {owners:?}");
    // Released, a code is free again; another school's same code is another key.
    let owner = nodes.iter().position(|_| true).context("a node")?;
    ensure!(nodes[1].claim("other-school", "CODE0000").await?, "another school's code is its own");
    for n in &nodes {
        n.release("school", "CODE0000").await;
    }
    ensure!(nodes[owner].locate("school", "CODE0000").await? == Located::Nowhere);
    ensure!(nodes[2].claim("school", "CODE0000").await?, "a released code is free");

    // A node that stops renewing (a crash, a pause): its lease lapses, another node takes the
    // room over by revision, and the old holder learns from its watch that it lost it, as the
    // takeover is written (without renewing).
    let short = Duration::from_millis(600);
    let paused = Cluster::connect(&nats.url, node("node-paused"), short).await?;
    let taker = Cluster::connect(&nats.url, node("node-taker"), short).await?;
    let claimed_at = Instant::now();
    ensure!(paused.claim("school", "LAPSED01").await?);
    ensure!(!taker.claim("school", "LAPSED01").await?, "a live lease holds");
    let taken = loop {
        if taker.claim("school", "LAPSED01").await? {
            break claimed_at.elapsed();
        }
        ensure!(claimed_at.elapsed() < Duration::from_secs(5), "the lapsed lease was never taken over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(taken >= short, "taken over after {taken:?}, before the lease of {short:?} ran out");
    println!("a lapsed lease of {short:?} was taken over after {taken:?}");
    let lost =
        tokio::time::timeout(Duration::from_secs(5), paused.lost_rooms()).await.context("learned of the loss")?;
    ensure!(lost == [("school".to_owned(), "LAPSED01".to_owned())], "{lost:?}");
    ensure!(!paused.holds("school", "LAPSED01"), "the old holder stopped holding it");
    taker.renew().await;
    ensure!(taker.holds("school", "LAPSED01"), "the new holder keeps it");
    let found = nodes[0].locate("school", "LAPSED01").await?.elsewhere().context("located")?;
    ensure!(found.id == "node-taker", "{found:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_on_the_wrong_node_ends_on_the_owner_and_codes_are_unique_across_nodes() -> Result<()> {
    let nats = NatsServer::start().await?;
    let db = TestDatabase::new(Backend::Postgres).await;
    let mut servers = Vec::new();
    for i in 1..=3 {
        let url = nats.url.clone();
        let server = TestServer::start_on(&db, move |c| {
            c.tenants = vec![school("a", SECRET_A, TenantLimits::default())];
            c.operators = Some(operators(SECRET_OPS));
            c.cluster = Some(url);
            c.node_id = Some(format!("node-{i}"));
            // Leases renewed (and clocks measured) every half second.
            c.cluster_lease_ms = 1_500;
        })
        .await?;
        // Node 3's native clients come over WebSocket.
        servers.push(if i == 3 { server.over(Transport::WebSocket) } else { server });
    }
    let mint = |role, sub: &str| {
        servers[0].tenants.mint("a", role, sub, &format!("Person {sub}"), Duration::from_secs(3600)).expect("mints")
    };
    let teacher = mint(Role::Teacher, "t-1");
    // Reads the directory; its own node entry lapses at once (it never renews it), so the
    // nodes do not count it among them.
    let observer = Cluster::connect(&nats.url, node("observer"), Duration::from_millis(1)).await?;

    // Rooms created on every node at once: every code distinct, each owned where it was made.
    let mut codes = BTreeSet::new();
    for round in 0..4 {
        let (a, b, c) = tokio::join!(
            servers[0].create_room(&teacher, 100.0, 4),
            servers[1].create_room(&teacher, 100.0, 4),
            servers[2].create_room(&teacher, 100.0, 4)
        );
        for (n, code) in [a?, b?, c?].into_iter().enumerate() {
            let plain = code.replace('-', "");
            let owner =
                observer.locate("a", &plain).await?.elsewhere().with_context(|| format!("{code} in the directory"))?;
            ensure!(
                owner.id == format!("node-{}", n + 1),
                "round {round}: {code} made on node {} lives on {}",
                n + 1,
                owner.id
            );
            ensure!(codes.insert(plain), "{code} given twice");
        }
    }
    // The teacher's room list on any node holds their rooms on every node, each with where
    // it lives (as that node's watch saw the directory, a moment behind).
    let listed = async {
        loop {
            let (status, body) = servers[1].http("GET", "/api/rooms", Some(&teacher), None).await?;
            ensure!(status == 200, "{body}");
            let rooms = body["rooms"].as_array().context("rooms")?;
            let listed: BTreeSet<(String, String)> = rooms
                .iter()
                .filter_map(|r| Some((r["code"].as_str()?.replace('-', ""), r["node"].as_str()?.to_owned())))
                .collect();
            if listed.len() == codes.len() {
                return Ok::<_, anyhow::Error>(listed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let listed = tokio::time::timeout(Duration::from_secs(10), listed).await.context("every room listed")??;
    for (code, node) in &listed {
        ensure!(codes.contains(code), "{code} listed but not made");
        let owner = observer.locate("a", code).await?.elsewhere().context("located")?;
        ensure!(&owner.id == node, "{code} listed on {node}, lives on {}", owner.id);
    }

    // A student says hello to node 2 for a room of node 1: told where it lives, the client
    // connects there; another student on WebSocket to node 3 does the same.
    let code = servers[0].create_room(&teacher, 120.0, 4).await?;
    let owner = servers[0].connect(&code, &teacher).await?;
    let mut students = Vec::new();
    for (i, (via, label)) in [(&servers[1], "webtransport"), (&servers[2], "websocket")].into_iter().enumerate() {
        let token = mint(Role::Student, &format!("s-{i}"));
        let student = Client::connect(via.options(&code, &token)).await?;
        let id = student.member_id();
        events_until(&owner, |e| matches!(e, Event::MemberJoined(m) if m.id == id)).await?;
        let presence = student.presence();
        ensure!(presence.iter().any(|m| m.id == owner.member_id()), "{label}: the student sits with the teacher");
        println!("{label}: a hello on another node ended on the owner (member {id})");
        students.push(student);
    }
    // A room's HTTP calls on other nodes are forwarded to its node, and answered from there.
    let (status, body) = servers[1].http("GET", &format!("/api/rooms/{code}"), Some(&teacher), None).await?;
    ensure!(status == 200 && body["members"].as_array().map(Vec::len) == Some(3), "{status} {body}");
    let epoch = owner.timeline().context("a timeline")?.epoch();
    let (status, body) = servers[2].http("POST", &format!("/api/rooms/{code}/start"), Some(&teacher), None).await?;
    ensure!(status == 200, "start through node 3: {status} {body}");
    downbeat_tests::wait_for_epoch(&owner, epoch + 1).await?;
    let student = mint(Role::Student, "s-0");
    let (status, body) = servers[1].http("POST", &format!("/api/rooms/{code}/stop"), Some(&student), None).await?;
    ensure!((status, body["error"]["code"].as_str()) == (403, Some("forbidden")), "the owner authorizes: {body}");
    let (status, body) = servers[1].http("POST", "/api/rooms/ZZZZ-ZZZZ/start", Some(&teacher), None).await?;
    ensure!((status, body["error"]["code"].as_str()) == (404, Some("room_not_found")), "{body}");
    println!("HTTP calls on nodes 2 and 3 were forwarded to node 1");

    // The operators' inspector on any node lists every node of the cluster.
    let overview = servers[1].call("GET", "/api/inspect", &servers[1].operator("op-1"), None, (200, None)).await?;
    let listed: Vec<(String, bool)> = overview["cluster"]
        .as_array()
        .context("the cluster's nodes")?
        .iter()
        .map(|n| (n["id"].as_str().unwrap_or_default().to_owned(), n["this"] == true))
        .collect();
    let expected: Vec<(String, bool)> = (1..=3).map(|i| (format!("node-{i}"), i == 2)).collect();
    ensure!(listed == expected, "{listed:?}");
    ensure!(overview["node"]["id"] == "node-2", "{}", overview["node"]);
    // Each node measures the others' clocks over NATS. On one host the truth is zero, so each
    // estimate must be within what the exchange can tell apart: half its smallest round trip
    // (the path's asymmetry is invisible) plus three standard errors. /metrics says it too.
    let measured = async {
        loop {
            let overview =
                servers[1].call("GET", "/api/inspect", &servers[1].operator("op-1"), None, (200, None)).await?;
            let clocks: Vec<serde_json::Value> = overview["cluster"]
                .as_array()
                .context("nodes")?
                .iter()
                .filter(|n| n["this"] != true)
                .map(|n| n["clock"].clone())
                .collect();
            if clocks.iter().all(|c| !c.is_null()) {
                return Ok::<_, anyhow::Error>(clocks);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let clocks = tokio::time::timeout(Duration::from_secs(10), measured).await.context("clock measurements")??;
    for clock in &clocks {
        let offset = clock["offset_micros"].as_i64().context("offset")?;
        let rtt = clock["rtt_micros"].as_i64().context("rtt")?;
        let uncertainty = clock["uncertainty_micros"].as_i64().context("uncertainty")?;
        ensure!(offset.abs() <= rtt / 2 + 3 * uncertainty + 1, "{clock}");
        println!(
            "node-2 measured {}: offset {offset} µs, ± {} µs, rtt {} µs",
            clock["node"], clock["uncertainty_micros"], clock["rtt_micros"]
        );
    }
    let (_, _, metrics) = servers[1].http_bytes("/metrics", &teacher).await?;
    let metrics = String::from_utf8(metrics)?;
    ensure!(metrics.contains("downbeat_cluster_clock_peers 2\n"), "{metrics}");

    // A code no node holds: the usual answer, from any node.
    let wrong = Client::connect(servers[1].options("ZZZZ-ZZZZ", &mint(Role::Student, "s-9"))).await;
    ensure!(matches!(&wrong, Err(ClientError::Refused { code: ErrorCode::RoomNotFound, .. })), "{:?}", wrong.err());
    // Closed, the room leaves the directory.
    let (status, body) = servers[0].http("DELETE", &format!("/api/rooms/{code}"), Some(&teacher), None).await?;
    ensure!(status == 200, "{body}");
    let plain = code.replace('-', "");
    let released = async {
        while observer.locate("a", &plain).await? != Located::Nowhere {
            tokio::task::yield_now().await;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(10), released).await.context("the closed room left the directory")??;
    Ok(())
}

/// A school's rooms and sessions on the other nodes, as `server`'s inspector counts them.
async fn elsewhere(server: &TestServer) -> Result<(u64, u64)> {
    let overview = server.call("GET", "/api/inspect", &server.operator("op-1"), None, (200, None)).await?;
    let school = overview["tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["id"] == "a"))
        .with_context(|| format!("school a in {overview}"))?;
    Ok((
        school["rooms_elsewhere"].as_u64().context("rooms_elsewhere")?,
        school["sessions_elsewhere"].as_u64().context("sessions_elsewhere")?,
    ))
}

/// Waits until `server` counts `want` (rooms, sessions) of school a on the other nodes.
async fn until_elsewhere(server: &TestServer, want: (u64, u64)) -> Result<()> {
    let counted = async {
        loop {
            if elsewhere(server).await? == want {
                return Ok::<_, anyhow::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), counted).await.with_context(|| format!("{want:?} elsewhere"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schools_room_and_session_limits_hold_across_the_cluster() -> Result<()> {
    let nats = NatsServer::start().await?;
    let db = TestDatabase::new(Backend::Postgres).await;
    let limits = TenantLimits { max_rooms: 2, max_sessions: 3, ..TenantLimits::default() };
    let mut servers = Vec::new();
    for i in 1..=2 {
        let url = nats.url.clone();
        servers.push(
            TestServer::start_on(&db, move |c| {
                c.tenants = vec![school("a", SECRET_A, limits)];
                c.operators = Some(operators(SECRET_OPS));
                c.cluster = Some(url);
                c.node_id = Some(format!("node-{i}"));
                c.cluster_lease_ms = 1_500;
            })
            .await?,
        );
    }
    let mint = |role, sub: &str| {
        servers[0].tenants.mint("a", role, sub, &format!("Person {sub}"), Duration::from_secs(3600)).expect("mints")
    };
    let teacher = mint(Role::Teacher, "t-1");
    let refused = |status: u16, body: &serde_json::Value| {
        (status, body["error"]["code"].as_str()) == (429, Some("too_many_rooms"))
    };

    // Rooms: one on each node fills the school's two; neither node opens a third.
    let first = servers[0].create_room(&teacher, 100.0, 4).await?;
    until_elsewhere(&servers[1], (1, 0)).await?;
    let second = servers[1].create_room(&teacher, 100.0, 4).await?;
    until_elsewhere(&servers[0], (1, 0)).await?;
    for server in &servers {
        let body = serde_json::json!({"name": "A third room", "tempo_bpm": 100.0, "beats_per_bar": 4});
        let (status, body) = server.http("POST", "/api/rooms", Some(&teacher), Some(body)).await?;
        ensure!(refused(status, &body), "a third room: {status} {body}");
    }
    println!("two rooms on two nodes; the third refused by both");

    // Sessions: two on node 1 and one on node 2 fill the school's three; a fourth hello is
    // refused on node 2 (its own count is one).
    let mut clients = vec![servers[0].connect(&first, &teacher).await?];
    clients.push(servers[0].connect(&first, &mint(Role::Student, "s-1")).await?);
    clients.push(servers[1].connect(&second, &mint(Role::Student, "s-2")).await?);
    until_elsewhere(&servers[1], (1, 2)).await?;
    let fourth = Client::connect(servers[1].options(&second, &mint(Role::Student, "s-3"))).await;
    ensure!(
        matches!(&fourth, Err(ClientError::Refused { code: ErrorCode::TooManySessions, .. })),
        "a fourth session: {:?}",
        fourth.err()
    );
    println!("three sessions on two nodes; the fourth refused");

    // Closed on node 1, its room and sessions leave the count, and node 2 may open a room.
    for client in clients.drain(..2) {
        client.close();
    }
    let (status, body) = servers[0].http("DELETE", &format!("/api/rooms/{first}"), Some(&teacher), None).await?;
    ensure!(status == 200, "{body}");
    until_elsewhere(&servers[1], (0, 0)).await?;
    servers[1].create_room(&teacher, 100.0, 4).await?;
    Ok(())
}
