//! Downbeat's timing server.
//!
//! The server owns one shared musical timeline per room and keeps every client's beat on the
//! same true instant:
//!
//! - **WebTransport** (HTTP/3 on quinn-proto, one task driving the socket and every
//!   connection, `quic/`; framed with wtransport's protocol crate, bound dual-stack;
//!   `session/h3.rs`): one reliable control stream per
//!   session (hello, welcome, control changes, errors with stable codes) and unreliable
//!   datagrams for NTP-style clock sync and for beat frames sent ahead of time.
//! - **HTTP/1.1** ([`axum`], its own TCP port, optionally also over HTTPS): health, the
//!   certificate hashes pages pin, rooms (create, list, look up, close) and teacher controls,
//!   `/metrics`, and the browser classroom: its pages, the browser package, what a page needs
//!   to connect, and demo sign-in. Every response is cross-origin isolated.
//! - **Tenants and tokens** ([`auth`]): every school is a tenant with its own signing keys and
//!   limits; sessions and requests carry a JWT whose verified claims give the tenant, a
//!   pseudonymous subject, the role and a display name. One authorization function decides
//!   what each role may do, for every entry point.
//! - **Classrooms**: rooms joined by a short code, seats that survive a Wi-Fi blip, presence,
//!   teacher controls on the beat, mute, parts, and notes every classmate hears at once.
//! - **SEL data** ([`sel`]): reflections children write, participation the server measures
//!   on the shared timeline, summaries and the teachers' live feed, export and deletion of one
//!   child's data, and retention; on SQLite by default or PostgreSQL, written through a
//!   bounded queue so beats and notes never wait on the database.
//! - **Certificates**: a self-signed development identity (rotated before Chrome's 14-day
//!   limit, hashes published), production PEM files (reloaded when they change), or a
//!   certificate obtained and renewed with ACME (TLS-ALPN-01 on the HTTPS listener); any of
//!   them is swapped in WebTransport and HTTPS at once without dropping open sessions.
//!
//! The timing logic itself lives in `downbeat-engine`, which never reads a clock; this crate
//! is the I/O shell around it and reads time only through [`ServerClock`]. Rooms live in
//! memory: they end when their teacher closes them, when nobody has been in them for a while,
//! or when the server stops.
//!
//! ```no_run
//! # async fn example() -> Result<(), downbeat_server::ServerError> {
//! let config = downbeat_server::Config { wt_port: 0, ..Default::default() };
//! let server = downbeat_server::Server::bind(config).await?;
//! println!("{}", server.webtransport_url("localhost"));
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

mod acme;
mod api;
pub mod arrival;
pub mod auth;
mod authz;
pub mod clock;
pub mod cluster;
mod codes;
pub mod config;
mod identity;
mod limits;
mod outbound;
mod private;
mod quic;
mod room;
pub mod sel;
mod session;
mod shutdown;
pub mod stats;

use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::serve::ListenerExt as _;
use downbeat_protocol::ErrorCode;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};
use wtransport::quinn;

pub use crate::api::{ApiError, status_for};
pub use crate::clock::ServerClock;
pub use crate::config::{Args, Config, ConfigError, parse_and_merge};
pub use crate::identity::{IdentityError, PublishedHash};
pub use crate::quic::{Exchanged, exchange_endpoint_events, register_for_reading, send_transmit};
pub use crate::stats::Stats;

use crate::auth::Tenants;
use crate::identity::{PublishedHashes, TlsHealth};
use crate::quic::{Endpoint, VarInt};
use crate::room::{Rooms, RoomsConfig};
use crate::session::SessionContext;

/// How long shutdown waits for HTTP connections and QUIC close handshakes.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS identity could not be loaded, created or used.
    #[error("TLS identity: {0}")]
    Identity(#[from] IdentityError),
    /// The HTTP listener could not be bound.
    #[error("cannot listen for HTTP on {addr}: {source} (is another server using the port? set --http-addr)")]
    BindHttp {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTPS listener could not be bound.
    #[error("cannot listen for HTTPS on {addr}: {source} (is another server using the port? set --https-addr)")]
    BindHttps {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics listener (`--metrics-addr`) could not be bound.
    #[error("cannot listen for /metrics on {addr}: {source} (is another server using the port? set --metrics-addr)")]
    BindMetrics {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The WebTransport UDP socket could not be bound.
    #[error(
        "cannot listen for WebTransport on UDP port {port}: {source} (is another server using the port? set --wt-port)"
    )]
    BindWebTransport {
        /// The port asked for.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory (for the default SQLite database) could not be created.
    #[error("cannot create the data directory {path}: {source} (make it writable or set --data-dir)")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The SEL database could not be opened or migrated.
    #[error("SEL database: {0} (check --database-url)")]
    Store(#[from] sel::store::StoreError),
    /// The HTTP server failed while running.
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    /// The cluster's NATS server could not be reached or set up.
    #[error("{0} (check --cluster)")]
    Cluster(cluster::ClusterError),
}

/// A bound server: both listeners are open (so the real ports are known, even when the
/// config asked for port 0) and the TLS identity is loaded. [`Server::run`] serves.
pub struct Server {
    config: Config,
    clock: ServerClock,
    stats: Arc<Stats>,
    endpoint: Arc<Endpoint>,
    http: TcpListener,
    http_addr: SocketAddr,
    https: Option<api::TlsListener>,
    https_addr: Option<SocketAddr>,
    https_certs: Option<Arc<api::CertResolver>>,
    metrics: Option<TcpListener>,
    metrics_addr: Option<SocketAddr>,
    wt_port: u16,
    source: identity::Source,
    hashes: Arc<PublishedHashes>,
    tls_health: Arc<TlsHealth>,
    tenants: Arc<Tenants>,
    demo_teacher_secret: Option<config::DemoSecret>,
    rooms: Arc<Rooms>,
    sel: sel::Sel,
    sel_writer: tokio::task::JoinHandle<()>,
    trigger: shutdown::Trigger,
    signal: shutdown::Shutdown,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("http_addr", &self.http_addr)
            .field("https_addr", &self.https_addr)
            .field("wt_port", &self.wt_port)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Validates `config`, loads or creates the TLS identity, and binds the WebTransport
    /// (UDP, dual-stack), HTTP (TCP) and, if configured, HTTPS (TCP) listeners. Missing
    /// pages or browser package directories are logged as warnings, not errors.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        config.validate()?;
        api::warn_if_missing(&config);
        // The nodes of a cluster share a time base, so a room's timeline moves between them
        // unchanged.
        let clock = if config.cluster.is_some() { ServerClock::on_shared_base() } else { ServerClock::new() };
        let stats = Arc::new(Stats::default());
        stats.clock_zero_monotonic_nanos.set(clock.zero_on_host_monotonic().unwrap_or(0));
        let (source, key) = identity::load(&config)?;
        let endpoint = bind_endpoint(&config, &key, stats.clone())?;
        let endpoint = Arc::new(endpoint);
        let wt_port = endpoint
            .local_addr()
            .map_err(|source| ServerError::BindWebTransport { port: config.wt_port, source })?
            .port();
        let asked = config.http_listen_addr();
        let http = bind_tcp(asked).await.map_err(|(addr, source)| ServerError::BindHttp { addr, source })?;
        let http_addr = http.local_addr().map_err(|source| ServerError::BindHttp { addr: asked, source })?;
        let (https, https_addr, https_certs) = match config.https_addr {
            Some(asked) => {
                let tcp = bind_tcp(asked).await.map_err(|(addr, source)| ServerError::BindHttps { addr, source })?;
                let addr = tcp.local_addr().map_err(|source| ServerError::BindHttps { addr: asked, source })?;
                let certs = Arc::new(api::CertResolver::new(&key).map_err(IdentityError::Tls)?);
                let listener = api::TlsListener::new(tcp, certs.clone(), config.http_header_timeout())
                    .map_err(IdentityError::Tls)?;
                (Some(listener), Some(addr), Some(certs))
            }
            None => (None, None, None),
        };
        let (metrics, metrics_addr) = match config.metrics_addr {
            Some(asked) => {
                let tcp = bind_tcp(asked).await.map_err(|(addr, source)| ServerError::BindMetrics { addr, source })?;
                let addr = tcp.local_addr().map_err(|source| ServerError::BindMetrics { addr: asked, source })?;
                (Some(tcp), Some(addr))
            }
            None => (None, None),
        };
        let tls_health = Arc::new(TlsHealth::new(&source, &key));
        stats.tls_certificate_not_after.set(identity::unix_secs(key.not_after));
        let tenants = Arc::new(Tenants::new(&config)?);
        let demo_teacher_secret =
            tenants.is_demo().then(|| config.demo_teacher_secret.clone().unwrap_or_else(config::DemoSecret::random));
        let hashes = Arc::new(PublishedHashes::default());
        hashes.set(source.published());
        let (trigger, signal) = shutdown::channel();
        if config.database_url.is_none() {
            private::private_dir(&config.data_dir)
                .map_err(|source| ServerError::DataDir { path: config.data_dir.clone(), source })?;
        }
        let store = sel::store::Store::open(&config.database_url_or_default()).await?;
        info!(backend = store.backend_name(), "SEL database ready");
        let (sel, sel_writer) = sel::Sel::spawn(store, config.sel_queue, stats.clone(), signal.clone());
        let cluster = match &config.cluster {
            Some(url) => {
                let node = node_entry(&config, http_addr, wt_port);
                let joined = cluster::Cluster::connect_with(url, node, config.cluster_lease(), Some(hashes.clone()))
                    .await
                    .map_err(ServerError::Cluster)?;
                joined.set_clock_bound(std::time::Duration::from_micros(config.cluster_clock_bound_us));
                Some(joined)
            }
            None => None,
        };
        let rooms = Arc::new(Rooms::new(
            RoomsConfig {
                engine: downbeat_engine::room::Config {
                    lead_nanos: config.lead_ms * 1_000_000,
                    send_interval_nanos: config.send_interval_ms * 1_000_000,
                    steady_send_interval_nanos: config.steady_send_interval_ms * 1_000_000,
                    idle_send_interval_nanos: config.steady_send_interval_ms * 1_000_000,
                    // A burst lasts a lead: as long as the announcement of a change at least.
                    burst_nanos: config.lead_ms * 1_000_000,
                    max_members: config.max_members_per_room,
                    playout_delay_nanos: config.playout_delay_ms * 1_000_000,
                    max_reflections_per_prompt: config.max_reflections_per_prompt,
                    ..downbeat_engine::room::Config::default()
                },
                max_rooms: config.max_rooms,
                idle_expiry_nanos: config.room_idle_expiry_secs * 1_000_000_000,
                seat_grace_nanos: config.seat_grace_ms * 1_000_000,
            },
            clock,
            stats.clone(),
            sel.clone(),
            signal.clone(),
            cluster,
        ));
        info!(
            http = %http_addr,
            https = ?https_addr,
            metrics = ?metrics_addr,
            webtransport_port = wt_port,
            production_tls = config.tls_cert.is_some(),
            acme = ?config.acme_domain,
            "listening"
        );
        Ok(Self {
            config,
            clock,
            stats,
            endpoint,
            http,
            http_addr,
            https,
            https_addr,
            https_certs,
            metrics,
            metrics_addr,
            wt_port,
            source,
            hashes,
            tls_health,
            tenants,
            demo_teacher_secret,
            rooms,
            sel,
            sel_writer,
            trigger,
            signal,
        })
    }

    /// The address the HTTP API listens on (the real port, also when 0 was asked for).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address the HTTPS listener (`--https-addr`) listens on, if there is one (the real
    /// port, also when 0 was asked for). It serves what HTTP serves, with the certificate
    /// WebTransport uses (rotations, reloads and ACME renewals reach both).
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The address `/metrics` alone is served on (`--metrics-addr`), if it has its own
    /// listener (the real port, also when 0 was asked for).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The UDP port WebTransport listens on (the real port, also when 0 was asked for).
    pub fn webtransport_port(&self) -> u16 {
        self.wt_port
    }

    /// The URL a client on `host` connects to, e.g. `https://localhost:4433/`. IPv6
    /// literals are bracketed.
    pub fn webtransport_url(&self, host: &str) -> String {
        if host.contains(':') && !host.starts_with('[') {
            format!("https://[{host}]:{}/", self.wt_port)
        } else {
            format!("https://{host}:{}/", self.wt_port)
        }
    }

    /// SHA-256 hashes of the development certificates pages should pin, current first;
    /// empty with production certificates. Changes as certificates rotate.
    pub fn cert_hashes(&self) -> Vec<[u8; 32]> {
        self.hashes.get().iter().map(|h| h.sha256).collect()
    }

    /// [`Self::cert_hashes`] with their expiry times.
    pub fn published_hashes(&self) -> Vec<PublishedHash> {
        self.hashes.get()
    }

    /// The tenants and their token keys (to mint development tokens for the demo tenant).
    pub fn tenants(&self) -> Arc<Tenants> {
        self.tenants.clone()
    }

    /// The demo tenant's teacher secret (configured, or random for this run), which
    /// `/api/demo/tokens` asks of teachers; `None` when schools are configured. Show it only to
    /// the person who started the server: the banner puts it in the teacher page's URL.
    pub fn demo_teacher_secret(&self) -> Option<&str> {
        self.demo_teacher_secret.as_ref().map(config::DemoSecret::expose)
    }

    /// The server clock (what `ServerNanos` on the wire are measured against).
    pub fn clock(&self) -> ServerClock {
        self.clock
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves until `shutdown` completes, then stops accepting, closes every session with
    /// [`ErrorCode::ShuttingDown`] (after telling it on its control stream), lets HTTP
    /// requests in flight finish, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let Self {
            config,
            clock,
            stats,
            endpoint,
            http,
            https,
            https_certs,
            metrics,
            wt_port,
            source,
            hashes,
            tls_health,
            tenants,
            demo_teacher_secret,
            rooms,
            sel,
            sel_writer,
            trigger,
            signal,
            ..
        } = self;
        // Each school's sessions here, against its limit (the other nodes' counted in, in a
        // cluster, through the node entries the lease task writes and reads).
        let tenant_sessions = session::TenantSessions::default();
        let lease_task =
            tokio::spawn(rooms.clone().keep_leases(tenants.clone(), tenant_sessions.clone(), signal.clone()));
        let clock_task = rooms.cluster().cloned().map(|cluster| tokio::spawn(cluster.run_clock(stats.clone())));
        let purge_task = tokio::spawn(sel::purge_loop(
            sel.store().clone(),
            tenants.clone(),
            stats.clone(),
            config.sel_purge_interval(),
            signal.clone(),
        ));

        let ctx = Arc::new(SessionContext {
            rooms: rooms.clone(),
            tenants: tenants.clone(),
            tenant_sessions,
            stats: stats.clone(),
            clock,
            hello_timeout: config.hello_timeout(),
            idle_timeout: config.idle_timeout(),
            keep_alive: config.keep_alive(),
            handshakes: Arc::new(Semaphore::new(config.max_concurrent_handshakes)),
            max_handshakes: config.max_concurrent_handshakes,
            handshakes_per_network: limits::PerNetwork::new(config.max_handshakes_per_address),
            retry_above_handshakes: config.retry_above_handshakes,
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
            sessions_per_network: limits::PerNetwork::new(config.max_sessions_per_address),
            probes: session::probe::Probes::new(
                config.max_probes_per_address,
                config.max_probes,
                config.probe_duration(),
            ),
            next_session_id: AtomicU64::new(1),
        });

        let http_limits = api::HttpLimits::new(&config);
        let state = api::AppState {
            rooms: rooms.clone(),
            tenants: tenants.clone(),
            hashes: hashes.clone(),
            tls: tls_health.clone(),
            stats: stats.clone(),
            clock,
            limits: Arc::new(Mutex::new(std::collections::HashMap::new())),
            sel: sel.clone(),
            web: Arc::new(api::Web::new(&config, wt_port, demo_teacher_secret.as_ref())),
            sessions: ctx.clone(),
            shutdown: signal.clone(),
        };
        let router = api::router(state.clone(), config.http_request_timeout(), metrics.is_none());
        let mut metrics_task = metrics.map(|listener| {
            let router = api::metrics_router(state.clone(), config.http_request_timeout());
            tokio::spawn(api::serve(listener, router, http_limits, signal.clone()))
        });
        drop(state);
        drop(sel);
        let http = http.tap_io(api::no_delay);
        let mut http_task = tokio::spawn(api::serve(http, router.clone(), http_limits, signal.clone()));
        let mut https_task =
            https.map(|listener| tokio::spawn(api::serve(listener, router, http_limits, signal.clone())));
        let installer = identity::Installer {
            endpoint: endpoint.clone(),
            https: https_certs,
            config: config.clone(),
            stats: stats.clone(),
            health: tls_health,
        };
        let identity_task = tokio::spawn(identity::maintain(source, installer, hashes, signal.clone()));
        // Shut down when asked, or if the HTTP, HTTPS or metrics server stops on its own.
        let watch = async {
            let ended = tokio::select! {
                () = shutdown => {
                    if rooms.cluster().is_some() {
                        info!("draining: handing this node's rooms to the others");
                        rooms.drain(config.cluster_drain()).await;
                    }
                    info!("shutting down");
                    (None, None, None)
                }
                ended = &mut http_task => {
                    warn!("HTTP server stopped; shutting down");
                    (Some(ended), None, None)
                }
                ended = until_finished(&mut https_task) => {
                    warn!("HTTPS server stopped; shutting down");
                    (None, Some(ended), None)
                }
                ended = until_finished(&mut metrics_task) => {
                    warn!("metrics server stopped; shutting down");
                    (None, None, Some(ended))
                }
            };
            trigger.fire();
            ended
        };
        let ((), (http_ended, https_ended, metrics_ended)) =
            tokio::join!(session::accept_loop(&endpoint, ctx, signal), watch);

        // `accept_loop` has returned, so no `Endpoint::accept` is pending: closing is safe.
        rooms.clear();
        endpoint.close(VarInt::from_u32(u32::from(ErrorCode::ShuttingDown.as_u16())), b"shutting down");
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, endpoint.wait_idle()).await;
        identity_task.abort();
        purge_task.abort();
        lease_task.abort();
        if let Some(task) = clock_task {
            task.abort();
        }
        // The SEL writer ends once the rooms' last flushes are committed (every handle to it
        // is gone when the room tasks and the HTTP server are).
        drop(rooms);
        if tokio::time::timeout(SHUTDOWN_WAIT, sel_writer).await.is_err() {
            warn!("SEL writes still pending at shutdown; the database did not take them in time");
        }
        let (http_result, https_result, metrics_result) = tokio::join!(
            finish_http(Some(http_task), http_ended, "HTTP"),
            finish_http(https_task, https_ended, "HTTPS"),
            finish_http(metrics_task, metrics_ended, "metrics")
        );
        info!("stopped");
        http_result.and(https_result).and(metrics_result)
    }
}

/// What an HTTP server task returns.
type HttpEnded = Result<(), tokio::task::JoinError>;

/// Waits for `task` to finish; never, if there is none.
async fn until_finished(task: &mut Option<tokio::task::JoinHandle<()>>) -> HttpEnded {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Lets an HTTP(S) server task (if any) finish its requests in flight after shutdown, up to
/// [`SHUTDOWN_WAIT`], and says how it ended. `ended` is its end if it already ended.
async fn finish_http(
    task: Option<tokio::task::JoinHandle<()>>,
    ended: Option<HttpEnded>,
    what: &str,
) -> Result<(), ServerError> {
    let ended = match (ended, task) {
        (Some(ended), _) => Ok(ended),
        (None, None) => return Ok(()),
        (None, Some(mut task)) => {
            let ended = tokio::time::timeout(SHUTDOWN_WAIT, &mut task).await;
            task.abort();
            ended
        }
    };
    match ended {
        Ok(_) => Ok(()),
        Err(_) => {
            warn!("{what} connections still open at shutdown; dropping them");
            Ok(())
        }
    }
}

/// Binds and serves `config` until `shutdown` completes.
/// The host's name, as operators know their machines (Linux).
pub(crate) fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_owned()).filter(|s| !s.is_empty())
}

/// Where this node is reached, for the cluster's directory: the configured public URLs, or
/// the listeners' own addresses.
fn node_entry(config: &Config, http_addr: SocketAddr, wt_port: u16) -> cluster::NodeEntry {
    let host = if http_addr.ip().is_unspecified() {
        host_name().unwrap_or_default()
    } else if http_addr.is_ipv6() {
        format!("[{}]", http_addr.ip())
    } else {
        http_addr.ip().to_string()
    };
    let http_url = config
        .public_http_url
        .clone()
        .unwrap_or_else(|| format!("http://{host}:{}", http_addr.port()))
        .trim_end_matches('/')
        .to_owned();
    let websocket_url = match http_url.strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}/api/ws"),
        None => format!("ws://{}/api/ws", http_url.trim_start_matches("http://")),
    };
    let id = config.node_id.clone().unwrap_or_else(|| {
        let name: String =
            host.to_ascii_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(50).collect();
        format!("{name}-{wt_port}")
    });
    cluster::NodeEntry {
        id,
        http_url,
        webtransport_url: config.public_wt_url.clone().unwrap_or_else(|| format!("https://{host}:{wt_port}/")),
        websocket_url,
        certificate_hashes: Vec::new(),
        lease_until_ms: 0,
        usage: std::collections::BTreeMap::new(),
    }
}

pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    Server::bind(config).await?.run(shutdown).await
}

/// Whether a failed wildcard bind is worth retrying on IPv4 only (a host without IPv6).
fn ipv6_unavailable(e: &std::io::Error) -> bool {
    !matches!(e.kind(), std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied)
}

/// Binds WebTransport on every address, dual-stack, so `https://localhost:PORT` (which
/// Chromium tries on `::1` first) and `https://127.0.0.1:PORT` both work. Falls back to IPv4
/// only on hosts without IPv6.
fn bind_endpoint(
    config: &Config,
    key: &downbeat_certs::CertifiedKey,
    stats: Arc<Stats>,
) -> Result<Endpoint, ServerError> {
    let port = config.wt_port;
    let buffer = usize::try_from(config.udp_buffer_bytes).unwrap_or(usize::MAX);
    let socket = match udp_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), buffer) {
        Ok(socket) => socket,
        Err(e) if ipv6_unavailable(&e) => {
            warn!(error = %e, "dual-stack bind failed; listening for WebTransport on IPv4 only");
            udp_socket(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), buffer)
                .map_err(|source| ServerError::BindWebTransport { port, source })?
        }
        Err(source) => return Err(ServerError::BindWebTransport { port, source }),
    };
    let server = identity::server_config(key, config)?;
    Endpoint::new(quinn::EndpointConfig::default(), server, socket, stats)
        .map_err(|source| ServerError::BindWebTransport { port, source })
}

/// A non-blocking UDP socket bound to `addr` (an IPv6 wildcard takes IPv4 too), with receive
/// and send buffers of `buffer` bytes asked for. The kernel may grant less (Linux caps at
/// `net.core.rmem_max` and `wmem_max`); what it granted is logged, and a capped receive buffer
/// warned about, since datagrams beyond it are dropped under load.
fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // Asking is best effort: a refusal leaves the kernel's default, which the log shows.
    let asked = (socket.set_recv_buffer_size(buffer), socket.set_send_buffer_size(buffer));
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // Linux reports twice what it keeps for the payload (the rest is its bookkeeping).
    let payload = |reported: usize| if cfg!(target_os = "linux") { reported / 2 } else { reported };
    let (receive, send) = (payload(socket.recv_buffer_size()?), payload(socket.send_buffer_size()?));
    if let (Err(e), _) | (_, Err(e)) = &asked {
        warn!(error = %e, "could not ask for larger WebTransport socket buffers");
    }
    if receive < buffer {
        warn!(
            asked = buffer,
            receive,
            send,
            "the WebTransport socket's receive buffer is smaller than asked (--udp-buffer-bytes): under load, \
             datagrams beyond it are dropped; raise net.core.rmem_max and wmem_max, e.g. sysctl -w \
             net.core.rmem_max={buffer} net.core.wmem_max={buffer}"
        );
    } else {
        info!(receive, send, "WebTransport socket buffers");
    }
    Ok(socket.into())
}

/// Binds an HTTP(S) listener; an IPv6 wildcard falls back to IPv4 on hosts without IPv6. The
/// error names the address that failed.
async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, (SocketAddr, std::io::Error)> {
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(e) if addr.ip().is_unspecified() && addr.is_ipv6() && ipv6_unavailable(&e) => {
            warn!(error = %e, %addr, "IPv6 bind failed; listening on IPv4 only");
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            TcpListener::bind(v4).await.map_err(|source| (v4, source))
        }
        Err(source) => Err((addr, source)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_webtransport_socket_gets_the_buffers_asked_for_up_to_the_kernels_cap() {
        let cap = |name: &str| -> usize {
            let path = format!("/proc/sys/net/core/{name}");
            std::fs::read_to_string(&path).unwrap().trim().parse().unwrap()
        };
        for asked in [256 << 10, 64 << 20] {
            let socket = socket2::Socket::from(udp_socket(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), asked).unwrap());
            assert_eq!(socket.recv_buffer_size().unwrap() / 2, asked.min(cap("rmem_max")));
            assert_eq!(socket.send_buffer_size().unwrap() / 2, asked.min(cap("wmem_max")));
        }
    }

    #[test]
    fn the_webtransport_socket_takes_ipv4_on_the_ipv6_wildcard() {
        let socket = udp_socket(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)), 256 << 10).unwrap();
        let port = socket.local_addr().unwrap().port();
        let sender = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        sender.send_to(b"hello", (Ipv4Addr::LOCALHOST, port)).unwrap();
        socket.set_nonblocking(false).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0; 16];
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(from.port(), sender.local_addr().unwrap().port());
    }
}
