//! Real `downbeat` server processes for cluster tests: a [`District`] (one school, `lincoln`,
//! with an HS256 key in a configuration file; a NATS server with JetStream for the room
//! directory; a fresh PostgreSQL database) and its [`Node`]s, each the `downbeat` binary run
//! as a child process, so a test can kill one with SIGKILL, freeze it with SIGSTOP and thaw it
//! with SIGCONT, or ask it to stop with SIGTERM or SIGINT.
//!
//! The binary is `DOWNBEAT_BIN` if set (a relative path is taken from the workspace root), else
//! `target/<profile>/downbeat` next to the test executable's `deps` directory. It is not built
//! here: `cargo build -p downbeat-server --bin downbeat` first.
//!
//! A node listens on ports the OS picks (`--http-addr 127.0.0.1:0 --wt-port 0`) and is ready
//! once its banner is out (it has bound its listeners, opened the database and joined the
//! cluster) and its HTTP listener answers `/api/cert-hashes` (which gives the hashes native
//! clients pin). Its stdout and stderr go to `<district dir>/<node id>.log`; errors and panics
//! print the log's path and its last [`LOG_TAIL_LINES`] lines.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use downbeat_client::{Client, ConnectOptions};
use downbeat_protocol::Transport;
use downbeat_server::auth::{OPERATOR_REALM, Role, Tenants};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::db::{Backend, TestDatabase};
use crate::nats::NatsServer;

/// The district's one school.
pub const TENANT: &str = "lincoln";

/// How many of a node's last log lines errors and panics show.
pub const LOG_TAIL_LINES: usize = 60;

/// How long a node may take to print its banner and answer HTTP.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Node::http`] waits for an answer unless set (a paused node never answers).
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a signal may take to show (stopped, continued, dead).
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The `downbeat` binary: `DOWNBEAT_BIN` (relative paths from the workspace root), else
/// `downbeat` in the target directory the test executable was built in.
pub fn server_binary() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().unwrap_or(manifest);
    let bin = match std::env::var_os("DOWNBEAT_BIN") {
        Some(bin) => workspace.join(bin),
        None => {
            let exe = std::env::current_exe().context("the test executable's path")?;
            let mut dir = exe.parent().context("the test executable's directory")?;
            // Integration tests live in target/<profile>/deps; binaries one level up.
            if dir.file_name().is_some_and(|name| name == "deps") {
                dir = dir.parent().context("the target directory")?;
            }
            dir.join(format!("downbeat{}", std::env::consts::EXE_SUFFIX))
        }
    };
    ensure!(
        bin.is_file(),
        "the server binary {} is missing: run `cargo build -p downbeat-server --bin downbeat` first \
         (or set DOWNBEAT_BIN to the binary)",
        bin.display()
    );
    Ok(bin)
}

/// Whether process `pid` exists (a zombie not yet reaped counts).
pub fn process_exists(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return false };
    // EPERM would mean someone else's process: it exists.
    !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH))
}

/// A school district's servers' shared ground: a temporary directory with the configuration
/// file (tenant [`TENANT`] with a random HS256 secret, and operators with another), a NATS
/// server with JetStream and a fresh PostgreSQL database. Start servers on it with
/// [`District::start_node`]. Everything is removed when the district and all its nodes are
/// dropped.
#[derive(Debug)]
pub struct District {
    shared: Arc<Shared>,
}

/// What the district's nodes share; they keep it alive until the last is dropped.
#[derive(Debug)]
struct Shared {
    bin: PathBuf,
    config_path: PathBuf,
    tenants: Tenants,
    nats: NatsServer,
    db: TestDatabase,
    /// Every node's id and log file, in the order started.
    logs: Mutex<Vec<(String, PathBuf)>>,
    /// Dropped last: the configuration, logs and data directories.
    dir: tempfile::TempDir,
}

/// How [`District::start_node_with`] starts a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// `--cluster-lease-ms`: how long its claim on its rooms lasts without a heartbeat.
    pub lease_ms: u64,
    /// `--public-http-url`; `None`: the server's default, `http://127.0.0.1:<its HTTP port>`
    /// (the port is the OS's choice, so it cannot be given beforehand).
    pub public_http_url: Option<String>,
    /// `RUST_LOG` for the node.
    pub rust_log: String,
    /// More command-line arguments, after the harness's.
    pub extra_args: Vec<String>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            lease_ms: 1_500,
            public_http_url: None,
            rust_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            extra_args: Vec::new(),
        }
    }
}

impl District {
    /// Writes the configuration, starts NATS and creates the database.
    ///
    /// # Panics
    ///
    /// If PostgreSQL cannot be reached (saying how to start it), as [`TestDatabase::new`].
    pub async fn start() -> Result<Self> {
        use base64::Engine as _;
        let bin = server_binary()?;
        let dir = tempfile::Builder::new().prefix("downbeat-district-").tempdir()?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let school_secret = b64.encode(rand::random::<[u8; 32]>());
        let operators_secret = b64.encode(rand::random::<[u8; 32]>());
        let config = format!(
            "[[tenants]]\n\
             id = \"{TENANT}\"\n\
             name = \"Lincoln Elementary\"\n\
             issuer = \"https://sso.lincoln.example\"\n\
             [[tenants.keys]]\n\
             algorithm = \"HS256\"\n\
             secret = \"{school_secret}\"\n\
             \n\
             [operators]\n\
             issuer = \"https://sso.district.example/operators\"\n\
             [[operators.keys]]\n\
             algorithm = \"HS256\"\n\
             secret = \"{operators_secret}\"\n"
        );
        let config_path = dir.path().join("district.toml");
        std::fs::write(&config_path, &config).with_context(|| format!("writing {}", config_path.display()))?;
        // Read as the server reads it, so tokens minted here are the server's own.
        let parsed = downbeat_server::config::parse_and_merge(downbeat_server::Args::default(), Some(&config))
            .context("the district's configuration")?;
        let tenants = Tenants::new(&parsed).context("the district's tenants")?;
        let nats = NatsServer::start().await?;
        let db = TestDatabase::new(Backend::Postgres).await;
        let shared = Shared { bin, config_path, tenants, nats, db, logs: Mutex::new(Vec::new()), dir };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// The temporary directory (configuration, node logs and data directories).
    pub fn dir(&self) -> &Path {
        self.shared.dir.path()
    }

    /// The configuration file every node is started with (`--config`).
    pub fn config_path(&self) -> &Path {
        &self.shared.config_path
    }

    /// `nats://127.0.0.1:<port>`, the cluster's room directory (`--cluster`).
    pub fn nats_url(&self) -> &str {
        &self.shared.nats.url
    }

    /// The shared database (for outages: [`TestDatabase::make_unavailable`]).
    pub fn database(&self) -> &TestDatabase {
        &self.shared.db
    }

    /// The shared database's URL (`--database-url`; it holds a password: do not print it).
    pub fn database_url(&self) -> &str {
        self.shared.db.url()
    }

    /// The server binary the nodes run.
    pub fn binary(&self) -> &Path {
        &self.shared.bin
    }

    /// A [`TENANT`] token for `sub`, valid for an hour, signed in-process with the key of the
    /// configuration file (by the server's own code, as the `token` subcommand signs).
    pub fn token(&self, role: Role, sub: &str, name: &str) -> String {
        self.shared.tenants.mint(TENANT, role, sub, name, Duration::from_secs(3600)).expect("the district mints")
    }

    /// A teacher's token (subject `sub`, named after it).
    pub fn teacher(&self, sub: &str) -> String {
        self.token(Role::Teacher, sub, &format!("Teacher {sub}"))
    }

    /// A student's token (subject `sub`, named after it).
    pub fn student(&self, sub: &str) -> String {
        self.token(Role::Student, sub, &format!("Student {sub}"))
    }

    /// An operator's token (the district's operators, for `/api/inspect`), subject `sub`.
    pub fn operator(&self, sub: &str) -> String {
        self.shared
            .tenants
            .mint(OPERATOR_REALM, Role::Operator, sub, &format!("Operator {sub}"), Duration::from_secs(3600))
            .expect("the operators' realm mints")
    }

    /// A [`TENANT`] token minted by the binary's `token` subcommand with the district's
    /// configuration file: `role` is `teacher`, `student` or `admin`.
    pub async fn token_from_binary(&self, role: &str, sub: &str, name: &str) -> Result<String> {
        let output = crate::server_command(&self.shared.bin.to_string_lossy())
            .arg("token")
            .arg("--config")
            .arg(&self.shared.config_path)
            .args(["--tenant", TENANT, "--role", role, "--sub", sub, "--name", name])
            .output()
            .await
            .context("running `downbeat token`")?;
        ensure!(
            output.status.success(),
            "`downbeat token` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).context("the token is not UTF-8")?.trim().to_owned();
        ensure!(token.split('.').count() == 3, "`downbeat token` printed {token:?}, not a JWT");
        Ok(token)
    }

    /// Starts node `id` with the default [`NodeOptions`] (a lease of 1.5 s) and waits until
    /// it is ready.
    pub async fn start_node(&self, id: &str) -> Result<Node> {
        self.start_node_with(id, NodeOptions::default()).await
    }

    /// Starts the nodes `ids` at once, with the default options; all ready, or an error.
    pub async fn start_nodes(&self, ids: &[&str]) -> Result<Vec<Node>> {
        futures_util::future::try_join_all(ids.iter().map(|id| self.start_node(id))).await
    }

    /// Starts node `id` (`a-z`, `0-9`, `-`) and waits until it is ready: its banner printed and
    /// its HTTP listener answering. Its data directory is `<dir>/<id>` and its log
    /// `<dir>/<id>.log`, both kept if a node of the same id is started again (a restart).
    pub async fn start_node_with(&self, id: &str, options: NodeOptions) -> Result<Node> {
        Node::start(self.shared.clone(), id, options).await
    }

    /// Every node's log path and last `lines` lines, in the order they were started (also of
    /// nodes already dropped).
    pub fn logs(&self, lines: usize) -> String {
        let logs = self.shared.logs.lock().map(|l| l.clone()).unwrap_or_default();
        let mut out = String::new();
        for (id, path) in logs {
            let _ = write!(out, "\n--- {id}: {}, last {lines} lines ---\n{}", path.display(), tail(&path, lines));
        }
        out
    }

    /// `error` with every node's log tail attached: for tests that return errors, e.g.
    /// `run(&district).await.map_err(|e| district.explain(e))`.
    pub fn explain(&self, error: anyhow::Error) -> anyhow::Error {
        error.context(format!("the district's node logs:{}", self.logs(LOG_TAIL_LINES)))
    }
}

/// One `downbeat` server process of a [`District`]. Killed with SIGKILL (paused or not) and
/// reaped when dropped; a panicking test prints its log's tail.
#[derive(Debug)]
pub struct Node {
    id: String,
    child: Child,
    pid: u32,
    http_addr: SocketAddr,
    wt_port: u16,
    cert_hashes: Vec<[u8; 32]>,
    log_path: PathBuf,
    data_dir: PathBuf,
    exit: Option<ExitStatus>,
    http_client: reqwest::Client,
    http_timeout: Duration,
    /// Keeps NATS, the database and the directory alive while the process runs.
    _district: Arc<Shared>,
}

/// What the banner says, once complete.
#[derive(Debug)]
struct Banner {
    http_port: u16,
    wt_port: u16,
}

impl Node {
    async fn start(district: Arc<Shared>, id: &str, options: NodeOptions) -> Result<Self> {
        ensure!(
            !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "node id {id:?} is not 1 to 64 characters from a-z, 0-9 and -"
        );
        let deadline = Instant::now() + START_TIMEOUT;
        let data_dir = district.dir.path().join(id);
        std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let log_path = district.dir.path().join(format!("{id}.log"));
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(log, "=== starting {id} ===")?;
        if let Ok(mut logs) = district.logs.lock()
            && !logs.iter().any(|(known, _)| known == id)
        {
            logs.push((id.to_owned(), log_path.clone()));
        }

        let mut command = crate::server_command(&district.bin.to_string_lossy());
        command
            .arg("--config")
            .arg(&district.config_path)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--http-addr", "127.0.0.1:0", "--wt-port", "0"])
            .args(["--cluster", &district.nats.url, "--node-id", id])
            .args(["--cluster-lease-ms", &options.lease_ms.to_string()])
            .args(["--database-url", district.db.url()]);
        if let Some(url) = &options.public_http_url {
            command.args(["--public-http-url", url]);
        }
        command
            .args(&options.extra_args)
            .env("RUST_LOG", &options.rust_log)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.try_clone()?));
        let mut child = command.spawn().with_context(|| format!("spawning {}", district.bin.display()))?;
        let pid = child.id().context("the new process's pid")?;
        let stdout = child.stdout.take().context("the node's stdout")?;
        let (banner_tx, banner_rx) = oneshot::channel();
        tokio::spawn(pump_stdout(stdout, log, banner_tx));

        let mut node = Self {
            id: id.to_owned(),
            child,
            pid,
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            wt_port: 0,
            cert_hashes: Vec::new(),
            log_path,
            data_dir,
            exit: None,
            http_client: reqwest::Client::new(),
            http_timeout: HTTP_TIMEOUT,
            _district: district,
        };
        // Banner first: the listeners are bound, the database open, the cluster joined.
        let banner = tokio::select! {
            banner = banner_rx => match banner {
                Ok(Ok(banner)) => banner,
                Ok(Err(why)) => {
                    // Most likely it is exiting (a bad setting): say how it ended.
                    let why = match node.wait_exit(Duration::from_secs(2)).await {
                        Some(status) => format!("{why}; it exited ({status})"),
                        None => why,
                    };
                    return Err(node.failure(&why));
                }
                Err(_) => return Err(node.failure("the banner reader ended")),
            },
            status = node.child.wait() => {
                let why = format!("exited ({}) before its banner", describe(status));
                return Err(node.failure(&why));
            }
            () = tokio::time::sleep_until(deadline) => {
                let why = format!("printed no complete banner within {START_TIMEOUT:?}");
                return Err(node.failure(&why));
            }
        };
        node.http_addr.set_port(banner.http_port);
        node.wt_port = banner.wt_port;
        // Then HTTP served: what native clients pin comes from there.
        loop {
            let last_error = match node.fetch_cert_hashes().await {
                Ok(hashes) => {
                    node.cert_hashes = hashes;
                    return Ok(node);
                }
                Err(e) => e,
            };
            if let Some(status) = node.exit_status() {
                let why = format!("exited ({status}) before answering HTTP");
                return Err(node.failure(&why));
            }
            if Instant::now() >= deadline {
                let why = format!("did not answer /api/cert-hashes within {START_TIMEOUT:?}: {last_error:#}");
                return Err(node.failure(&why));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The pinned hashes the node publishes, current first.
    async fn fetch_cert_hashes(&self) -> Result<Vec<[u8; 32]>> {
        let (status, body) = self.http("GET", "/api/cert-hashes", None, None).await?;
        ensure!(status == 200, "/api/cert-hashes answered {status}: {body}");
        let hashes = body["hashes"]
            .as_array()
            .context("no hashes")?
            .iter()
            .map(|h| parse_hash(h["hex"].as_str().unwrap_or_default()))
            .collect::<Result<Vec<_>>>()?;
        ensure!(!hashes.is_empty(), "no certificate hashes: {body}");
        Ok(hashes)
    }

    /// The node's id in the cluster (`--node-id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The HTTP listener's address (`127.0.0.1:<port>`).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://127.0.0.1:<port>`, where its API is (and what the cluster's directory says,
    /// unless [`NodeOptions::public_http_url`] said otherwise).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The UDP port of its WebTransport endpoint.
    pub fn wt_port(&self) -> u16 {
        self.wt_port
    }

    /// `https://127.0.0.1:<port>/`, its WebTransport endpoint.
    pub fn webtransport_url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.wt_port)
    }

    /// `ws://127.0.0.1:<port>/api/ws`, its WebSocket endpoint.
    pub fn websocket_url(&self) -> String {
        format!("ws://{}/api/ws", self.http_addr)
    }

    /// The URL native clients open sessions at over `transport`.
    pub fn session_url(&self, transport: Transport) -> String {
        match transport {
            Transport::WebTransport => self.webtransport_url(),
            Transport::WebSocket => self.websocket_url(),
        }
    }

    /// SHA-256 hashes of its development certificates (current, next) that native clients
    /// pin, as `/api/cert-hashes` gave them when it started.
    pub fn cert_hashes(&self) -> &[[u8; 32]] {
        &self.cert_hashes
    }

    /// Its data directory (`--data-dir`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Its log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// Connect options to join room `code` with `token` over `transport`, pinning its hashes;
    /// no reports.
    pub fn options(&self, transport: Transport, code: &str, token: &str) -> ConnectOptions {
        let mut options = ConnectOptions::new(self.session_url(transport), token, code);
        options.cert_hashes = self.cert_hashes.clone();
        options.report_interval = None;
        options
    }

    /// Joins room `code` with `token` over WebTransport (following `moved` to the room's
    /// node, as clients do).
    pub async fn connect(&self, code: &str, token: &str) -> Result<Client> {
        Client::connect(self.options(Transport::WebTransport, code, token))
            .await
            .with_context(|| format!("joining {code} through {}", self.id))
    }

    /// An HTTP request to the node with `token` (if any); the status and the JSON body
    /// (`Null` if empty). Gives up after 10 s, or what [`Self::set_http_timeout`] set (a
    /// paused node never answers).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut request =
            self.http_client.request(method.clone(), format!("{}{path}", self.http_url())).timeout(self.http_timeout);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.with_context(|| format!("{method} {path} on {}", self.id))?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        let value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).context(text)? };
        Ok((status, value))
    }

    /// How long [`Self::http`] waits for an answer from now on (10 s unless set).
    pub fn set_http_timeout(&mut self, timeout: Duration) {
        self.http_timeout = timeout;
    }

    /// Its exit status, if it has ended (reaping it).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Kills it with SIGKILL, as a crash would (a paused one too), and reaps it; its exit
    /// status (or the one it had already ended with).
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit_status() {
            return Ok(status);
        }
        self.child.start_kill().with_context(|| format!("SIGKILL to {}", self.id))?;
        match self.wait_exit(SIGNAL_TIMEOUT).await {
            Some(status) => Ok(status),
            None => Err(self.failure(&format!("still running {SIGNAL_TIMEOUT:?} after SIGKILL"))),
        }
    }

    /// Freezes it with SIGSTOP and waits until the kernel shows it stopped: it answers
    /// nothing, renews no lease, until [`Self::resume`].
    pub async fn pause(&mut self) -> Result<()> {
        self.signal(rustix::process::Signal::STOP)?;
        self.wait_for_state("stopped", |state| state == 'T').await
    }

    /// Thaws it with SIGCONT and waits until the kernel no longer shows it stopped.
    pub async fn resume(&mut self) -> Result<()> {
        self.signal(rustix::process::Signal::CONT)?;
        self.wait_for_state("running again", |state| state != 'T').await
    }

    /// Whether it is stopped (SIGSTOP) right now.
    pub fn is_paused(&self) -> bool {
        process_state(self.pid) == Some('T')
    }

    /// Sends SIGTERM (a service manager's stop); [`Self::wait_exit`] sees how it ends.
    pub fn terminate(&mut self) -> Result<()> {
        self.signal(rustix::process::Signal::TERM)
    }

    /// Sends SIGINT (Ctrl-C: the server's graceful stop); [`Self::wait_exit`] sees how it ends.
    pub fn interrupt(&mut self) -> Result<()> {
        self.signal(rustix::process::Signal::INT)
    }

    /// Waits at most `timeout` for it to end; its exit status, or `None` if it still runs.
    ///
    /// # Panics
    ///
    /// If waiting fails (the process is not this one's child any more).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit {
            return Some(status);
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exit = Some(status);
                Some(status)
            }
            Ok(Err(e)) => panic!("waiting for node {} (pid {}): {e}", self.id, self.pid),
            Err(_) => None,
        }
    }

    /// Sends `signal`, unless it has already ended (its pid may be someone else's by now).
    fn signal(&mut self, signal: rustix::process::Signal) -> Result<()> {
        if let Some(status) = self.exit_status() {
            bail!("node {} (pid {}) has already ended ({status}): no {signal:?} sent", self.id, self.pid);
        }
        let pid = i32::try_from(self.pid).ok().and_then(rustix::process::Pid::from_raw).context("pid")?;
        rustix::process::kill_process(pid, signal).with_context(|| format!("{signal:?} to node {}", self.id))
    }

    /// Waits until the process's state letter (`/proc/<pid>/stat`) satisfies `wanted`.
    async fn wait_for_state(&mut self, what: &str, wanted: impl Fn(char) -> bool) -> Result<()> {
        let deadline = Instant::now() + SIGNAL_TIMEOUT;
        loop {
            match process_state(self.pid) {
                Some(state) if wanted(state) => return Ok(()),
                Some('Z' | 'X') | None => {
                    let status = self.exit_status().map_or_else(|| "not reaped".to_owned(), |s| s.to_string());
                    return Err(self.failure(&format!("ended ({status}) instead of being {what}")));
                }
                Some(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!("not {what} {SIGNAL_TIMEOUT:?} after the signal")));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// An error saying what went wrong with this node, with its log's path and tail.
    fn failure(&self, why: &str) -> anyhow::Error {
        anyhow!("node {} (pid {}): {why}\n{}", self.id, self.pid, self.report())
    }

    /// Its log's path and last [`LOG_TAIL_LINES`] lines.
    pub fn report(&self) -> String {
        format!(
            "--- {} log {}, last {LOG_TAIL_LINES} lines ---\n{}",
            self.id,
            self.log_path.display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        if self.exit_status().is_some() {
            return;
        }
        // SIGKILL ends a stopped process too. Reap it here, so its ports, its database
        // connections and its lease are gone once the node is.
        if self.child.start_kill().is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + SIGNAL_TIMEOUT;
        while self.exit_status().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Copies the node's stdout to its log line by line, sending the banner's ports once its last
/// line ("Press Ctrl-C to stop.") is out, then the rest, so the pipe never fills.
async fn pump_stdout(stdout: ChildStdout, mut log: std::fs::File, banner: oneshot::Sender<Result<Banner, String>>) {
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Some(banner);
    let (mut http_port, mut wt_port) = (None, None);
    let port_of = |url: &str| url.trim_end_matches('/').rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                let _ = writeln!(log, "(reading stdout failed: {e})");
                break;
            }
        };
        let _ = writeln!(log, "{line}");
        if banner.is_none() {
            continue;
        }
        let text = line.trim();
        if let Some(rest) = text.strip_prefix("HTTP API:") {
            http_port = port_of(rest.trim());
        } else if let Some(rest) = text.strip_prefix("WebTransport:") {
            wt_port = rest.split_whitespace().find(|w| w.starts_with("https://")).and_then(port_of);
        } else if text.starts_with("Press Ctrl-C to stop.")
            && let Some(banner) = banner.take()
        {
            let parsed = match (http_port, wt_port) {
                (Some(http_port), Some(wt_port)) => Ok(Banner { http_port, wt_port }),
                _ => Err(format!("the banner lacks a port (HTTP {http_port:?}, WebTransport {wt_port:?})")),
            };
            let _ = banner.send(parsed);
        }
    }
    if let Some(banner) = banner {
        let _ = banner.send(Err("its stdout ended before the banner did".to_owned()));
    }
}

/// The state letter of process `pid` (`R`, `S`, `T` stopped, `Z` zombie, ...), if it exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`; the name may hold spaces and parentheses.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// The last `lines` lines of the file at `path`.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// 64 hex digits as 32 bytes.
fn parse_hash(hex: &str) -> Result<[u8; 32]> {
    ensure!(hex.len() == 64 && hex.is_ascii(), "{hex:?} is not a SHA-256 in hex");
    let mut hash = [0_u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).with_context(|| format!("{hex:?} is not hex"))?;
    }
    Ok(hash)
}

/// How a wait for the process ended, for messages.
fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("waiting failed: {e}"),
    }
}
