//! A relay between clients and the server that a test can cut, to lose a connection the way a
//! Chromebook's Wi-Fi does: packets simply stop, nobody closes anything. The way back alone
//! can be cut too, as when Wi-Fi fails just after a request was sent: the server gets it, the
//! client never hears the answer. UDP for WebTransport; TCP for WebSocket (bytes stop moving,
//! no connection is closed).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;

use crate::{TestServer, Transport};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// Forwards datagrams from clients on its port to the server and back, until cut.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    downlink_cut: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relays to `server` (a UDP address on loopback).
    pub async fn start(server: SocketAddr) -> Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let downlink_cut = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(front, server, cut.clone(), downlink_cut.clone()));
        Ok(Self { addr, cut, downlink_cut, task })
    }

    /// Relays to `server` over its tests' transport: its WebTransport port (UDP) or its HTTP
    /// listener (TCP, for WebSocket).
    pub async fn start_for(server: &TestServer) -> Result<Self> {
        match server.transport {
            Transport::WebTransport => Self::start(format!("127.0.0.1:{}", server.wt_port).parse()?).await,
            Transport::WebSocket => Self::start_tcp(server.http).await,
        }
    }

    /// Relays TCP connections to `server`.
    pub async fn start_tcp(server: SocketAddr) -> Result<Self> {
        let front = TcpListener::bind("127.0.0.1:0").await?;
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let downlink_cut = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run_tcp(front, server, cut.clone(), downlink_cut.clone()));
        Ok(Self { addr, cut, downlink_cut, task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a native client of `server` opens its session at through this relay.
    pub fn url(&self, server: &TestServer) -> String {
        match server.transport {
            Transport::WebTransport => format!("https://127.0.0.1:{}/", self.addr.port()),
            Transport::WebSocket => format!("ws://127.0.0.1:{}/api/ws", self.addr.port()),
        }
    }

    /// Drops every packet from now on, both ways.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.downlink_cut.store(true, Ordering::SeqCst);
    }

    /// Drops every packet from the server to clients from now on; requests still arrive.
    pub fn cut_downlink(&self) {
        self.downlink_cut.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(front: Arc<UdpSocket>, server: SocketAddr, cut: Arc<AtomicBool>, downlink_cut: Arc<AtomicBool>) {
    // One upstream socket per client address, so the server sees one peer per client.
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    // Dropped (and so aborted) with this task.
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = front.recv_from(&mut buf).await else { return };
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        let upstream = match upstreams.get(&client) {
            Some(upstream) => upstream.clone(),
            None => {
                let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                let socket = Arc::new(socket);
                upstreams.insert(client, socket.clone());
                let (back, front, cut) = (socket.clone(), front.clone(), downlink_cut.clone());
                tasks.spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = back.recv_from(&mut buf).await {
                        if !cut.load(Ordering::SeqCst) {
                            let _ = front.send_to(&buf[..n], client).await;
                        }
                    }
                });
                socket
            }
        };
        let _ = upstream.send_to(&buf[..n], server).await;
    }
}

async fn run_tcp(front: TcpListener, server: SocketAddr, cut: Arc<AtomicBool>, downlink_cut: Arc<AtomicBool>) {
    // Dropped (and so aborted, sockets and all) with this task.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = front.accept().await else { return };
        let Ok(upstream) = TcpStream::connect(server).await else { continue };
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = upstream.into_split();
        tasks.spawn(pipe(client_read, server_write, cut.clone()));
        tasks.spawn(pipe(server_read, client_write, downlink_cut.clone()));
    }
}

/// Copies bytes until `cut`; from then on it neither reads nor writes, and closes nothing.
async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, cut: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if cut.load(Ordering::SeqCst) {
        // Hold both sockets open, silent, like a network that stopped carrying packets.
        std::future::pending::<()>().await;
    }
}
