//! The network check pages run before anyone signs in: [`probe`] opens a probe session (no
//! token) on one transport, syncs the clock for a few seconds with the engine's
//! `downbeat_engine::probe::Probe`, closes, and resolves to what it found. It never rejects for
//! a network reason: an unreachable server is a result (`reachable: false` with a code), so a
//! page can run one probe per transport side by side and compare.

use std::cell::RefCell;
use std::rc::Rc;

use downbeat_engine::probe::{self, End, Probe, State, Summary};
use downbeat_protocol::ErrorCode;
use futures_util::future::{Either, select};
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::spawn_local;

use crate::classroom::{endpoints, invalid};
use crate::js::{self, CLOSED, CONNECT_FAILED, NOT_SYNCED, PROTOCOL, TIMEOUT};
use crate::transport::{self, Kind, Transport};

/// Default time a probe syncs once started (ms).
const DEFAULT_DURATION_MS: f64 = 3_000.0;
/// Default time opening the session and the server's answer may take (ms).
const DEFAULT_TIMEOUT_MS: f64 = 10_000.0;
/// Longest sleep of the probe's loop, so its end is noticed soon.
const MAX_SLEEP_MS: f64 = 50.0;

/// `probe()`'s options (every field may be left out; a missing `transport` is refused).
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct ProbeOptions {
    transport: String,
    url: Option<String>,
    certificate_hashes: Vec<String>,
    web_socket_url: Option<String>,
    duration_ms: Option<f64>,
    timeout_ms: Option<f64>,
}

/// A positive number of milliseconds (`what` names it in the error), or `default`.
fn millis(value: Option<f64>, default: f64, what: &str) -> Result<f64, js::Failure> {
    match value {
        None => Ok(default),
        Some(ms) if ms.is_finite() && ms > 0.0 => Ok(ms),
        Some(ms) => Err(invalid(format!("{what} must be a positive number of milliseconds, not {ms}"))),
    }
}

/// Checks whether the server is reachable on one transport and how well the clock syncs
/// there: resolves to a `ProbeResult` (also when the server could not be reached); rejects only
/// with `invalid_argument` for bad options.
#[wasm_bindgen(unchecked_return_type = "ProbeResult")]
pub async fn probe(
    #[wasm_bindgen(unchecked_param_type = "ProbeOptions")] options: JsValue,
) -> Result<JsValue, JsValue> {
    let options: ProbeOptions =
        serde_wasm_bindgen::from_value(options).map_err(|e| invalid(format!("probe options: {e}")))?;
    let kind = match options.transport.as_str() {
        "webtransport" => Kind::WebTransport,
        "websocket" => Kind::WebSocket,
        other => return Err(invalid(format!("transport {other:?} is not \"webtransport\" or \"websocket\"")).into()),
    };
    let endpoints = endpoints(options.url.as_deref(), &options.certificate_hashes, options.web_socket_url.as_deref())?;
    let duration_ms = millis(options.duration_ms, DEFAULT_DURATION_MS, "durationMs")?;
    let timeout_ms = millis(options.timeout_ms, DEFAULT_TIMEOUT_MS, "timeoutMs")?;
    let started_at = js::now_ms();
    let opened = match select(Box::pin(transport::open(kind, &endpoints)), Box::pin(js::sleep(timeout_ms))).await {
        Either::Left((opened, _)) => opened,
        Either::Right(((), _)) => {
            Err(js::Failure::new(TIMEOUT, format!("no {} session within {timeout_ms} ms", kind.as_str())))
        }
    };
    let transport = match opened {
        Ok(transport) => transport,
        Err(e) if e.code == js::INVALID_ARGUMENT => return Err(e.into()),
        Err(e) => return Ok(view::failed(kind, &e.code, &e.message)),
    };
    let config = probe::Config { duration_nanos: js::ms_to_nanos(duration_ms), ..probe::Config::default() };
    let (engine, frame) = Probe::start(config);
    let run = Rc::new(Run { probe: RefCell::new(engine), connect_ms: RefCell::new(None), started_at });
    if let Err(e) = transport.send_control(&frame).await {
        transport.close(0, "");
        return Ok(view::failed(kind, &e.code, &e.message));
    }
    spawn_local(control_loop(run.clone(), transport.clone()));
    spawn_local(datagram_loop(run.clone(), transport.clone()));
    loop {
        let now = js::local_now();
        let wait_ms = {
            let mut probe = run.probe.borrow_mut();
            match probe.state() {
                State::Done => break,
                State::Starting if js::now_ms() - started_at > timeout_ms => {
                    probe.handle_closed("the server did not answer the probe in time");
                    break;
                }
                State::Starting => MAX_SLEEP_MS,
                State::Running => {
                    while let Some(request) = probe.poll_datagram(now) {
                        transport.send_datagram(&request);
                    }
                    probe.poll_timeout().map_or(0.0, |at| js::nanos_to_ms(at.0.saturating_sub(now.0)))
                }
            }
        };
        js::sleep(wait_ms.clamp(1.0, MAX_SLEEP_MS)).await;
    }
    transport.close(0, "");
    let summary = run.probe.borrow().summary(js::local_now());
    Ok(view::result(kind, &summary, *run.connect_ms.borrow()))
}

/// What the probe's loops share.
struct Run {
    probe: RefCell<Probe>,
    /// When the server answered, ms after the probe began.
    connect_ms: RefCell<Option<f64>>,
    started_at: f64,
}

async fn control_loop(run: Rc<Run>, transport: Rc<dyn Transport>) {
    loop {
        let bytes = transport.recv_control().await;
        let mut probe = run.probe.borrow_mut();
        match bytes {
            Some(bytes) => probe.handle_control_bytes(js::local_now(), &bytes),
            None => probe.handle_closed("the server ended the session"),
        }
        if probe.state() != State::Starting && run.connect_ms.borrow().is_none() {
            *run.connect_ms.borrow_mut() = Some(js::now_ms() - run.started_at);
        }
        if probe.state() == State::Done {
            return;
        }
    }
}

async fn datagram_loop(run: Rc<Run>, transport: Rc<dyn Transport>) {
    while let Some(bytes) = transport.recv_datagram().await {
        // Stamped first: it is a sync reply.
        let t3 = js::local_now();
        let mut probe = run.probe.borrow_mut();
        if probe.state() == State::Done {
            return;
        }
        if let Err(e) = probe.handle_datagram(t3, &bytes) {
            js::warn("downbeat: dropped an undecodable datagram", &JsValue::from_str(&e.to_string()));
        }
    }
}

mod view {
    use super::*;

    /// What `probe()` resolves to (the `ProbeResult` of the TypeScript declarations).
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct ProbeResult<'a> {
        transport: &'static str,
        reachable: bool,
        code: Option<&'a str>,
        message: Option<&'a str>,
        connect_ms: Option<f64>,
        rtt_ms: Option<Rtt>,
        uncertainty_ms: Option<f64>,
        error_bound_ms: Option<f64>,
        synced: bool,
        quality: Option<&'static str>,
        samples: usize,
        sent: u32,
    }

    #[derive(Serialize)]
    struct Rtt {
        min: f64,
        p50: f64,
        p95: f64,
    }

    /// No session: why.
    pub(super) fn failed(kind: Kind, code: &str, message: &str) -> JsValue {
        crate::view::to_js(&ProbeResult {
            transport: kind.as_str(),
            reachable: false,
            code: Some(code),
            message: Some(message),
            connect_ms: None,
            rtt_ms: None,
            uncertainty_ms: None,
            error_bound_ms: None,
            synced: false,
            quality: None,
            samples: 0,
            sent: 0,
        })
    }

    /// A probe that ran (or was refused): what it found.
    pub(super) fn result(kind: Kind, s: &Summary, connect_ms: Option<f64>) -> JsValue {
        let ms = |nanos: Option<u64>| nanos.map(js::nanos_to_ms);
        let (code, message) = match &s.end {
            Some(End::Server { code: ErrorCode::ProbeOver, .. }) | Some(End::Done) | None => (None, None),
            Some(End::Server { code, message }) => (Some(code.as_str()), Some(message.as_str())),
            Some(End::Protocol(message)) => (Some(PROTOCOL), Some(message.as_str())),
            Some(End::Lost(message)) if s.started => (Some(CLOSED), Some(message.as_str())),
            Some(End::Lost(message)) => (Some(CONNECT_FAILED), Some(message.as_str())),
        };
        let (code, message) = if code.is_none() && s.started && s.samples == 0 {
            (Some(NOT_SYNCED), Some("no clock-sync reply came back"))
        } else {
            (code, message)
        };
        let rtt_ms = match (s.rtt_min_nanos, s.rtt_p50_nanos, s.rtt_p95_nanos) {
            (Some(min), Some(p50), Some(p95)) => {
                Some(Rtt { min: js::nanos_to_ms(min), p50: js::nanos_to_ms(p50), p95: js::nanos_to_ms(p95) })
            }
            _ => None,
        };
        crate::view::to_js(&ProbeResult {
            transport: kind.as_str(),
            reachable: s.reachable(),
            code,
            message,
            connect_ms,
            rtt_ms,
            uncertainty_ms: ms(s.uncertainty_nanos),
            error_bound_ms: ms(s.error_bound_nanos),
            synced: s.synced,
            quality: s.quality.map(probe::Quality::as_str),
            samples: s.samples,
            sent: s.sent,
        })
    }
}
