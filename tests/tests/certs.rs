//! Certificate replacement over real sockets: swapping the production PEM files under a running
//! server changes what new handshakes see, while open sessions keep their connection.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use downbeat_certs::{CertifiedKey, DevIdentity};
use downbeat_client::{Client, ClientError};
use downbeat_protocol::{Change, MicroBpm};
use downbeat_tests::{TestServer, wait_for_epoch};

/// A fresh self-signed identity for the loopback names, made in its own directory.
fn identity(dir: &Path) -> Result<CertifiedKey> {
    let names = ["localhost", "127.0.0.1", "::1"].map(String::from);
    Ok(DevIdentity::load_or_create(dir, &names, SystemTime::now())?.current)
}

/// Writes `key`'s PEM files over `cert_path` and `key_path` the way ACME clients do: each to a
/// temporary file first, then renamed over the old one.
fn install(key: &CertifiedKey, cert_path: &Path, key_path: &Path) -> Result<()> {
    let (cert_pem, key_pem) = key.to_pem();
    for (path, contents) in [(cert_path, cert_pem), (key_path, key_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, contents)?;
        std::fs::rename(&tmp, path)?;
    }
    Ok(())
}

/// Connects to `room` accepting only a certificate with hash `pin`.
async fn connect_pinned(server: &TestServer, room: &str, token: &str, pin: [u8; 32]) -> Result<Client, ClientError> {
    let mut options = server.options(room, token);
    options.cert_hashes = vec![pin];
    options.handshake_timeout = Duration::from_secs(2);
    Client::connect(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_certificate_keeps_open_sessions_and_serves_the_new_one() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let a = identity(&tmp.path().join("a"))?;
    let b = identity(&tmp.path().join("b"))?;
    assert_ne!(a.sha256(), b.sha256());
    let (cert_path, key_path) = (tmp.path().join("tls.pem"), tmp.path().join("tls.key"));
    install(&a, &cert_path, &key_path)?;

    let server = TestServer::start_with(|c| {
        c.tls_cert = Some(cert_path.clone());
        c.tls_key = Some(key_path.clone());
        c.tls_reload_check_ms = 100;
    })
    .await?;
    assert!(server.hashes.is_empty(), "a production certificate publishes no hashes");

    let teacher = server.teacher("t-1");
    let room = server.create_room(&teacher, 120.0, 4).await?;
    let old = connect_pinned(&server, &room, &teacher, a.sha256()).await.context("client pinning A")?;
    let (status, body) = server.http("POST", &format!("/api/rooms/{room}/start"), Some(&teacher), None).await?;
    assert_eq!(status, 200, "{body}");
    old.wait_frames(1, Duration::from_secs(5)).await.context("beat frames before the swap")?;
    assert!(
        connect_pinned(&server, &room, &server.student("too-early"), b.sha256()).await.is_err(),
        "B is not served before it is installed"
    );

    install(&b, &cert_path, &key_path)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let new = loop {
        match connect_pinned(&server, &room, &server.student("new"), b.sha256()).await {
            Ok(client) => break client,
            Err(e) if Instant::now() >= deadline => bail!("B was not served within 10 s: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(new.welcome().room.code.as_str(), room.replace('-', ""));

    // The session opened under A still carries control and beats.
    let ack = old.change(Change::SetTempo(MicroBpm::from_bpm(90))).await.context("control on the old session")?;
    wait_for_epoch(&old, ack.applied.context("a boundary")?.epoch)
        .await
        .context("the new timeline on the old session")?;
    let seen = old.stats().frames;
    old.wait_frames(seen + 3, Duration::from_secs(5)).await.context("beat frames on the old session after the swap")?;

    // A new client that only accepts A is now refused.
    match connect_pinned(&server, &room, &server.student("stale-pin"), a.sha256()).await {
        Ok(_) => bail!("a client pinning only the replaced certificate still connected"),
        Err(ClientError::Connect(_)) => {}
        Err(e) => bail!("expected a handshake failure, got {e}"),
    }
    Ok(())
}
