//! A school district on this machine for the cluster benchmark: a NATS server with JetStream
//! (the cluster's room directory), a fresh PostgreSQL database, a configuration file with the
//! benchmark school (an HS256 key), and `downbeat` processes started with `--cluster`, each
//! listening on ports the OS picks. Everything is stopped and removed when dropped: the nodes
//! and NATS are killed, the database is dropped.

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;

use crate::downbeat::{fetch_metrics, read_banner, server_binary};

/// The benchmark school's tenant id.
pub const TENANT: &str = "bench";

/// The PostgreSQL server used unless `--postgres-url` (or `DOWNBEAT_TEST_POSTGRES_URL`) names
/// another: the local one `scripts/setup` starts, with the role it creates. Only its
/// maintenance database is used directly, to create and drop each run's database.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://downbeat:downbeat@127.0.0.1:5432/postgres";

/// Where `nats-server` is: `explicit` if given, else the one `scripts/setup` installs in
/// `target/py-nats` (found from this program's own directory, `target/<profile>/`).
pub fn nats_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        ensure!(path.is_file(), "--nats-server {} is not a file", path.display());
        return Ok(path.to_path_buf());
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf)) {
        candidates.push(dir.join("../py-nats/bin/nats-server"));
        candidates.push(dir.join("../../py-nats/bin/nats-server"));
    }
    candidates.push(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/py-nats/bin/nats-server")));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("no nats-server: run ./scripts/setup (it installs one in target/py-nats), or pass --nats-server")
}

/// A `nats-server -js` on a port of its own choosing, with a store directory of its own.
#[derive(Debug)]
pub struct Nats {
    child: Child,
    /// `nats://127.0.0.1:<port>`.
    pub url: String,
    _store: tempfile::TempDir,
}

impl Nats {
    /// Starts one and waits until it says it is ready.
    pub fn start(bin: &Path) -> Result<Self> {
        let store = tempfile::Builder::new().prefix("downbeat-bench-nats-").tempdir()?;
        let mut child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1"])
            .arg("-sd")
            .arg(store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("nats-server's log")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut url = None;
            let mut seen = String::new();
            let mut lines = BufReader::new(stderr).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                seen.push_str(&line);
                seen.push('\n');
                const LISTENING: &str = "Listening for client connections on ";
                if let Some(at) = line.find(LISTENING) {
                    url = Some(format!("nats://{}", line[at + LISTENING.len()..].trim()));
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(url.take().ok_or_else(|| format!("it named no client address:\n{seen}")));
                    break;
                }
            }
            // Keep reading, so the pipe never fills; an early end is reported as such.
            let _ = tx.send(Err(format!("it ended before it was ready:\n{seen}")));
            for _ in lines {}
        });
        let ready = rx.recv_timeout(Duration::from_secs(20));
        match ready {
            Ok(Ok(url)) => Ok(Self { child, url, _store: store }),
            Ok(Err(why)) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("nats-server: {why}")
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("nats-server said nothing about being ready within 20 s")
            }
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL database made for one run (`downbeat_bench_<random>`), dropped `WITH (FORCE)`
/// when this is dropped.
#[derive(Debug)]
pub struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    /// Creates it on the server `admin_url` names (its maintenance database).
    pub fn create(admin_url: &str) -> Result<Self> {
        let name = format!("downbeat_bench_{:016x}", rand::random::<u64>());
        admin(admin_url, &format!("CREATE DATABASE {name}"))?;
        Ok(Self { admin_url: admin_url.to_owned(), url: with_database(admin_url, &name)?, name })
    }

    /// Its URL (`--database-url`; it holds a password: never print it).
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Err(e) = admin(&self.admin_url, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            eprintln!("cluster: dropping database {} failed: {e:#}", self.name);
        }
    }
}

/// Runs one statement on the maintenance database `url` names.
fn admin(url: &str, sql: &str) -> Result<()> {
    use sqlx::Connection as _;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let connect = sqlx::PgConnection::connect(url);
        let mut conn = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .context("PostgreSQL did not answer within 10 s")?
            .context(
                "connecting to PostgreSQL (is it running? `pg_ctlcluster 15 main start`; the role is the one \
                 scripts/setup creates)",
            )?;
        sqlx::raw_sql(sql).execute(&mut conn).await.with_context(|| format!("running {sql:?}"))?;
        conn.close().await?;
        Ok(())
    })
}

/// `url` with its database (the path) replaced by `name`.
fn with_database(url: &str, name: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let after_scheme = base.find("://").context("the PostgreSQL URL has no scheme")? + 3;
    let host_end = base[after_scheme..].find('/').map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

/// What the district's nodes are started with.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// `--cluster-lease-ms`.
    pub lease_ms: u64,
    /// `idle_timeout_ms` (QUIC's idle timeout; how long a client takes to notice a dead
    /// node), or the server's default.
    pub idle_timeout_ms: Option<u64>,
    /// Sessions, rooms and members per room each node allows (and the school on each).
    pub max_sessions: usize,
    /// Rooms each node allows.
    pub max_rooms: usize,
    /// Members per room.
    pub max_members_per_room: usize,
}

/// The district: NATS, the database, the configuration and the nodes.
#[derive(Debug)]
pub struct District {
    /// The nodes, in the order started (`node-1`, `node-2`, ...).
    pub nodes: Vec<Node>,
    nats: Nats,
    db: Database,
    config_text: String,
    /// `None` once [`District::keep_logs`] kept it.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl District {
    /// Writes the configuration, starts NATS, creates the database and starts `nodes`
    /// nodes one after another (the first one creates the database's tables).
    pub fn start(nats_bin: &Path, postgres_url: &str, nodes: usize, settings: &NodeSettings) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("downbeat-bench-cluster-").tempdir()?;
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let mut config_text = format!(
            "max_sessions = {sessions}\nmax_rooms = {rooms}\nmax_members_per_room = {members}\n",
            sessions = settings.max_sessions,
            rooms = settings.max_rooms,
            members = settings.max_members_per_room,
        );
        if let Some(idle) = settings.idle_timeout_ms {
            // Keep-alives must come more often than the idle timeout; a third of it, as the
            // default (3 s of 30 s) does at a tenth.
            let keep_alive = (idle / 3).clamp(1, 3_000);
            config_text.push_str(&format!("idle_timeout_ms = {idle}\nkeep_alive_ms = {keep_alive}\n"));
        }
        config_text.push_str(&format!(
            "\n[[tenants]]\nid = \"{TENANT}\"\nname = \"Benchmark district\"\nissuer = \"downbeat-bench\"\n\
             [[tenants.keys]]\nalgorithm = \"HS256\"\nsecret = \"{secret}\"\n\
             [tenants.limits]\nmax_sessions = {sessions}\nmax_rooms = {rooms}\nmax_members_per_room = {members}\n",
            sessions = settings.max_sessions,
            rooms = settings.max_rooms,
            members = settings.max_members_per_room,
        ));
        let config_path = dir.path().join("district.toml");
        std::fs::write(&config_path, &config_text)?;
        let nats = Nats::start(nats_bin)?;
        let db = Database::create(postgres_url)?;
        let path = dir.path().to_path_buf();
        let mut district = Self { nodes: Vec::new(), nats, db, config_text, dir: Some(dir), path };
        let bin = server_binary()?;
        for i in 0..nodes {
            let node = Node::start(&bin, &district, &config_path, &format!("node-{}", i + 1), settings.lease_ms)?;
            district.nodes.push(node);
        }
        Ok(district)
    }

    /// The configuration file's text (the school's key: helpers mint tokens with it).
    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    /// NATS's pid.
    pub fn nats_pid(&self) -> u32 {
        self.nats.pid()
    }

    /// Keeps the directory with the configuration and the nodes' logs (`<node id>.log`) after
    /// the district is dropped; its path.
    pub fn keep_logs(&mut self) -> PathBuf {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        self.path.clone()
    }
}

/// One `downbeat` process of the district. Killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Node {
    /// Its `--node-id`.
    pub id: String,
    child: Child,
    http: SocketAddr,
    wt_port: u16,
    hashes: Vec<String>,
    log: PathBuf,
    dead: bool,
}

impl Node {
    fn start(bin: &Path, district: &District, config: &Path, id: &str, lease_ms: u64) -> Result<Self> {
        let data = district.path.join(id);
        std::fs::create_dir_all(&data)?;
        let log = district.path.join(format!("{id}.log"));
        let log_file = std::fs::File::create(&log)?;
        let mut command = Command::new(bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DOWNBEAT_") {
                command.env_remove(key);
            }
        }
        command
            .arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(&data)
            .args(["--http-addr", "127.0.0.1:0", "--wt-port", "0"])
            .args(["--cluster", &district.nats.url, "--node-id", id])
            .args(["--cluster-lease-ms", &lease_ms.to_string()])
            .args(["--database-url", district.db.url()])
            .env("RUST_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        let mut child = command.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("the node's stdout")?;
        match read_banner(stdout) {
            Ok((http_port, wt_port, hashes)) => Ok(Self {
                id: id.to_owned(),
                child,
                http: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), http_port),
                wt_port,
                hashes,
                log,
                dead: false,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!("node {id} did not start; its log:\n{}", tail(&log, 40))))
            }
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `https://127.0.0.1:<port>/`.
    pub fn webtransport_url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.wt_port)
    }

    /// `ws://127.0.0.1:<port>/api/ws`.
    pub fn websocket_url(&self) -> String {
        format!("ws://{}/api/ws", self.http)
    }

    /// Its certificates' SHA-256 hashes, hex.
    pub fn cert_hashes(&self) -> &[String] {
        &self.hashes
    }

    /// Its Prometheus metrics.
    pub fn metrics(&self) -> Result<std::collections::HashMap<String, f64>> {
        fetch_metrics(self.http).with_context(|| format!("the metrics of {}", self.id))
    }

    /// Whether it was killed.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().with_context(|| format!("SIGKILL to {}", self.id))?;
        self.child.wait()?;
        self.dead = true;
        Ok(())
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Its log's warnings and errors, by level and message (without the fields after it:
    /// `WARN downbeat_server::room::registry: this node lost the room …`), with how many
    /// times each was logged.
    pub fn log_warnings(&self) -> std::collections::BTreeMap<String, usize> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = std::collections::BTreeMap::new();
        for line in text.lines() {
            let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else { continue };
            let message = line[at + 1..].split(" key=").next().unwrap_or_default();
            // Fields come after the message as `name=value`; keep the words before the first.
            let words: Vec<&str> = message.split_whitespace().take_while(|w| !is_field(w)).collect();
            *out.entry(words.join(" ")).or_default() += 1;
        }
        out
    }
}

/// Whether `word` is a tracing field (`name=value`).
fn is_field(word: &str) -> bool {
    word.split_once('=')
        .is_some_and(|(name, _)| !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.dead {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_get_the_runs_database() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/postgres", "x").unwrap(),
            "postgres://u:p@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://h/postgres?sslmode=require", "x").unwrap(),
            "postgres://h/x?sslmode=require"
        );
        assert_eq!(with_database("postgres://h", "x").unwrap(), "postgres://h/x");
        assert!(with_database("nonsense", "x").is_err());
    }

    #[test]
    fn warnings_are_grouped_by_message() {
        assert!(is_field("code=ABC") && is_field("error=no") && !is_field("=x") && !is_field("lost"));
    }
}
