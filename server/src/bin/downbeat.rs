//! `downbeat`: runs the timing server until Ctrl-C. All logic lives in the library.

use anyhow::Context as _;
use downbeat_server::{Config, Server};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load().context("configuration")?;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let server = Server::bind(config).await.context("starting the server")?;
    print!("{}", banner(&server));
    server
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("running the server")
}

/// What to tell the person who started the server: where it is, what to pin, how to begin.
fn banner(server: &Server) -> String {
    let http = format!("http://localhost:{}", server.http_addr().port());
    let hashes = server.cert_hashes();
    let mut out = String::new();
    out.push_str("\nDownbeat is running.\n\n");
    out.push_str(&format!("  HTTP API:      {http}\n"));
    out.push_str(&format!(
        "  WebTransport:  {}  or  {}\n",
        server.webtransport_url("localhost"),
        server.webtransport_url("127.0.0.1")
    ));
    if hashes.is_empty() {
        out.push_str("  Certificate:   production PEM files (no pinning needed)\n");
    } else {
        for (i, hash) in hashes.iter().enumerate() {
            let label = if i == 0 { "current" } else { "next" };
            out.push_str(&format!("  Cert SHA-256:  {} ({label})\n", hex::encode(hash)));
        }
        out.push_str(&format!("                 (also served at {http}/api/cert-hashes)\n"));
    }
    out.push_str(&format!("  Dev token:     {}\n\n", server.dev_token()));
    out.push_str("Create a room:\n");
    out.push_str(&format!(
        "  curl -X POST {http}/api/rooms -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"tempo_bpm\": 120, \"beats_per_bar\": 4}}'\n\n",
        server.dev_token()
    ));
    out.push_str("Press Ctrl-C to stop.\n\n");
    out
}
