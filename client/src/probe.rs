//! Network checks: [`probe`] opens a probe session (no token) over the transport its URL names,
//! syncs the clock for a few seconds with the engine's [`Probe`] and returns what it found
//! (round trips, sync quality, and how the probe ended), as the browser's `/check` page does.

use std::time::Duration;

use downbeat_engine::probe::{Probe, State};
use tokio::time::{Instant, sleep_until, timeout};

pub use downbeat_engine::probe::{Config, End, Quality, Summary};

use crate::clock::{LocalClock, SystemClock};
use crate::{ClientError, ConnectOptions, transport};

/// Where to probe and for how long.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// The server's WebTransport URL (`https://…`) or WebSocket URL (`ws://…/api/ws`,
    /// `wss://…`).
    pub url: String,
    /// Certificate hashes to pin, as in [`ConnectOptions::cert_hashes`].
    pub cert_hashes: Vec<[u8; 32]>,
    /// How long to sync and how often.
    pub config: Config,
    /// How long opening the session and the server's answer may take.
    pub handshake_timeout: Duration,
}

impl ProbeOptions {
    /// A probe of `url` with the default schedule (3 s, a request every 50 ms) and a 10 s
    /// handshake timeout.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cert_hashes: Vec::new(),
            config: Config::default(),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Probes the server as `options` say, on the machine's clock. A refusal or an end the server
/// chose is in the summary ([`Summary::end`]); `Err` only when no session could be opened or
/// the server did not answer in time.
pub async fn probe(options: &ProbeOptions) -> Result<Summary, ClientError> {
    let clock = SystemClock::new();
    let connect =
        ConnectOptions { cert_hashes: options.cert_hashes.clone(), ..ConnectOptions::new(&options.url, "", "") };
    let opened = timeout(options.handshake_timeout, transport::open(&connect)).await;
    let transport = opened.map_err(|_| ClientError::Timeout("the probe session to open"))??;
    let (mut probe, frame) = Probe::start(options.config);
    transport.send_control(&frame).await?;
    let answered = timeout(options.handshake_timeout, async {
        while probe.state() == State::Starting {
            match transport.recv_control().await {
                Some(bytes) => probe.handle_control_bytes(clock.now(), &bytes),
                None => probe.handle_closed("the server ended the session before answering"),
            }
        }
    })
    .await;
    if answered.is_err() {
        transport.close(0, b"");
        return Err(ClientError::Timeout("the server's answer to the probe"));
    }
    while probe.state() == State::Running {
        let wake = probe.poll_timeout().map_or_else(Instant::now, |at| clock.instant_at(at).into());
        tokio::select! {
            // Control first: when the server ends the probe, its goodbye (probe_over) is queued
            // before the transport's channels close, and picking the closed datagram channel
            // first would report a lost connection instead of the server's reason.
            biased;
            bytes = transport.recv_control() => match bytes {
                Some(bytes) => probe.handle_control_bytes(clock.now(), &bytes),
                None => probe.handle_closed("the server ended the session"),
            },
            datagram = transport.recv_datagram() => match datagram {
                Some(datagram) => {
                    // Stamped first: it is a sync reply.
                    let t3 = clock.now();
                    // An undecodable datagram is dropped, as every client does.
                    let _ = probe.handle_datagram(t3, &datagram);
                }
                None => probe.handle_closed("the connection closed"),
            },
            () = sleep_until(wake) => {
                let now = clock.now();
                while let Some(request) = probe.poll_datagram(now) {
                    // A full send buffer drops it; the probe counts what comes back.
                    let _ = transport.send_datagram(&request);
                }
            }
        }
    }
    transport.close(0, b"");
    Ok(probe.summary(clock.now()))
}
