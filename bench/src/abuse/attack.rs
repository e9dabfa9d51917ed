//! The attacks of the abuse scenario. Each runs in a child process of its own (this program,
//! `attack-helper`, started under `nice` so that the attacker's own CPU, which on a real
//! network is on other machines, does not crowd out the server it attacks), from addresses of
//! its own on the loopback network, until its stdin closes. It prints `attacking` once the
//! attack is at full strength, then, at the end, its counters as JSON.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use downbeat_client::{Client, ClientError, ConnectOptions};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::watch;

/// One attack.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Attack {
    /// Connections to the HTTP listener that send a request's header a line at a time, one
    /// line a second, and never finish it (slowloris); each one closed is opened again.
    SlowHttp {
        /// The HTTP listener.
        target: SocketAddr,
        /// Connections kept open at once.
        connections: usize,
        /// Source addresses they come from (spread evenly).
        sources: usize,
    },
    /// QUIC handshakes that send their Initial packet and never answer: `handshakes` new ones
    /// every `every_ms`, so that many are always stalled.
    StalledQuic {
        /// The WebTransport (QUIC) endpoint.
        target: SocketAddr,
        /// Handshakes started each round.
        handshakes: usize,
        /// Source addresses (one UDP socket each).
        sources: usize,
        /// Time between rounds, in ms.
        every_ms: u64,
    },
    /// One student of the class: notes as fast as `notes_per_second` on their seated session,
    /// and joins as fast as the server answers, guessing room codes.
    Flood {
        /// The server's WebTransport URL.
        url: String,
        /// Its certificate hashes, hex.
        cert_hashes: Vec<String>,
        /// The student's token.
        token: String,
        /// The class's room code.
        code: String,
        /// Notes a second on the seated session.
        notes_per_second: u32,
    },
    /// Storms of `connections` HTTP connections at once, each asking `/api/health` and
    /// reading the answer, one storm after another.
    Storm {
        /// The HTTP listener.
        target: SocketAddr,
        /// Connections per storm.
        connections: usize,
        /// Source addresses they come from.
        sources: usize,
    },
}

impl Attack {
    /// The attack's name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SlowHttp { .. } => "slow-http",
            Self::StalledQuic { .. } => "stalled-quic",
            Self::Flood { .. } => "flood",
            Self::Storm { .. } => "storm",
        }
    }

    /// The second octet of the loopback addresses this attack sends from (127.X.0.1 ...):
    /// apart from the class's (127.0.x.x) and from each other's.
    fn source_octet(&self) -> u8 {
        match self {
            Self::SlowHttp { .. } => 70,
            Self::StalledQuic { .. } => 71,
            Self::Flood { .. } => 72,
            Self::Storm { .. } => 73,
        }
    }
}

/// What an attack did: counters by name, and remarks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttackReport {
    /// Counters by name (see each attack).
    pub counters: BTreeMap<String, u64>,
    /// Remarks (e.g. how the flooding student's session ended).
    pub notes: Vec<String>,
}

/// Counters shared by an attack's tasks.
#[derive(Debug, Default)]
struct Counters(Mutex<BTreeMap<String, u64>>);

impl Counters {
    fn add(&self, name: &str, n: u64) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner).entry(name.to_owned()).or_default() += n;
    }

    fn get(&self, name: &str) -> u64 {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get(name).copied().unwrap_or(0)
    }

    fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// Runs the helper: the attack in `spec_path` until stdin closes; its report as JSON to stdout.
pub fn run_helper(spec_path: &std::path::Path) -> Result<()> {
    let attack: Attack = serde_json::from_slice(&std::fs::read(spec_path).context("reading the attack spec")?)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(async {
        let (stop_tx, stop) = watch::channel(false);
        tokio::task::spawn_blocking(move || {
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
            let _ = stop_tx.send(true);
        });
        run(attack, stop).await
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Source address `i` of `attack`.
fn source(attack: &Attack, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, attack.source_octet(), (i / 250) as u8, 1 + (i % 250) as u8))
}

async fn run(attack: Attack, stop: watch::Receiver<bool>) -> Result<AttackReport> {
    let counters = Arc::new(Counters::default());
    let mut notes = Vec::new();
    match &attack {
        Attack::SlowHttp { target, connections, sources } => {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..*connections {
                let from = source(&attack, i % sources.max(&1));
                tasks.spawn(slow_connection(*target, from, counters.clone(), stop.clone()));
            }
            // Full strength once every connection opened (or could not, after 10 s).
            let began = Instant::now();
            while counters.get("opened") + counters.get("connect_failed") < *connections as u64
                && began.elapsed() < Duration::from_secs(10)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("attacking");
            while tasks.join_next().await.is_some() {}
        }
        Attack::StalledQuic { target, handshakes, sources, every_ms } => {
            stalled_quic(&attack, *target, *handshakes, *sources, Duration::from_millis(*every_ms), &counters, stop)
                .await?;
        }
        Attack::Flood { url, cert_hashes, token, code, notes_per_second } => {
            notes =
                flood(url, cert_hashes, token, code, *notes_per_second, source(&attack, 0), &counters, stop).await?;
        }
        Attack::Storm { target, connections, sources } => {
            let mut stop = stop;
            println!("attacking");
            while !*stop.borrow() {
                let began = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..*connections {
                    let from = source(&attack, i % sources.max(&1));
                    tasks.spawn(storm_connection(*target, from, counters.clone()));
                }
                while tasks.join_next().await.is_some() {}
                counters.add("storms", 1);
                counters.add("storm_ms", began.elapsed().as_millis() as u64);
                if stop.has_changed().unwrap_or(true) && *stop.borrow_and_update() {
                    break;
                }
            }
        }
    }
    Ok(AttackReport { counters: counters.take(), notes })
}

async fn connect_from(from: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(Duration::from_secs(10), socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// One slowloris connection, opened again each time the server closes it, until `stop`.
async fn slow_connection(target: SocketAddr, from: IpAddr, counters: Arc<Counters>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        let Ok(mut stream) = connect_from(from, target).await else {
            counters.add("connect_failed", 1);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        counters.add("opened", 1);
        let opened = Instant::now();
        let mut line = 0_u64;
        let mut buf = [0_u8; 1024];
        let first = format!("GET /api/health HTTP/1.1\r\nHost: {target}\r\n");
        let mut next: Vec<u8> = first.into_bytes();
        loop {
            if stream.write_all(&next).await.is_err() {
                counters.add("closed_by_server", 1);
                break;
            }
            line += 1;
            next = format!("X-Slow-{line}: still typing\r\n").into_bytes();
            tokio::select! {
                read = stream.read(&mut buf) => {
                    match read {
                        Ok(0) | Err(_) => counters.add("closed_by_server", 1),
                        // An answer before the header ended: the server gave up on it (408).
                        Ok(_) => counters.add("answered_early", 1),
                    }
                    break;
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        counters.add("held_ms", opened.elapsed().as_millis() as u64);
    }
}

/// One connection of a storm: asks `/api/health`, reads the answer.
async fn storm_connection(target: SocketAddr, from: IpAddr, counters: Arc<Counters>) {
    let mut stream = match connect_from(from, target).await {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return counters.add("connect_timed_out", 1),
        Err(_) => return counters.add("connect_failed", 1),
    };
    let request = format!("GET /api/health HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        stream.read_to_end(&mut answer).await
    };
    match tokio::time::timeout(Duration::from_secs(20), exchange).await {
        Err(_) => counters.add("timed_out", 1),
        Ok(Err(_)) | Ok(Ok(_)) if answer.is_empty() => counters.add("closed_unanswered", 1),
        Ok(_) => {
            let status =
                String::from_utf8_lossy(&answer[..answer.len().min(12)]).split_whitespace().nth(1).map(str::to_owned);
            counters.add(&format!("answered_{}", status.as_deref().unwrap_or("garbled")), 1);
        }
    }
}

/// QUIC clients that send an Initial and go silent. quinn-proto (sans-IO) writes each
/// Initial; nothing that comes back is ever answered, only counted by packet type.
async fn stalled_quic(
    attack: &Attack,
    target: SocketAddr,
    handshakes: usize,
    sources: usize,
    every: Duration,
    counters: &Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        // Never verified: the handshake never gets as far as the server's certificate.
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn_proto::crypto::rustls::QuicClientConfig::try_from(Arc::new(crypto))?;
    let config = quinn_proto::ClientConfig::new(Arc::new(quic));
    let mut endpoint = quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, false, None);
    let mut sockets = Vec::new();
    let mut readers = tokio::task::JoinSet::new();
    for i in 0..sources.max(1) {
        let socket = Arc::new(UdpSocket::bind(SocketAddr::new(source(attack, i), 0)).await?);
        sockets.push(socket.clone());
        let counters = counters.clone();
        readers.spawn(async move {
            let mut buf = vec![0_u8; 2048];
            while let Ok((n, _)) = socket.recv_from(&mut buf).await {
                let kind = match buf.get(..n).and_then(|b| b.first()) {
                    // Long header: the packet type is in bits 4-5 (QUIC v1).
                    Some(b) if b & 0x80 != 0 => match (b >> 4) & 0x3 {
                        0 => "server_initials",
                        3 => "retries",
                        _ => "other_long_packets",
                    },
                    Some(_) => "short_packets",
                    None => continue,
                };
                counters.add(kind, 1);
            }
        });
    }
    let mut first = true;
    let mut buf = Vec::with_capacity(1500);
    loop {
        for i in 0..handshakes {
            let (_, mut connection) = endpoint.connect(Instant::now(), config.clone(), target, "localhost")?;
            buf.clear();
            if let Some(transmit) = connection.poll_transmit(Instant::now(), 1, &mut buf) {
                let socket = &sockets[i % sockets.len()];
                if socket.send_to(&buf[..transmit.size], target).await.is_ok() {
                    counters.add("initials_sent", 1);
                }
            }
            // The connection is dropped unanswered: this client never sends again.
        }
        if first {
            first = false;
            println!("attacking");
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    readers.abort_all();
    Ok(())
}

/// How the abuse scenario's extra students (the flooder, the latecomers) connect: from `from`,
/// a 10 s handshake deadline, no reports.
pub(super) fn student_options(url: &str, token: &str, code: &str, hashes: &[[u8; 32]], from: IpAddr) -> ConnectOptions {
    let mut options = ConnectOptions::new(url.to_owned(), token.to_owned(), code);
    options.cert_hashes = hashes.to_vec();
    options.bind_address = Some(from);
    options.handshake_timeout = Duration::from_secs(10);
    options.report_interval = None;
    options
}

/// One student flooding: a seated session playing notes far past the rate limit, and join
/// attempts with guessed codes as fast as the server answers them.
#[allow(clippy::too_many_arguments)]
async fn flood(
    url: &str,
    cert_hashes: &[String],
    token: &str,
    code: &str,
    notes_per_second: u32,
    from: IpAddr,
    counters: &Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> Result<Vec<String>> {
    let hashes = crate::downbeat::class::decode_hashes(cert_hashes)?;
    let client = Arc::new(
        Client::connect(student_options(url, token, code, &hashes, from))
            .await
            .context("the flooding student joining")?,
    );
    client.wait_synced(Duration::from_secs(10)).await.context("the flooding student's clock")?;
    println!("attacking");
    let notes = {
        let client = client.clone();
        let counters = counters.clone();
        let every = Duration::from_secs_f64(1.0 / f64::from(notes_per_second.max(1)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            for n in 0_u64.. {
                tick.tick().await;
                if client.play_note(60 + (n % 12) as u8, 100, 0).is_err() {
                    break;
                }
                counters.add("notes_sent", 1);
            }
        })
    };
    let joins = {
        let counters = counters.clone();
        let stop = stop.clone();
        let (url, token) = (url.to_owned(), token.to_owned());
        tokio::spawn(async move {
            let mut guess = 0_u32;
            while !*stop.borrow() {
                guess += 1;
                // Eight symbols of the codes' alphabet, counting up from one no room has
                // (a real code never starts with "22222").
                let alphabet = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZ";
                let wrong: String = (0..8)
                    .map(|k| if k < 5 { '2' } else { char::from(alphabet[((guess >> (5 * (7 - k))) % 32) as usize]) })
                    .collect();
                let outcome = match Client::connect(student_options(&url, &token, &wrong, &hashes, from)).await {
                    Ok(_) => "joins_admitted".to_owned(),
                    Err(ClientError::Refused { code, .. }) => format!("joins_refused_{}", code.as_str()),
                    Err(_) => "joins_failed".to_owned(),
                };
                counters.add(&outcome, 1);
            }
        })
    };
    let mut notes_out = Vec::new();
    tokio::select! {
        reason = client.closed() => notes_out.push(format!("the flooding student's session was closed: {reason}")),
        _ = stop.wait_for(|s| *s) => notes_out.push("the flooding student's session stayed open".to_owned()),
    }
    notes.abort();
    let _ = joins.await;
    client.close();
    Ok(notes_out)
}
