//! `downbeat`: runs the timing server until Ctrl-C, or mints development tokens
//! (`downbeat token ...`). All logic lives in the library.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use downbeat_server::auth::{OPERATOR_REALM, Role, Tenants};
use downbeat_server::{Args, Config, Server};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "downbeat", version, about = "Downbeat timing server for classroom music")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mints a signed token for a tenant whose key is a shared secret (the demo tenant's is
    /// in the data directory) and prints it.
    Token {
        /// The tenant (school) id.
        #[arg(long, default_value = "demo")]
        tenant: String,
        /// `teacher`, `student`, `admin`, or `operator` (with `--tenant operators`).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Pseudonymous subject id, stable for this person (e.g. `t-1`, `s-17`).
        #[arg(long)]
        sub: String,
        /// Display name shown to the class.
        #[arg(long)]
        name: String,
        /// Hours until the token expires.
        #[arg(long, default_value_t = 12)]
        ttl_hours: u64,
        /// The server's settings (the data directory holds the demo tenant's secret; a
        /// `--config` file names other tenants).
        #[command(flatten)]
        server: Box<Args>,
    },
    /// Prints the settings as the markdown table in the README.
    #[command(hide = true)]
    SettingsDoc,
    /// Prints the metrics as the markdown table in the README.
    #[command(hide = true)]
    MetricsDoc,
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "teacher" => Ok(Role::Teacher),
        "student" => Ok(Role::Student),
        "admin" => Ok(Role::Admin),
        "operator" => Ok(Role::Operator),
        _ => Err(format!("{s:?} is not a role: use teacher, student, admin or operator")),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::SettingsDoc) = cli.command {
        print!("{}", downbeat_server::config::settings_markdown());
        return Ok(());
    }
    if let Some(Command::MetricsDoc) = cli.command {
        print!("{}", downbeat_server::stats::metrics_markdown());
        return Ok(());
    }
    if let Some(Command::Token { tenant, role, sub, name, ttl_hours, server }) = cli.command {
        let config = Config::from_args(*server).context("configuration")?;
        let tenants = Tenants::new(&config).context("tenants")?;
        let token = tenants
            .mint(&tenant, role, &sub, &name, Duration::from_secs(ttl_hours * 3600))
            .context("minting the token")?;
        println!("{token}");
        return Ok(());
    }
    let config = Config::from_args(cli.args).context("configuration")?;
    // Logs go to stderr; stdout carries only the banner (and `token`'s output).
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(usize::try_from(config.worker_threads).context("worker_threads")?);
    }
    runtime.enable_all().build().context("starting the runtime")?.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let server = Server::bind(config).await.context("starting the server")?;
    let stop = ctrl_c().context("listening for Ctrl-C")?;
    print!("{}", banner(&server)?);
    server.run(stop).await.context("running the server")
}

/// Resolves at the first Ctrl-C (SIGINT) or SIGTERM (a service manager stopping the server;
/// a node of a cluster then hands its rooms to the others first). It listens from the call
/// on, so a signal as soon as the banner is out stops the server gracefully rather than
/// killing the process.
fn ctrl_c() -> std::io::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// `scheme://host:port` of a listener bound to `addr`, as a browser on this machine opens it:
/// `localhost` for a wildcard address, else the address itself.
fn site(scheme: &str, addr: SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => format!("{scheme}://localhost:{}", addr.port()),
        IpAddr::V4(ip) => format!("{scheme}://{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{}", addr.port()),
    }
}

/// What to tell the person who started the server: where it is, what to pin, how to begin.
/// The demo teacher secret appears here only, in the teacher pages' URL fragments (which
/// browsers never send, so no request log holds it either).
fn banner(server: &Server) -> anyhow::Result<String> {
    let http = site("http", server.http_addr());
    let hashes = server.cert_hashes();
    let mut out = String::new();
    out.push_str("\nDownbeat is running.\n\n");
    out.push_str(&format!("  HTTP API:      {http}\n"));
    let mut sites = vec![http.clone()];
    sites.extend(server.https_addr().map(|https| site("https", https)));
    let fragment = server.demo_teacher_secret().map(|secret| format!("#secret={secret}")).unwrap_or_default();
    for site in &sites {
        out.push_str(&format!("  Teacher page:  {site}/teacher{fragment}\n"));
        out.push_str(&format!("  Student page:  {site}/student\n"));
        out.push_str(&format!("  Network check: {site}/check\n"));
    }
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
    let tenants = server.tenants();
    if !tenants.is_demo() {
        let ids: Vec<_> = tenants.iter().map(|t| t.id().to_owned()).collect();
        out.push_str(&format!("  Tenants:       {}\n\nPress Ctrl-C to stop.\n\n", ids.join(", ")));
        return Ok(out);
    }
    let day = Duration::from_secs(12 * 3600).min(tenants.max_lifetime());
    let teacher = tenants.mint("demo", Role::Teacher, "t-1", "Ms. Rivera", day)?;
    let student = tenants.mint("demo", Role::Student, "s-1", "Ana", day)?;
    let operator = tenants.mint(OPERATOR_REALM, Role::Operator, "op-1", "Demo operator", day)?;
    out.push_str(&format!(
        "  Tenant:        demo (Demo School); dev tokens below last {} hours\n",
        day.as_secs() as f64 / 3600.0
    ));
    out.push_str(&format!("  Inspector:     {http}/inspect#token={operator}\n"));
    out.push_str(
        "                 (the teacher page's and the inspector's links hold secrets: keep them to yourself)\n\n",
    );
    out.push_str(&format!("Teacher token (t-1, Ms. Rivera):\n  {teacher}\n\n"));
    out.push_str(&format!("Student token (s-1, Ana):\n  {student}\n\n"));
    out.push_str("More tokens: downbeat token --tenant demo --role student --sub s-2 --name Ben\n\n");
    out.push_str("Create a room (prints its join code):\n");
    out.push_str(&format!(
        "  curl -X POST {http}/api/rooms -H 'Authorization: Bearer {teacher}' -H 'Content-Type: application/json' -d '{{\"name\": \"Room 12\", \"tempo_bpm\": 120, \"beats_per_bar\": 4}}'\n\n"
    ));
    out.push_str("Press Ctrl-C to stop.\n\n");
    Ok(out)
}
