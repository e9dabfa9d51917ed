//! The WebSocket [`Transport`] (the browser's `WebSocket` through web-sys), for networks that
//! block QUIC: one socket carries both the control stream and the datagrams, one tagged unit
//! per binary message ([`downbeat_protocol::ws`]).
//!
//! Received units wait in two queues, one per reading loop. The control queue is the reliable
//! stream and keeps everything; the datagram queue holds at most [`DATAGRAM_BACKLOG`] and drops
//! its oldest when full (the newest beat frame and sync reply are the useful ones). Datagrams
//! are sent only while the socket's own buffer is nearly empty, so timing traffic never waits
//! behind a slow socket. Anything the server sends that is not a well-formed binary unit closes
//! the socket, which ends the session like a lost connection.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Poll, Waker};

use downbeat_protocol::ws::{self, Unit};
use downbeat_protocol::{ErrorCode, FRAME_HEADER_LEN, frame_body_len};
use futures_util::future::{LocalBoxFuture, poll_fn, ready};
use js_sys::{ArrayBuffer, Function, Promise, Uint8Array};
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{BinaryType, CloseEvent, MessageEvent};

use crate::js::{self, CONNECT_FAILED, Failure};
use crate::transport::Transport;

/// Most received datagrams waiting for the datagram loop.
const DATAGRAM_BACKLOG: usize = 64;
/// A datagram is sent only while the socket has less than this buffered (bytes): anything more
/// means the connection is backed up, and a sync request or note queued behind it is stale.
const DATAGRAM_SEND_BUFFER: u32 = 8 * 1024;
/// The close code a normal close sends (RFC 6455 allows only 1000 and 3000-4999 from pages).
const NORMAL_CLOSURE: u16 = 1000;
/// The close code sent when the server's message is not a well-formed unit: 4000 plus the
/// error code, as the server closes (pages may not send 1002).
const BAD_MESSAGE: u16 = ws::close_code(ErrorCode::MalformedFrame);

/// An open WebSocket session.
pub(crate) struct WebSocket {
    socket: web_sys::WebSocket,
    shared: Rc<Shared>,
    /// Resolves once the socket closed (or this value was dropped).
    closed: Promise,
    resolve_closed: Function,
    /// The event handlers, kept alive as long as the socket may call them.
    _handlers: [Closure<dyn FnMut(JsValue)>; 3],
}

impl std::fmt::Debug for WebSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocket").field("url", &self.socket.url()).finish_non_exhaustive()
    }
}

/// What the event handlers and the reading loops share.
#[derive(Default)]
struct Shared {
    control: RefCell<Queue>,
    datagrams: RefCell<Queue>,
    /// Why the socket closed before it opened (a close code and reason), once it did.
    refused: RefCell<Option<String>>,
    opened: Cell<bool>,
}

/// Messages waiting for the one loop that reads them.
#[derive(Default)]
struct Queue {
    items: VecDeque<Vec<u8>>,
    ended: bool,
    reader: Option<Waker>,
}

impl Queue {
    /// Adds a message; with `cap`, drops the oldest first when full.
    fn push(&mut self, item: Vec<u8>, cap: Option<usize>) {
        if cap.is_some_and(|cap| self.items.len() >= cap) {
            self.items.pop_front();
        }
        self.items.push_back(item);
        self.wake();
    }

    fn end(&mut self) {
        self.ended = true;
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(waker) = self.reader.take() {
            waker.wake();
        }
    }
}

/// The next message of `queue`; `None` once it ended and is empty.
async fn next(queue: &RefCell<Queue>) -> Option<Vec<u8>> {
    poll_fn(|cx| {
        let mut queue = queue.borrow_mut();
        if let Some(item) = queue.items.pop_front() {
            Poll::Ready(Some(item))
        } else if queue.ended {
            Poll::Ready(None)
        } else {
            queue.reader = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

/// A promise and the function that resolves it.
fn deferred() -> (Promise, Function) {
    let mut resolve = None;
    let promise = Promise::new(&mut |res, _rej| resolve = Some(res));
    // The executor runs synchronously inside `new Promise`.
    (promise, resolve.unwrap_or_else(|| Function::new_no_args("")))
}

impl WebSocket {
    /// Opens a socket to `url` (`ws:` or `wss:`) and waits until it is open.
    pub(crate) async fn open(url: &str) -> Result<Self, Failure> {
        let failed = |what: &str, e: String| Failure::new(CONNECT_FAILED, format!("{what} {url}: {e}"));
        let socket =
            web_sys::WebSocket::new(url).map_err(|e| failed("cannot open a WebSocket to", js::describe(&e)))?;
        socket.set_binary_type(BinaryType::Arraybuffer);
        let shared = Rc::new(Shared::default());
        let (opened, resolve_opened) = deferred();
        let (closed, resolve_closed) = deferred();

        let on_open = {
            let (shared, resolve) = (shared.clone(), resolve_opened.clone());
            Closure::<dyn FnMut(JsValue)>::new(move |_| {
                shared.opened.set(true);
                let _ = resolve.call0(&JsValue::NULL);
            })
        };
        let on_close = {
            let (shared, resolve_opened, resolve_closed) = (shared.clone(), resolve_opened, resolve_closed.clone());
            Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
                if !shared.opened.get() {
                    let why = event.dyn_ref::<CloseEvent>().map_or_else(String::new, |e| {
                        format!("closed with code {}{}", e.code(), if e.reason().is_empty() { "" } else { ": " })
                            + &e.reason()
                    });
                    *shared.refused.borrow_mut() = Some(why);
                }
                shared.control.borrow_mut().end();
                shared.datagrams.borrow_mut().end();
                let _ = resolve_opened.call0(&JsValue::NULL);
                let _ = resolve_closed.call0(&JsValue::NULL);
            })
        };
        let on_message = {
            let (shared, socket) = (shared.clone(), socket.clone());
            Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
                let data = event.dyn_ref::<MessageEvent>().map(MessageEvent::data);
                let bytes = data.and_then(|d| d.dyn_into::<ArrayBuffer>().ok()).map(|b| Uint8Array::new(&b).to_vec());
                match bytes.as_deref().map(ws::split) {
                    // The unit after the tag is one whole frame: the control stream's bytes.
                    Some(Ok(Unit::Control(_))) => {
                        let frame = bytes.as_deref().map(|b| b[1..].to_vec()).unwrap_or_default();
                        shared.control.borrow_mut().push(frame, None);
                    }
                    Some(Ok(Unit::Datagram(datagram))) => {
                        shared.datagrams.borrow_mut().push(datagram.to_vec(), Some(DATAGRAM_BACKLOG));
                    }
                    // A text message or a malformed unit: the server is not speaking the protocol.
                    None | Some(Err(_)) => {
                        let _ = socket.close_with_code_and_reason(BAD_MESSAGE, "malformed message");
                        shared.control.borrow_mut().end();
                        shared.datagrams.borrow_mut().end();
                    }
                }
            })
        };
        socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        // From here on, dropping `this` (a failure, or the race cancelling this attempt) closes
        // the socket.
        let this = Self { socket, shared, closed, resolve_closed, _handlers: [on_open, on_close, on_message] };
        let _ = js::settle(opened).await;
        if !this.shared.opened.get() {
            let why = this.shared.refused.borrow_mut().take().unwrap_or_default();
            return Err(failed("could not connect to", why));
        }
        Ok(this)
    }

    /// Sends each whole frame of `bytes` as one control message.
    fn send_frames(&self, mut bytes: &[u8]) -> Result<(), Failure> {
        if self.socket.ready_state() != web_sys::WebSocket::OPEN {
            return Err(Failure::closed());
        }
        while !bytes.is_empty() {
            let frame_len = bytes
                .first_chunk::<FRAME_HEADER_LEN>()
                .and_then(|header| frame_body_len(*header).ok())
                .map(|body| FRAME_HEADER_LEN + body)
                .filter(|len| *len <= bytes.len())
                .ok_or_else(|| Failure::protocol("a control write that is not whole frames"))?;
            let (frame, rest) = bytes.split_at(frame_len);
            self.socket.send_with_u8_array(&ws::control_message(frame)).map_err(|_| Failure::closed())?;
            bytes = rest;
        }
        Ok(())
    }
}

impl Transport for WebSocket {
    fn send_control<'a>(&'a self, bytes: &'a [u8]) -> LocalBoxFuture<'a, Result<(), Failure>> {
        // The socket buffers what it cannot send yet; the write is taken at once.
        Box::pin(ready(self.send_frames(bytes)))
    }

    fn recv_control(&self) -> LocalBoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(next(&self.shared.control))
    }

    fn send_datagram(&self, bytes: &[u8]) {
        if self.socket.ready_state() == web_sys::WebSocket::OPEN && self.socket.buffered_amount() < DATAGRAM_SEND_BUFFER
        {
            let _ = self.socket.send_with_u8_array(&ws::datagram_message(bytes));
        }
    }

    fn recv_datagram(&self) -> LocalBoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(next(&self.shared.datagrams))
    }

    fn close(&self, _code: u32, reason: &str) {
        // A reason longer than 123 bytes is refused; the close itself matters, not the words.
        if self.socket.close_with_code_and_reason(NORMAL_CLOSURE, reason).is_err() {
            let _ = self.socket.close_with_code(NORMAL_CLOSURE);
        }
    }

    fn closed(&self) -> LocalBoxFuture<'static, (u32, String)> {
        let closed = self.closed.clone();
        Box::pin(async move {
            // The server's error frame and its close frame travel in order on one connection,
            // and the socket hands them over in that order: the frame says why.
            let _ = js::settle(closed).await;
            (0, String::new())
        })
    }
}

impl Drop for WebSocket {
    fn drop(&mut self) {
        // The handlers die with this value: the socket must not call them any more.
        self.socket.set_onopen(None);
        self.socket.set_onclose(None);
        self.socket.set_onmessage(None);
        self.close(0, "");
        let _ = self.resolve_closed.call0(&JsValue::NULL);
    }
}
