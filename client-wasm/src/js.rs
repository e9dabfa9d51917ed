//! Small bridges to the JavaScript world: the page's clock, timers, randomness, errors,
//! reading object fields, the page's own address and `localStorage`. Everything works in a window and in a worker (it goes through the
//! global object, never `window`).

use std::fmt;

use downbeat_protocol::{ClientNanos, ErrorCode};
use js_sys::{Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// A failure with a stable code: the server's codes (`room_not_found`, `not_teacher`...) or
/// this package's own (see [`Failure::closed`] and friends). Becomes a `DownbeatError` in JS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) code: String,
    pub(crate) message: String,
    /// Where the room lives, when the server answered the hello with `moved`.
    pub(crate) moved: Option<Box<downbeat_protocol::Moved>>,
}

impl Failure {
    pub(crate) fn new(code: &str, message: impl Into<String>) -> Self {
        Self { code: code.to_owned(), message: message.into(), moved: None }
    }

    /// The server refused with a stable code.
    pub(crate) fn server(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(code.as_str(), message)
    }

    /// The session (or the whole classroom) is closed.
    pub(crate) fn closed() -> Self {
        Self::new(CLOSED, "the session is closed")
    }

    /// The server sent something this client cannot understand.
    pub(crate) fn protocol(message: impl fmt::Display) -> Self {
        Self::new(PROTOCOL, format!("protocol error: {message}"))
    }

    /// Converts to a JS `Error` named `DownbeatError` with a `code` property.
    pub(crate) fn into_js(self) -> JsValue {
        let error = js_sys::Error::new(&self.message);
        error.set_name("DownbeatError");
        // Setting a property on a fresh Error object cannot fail.
        let _ = Reflect::set(&error, &"code".into(), &JsValue::from_str(&self.code));
        error.into()
    }
}

impl From<Failure> for JsValue {
    fn from(f: Failure) -> Self {
        f.into_js()
    }
}

/// The WebTransport session could not be opened.
pub(crate) const CONNECT_FAILED: &str = "connect_failed";
/// The session or classroom is closed.
pub(crate) const CLOSED: &str = "closed";
/// Waited too long (for the welcome).
pub(crate) const TIMEOUT: &str = "timeout";
/// The clock is not estimated yet.
pub(crate) const NOT_SYNCED: &str = "not_synced";
/// Undecodable input from the server.
pub(crate) const PROTOCOL: &str = "protocol";
/// The options or arguments given by the page are invalid.
pub(crate) const INVALID_ARGUMENT: &str = "invalid_argument";

/// The global object (`window` or a worker's `self`).
fn global() -> Object {
    js_sys::global()
}

fn get(target: &JsValue, key: &str) -> JsValue {
    Reflect::get(target, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
}

/// A numeric field of `target`, if it is a finite number.
pub(crate) fn number_field(target: &JsValue, key: &str) -> Option<f64> {
    get(target, key).as_f64().filter(|v| v.is_finite())
}

/// Calls `target[method](...args)`; `undefined` when it is not a function or it threw.
fn call(target: &JsValue, method: &str, args: &[&JsValue]) -> JsValue {
    let Some(f) = get(target, method).dyn_into::<Function>().ok() else { return JsValue::UNDEFINED };
    let array: js_sys::Array = args.iter().copied().collect();
    f.apply(target, &array).unwrap_or(JsValue::UNDEFINED)
}

/// The page's `location.protocol` (`"https:"`) and `location.host` (`"example.org:8443"`).
pub(crate) fn page_location() -> Option<(String, String)> {
    let location = get(&global(), "location");
    Some((get(&location, "protocol").as_string()?, get(&location, "host").as_string()?))
}

/// `localStorage`, where there is one and the page may use it (reading the property throws
/// when storage is blocked; workers have none).
fn local_storage() -> Option<JsValue> {
    Reflect::get(&global(), &JsValue::from_str("localStorage")).ok().filter(JsValue::is_object)
}

/// The value stored under `key` in `localStorage`.
pub(crate) fn storage_get(key: &str) -> Option<String> {
    call(&local_storage()?, "getItem", &[&JsValue::from_str(key)]).as_string()
}

/// Stores `value` under `key` (quietly nothing where storage is blocked or full).
pub(crate) fn storage_set(key: &str, value: &str) {
    if let Some(storage) = local_storage() {
        call(&storage, "setItem", &[&JsValue::from_str(key), &JsValue::from_str(value)]);
    }
}

pub(crate) fn storage_remove(key: &str) {
    if let Some(storage) = local_storage() {
        call(&storage, "removeItem", &[&JsValue::from_str(key)]);
    }
}

/// `performance.now()` in milliseconds.
pub(crate) fn now_ms() -> f64 {
    let performance = get(&global(), "performance");
    let now = get(&performance, "now");
    now.dyn_ref::<Function>().and_then(|f| f.call0(&performance).ok()).and_then(|v| v.as_f64()).unwrap_or(0.0)
}

/// The local clock the engine runs on: `performance.now()` in nanoseconds.
pub(crate) fn local_now() -> ClientNanos {
    ms_to_local(now_ms())
}

/// A `performance.now()` instant as the engine's local clock.
pub(crate) fn ms_to_local(ms: f64) -> ClientNanos {
    // `as` saturates: negative and NaN become 0.
    ClientNanos((ms * 1e6) as u64)
}

/// Nanoseconds as float milliseconds (exact to the nanosecond for any realistic uptime).
pub(crate) fn nanos_to_ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

/// Float milliseconds as nanoseconds, saturating.
pub(crate) fn ms_to_nanos(ms: f64) -> u64 {
    (ms * 1e6) as u64
}

/// Resolves after `ms` milliseconds (`setTimeout`).
pub(crate) async fn sleep(ms: f64) {
    let promise = Promise::new(&mut |resolve, _reject| {
        let set_timeout = get(&global(), "setTimeout");
        if let Some(f) = set_timeout.dyn_ref::<Function>() {
            let _ = f.call2(&JsValue::NULL, &resolve, &JsValue::from_f64(ms.max(0.0)));
        }
    });
    let _ = JsFuture::from(promise).await;
}

/// `n` random bytes from `crypto.getRandomValues`, or from `Math.random` where there is no
/// Web Crypto (never in a secure context, which WebTransport needs anyway).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let array = Uint8Array::new_with_length(N as u32);
    let crypto = get(&global(), "crypto");
    let filled =
        get(&crypto, "getRandomValues").dyn_ref::<Function>().is_some_and(|f| f.call1(&crypto, &array).is_ok());
    if filled {
        array.copy_to(&mut out);
    } else {
        for b in &mut out {
            *b = (js_sys::Math::random() * 256.0) as u8;
        }
    }
    out
}

/// Logs a warning to the console (a listener threw, say).
pub(crate) fn warn(message: &str, detail: &JsValue) {
    web_sys::console::warn_2(&JsValue::from_str(message), detail);
}

/// Awaits a promise, turning a rejection into its message.
pub(crate) async fn settle(promise: Promise) -> Result<JsValue, String> {
    JsFuture::from(promise).await.map_err(|e| describe(&e))
}

/// A JS exception as text.
pub(crate) fn describe(e: &JsValue) -> String {
    if let Some(error) = e.dyn_ref::<js_sys::Error>() {
        return String::from(error.message());
    }
    e.as_string().unwrap_or_else(|| format!("{e:?}"))
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a 64-character hex SHA-256 hash (colons and spaces between bytes allowed).
pub(crate) fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = text.bytes().filter(|b| !matches!(b, b':' | b' ')).collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}
