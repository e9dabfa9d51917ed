//! The packet-level network emulator end to end: real TUN devices, a real namespace, real UDP
//! and TCP sockets, with the benchmark binary's helpers running inside the namespace.
//!
//! These tests need root, /dev/net/tun and iproute2 (CI runs as root). Without them they
//! fail and say so: they never skip. Each test uses its own emulator id, so they run in
//! parallel.

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use downbeat_bench::netem::helper::{
    ProbeHeader, ProbeReport, SinkReport, TcpPingReport, echo_stream, wait_ready, wall_nanos,
};
use downbeat_bench::netem::{Emulator, EmulatorConfig, PathParams, PowerSave, Profile};

const EXE: &str = env!("CARGO_BIN_EXE_downbeat-bench");
const MS: u64 = 1_000_000;

fn start(config: EmulatorConfig) -> Emulator {
    Emulator::start(config).unwrap_or_else(|e| {
        panic!("the network emulator could not start; these tests need root, /dev/net/tun and iproute2: {e:#}")
    })
}

fn helper_command(emulator: &Emulator, args: &[&str]) -> Command {
    let mut cmd = emulator.command_in_netns(EXE);
    cmd.arg("netem-helper").args(args).stdin(Stdio::null()).stderr(Stdio::inherit());
    cmd
}

/// Runs a helper to completion and returns its last line of output.
fn run_helper(emulator: &Emulator, args: &[&str]) -> String {
    let out = helper_command(emulator, args).output().expect("runs the helper");
    assert!(out.status.success(), "helper {args:?} failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_owned()
}

/// A helper server in the namespace; killed when dropped.
struct Server {
    child: Child,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl Server {
    fn spawn(emulator: &Emulator, args: &[&str]) -> Self {
        let mut child = helper_command(emulator, args).stdout(Stdio::piped()).spawn().expect("spawns the helper");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let addr = wait_ready(&mut stdout).expect("the helper listens");
        Self { child, stdout, addr }
    }

    /// Waits for the helper to finish and returns its last line of output.
    fn finish(mut self) -> String {
        let mut out = String::new();
        self.stdout.read_to_string(&mut out).expect("reads the helper's output");
        let status = self.child.wait().expect("waits for the helper");
        assert!(status.success(), "helper failed: {status}");
        out.lines().last().unwrap_or_default().to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn probe(emulator: &Emulator, server: SocketAddr, clients: usize, count: u32, interval_us: u64) -> ProbeReport {
    let from: Vec<String> = (0..clients).map(|i| emulator.client_addr(i).to_string()).collect();
    let line = run_helper(
        emulator,
        &[
            "probe",
            "--server",
            &server.to_string(),
            "--from",
            &from.join(","),
            "--count",
            &count.to_string(),
            "--interval-us",
            &interval_us.to_string(),
            "--wait-ms",
            "500",
        ],
    );
    serde_json::from_str(&line).expect("a probe report")
}

/// A UDP echo server in the root namespace, on the server address, until the flag is set.
fn udp_echo(emulator: &Emulator) -> (SocketAddr, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let socket = UdpSocket::bind((emulator.server_addr(), 0)).expect("binds the server address");
    socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let addr = socket.local_addr().expect("address");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                // Stamp probes with the instant they are echoed (the probe measures one way).
                if let Some(h) = ProbeHeader::read(&buf[..n]) {
                    ProbeHeader { echoed_ns: wall_nanos(), ..h }.write(&mut buf);
                }
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    });
    (addr, stop, thread)
}

fn quantile(values: &[u64], q: f64) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn loopback_carries_udp_and_tcp_both_ways() {
    let emulator = start(EmulatorConfig::new(201, 2, Profile::loopback()));

    // UDP from the namespace to a server in the root namespace, from two client addresses.
    let (addr, stop, echo) = udp_echo(&emulator);
    let report = probe(&emulator, addr, 2, 50, 2_000);
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("echo thread");
    assert_eq!((report.sent, report.received), (100, 100));

    // UDP from the root namespace to a server in the namespace.
    let server = Server::spawn(&emulator, &["udp-echo", "--bind", &format!("{}:0", emulator.client_addr(1))]);
    let socket = UdpSocket::bind((emulator.server_addr(), 0)).expect("binds");
    socket.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    for k in 0..20u8 {
        socket.send_to(&[k; 100], server.addr).expect("sends");
        let mut buf = [0u8; 200];
        let (n, from) = socket.recv_from(&mut buf).expect("the echo comes back");
        assert_eq!((&buf[..n], from), (&[k; 100][..], server.addr));
    }
    drop(server);

    // TCP from the namespace to a server in the root namespace (round trips, then 1 MB).
    let listener = TcpListener::bind((emulator.server_addr(), 0)).expect("binds");
    let addr = listener.local_addr().expect("address");
    let acceptor = std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            echo_stream(stream);
        }
    });
    let line = run_helper(
        &emulator,
        &[
            "tcp-ping",
            "--from",
            &emulator.client_addr(0).to_string(),
            "--server",
            &addr.to_string(),
            "--rounds",
            "20",
            "--bytes",
            "1048576",
        ],
    );
    let ping: TcpPingReport = serde_json::from_str(&line).expect("a tcp-ping report");
    assert_eq!((ping.rtt_ns.len(), ping.bulk_bytes), (20, 1 << 20));
    acceptor.join().expect("acceptor");

    // TCP from the root namespace to a server in the namespace.
    let server = Server::spawn(&emulator, &["tcp-echo", "--bind", &format!("{}:0", emulator.client_addr(1))]);
    let mut stream = TcpStream::connect_timeout(&server.addr, Duration::from_secs(5)).expect("connects");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let data: Vec<u8> = (0..262_144u32).map(|i| (i % 253) as u8).collect();
    let mut writer = stream.try_clone().expect("clones");
    let sent = data.clone();
    let sender = std::thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    stream.read_exact(&mut back).expect("reads the echo");
    sender.join().expect("sender").expect("writes");
    assert!(back == data, "the echo differs");
    drop(server);

    let stats = emulator.stats();
    assert!(stats.up.forwarded > 100 && stats.down.forwarded > 100, "{stats:?}");
    assert_eq!(stats.up.dropped() + stats.down.dropped(), 0);
    assert_eq!(stats.up.write_errors + stats.down.write_errors, 0);
}

#[test]
fn a_fixed_delay_shows_in_the_round_trip() {
    let emulator = start(EmulatorConfig::new(202, 1, Profile::fixed("fixed-20ms", 20 * MS, 20 * MS)));
    let (addr, stop, echo) = udp_echo(&emulator);
    let report = probe(&emulator, addr, 1, 30, 20_000);
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("echo thread");
    assert_eq!(report.received, 30);
    let rtt = &report.rtt_ns;
    assert!(rtt.iter().all(|&r| r >= 40 * MS), "a round trip under 40 ms: {rtt:?}");
    assert!(quantile(rtt, 0.9) < 60 * MS, "round trips {rtt:?}");
    // One way, as the probe measured it (the wall clock both processes share).
    assert!(report.down_one_way_ns.iter().all(|&d| d >= 20 * MS));
    assert!(quantile(&report.down_one_way_ns, 0.5) < 30 * MS);
    // The emulator's own measure of what it added.
    let stats = emulator.stats();
    assert!(stats.up.added_delay.quantile(0.0) >= 20 * MS);
    assert!(stats.up.added_delay.quantile(0.5) < 25 * MS, "{stats:?}");
}

/// Sends 5,000 numbered probes from client 0 to the root namespace and returns the sequence
/// numbers that arrived, with the emulator's count of random drops.
fn lossy_run(seed: u64) -> (Vec<u32>, u64) {
    let profile = Profile { up: PathParams { loss: 0.1, ..PathParams::fixed(0) }, ..Profile::loopback() };
    let emulator = start(EmulatorConfig { seed, ..EmulatorConfig::new(203, 1, profile) });
    let socket = UdpSocket::bind((emulator.server_addr(), 0)).expect("binds");
    socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let to = socket.local_addr().expect("address").to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let receiver = std::thread::spawn(move || {
        let mut seqs = Vec::new();
        let mut buf = [0u8; 2048];
        while !flag.load(Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf)
                && let Some(h) = ProbeHeader::read(&buf[..n])
            {
                seqs.push(h.seq);
            }
        }
        seqs
    });
    let from = emulator.client_addr(0).to_string();
    run_helper(&emulator, &["udp-send", "--from", &from, "--to", &to, "--count", "5000", "--interval-us", "200"]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let seqs = receiver.join().expect("receiver");
    (seqs, emulator.stats().up.dropped_random)
}

#[test]
fn random_loss_has_its_rate_and_repeats_with_the_seed() {
    let (first, dropped) = lossy_run(7);
    let rate = 1.0 - first.len() as f64 / 5_000.0;
    assert!((0.08..0.12).contains(&rate), "loss {rate}");
    assert_eq!(first.len() as u64 + dropped, 5_000, "only the emulator lost probes");
    assert!(first.windows(2).all(|w| w[0] < w[1]), "in order");
    let (again, _) = lossy_run(7);
    assert_eq!(first, again, "the same seed drops the same probes");
    let (other, _) = lossy_run(8);
    assert_ne!(first, other, "another seed drops others");
}

#[test]
fn power_save_holds_downlink_packets_for_the_beacon_grid() {
    let beacon = 102_400_000;
    let profile = Profile {
        power_save: Some(PowerSave { idle_nanos: 200 * MS, beacon_nanos: beacon }),
        power_save_share: 1.0,
        ..Profile::loopback()
    };
    let emulator = start(EmulatorConfig::new(204, 1, profile));
    let sink = Server::spawn(
        &emulator,
        &["udp-sink", "--bind", &format!("{}:0", emulator.client_addr(0)), "--count", "12", "--max-seconds", "20"],
    );
    let socket = UdpSocket::bind((emulator.server_addr(), 0)).expect("binds");
    let mut buf = [0u8; 64];
    let mut awake_sent = Vec::new();
    for k in 0..6u32 {
        // Asleep (more than 200 ms idle): waits for a beacon.
        ProbeHeader { seq: 2 * k, sent_ns: wall_nanos(), ..ProbeHeader::default() }.write(&mut buf);
        socket.send_to(&buf, sink.addr).expect("sends");
        std::thread::sleep(Duration::from_millis(150));
        // Awake (that packet left less than 200 ms ago): goes straight through.
        let sent = wall_nanos();
        ProbeHeader { seq: 2 * k + 1, sent_ns: sent, ..ProbeHeader::default() }.write(&mut buf);
        socket.send_to(&buf, sink.addr).expect("sends");
        awake_sent.push(sent);
        std::thread::sleep(Duration::from_millis(350));
    }
    let report: SinkReport = serde_json::from_str(&sink.finish()).expect("a sink report");
    assert_eq!(report.arrivals.len(), 12, "{report:?}");
    let epoch = emulator.epoch_wall_nanos();
    // What is checked is which side of the beacon grid each probe fell on, not how fast the
    // emulator and the sink process forward it (a_fixed_delay_shows_in_the_round_trip measures
    // that): a fifth of a beacon interval leaves room for a loaded machine's scheduling delays,
    // while a probe released off the grid (or held when awake) would land anywhere in the
    // interval, so six of them all passing by chance has odds of (1/5)^6, about 1 in 15,600.
    let tolerance = beacon / 5;
    for &(seq, at) in &report.arrivals {
        let phase = (at - epoch) % beacon;
        if seq % 2 == 0 {
            assert!(phase < tolerance, "probe {seq} arrived {:.2} ms after a beacon", phase as f64 / 1e6);
        } else {
            let waited = at - awake_sent[seq as usize / 2];
            assert!(waited < tolerance, "awake probe {seq} took {:.2} ms", waited as f64 / 1e6);
        }
    }
    assert_eq!(emulator.stats().down.held_power_save, 6);
}

fn leftovers(id: u8) -> Vec<String> {
    let mut found = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    if String::from_utf8_lossy(&netns.stdout).split_whitespace().any(|w| w == format!("dbnet-{id}")) {
        found.push(format!("dbnet-{id}"));
    }
    for dev in [format!("dbc{id}"), format!("dbs{id}")] {
        if std::path::Path::new("/sys/class/net").join(&dev).exists() {
            found.push(dev);
        }
    }
    found
}

#[test]
fn teardown_leaves_nothing_behind_and_stale_leftovers_are_cleared() {
    // Leftovers of a killed run: the namespace and a persistent device with the same names.
    let ok = |args: &[&str]| Command::new("ip").args(args).status().is_ok_and(|s| s.success());
    assert!(ok(&["netns", "add", "dbnet-205"]) && ok(&["tuntap", "add", "dev", "dbs205", "mode", "tun"]));
    let emulator = start(EmulatorConfig::new(205, 3, Profile::lan()));
    assert_eq!(leftovers(205), ["dbnet-205", "dbs205"], "running: the namespace and the server device");
    assert!(ok(&["-n", "dbnet-205", "link", "show", "dbc205"]), "the client device is in the namespace");
    drop(emulator);
    assert!(leftovers(205).is_empty(), "left behind: {:?}", leftovers(205));

    // A panic while it runs still tears it down.
    let panicked = std::panic::catch_unwind(|| {
        let _emulator = start(EmulatorConfig::new(206, 1, Profile::loopback()));
        assert_eq!(leftovers(206).len(), 2);
        panic!("a benchmark failed");
    });
    assert!(panicked.is_err());
    assert!(leftovers(206).is_empty(), "left behind after a panic: {:?}", leftovers(206));
}

#[test]
fn an_outage_drops_everything_on_its_path_for_its_duration() {
    let emulator = start(EmulatorConfig::new(207, 2, Profile::loopback()));
    let (addr, stop, echo) = udp_echo(&emulator);
    emulator.outage(downbeat_bench::netem::Target::Client(0), Duration::from_secs(30));
    let started = Instant::now();
    let report = probe(&emulator, addr, 2, 20, 5_000);
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("echo thread");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Client 0's probes all died, client 1's all came back.
    assert_eq!((report.sent, report.received), (40, 20));
    let stats = emulator.stats();
    assert_eq!((stats.up.dropped_outage, stats.down.dropped_outage), (20, 0));
}
