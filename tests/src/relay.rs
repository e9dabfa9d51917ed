//! A UDP relay between clients and the server that a test can cut, to lose a connection the
//! way a Chromebook's Wi-Fi does: packets simply stop, nobody closes anything. The way back
//! alone can be cut too, as when Wi-Fi fails just after a request was sent: the server gets
//! it, the client never hears the answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use tokio::net::UdpSocket;
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

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
