//! Small network programs the benchmark binary runs inside the clients' namespace (`ip netns
//! exec dbnet-<id> downbeat-bench netem-helper MODE`), for the self-check and the tests.
//!
//! Servers print `ready <address>` on a line of their own once they listen. Every program is
//! bounded in packets and time. Results are one JSON line on stdout.
//!
//! UDP probe packets carry a header ([`ProbeHeader`]): the sender's client index, its
//! sequence number and send instant, and the echoing server's instant and its own sequence
//! number per client. Instants are wall-clock nanoseconds, which all processes of the machine
//! share, so one-way delays can be measured across processes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde::Serialize;

/// A helper program.
#[derive(Subcommand, Debug, Clone)]
pub enum HelperMode {
    /// Sends `count` probes from each `--from` address to a UDP echo server, one round every
    /// `interval-us`, and reports one-way delays, RTTs and reordering of the echoes.
    Probe {
        /// The echo server.
        #[arg(long)]
        server: SocketAddr,
        /// Source addresses, comma-separated (one per simulated client).
        #[arg(long, value_delimiter = ',', required = true)]
        from: Vec<Ipv4Addr>,
        /// Probes per address.
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// Time between rounds, us.
        #[arg(long, default_value_t = 10_000)]
        interval_us: u64,
        /// Probe size, bytes (at least the header).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// How long to wait for echoes after the last probe, ms.
        #[arg(long, default_value_t = 2_000)]
        wait_ms: u64,
    },
    /// Sends `count` numbered probes from one address to one UDP address, every `interval-us`.
    UdpSend {
        /// Source address.
        #[arg(long)]
        from: Ipv4Addr,
        /// Destination.
        #[arg(long)]
        to: SocketAddr,
        /// Probes.
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// Time between probes, us.
        #[arg(long, default_value_t = 1_000)]
        interval_us: u64,
        /// Probe size, bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Receives numbered probes and reports each one's sequence number and arrival instant.
    UdpSink {
        /// Address to listen on (port 0 picks one).
        #[arg(long)]
        bind: SocketAddr,
        /// Stop after this many probes.
        #[arg(long, default_value_t = 100_000)]
        count: u32,
        /// Stop after this long without a probe (once one arrived), ms.
        #[arg(long, default_value_t = 1_000)]
        idle_ms: u64,
        /// Stop after this long in any case, s.
        #[arg(long, default_value_t = 60)]
        max_seconds: u64,
    },
    /// Echoes UDP datagrams back to their sender.
    UdpEcho {
        /// Address to listen on (port 0 picks one).
        #[arg(long)]
        bind: SocketAddr,
        /// Stop after this long, s.
        #[arg(long, default_value_t = 60)]
        max_seconds: u64,
    },
    /// Echoes the bytes of every TCP connection back.
    TcpEcho {
        /// Address to listen on (port 0 picks one).
        #[arg(long)]
        bind: SocketAddr,
        /// Stop after this long, s.
        #[arg(long, default_value_t = 60)]
        max_seconds: u64,
    },
    /// Connects to a TCP echo server from `from`, measures `rounds` round trips of 64 bytes,
    /// then sends `bytes` in bulk and checks the echo.
    TcpPing {
        /// Source address.
        #[arg(long)]
        from: Ipv4Addr,
        /// The echo server.
        #[arg(long)]
        server: SocketAddr,
        /// Round trips to time.
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        /// Bulk bytes.
        #[arg(long, default_value_t = 262_144)]
        bytes: usize,
    },
}

/// The header of a UDP probe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeHeader {
    /// The sending client's index.
    pub client: u16,
    /// The sender's sequence number (per client).
    pub seq: u32,
    /// Wall-clock send instant, ns since the Unix epoch.
    pub sent_ns: u64,
    /// Wall-clock instant the echo server answered (0 before), ns since the Unix epoch.
    pub echoed_ns: u64,
    /// The echo server's sequence number for this client (0 before).
    pub echo_seq: u32,
}

const MAGIC: &[u8; 4] = b"DBNE";

impl ProbeHeader {
    /// Encoded size, bytes.
    pub const LEN: usize = 30;

    /// Writes the header at the start of `buf` (at least [`Self::LEN`] bytes).
    pub fn write(&self, buf: &mut [u8]) {
        buf[0..4].copy_from_slice(MAGIC);
        buf[4..6].copy_from_slice(&self.client.to_be_bytes());
        buf[6..10].copy_from_slice(&self.seq.to_be_bytes());
        buf[10..18].copy_from_slice(&self.sent_ns.to_be_bytes());
        buf[18..26].copy_from_slice(&self.echoed_ns.to_be_bytes());
        buf[26..30].copy_from_slice(&self.echo_seq.to_be_bytes());
    }

    /// Reads a header, if `buf` starts with one.
    pub fn read(buf: &[u8]) -> Option<Self> {
        if buf.len() < Self::LEN || &buf[0..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Some(Self {
            client: u16::from_be_bytes([buf[4], buf[5]]),
            seq: u32_at(6),
            sent_ns: u64_at(10),
            echoed_ns: u64_at(18),
            echo_seq: u32_at(26),
        })
    }
}

/// Wall-clock now, ns since the Unix epoch.
pub fn wall_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// What `probe` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ProbeReport {
    /// Probes sent.
    pub sent: u64,
    /// Echoes received.
    pub received: u64,
    /// Wall-clock instant of the first probe, ns since the Unix epoch.
    pub first_sent_ns: u64,
    /// One-way delay of each echo (server to client), ns.
    pub down_one_way_ns: Vec<u64>,
    /// Round-trip time of each echo, ns.
    pub rtt_ns: Vec<u64>,
    /// Echoes that arrived after one the server sent later (per client).
    pub down_reordered: u64,
}

/// What `udp-sink` reports: `(seq, arrival wall-clock ns)` per probe, in arrival order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SinkReport {
    /// The probes.
    pub arrivals: Vec<(u32, u64)>,
}

/// What `tcp-ping` reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct TcpPingReport {
    /// Round-trip time of each 64-byte exchange, ns.
    pub rtt_ns: Vec<u64>,
    /// Bulk bytes echoed back intact.
    pub bulk_bytes: usize,
    /// Seconds the bulk transfer took.
    pub bulk_seconds: f64,
}

/// Runs a helper program.
pub fn run(mode: HelperMode) -> Result<()> {
    match mode {
        HelperMode::Probe { server, from, count, interval_us, size, wait_ms } => {
            let report = probe(server, &from, count, Duration::from_micros(interval_us), size, wait_ms)?;
            println!("{}", serde_json::to_string(&report)?);
        }
        HelperMode::UdpSend { from, to, count, interval_us, size } => {
            let socket = UdpSocket::bind((from, 0)).with_context(|| format!("binding {from}"))?;
            let mut buf = vec![0u8; size.max(ProbeHeader::LEN)];
            let start = Instant::now();
            for seq in 0..count {
                pace(start, Duration::from_micros(interval_us) * seq);
                ProbeHeader { seq, sent_ns: wall_nanos(), ..ProbeHeader::default() }.write(&mut buf);
                socket.send_to(&buf, to).with_context(|| format!("sending to {to}"))?;
            }
            println!("{}", serde_json::json!({ "sent": count }));
        }
        HelperMode::UdpSink { bind, count, idle_ms, max_seconds } => {
            let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            ready(socket.local_addr()?)?;
            let deadline = Instant::now() + Duration::from_secs(max_seconds);
            let mut report = SinkReport::default();
            let mut last = None::<Instant>;
            let mut buf = vec![0u8; 65_536];
            while report.arrivals.len() < count as usize
                && Instant::now() < deadline
                && last.is_none_or(|l| l.elapsed() < Duration::from_millis(idle_ms))
            {
                if let Ok(n) = socket.recv(&mut buf) {
                    let at = wall_nanos();
                    if let Some(h) = ProbeHeader::read(&buf[..n]) {
                        report.arrivals.push((h.seq, at));
                        last = Some(Instant::now());
                    }
                }
            }
            println!("{}", serde_json::to_string(&report)?);
        }
        HelperMode::UdpEcho { bind, max_seconds } => {
            let socket = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            ready(socket.local_addr()?)?;
            let deadline = Instant::now() + Duration::from_secs(max_seconds);
            let mut buf = vec![0u8; 65_536];
            while Instant::now() < deadline {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        }
        HelperMode::TcpEcho { bind, max_seconds } => tcp_echo(bind, Duration::from_secs(max_seconds))?,
        HelperMode::TcpPing { from, server, rounds, bytes } => {
            let report = tcp_ping(from, server, rounds, bytes)?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

fn ready(addr: SocketAddr) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {addr}")?;
    out.flush()?;
    Ok(())
}

/// Sleeps until `start + offset`.
fn pace(start: Instant, offset: Duration) {
    let wait = (start + offset).saturating_duration_since(Instant::now());
    if !wait.is_zero() {
        std::thread::sleep(wait);
    }
}

#[derive(Default)]
struct Echoes {
    down_one_way_ns: Vec<u64>,
    rtt_ns: Vec<u64>,
    reordered: u64,
}

fn probe(
    server: SocketAddr,
    from: &[Ipv4Addr],
    count: u32,
    interval: Duration,
    size: usize,
    wait_ms: u64,
) -> Result<ProbeReport> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut sockets = Vec::new();
    let mut receivers = Vec::new();
    for &addr in from {
        let socket = UdpSocket::bind((addr, 0)).with_context(|| format!("binding {addr}"))?;
        socket.connect(server).with_context(|| format!("connecting to {server}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let rx = socket.try_clone()?;
        let stop = stop.clone();
        receivers.push(std::thread::spawn(move || {
            let mut echoes = Echoes::default();
            let mut newest = None::<u32>;
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                let Ok(n) = rx.recv(&mut buf) else { continue };
                let now = wall_nanos();
                let Some(h) = ProbeHeader::read(&buf[..n]) else { continue };
                echoes.down_one_way_ns.push(now.saturating_sub(h.echoed_ns));
                echoes.rtt_ns.push(now.saturating_sub(h.sent_ns));
                if newest.is_some_and(|s| h.echo_seq < s) {
                    echoes.reordered += 1;
                }
                newest = newest.max(Some(h.echo_seq));
            }
            echoes
        }));
        sockets.push(socket);
    }
    let mut buf = vec![0u8; size.max(ProbeHeader::LEN)];
    let start = Instant::now();
    let first_sent_ns = wall_nanos();
    let mut sent = 0;
    for seq in 0..count {
        pace(start, interval * seq);
        for (client, socket) in sockets.iter().enumerate() {
            ProbeHeader { client: client as u16, seq, sent_ns: wall_nanos(), ..ProbeHeader::default() }.write(&mut buf);
            // A refused send (an ICMP error from an earlier probe) is a lost probe.
            if socket.send(&buf).is_ok() {
                sent += 1;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(wait_ms));
    stop.store(true, Ordering::Relaxed);
    let mut report = ProbeReport { sent, first_sent_ns, ..ProbeReport::default() };
    for r in receivers {
        let Ok(e) = r.join() else { bail!("a probe receiver panicked") };
        report.received += e.rtt_ns.len() as u64;
        report.down_one_way_ns.extend(e.down_one_way_ns);
        report.rtt_ns.extend(e.rtt_ns);
        report.down_reordered += e.reordered;
    }
    Ok(report)
}

fn tcp_echo(bind: SocketAddr, max: Duration) -> Result<()> {
    let listener = TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?;
    listener.set_nonblocking(true)?;
    ready(listener.local_addr()?)?;
    let deadline = Instant::now() + max;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                std::thread::spawn(move || echo_stream(stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e).context("accepting"),
        }
    }
    Ok(())
}

/// Echoes a TCP stream until the peer closes it.
pub fn echo_stream(mut stream: TcpStream) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn tcp_ping(from: Ipv4Addr, server: SocketAddr, rounds: u32, bytes: usize) -> Result<TcpPingReport> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.bind(&SocketAddr::new(IpAddr::V4(from), 0).into()).with_context(|| format!("binding {from}"))?;
    socket
        .connect_timeout(&server.into(), Duration::from_secs(10))
        .with_context(|| format!("connecting to {server}"))?;
    let mut stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut report = TcpPingReport::default();
    let mut buf = [0u8; 64];
    for round in 0..rounds {
        let msg = [round as u8; 64];
        let t = Instant::now();
        stream.write_all(&msg)?;
        stream.read_exact(&mut buf)?;
        report.rtt_ns.push(t.elapsed().as_nanos() as u64);
        if buf != msg {
            bail!("round {round}: the echo differs");
        }
    }
    let data: Vec<u8> = (0..bytes).map(|i| (i * 7 % 251) as u8).collect();
    let t = Instant::now();
    let mut writer = stream.try_clone()?;
    let to_send = data.clone();
    let sender = std::thread::spawn(move || writer.write_all(&to_send));
    let mut back = vec![0u8; bytes];
    BufReader::new(&stream).read_exact(&mut back).context("reading the bulk echo")?;
    match sender.join() {
        Ok(r) => r.context("sending the bulk data")?,
        Err(_) => bail!("the bulk sender panicked"),
    }
    report.bulk_seconds = t.elapsed().as_secs_f64();
    if back != data {
        bail!("the bulk echo differs");
    }
    report.bulk_bytes = bytes;
    Ok(report)
}

/// Reads lines from a helper's stdout until `ready <address>`, and returns the address.
pub fn wait_ready(stdout: &mut impl BufRead) -> Result<SocketAddr> {
    let mut line = String::new();
    loop {
        line.clear();
        if stdout.read_line(&mut line)? == 0 {
            bail!("the helper exited before it was ready");
        }
        if let Some(addr) = line.trim().strip_prefix("ready ") {
            return addr.parse().with_context(|| format!("helper said {line:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_header_round_trips() {
        let h = ProbeHeader { client: 29, seq: 123_456, sent_ns: u64::MAX - 5, echoed_ns: 42, echo_seq: 7 };
        let mut buf = [0u8; 64];
        h.write(&mut buf);
        assert_eq!(ProbeHeader::read(&buf), Some(h));
        assert_eq!(ProbeHeader::read(&buf[..29]), None);
        buf[0] = b'X';
        assert_eq!(ProbeHeader::read(&buf), None);
    }

    #[test]
    fn ready_lines_are_found() {
        let mut input = std::io::Cursor::new(b"noise\nready 10.77.1.1:4000\n".to_vec());
        assert_eq!(wait_ready(&mut input).expect("ready"), "10.77.1.1:4000".parse::<SocketAddr>().expect("addr"));
        let mut empty = std::io::Cursor::new(Vec::new());
        assert!(wait_ready(&mut empty).is_err());
    }
}
