//! Downbeat in a benchmark run: the real `downbeat` server binary as a child process (so its
//! CPU time and memory are its own), and simulated classrooms of native clients in a child
//! process of their own ([`class`]), inside the emulator's namespace when there is one.

pub mod class;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use base64::Engine as _;
use downbeat_server::auth::{Role, Tenants};
use downbeat_server::{Args, parse_and_merge};

/// The tenant benchmark tokens belong to.
const TENANT: &str = "bench";

/// Limits for a benchmark server: a school far bigger than a real one, so that only the
/// machine limits what a run can hold.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Sessions at once (server and tenant).
    pub sessions: usize,
    /// Rooms at once (server and tenant).
    pub rooms: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self { sessions: 20_000, rooms: 2_000 }
    }
}

/// How to start a [`ServerProcess`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Sessions and rooms.
    pub limits: ServerLimits,
    /// Where the HTTP listener listens (see [`ServerProcess::start`]).
    pub http_host: IpAddr,
    /// Where the data directory (its SQLite database included) is made: a fresh directory
    /// inside this one (default: the system's temporary directory).
    pub data_dir: Option<PathBuf>,
    /// More top-level settings, as lines of the configuration file (`key = value\n`).
    pub settings: String,
    /// The processors the server may run on, as `taskset -c` takes them (`1`, `2-3`): the
    /// server is started through `taskset`, so that it runs on them alone when the load
    /// generator is kept off them (`taskset -c 0 downbeat-bench ...`). `None`: the
    /// `BENCH_SERVER_CPUS` environment variable if set, else wherever the scheduler puts it.
    pub cpus: Option<String>,
}

/// The `downbeat` binary next to this program (`target/<profile>/downbeat`), or the one
/// `DOWNBEAT_BIN` names.
pub fn server_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("DOWNBEAT_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let dir = exe.parent().context("this program's directory")?;
    // Integration tests run from target/<profile>/deps.
    for candidate in [dir.join("downbeat"), dir.join("../downbeat")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "no downbeat server binary next to {}: build it with `cargo build --release -p downbeat-server` \
         (or set DOWNBEAT_BIN)",
        exe.display()
    )
}

/// The processors `BENCH_SERVER_CPUS` names for the server, if set (see [`ServerOptions::cpus`]).
pub fn server_cpus() -> Option<String> {
    std::env::var("BENCH_SERVER_CPUS").ok().filter(|cpus| !cpus.trim().is_empty())
}

/// The command that starts `bin`: through `taskset -c <cpus>` when given (it sets the
/// processors and runs the server in its own place, so the child's pid is the server's).
fn server_command(bin: PathBuf, cpus: Option<&str>) -> Command {
    match cpus {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(cpus).arg(bin);
            command
        }
        None => Command::new(bin),
    }
}

/// A running `downbeat` server process with a fresh data directory (SQLite, a self-signed
/// certificate) and one large benchmark tenant. Killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    http_host: IpAddr,
    http_port: u16,
    wt_port: u16,
    hashes: Vec<String>,
    zero: u64,
    tenants: Tenants,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts the server and waits for its banner and its first metrics. Its HTTP listener
    /// (the API, `/metrics` and WebSocket sessions at `/api/ws`) listens on `http_host` (the
    /// address WebSocket students reach: the emulator's server address when emulated, so
    /// their TCP crosses it); WebTransport listens on every address.
    pub fn start(limits: ServerLimits, http_host: IpAddr) -> Result<Self> {
        Self::start_with(ServerOptions { limits, http_host, data_dir: None, settings: String::new(), cpus: None })
    }

    /// [`ServerProcess::start`] with every option.
    pub fn start_with(options: ServerOptions) -> Result<Self> {
        let ServerOptions { limits, http_host, data_dir, settings, cpus } = options;
        let dir = match data_dir {
            Some(parent) => tempfile::tempdir_in(parent),
            None => tempfile::tempdir(),
        }
        .context("a data directory for the server")?;
        let secret: [u8; 32] = rand::random();
        let config_text = format!(
            "{settings}max_sessions = {sessions}\nmax_rooms = {rooms}\nmax_members_per_room = 64\n\n\
             [[tenants]]\nid = \"{TENANT}\"\nname = \"Benchmark school\"\nissuer = \"downbeat-bench\"\n\
             [[tenants.keys]]\nalgorithm = \"HS256\"\nsecret = \"{secret}\"\n\
             [tenants.limits]\nmax_sessions = {sessions}\nmax_rooms = {rooms}\nmax_members_per_room = 64\n",
            sessions = limits.sessions,
            rooms = limits.rooms,
            secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
        );
        let config_path = dir.path().join("downbeat.toml");
        std::fs::write(&config_path, &config_text)?;
        let config =
            parse_and_merge(Args { data_dir: Some(dir.path().to_path_buf()), ..Args::default() }, Some(&config_text))
                .context("the benchmark server's configuration")?;
        let tenants = Tenants::new(&config).context("the benchmark tenant")?;

        let cpus = cpus.or_else(server_cpus);
        let mut command = server_command(server_binary()?, cpus.as_deref());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("DOWNBEAT_") {
                command.env_remove(key);
            }
        }
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--http-addr")
            .arg(SocketAddr::new(http_host, 0).to_string())
            .args(["--wt-port", "0"])
            .env("RUST_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // The server's `worker_threads` setting (its runtime's threads; unset: one per core).
        if let Some(threads) = std::env::var_os("BENCH_SERVER_THREADS") {
            command.env("DOWNBEAT_WORKER_THREADS", threads);
        }
        let mut child = command.spawn().with_context(|| match &cpus {
            Some(cpus) => format!("starting the downbeat server on processors {cpus} through taskset (util-linux)"),
            None => "starting the downbeat server".to_owned(),
        })?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let (http_port, wt_port, hashes) = match read_banner(stdout) {
            Ok(found) => found,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut server = Self { child, http_host, http_port, wt_port, hashes, zero: 0, tenants, _dir: dir };
        let metrics = server.metrics()?;
        server.zero = metrics.get("downbeat_clock_zero_monotonic_nanoseconds").copied().unwrap_or(0.0) as u64;
        ensure!(server.zero > 0, "the server did not publish its clock zero (not Linux?)");
        Ok(server)
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The WebTransport URL on `host`.
    pub fn url(&self, host: IpAddr) -> String {
        format!("https://{host}:{}/", self.wt_port)
    }

    /// The HTTP listener's address.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.http_host, self.http_port)
    }

    /// The data directory (the SQLite database is `downbeat.sqlite3` in it).
    pub fn data_dir(&self) -> &Path {
        self._dir.path()
    }

    /// The WebSocket URL (`ws://` on the HTTP listener: no TLS, as the peers).
    pub fn websocket_url(&self) -> String {
        format!("ws://{}/api/ws", SocketAddr::new(self.http_host, self.http_port))
    }

    /// The pinned certificate hashes, hex.
    pub fn cert_hashes(&self) -> &[String] {
        &self.hashes
    }

    /// Host monotonic nanoseconds at server time zero.
    pub fn zero(&self) -> u64 {
        self.zero
    }

    /// A token of the benchmark tenant.
    pub fn token(&self, role: Role, sub: &str) -> Result<String> {
        Ok(self.tenants.mint(TENANT, role, sub, sub, Duration::from_secs(6 * 3600))?)
    }

    /// The server's Prometheus metrics, by series: the name, with its labels as the server
    /// writes them when it has any (`downbeat_transport_sessions_active{transport="websocket"}`).
    /// Fetched from this host's own address, so never through the emulator.
    pub fn metrics(&self) -> Result<HashMap<String, f64>> {
        fetch_metrics(SocketAddr::new(self.http_host, self.http_port))
    }

    /// Stops the server (SIGKILL: nothing to flush that a benchmark needs).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Prometheus metrics of the server whose HTTP listener is `addr`, by series (see
/// [`ServerProcess::metrics`]).
pub fn fetch_metrics(addr: SocketAddr) -> Result<HashMap<String, f64>> {
    let mut stream = TcpStream::connect(addr).context("connecting for metrics")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).context("an HTTP answer")?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
        .collect())
}

/// Reads the banner up to "Press Ctrl-C", then drains the rest in the background: the HTTP
/// port, the WebTransport port and the certificate hashes (hex).
pub(crate) fn read_banner(stdout: std::process::ChildStdout) -> Result<(u16, u16, Vec<String>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let (mut http, mut wt, mut hashes) = (None, None, Vec::new());
        let port_of = |url: &str| url.trim_end_matches('/').rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("HTTP API:") {
                http = port_of(rest.trim());
            } else if let Some(rest) = line.strip_prefix("WebTransport:") {
                wt = rest.split_whitespace().find(|w| w.starts_with("https://127.0.0.1:")).and_then(port_of);
            } else if let Some(rest) = line.strip_prefix("Cert SHA-256:") {
                hashes.extend(rest.split_whitespace().next().map(str::to_owned));
            } else if line.starts_with("Press Ctrl-C") {
                let _ = tx.send((http, wt, hashes.clone()));
                break;
            }
        }
        // Keep reading so the pipe never fills.
        for _ in lines {}
    });
    let (http, wt, hashes) = rx
        .recv_timeout(Duration::from_secs(30))
        .context("the downbeat server did not print its banner (see its log above)")?;
    Ok((http.context("the banner's HTTP port")?, wt.context("the banner's WebTransport port")?, hashes))
}

/// What the class helper says once its sessions are up and the beat runs.
#[derive(Clone, Debug)]
pub enum Ready {
    /// Hold mode: this many sessions are held.
    Held(usize),
    /// `until_stdin_closes`: the measured window began; the rooms' codes.
    Playing(Vec<String>),
}

/// Runs the class helper (this program, `class-helper`) with `spec`: through `command`
/// (inside the emulator's namespace, or plain), and returns its output. `on_ready` is called
/// in hold mode once every session is up, and with `until_stdin_closes` once the measured
/// window begins; the helper's beat ends when it returns.
pub fn run_class(
    mut command: Command,
    spec: &class::ClassSpec,
    work_dir: &Path,
    on_ready: impl FnOnce(Ready) -> Result<()>,
) -> Result<class::ClassOutput> {
    let spec_path = work_dir.join("class-spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(spec)?)?;
    command
        .arg("class-helper")
        .arg("--spec")
        .arg(&spec_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let began = Instant::now();
    let mut child = command.spawn().context("starting the class helper")?;
    let stdin = child.stdin.take();
    let mut stdout = BufReader::new(child.stdout.take().context("the helper's stdout")?);
    let mut last = String::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line)? == 0 {
            break;
        }
        let ready = if let Some(n) = line.trim().strip_prefix("held ") {
            Some(Ready::Held(n.parse::<usize>()?))
        } else {
            line.trim()
                .strip_prefix("playing")
                .map(|codes| Ready::Playing(codes.split_whitespace().map(str::to_owned).collect()))
        };
        if let Some(ready) = ready {
            ensure!(
                matches!(ready, Ready::Held(_)) == spec.hold,
                "the helper said {:?} to a spec with hold = {}",
                line.trim(),
                spec.hold
            );
            let result = on_ready(ready);
            drop(stdin);
            result?;
            // `stdin` is gone now; keep reading the output.
            return finish(child, stdout, began);
        }
        last = line;
    }
    let status = child.wait()?;
    ensure!(status.success(), "the class helper failed ({status}) after {:?}", began.elapsed());
    serde_json::from_str(last.trim()).context("the class helper's output")
}

fn finish(
    mut child: Child,
    mut stdout: BufReader<std::process::ChildStdout>,
    began: Instant,
) -> Result<class::ClassOutput> {
    let mut rest = String::new();
    stdout.read_to_string(&mut rest)?;
    let status = child.wait()?;
    ensure!(status.success(), "the class helper failed ({status}) after {:?}", began.elapsed());
    let last = rest.lines().last().context("the class helper printed nothing")?;
    serde_json::from_str(last.trim()).context("the class helper's output")
}
