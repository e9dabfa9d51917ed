//! The WebTransport [`Transport`] (the browser's `WebTransport` through web-sys): one
//! bidirectional stream for control frames, datagrams for the rest.

use futures_util::future::LocalBoxFuture;
use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::spawn_local;
use web_sys::{
    ReadableStream, ReadableStreamDefaultReader, WebTransportBidirectionalStream, WebTransportCloseInfo,
    WebTransportHash, WebTransportOptions, WritableStreamDefaultWriter,
};

use crate::js::{self, CONNECT_FAILED, Failure};
use crate::transport::Transport;

/// An open WebTransport session: its writers, shared by everything that sends, and its
/// readers, each read by one loop.
#[derive(Debug)]
pub(crate) struct WebTransport {
    transport: web_sys::WebTransport,
    datagrams: WritableStreamDefaultWriter,
    control: WritableStreamDefaultWriter,
    datagram_reader: Reader,
    control_reader: Reader,
}

impl WebTransport {
    /// Opens a session to `url`, pinning `hashes` (SHA-256 of acceptable self-signed
    /// certificates; empty: the browser's trust store), and opens the control stream.
    pub(crate) async fn open(url: &str, hashes: &[[u8; 32]]) -> Result<Self, Failure> {
        let failed = |what: &str, e: String| Failure::new(CONNECT_FAILED, format!("{what} {url}: {e}"));
        let options = WebTransportOptions::new();
        if !hashes.is_empty() {
            let pins: Vec<WebTransportHash> = hashes
                .iter()
                .map(|h| {
                    let pin = WebTransportHash::new();
                    pin.set_algorithm("sha-256");
                    pin.set_value(&Uint8Array::from(&h[..]));
                    pin
                })
                .collect();
            options.set_server_certificate_hashes(&pins);
        }
        let transport = web_sys::WebTransport::new_with_options(url, &options)
            .map_err(|e| failed("cannot open a session to", js::describe(&e)))?;
        // Abandoned before it opened (a failure, or the race cancelling this attempt): close it
        // rather than leave the browser trying.
        let mut pending = Pending(Some(transport.clone()));
        // A session that never opens also rejects `closed`; observe it so the browser does not
        // report an unhandled rejection.
        spawn_local(ignore(transport.closed().unchecked_into()));
        if let Err(e) = js::settle(transport.ready().unchecked_into()).await {
            return Err(failed("could not connect to", e));
        }
        let bidi = js::settle(transport.create_bidirectional_stream().unchecked_into())
            .await
            .map_err(|e| failed("could not open the control stream to", e))?;
        let bidi: WebTransportBidirectionalStream = bidi.unchecked_into();
        let control = bidi.writable().get_writer().map_err(|e| failed("control stream of", js::describe(&e)))?;
        let control_reader = Reader::new(&bidi.readable()).map_err(|e| failed("control stream of", e))?;
        let duplex = transport.datagrams();
        let datagrams = duplex.writable().get_writer().map_err(|e| failed("datagrams of", js::describe(&e)))?;
        let datagram_reader = Reader::new(&duplex.readable()).map_err(|e| failed("datagrams of", e))?;
        pending.0 = None;
        Ok(Self { transport, datagrams, control, datagram_reader, control_reader })
    }
}

/// A session being opened, closed if its opening is abandoned.
struct Pending(Option<web_sys::WebTransport>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(transport) = self.0.take() {
            transport.close();
        }
    }
}

async fn ignore(promise: js_sys::Promise) {
    let _ = js::settle(promise).await;
}

impl Transport for WebTransport {
    fn send_control<'a>(&'a self, bytes: &'a [u8]) -> LocalBoxFuture<'a, Result<(), Failure>> {
        let chunk = Uint8Array::from(bytes);
        let written = self.control.write_with_chunk(&chunk);
        Box::pin(async move { js::settle(written).await.map(drop).map_err(|_| Failure::closed()) })
    }

    fn recv_control(&self) -> LocalBoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(self.control_reader.next())
    }

    fn send_datagram(&self, bytes: &[u8]) {
        let chunk = Uint8Array::from(bytes);
        spawn_local(ignore(self.datagrams.write_with_chunk(&chunk)));
    }

    fn recv_datagram(&self) -> LocalBoxFuture<'_, Option<Vec<u8>>> {
        Box::pin(self.datagram_reader.next())
    }

    fn close(&self, code: u32, reason: &str) {
        let info = WebTransportCloseInfo::new();
        info.set_close_code(code);
        info.set_reason(reason);
        self.transport.close_with_close_info(&info);
    }

    fn closed(&self) -> LocalBoxFuture<'static, (u32, String)> {
        let closed: js_sys::Promise = self.transport.closed().unchecked_into();
        Box::pin(async move {
            // Resolves with `{ closeCode, reason }` when the server closed the session; rejects
            // when the connection was lost.
            let Ok(info) = js::settle(closed).await else { return (0, String::new()) };
            let field = |name: &str| Reflect::get(&info, &JsValue::from_str(name)).ok();
            let code = field("closeCode").and_then(|v| v.as_f64()).map_or(0, |c| c as u32);
            (code, field("reason").and_then(|v| v.as_string()).unwrap_or_default())
        })
    }
}

/// Reads byte chunks from a readable stream.
#[derive(Debug)]
struct Reader {
    reader: ReadableStreamDefaultReader,
}

impl Reader {
    fn new(stream: &ReadableStream) -> Result<Self, String> {
        let reader = ReadableStreamDefaultReader::new(stream).map_err(|e| js::describe(&e))?;
        Ok(Self { reader })
    }

    /// The next chunk; `None` once the stream ended or failed (a read after the session
    /// closed rejects, which also just ends the loop).
    async fn next(&self) -> Option<Vec<u8>> {
        let result = js::settle(self.reader.read()).await.ok()?;
        if Reflect::get(&result, &JsValue::from_str("done")).ok()?.is_truthy() {
            return None;
        }
        let value = Reflect::get(&result, &JsValue::from_str("value")).ok()?;
        Some(value.dyn_into::<Uint8Array>().ok()?.to_vec())
    }
}
