//! The WebTransport session: one bidirectional control stream (framed, reliable) and the
//! datagrams (clock sync, beat frames, notes).

use downbeat_protocol::{
    ClientDatagram, ClientMessage, FrameDecoder, ServerMessage, encode_client_datagram, encode_frame,
};
use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::spawn_local;
use web_sys::{
    ReadableStream, ReadableStreamDefaultReader, WebTransport, WebTransportBidirectionalStream, WebTransportHash,
    WebTransportOptions, WritableStreamDefaultWriter,
};

use crate::js::{self, CONNECT_FAILED, Failure};

/// The writing side of an open session, shared by everything that sends.
#[derive(Debug)]
pub(crate) struct Session {
    transport: WebTransport,
    datagrams: WritableStreamDefaultWriter,
    control: WritableStreamDefaultWriter,
}

/// The reading sides, each owned by the one loop that reads it.
#[derive(Debug)]
pub(crate) struct Readers {
    pub(crate) datagrams: Reader,
    pub(crate) control: ControlReader,
}

/// Opens a session to `url`, pinning `hashes` (SHA-256 of acceptable self-signed
/// certificates; empty: the browser's trust store), and opens the control stream.
pub(crate) async fn open(url: &str, hashes: &[[u8; 32]]) -> Result<(Session, Readers), Failure> {
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
    let transport = WebTransport::new_with_options(url, &options)
        .map_err(|e| failed("cannot open a session to", js::describe(&e)))?;
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
    let session = Session { transport, datagrams, control };
    let readers = Readers {
        datagrams: datagram_reader,
        control: ControlReader { reader: control_reader, decoder: FrameDecoder::new() },
    };
    Ok((session, readers))
}

async fn ignore(promise: js_sys::Promise) {
    let _ = js::settle(promise).await;
}

impl Session {
    /// Sends a datagram; a full buffer or a closed session drops it (datagrams are
    /// unreliable by design; every sender copes with loss).
    pub(crate) fn send_datagram(&self, datagram: &ClientDatagram) {
        let Ok(bytes) = encode_client_datagram(datagram) else { return };
        let chunk = Uint8Array::from(&bytes[..]);
        spawn_local(ignore(self.datagrams.write_with_chunk(&chunk)));
    }

    /// Writes one frame on the control stream and waits until the stream took it.
    pub(crate) async fn send(&self, message: &ClientMessage) -> Result<(), Failure> {
        let bytes = encode_frame(message).map_err(|e| Failure::new(js::INVALID_ARGUMENT, e.to_string()))?;
        let chunk = Uint8Array::from(&bytes[..]);
        js::settle(self.control.write_with_chunk(&chunk)).await.map(drop).map_err(|_| Failure::closed())
    }

    /// Resolves when the session has ended, for whatever reason.
    pub(crate) fn closed(&self) -> js_sys::Promise {
        self.transport.closed().unchecked_into()
    }

    /// Closes the session (idempotent).
    pub(crate) fn close(&self) {
        self.transport.close();
    }
}

/// Reads byte chunks from a readable stream.
#[derive(Debug)]
pub(crate) struct Reader {
    reader: ReadableStreamDefaultReader,
}

impl Reader {
    fn new(stream: &ReadableStream) -> Result<Self, String> {
        let reader = ReadableStreamDefaultReader::new(stream).map_err(|e| js::describe(&e))?;
        Ok(Self { reader })
    }

    /// The next chunk; `None` once the stream ended or failed (a read after the session
    /// closed rejects, which also just ends the loop).
    pub(crate) async fn next(&self) -> Option<Vec<u8>> {
        let result = js::settle(self.reader.read()).await.ok()?;
        if Reflect::get(&result, &JsValue::from_str("done")).ok()?.is_truthy() {
            return None;
        }
        let value = Reflect::get(&result, &JsValue::from_str("value")).ok()?;
        Some(value.dyn_into::<Uint8Array>().ok()?.to_vec())
    }
}

/// The control stream's reading side: frames out of arbitrary chunks.
#[derive(Debug)]
pub(crate) struct ControlReader {
    reader: Reader,
    decoder: FrameDecoder,
}

impl ControlReader {
    /// The next message: `Ok(None)` when the stream ended, an error when it is out of step.
    pub(crate) async fn next(&mut self) -> Result<Option<ServerMessage>, Failure> {
        loop {
            if let Some(message) = self.decoder.next_frame().map_err(Failure::protocol)? {
                return Ok(Some(message));
            }
            let Some(chunk) = self.reader.next().await else { return Ok(None) };
            self.decoder.push(&chunk);
        }
    }
}
