//! Server configuration: command line, `DOWNBEAT_*` environment variables and an optional TOML
//! file, merged in that order of precedence over built-in defaults.
//!
//! Every setting is declared once, in the `settings!` table below: its name and type, its
//! default, its help, its environment variable, and its flag or file key where those differ
//! from the name. From that table come [`Args`] (what a user may say: every field optional, so
//! the command line, the environment and the file can be merged field by field), [`Config`]
//! (the resolved result the server runs with), [`Config::default`], the merge in
//! [`parse_and_merge`], `--help`, and [`settings_markdown`] (the README's settings table, which
//! a test keeps equal to it). Validation ([`Config::validate`]) stays hand-written: its
//! messages say what to fix.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use clap::Parser;
use serde::{Deserialize, Serialize};

use downbeat_protocol::{MAX_MEMBERS, TextKind, check_text};

/// Declares the settings. Each entry is the setting's doc comment (its help), then
/// `name: Type = default` (no `= default`: the setting is optional, `Option<Type>` in
/// [`Config`]), then `env "VAR", value "NAME"` (the placeholder in `--help`), then optionally
/// `flag "name"` (the long flag, when not the name in kebab case), `key "name"` (the TOML key,
/// when not the name), `shown "text"` (the default as the docs say it, when not the value
/// itself) and `clap(...)` (further clap arguments).
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $name:ident: $ty:ty $(= $default:expr)?,
        env $env:literal, value $value:literal
        $(, flag $flag:literal)? $(, key $key:literal)? $(, shown $shown:literal)? $(, clap($($clap:tt)*))?;
    )*) => {
        /// What can be said on the command line, in `DOWNBEAT_*` variables, or in the TOML file
        /// given by `--config`. Every field is the [`Config`] field of the same name, optional;
        /// unset fields fall back to the file, then to the defaults.
        #[derive(Clone, Debug, Default, Parser, Deserialize)]
        #[command(name = "downbeat", version, about = "Downbeat timing server for classroom music")]
        #[serde(deny_unknown_fields)]
        pub struct Args {
            /// A TOML file with any of the other settings (the command line and the environment
            /// win over it).
            #[arg(long, env = "DOWNBEAT_CONFIG", value_name = "FILE", help = CONFIG_HELP)]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                #[arg(long $(= $flag)?, env = $env, value_name = $value,
                    help = help_text(&[$($doc),+], settings!(@shown $ty; $($shown)? ; $($default)?))
                    $(, $($clap)*)?)]
                $(#[serde(rename = $key)])?
                pub $name: Option<$ty>,
            )*
            /// The schools (tenants) whose tokens are accepted: file only, as `[[tenants]]`
            /// tables. None: an embedded demo tenant whose secret lives in the data directory.
            #[arg(skip)]
            pub tenants: Option<Vec<TenantConfig>>,
            /// The server's operators (the inspector): file only, as an `[operators]` table.
            #[arg(skip)]
            pub operators: Option<OperatorsConfig>,
        }

        /// The resolved server configuration. Build one with [`parse_and_merge`],
        /// [`Config::load`], or `Config { .., ..Config::default() }` in tests;
        /// [`Config::validate`] checks it. (Deserialized, a missing field takes its default.)
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Config {
            $(
                $(#[doc = $doc])+
                pub $name: settings!(@type $ty $(, $default)?),
            )*
            /// The schools whose tokens are accepted. Empty: the embedded demo tenant (see
            /// [`crate::auth::Tenants::new`]).
            pub tenants: Vec<TenantConfig>,
            /// The keys of the server's operators, who use the inspector (`/inspect`). None:
            /// with the demo tenant, a demo operator key kept in the data directory; with
            /// configured schools, no operators.
            pub operators: Option<OperatorsConfig>,
        }

        impl Default for Config {
            fn default() -> Self {
                Self {
                    $($name: settings!(@default $($default)?),)*
                    tenants: Vec::new(),
                    operators: None,
                }
            }
        }

        /// `args` over `file` over the defaults, setting by setting.
        fn merge(args: Args, file: Args) -> Config {
            Config {
                $($name: settings!(@merge args.$name.or(file.$name) $(, $default)?),)*
                tenants: args.tenants.or(file.tenants).unwrap_or_default(),
                operators: args.operators.or(file.operators),
            }
        }

        /// Every setting as the docs show it, in declaration order.
        pub fn settings() -> Vec<Setting> {
            vec![$(
                Setting {
                    flag: format!("--{}", settings!(@or stringify!($name).replace('_', "-") $(, $flag.to_owned())?)),
                    env: $env,
                    key: settings!(@or stringify!($name) $(, $key)?),
                    value: $value,
                    default: settings!(@shown $ty; $($shown)? ; $($default)?),
                    help: help_text(&[$($doc),+], None),
                },
            )*]
        }
    };
    (@type $ty:ty) => { Option<$ty> };
    (@type $ty:ty, $default:expr) => { $ty };
    (@default) => { None };
    (@default $default:expr) => { $default };
    (@merge $given:expr) => { $given };
    (@merge $given:expr, $default:expr) => { $given.unwrap_or_else(|| $default) };
    (@or $fallback:expr) => { $fallback };
    (@or $fallback:expr, $given:expr) => { $given };
    (@shown $ty:ty; $shown:literal ; $($default:expr)?) => { Some(String::from($shown)) };
    (@shown $ty:ty; ; $default:expr) => {
        Some(<$ty as ShowDefault>::show(&$default)).filter(|s| !s.is_empty()).map(|s| format!("`{s}`"))
    };
    (@shown $ty:ty; ;) => { None };
}

settings! {
    /// HTTP/1.1 listener for the API and the pages. The demo tenant listens on this machine
    /// only unless given an address (see "Reaching the pages from a real classroom").
    http_addr: SocketAddr, env "DOWNBEAT_HTTP_ADDR", value "ADDR",
        shown "`127.0.0.1:4480` for the demo tenant, `[::]:4480` with `[[tenants]]`";
    /// UDP port for WebTransport, bound dual-stack on every address (0: any free port).
    wt_port: u16 = 4433, env "DOWNBEAT_WT_PORT", value "PORT";
    /// Directory for server state (development certificates, the demo tenant's secret, the
    /// default SQLite database).
    data_dir: PathBuf = PathBuf::from("./data"), env "DOWNBEAT_DATA_DIR", value "DIR";
    /// Production certificate chain (PEM). Needs --tls-key. Without both, a development
    /// certificate is generated, rotated, and its hash published for pages to pin.
    tls_cert: PathBuf, env "DOWNBEAT_TLS_CERT", value "FILE";
    /// Production private key (PEM). Needs --tls-cert.
    tls_key: PathBuf, env "DOWNBEAT_TLS_KEY", value "FILE";
    /// How often the production certificate and key files are checked for replacement, in ms.
    /// Ignored for the development certificate.
    tls_reload_check_ms: u64 = 10_000, env "DOWNBEAT_TLS_RELOAD_CHECK_MS", value "MS";
    /// Extra names or addresses for the development certificate (localhost, 127.0.0.1 and ::1
    /// are always included). Repeat or separate with commas.
    hostnames: Vec<String> = Vec::new(), env "DOWNBEAT_HOSTNAMES", value "NAME", flag "hostname",
        clap(value_delimiter = ',');
    /// How far ahead beats are sent and changes announced, in ms.
    lead_ms: u64 = 1500, env "DOWNBEAT_LEAD_MS", value "MS";
    /// Interval between beat datagrams to each member of a room right after a change to its
    /// timeline (start, stop, tempo, meter), for one lead and until the change takes effect,
    /// and while notes are played (for one lead after the last), in ms.
    send_interval_ms: u64 = 100, env "DOWNBEAT_SEND_INTERVAL_MS", value "MS";
    /// Interval between beat datagrams to each member of a room, running or stopped, whose
    /// timeline has not changed and where no note was played for a lead, in ms: clients
    /// compute every beat from the timeline they hold, and a member whose sync request names
    /// an older timeline gets the current one at once, so these only show the room is alive.
    steady_send_interval_ms: u64 = 10000, env "DOWNBEAT_STEADY_SEND_INTERVAL_MS", value "MS";
    /// Most rooms at once.
    max_rooms: usize = 1000, env "DOWNBEAT_MAX_ROOMS", value "N";
    /// Most members in one room, for every tenant (a tenant's own limit applies within it).
    max_members_per_room: usize = 64, env "DOWNBEAT_MAX_MEMBERS_PER_ROOM", value "N";
    /// Most sessions at once (WebTransport and WebSocket together).
    max_sessions: usize = 10_000, env "DOWNBEAT_MAX_SESSIONS", value "N";
    /// Most QUIC/WebTransport handshakes in progress at once.
    max_concurrent_handshakes: usize = 256, env "DOWNBEAT_MAX_CONCURRENT_HANDSHAKES", value "N";
    /// Most QUIC/WebTransport handshakes in progress at once from one client network (an IPv4
    /// address or an IPv6 /64); more are refused at the QUIC level, as past
    /// `max_concurrent_handshakes`. A whole school behind one address joining at once stays
    /// far below it, since each handshake takes milliseconds.
    max_handshakes_per_address: usize = 32, env "DOWNBEAT_MAX_HANDSHAKES_PER_ADDRESS", value "N";
    /// Handshakes in progress past which a new QUIC connection must first prove its address
    /// (a stateless Retry: one round trip more, no state kept), so a flood from forged
    /// addresses costs one packet each. 0: always.
    retry_above_handshakes: usize = 64, env "DOWNBEAT_RETRY_ABOVE_HANDSHAKES", value "N";
    /// Most sessions at once from one client network (WebTransport and WebSocket together);
    /// more are refused with `server_busy`. A school behind one NAT address must fit.
    max_sessions_per_address: usize = 2_000, env "DOWNBEAT_MAX_SESSIONS_PER_ADDRESS", value "N";
    /// Reflections one student may write to one prompt of a room (each is stored; a retry of
    /// one is no new one); more are refused with `too_many_reflections`.
    max_reflections_per_prompt: usize = 5, env "DOWNBEAT_MAX_REFLECTIONS_PER_PROMPT", value "N";
    /// Time a new session has to open its control stream and say hello, in ms.
    hello_timeout_ms: u64 = 5000, env "DOWNBEAT_HELLO_TIMEOUT_MS", value "MS";
    /// A session that receives nothing for this long is lost (QUIC's idle timeout; WebSocket
    /// sessions time their reads), in ms. It is also how long a client takes to notice that
    /// its server's host is gone, so it stays below `seat_grace_ms`: a member whose node died
    /// is back in their seat on another node.
    idle_timeout_ms: u64 = 10_000, env "DOWNBEAT_IDLE_TIMEOUT_MS", value "MS";
    /// Receive and send buffer asked for the WebTransport UDP socket, in bytes. Thousands of
    /// sessions deliver bursts of datagrams faster than one wake-up drains them, and the
    /// kernel's default (208 KiB on Linux) then drops them. Linux caps what it grants at
    /// `net.core.rmem_max` and `net.core.wmem_max`; the server logs what it got and warns
    /// when capped.
    udp_buffer_bytes: u64 = 4 << 20, env "DOWNBEAT_UDP_BUFFER_BYTES", value "BYTES";
    /// Threads that run sessions, rooms and the HTTP API; 0: one per core. One thread spends
    /// about a fifth less CPU on a settled class (no wake-ups passed between threads) but does
    /// a room's fan-out one member after another, so note delivery's tail grows (BENCHMARKS.md,
    /// "fifth round"): for nodes of a cluster run one per core, not for a server alone.
    worker_threads: u64 = 0, env "DOWNBEAT_WORKER_THREADS", value "N";
    /// How often an idle session is kept alive (QUIC keep-alive; a WebSocket ping), in ms.
    keep_alive_ms: u64 = 3000, env "DOWNBEAT_KEEP_ALIVE_MS", value "MS";
    /// How long a network check (a probe session, the `/check` page's) may sync its clock
    /// before the server ends it with `probe_over`, in ms.
    probe_duration_ms: u64 = 10_000, env "DOWNBEAT_PROBE_DURATION_MS", value "MS";
    /// Most network checks running at once from one client network (an IPv4 address or an
    /// IPv6 /64); more are refused with `too_many_probes`.
    max_probes_per_address: usize = 4, env "DOWNBEAT_MAX_PROBES_PER_ADDRESS", value "N";
    /// Most network checks running at once on the server.
    max_probes: usize = 64, env "DOWNBEAT_MAX_PROBES", value "N";
    /// The `aud` claim every token must carry.
    audience: String = DEFAULT_AUDIENCE.to_owned(), env "DOWNBEAT_TOKEN_AUDIENCE", value "AUD",
        flag "token-audience", key "token_audience";
    /// Longest lifetime a token may have, in seconds: a token whose `exp` is further than this
    /// from its `iat` or from now is refused.
    max_token_lifetime_secs: u64 = 86_400, env "DOWNBEAT_MAX_TOKEN_LIFETIME_SECS", value "SECS";
    /// How long a room with nobody in it is kept before it expires, in seconds.
    room_idle_expiry_secs: u64 = 1800, env "DOWNBEAT_ROOM_IDLE_EXPIRY_SECS", value "SECS";
    /// How long a disconnected member's seat is held for them to reconnect, in ms.
    seat_grace_ms: u64 = 15_000, env "DOWNBEAT_SEAT_GRACE_MS", value "MS";
    /// How far behind the beat clock students' notes are played out, in ms.
    playout_delay_ms: u64 = 80, env "DOWNBEAT_PLAYOUT_DELAY_MS", value "MS";
    /// Where SEL data (reflections, participation) is stored: `postgres://user:pass@host/db`,
    /// or a SQLite file (`sqlite://path` or a path).
    database_url: String, env "DOWNBEAT_DATABASE_URL", value "URL",
        shown "`downbeat.sqlite3` in the data directory";
    /// SEL writes queued while the database is slow or down before reflections are refused
    /// with `store_unavailable`.
    sel_queue: usize = 1024, env "DOWNBEAT_SEL_QUEUE", value "N";
    /// How often records past a tenant's retention period are purged, in seconds.
    sel_purge_interval_secs: u64 = 3600, env "DOWNBEAT_SEL_PURGE_INTERVAL_SECS", value "SECS";
    /// Directory of the browser classroom pages served at `/`, `/teacher` and `/student`, and
    /// of the network check at `/check`.
    /// Missing: the server still starts; the pages answer 404.
    web_dir: PathBuf = PathBuf::from(DEFAULT_WEB_DIR), env "DOWNBEAT_WEB_DIR", value "DIR",
        shown "`web/` of the source checkout";
    /// Directory of the built browser package served at `/pkg/` (`scripts/build-wasm` builds
    /// it). Missing: the server still starts; `/pkg/` answers 404 saying how to build it.
    pkg_dir: PathBuf = PathBuf::from(DEFAULT_PKG_DIR), env "DOWNBEAT_PKG_DIR", value "DIR",
        shown "`client-wasm/pkg` of the source checkout";
    /// The WebTransport URL pages are told to connect to (`/api/client-config`), for a server
    /// reached under another name or port.
    public_wt_url: String, env "DOWNBEAT_PUBLIC_WT_URL", value "URL",
        shown "`https://<the page's host>:<wt port>/`";
    /// Also serve the pages and the API over HTTPS on this address, with the certificate
    /// WebTransport uses (rotations, reloads and ACME renewals reach both at once).
    https_addr: SocketAddr, env "DOWNBEAT_HTTPS_ADDR", value "ADDR", shown "no HTTPS listener";
    /// Serve `/metrics` on this address only (plain HTTP, e.g. on an operator network), not on
    /// the HTTP and HTTPS listeners, which then answer it 404.
    metrics_addr: SocketAddr, env "DOWNBEAT_METRICS_ADDR", value "ADDR",
        shown "`/metrics` on the HTTP and HTTPS listeners";
    /// Obtain and renew the certificate for this DNS name with ACME (TLS-ALPN-01 on the HTTPS
    /// listener, which must be reachable on port 443 under this name). Needs --https-addr;
    /// excludes --tls-cert/--tls-key.
    acme_domain: String, env "DOWNBEAT_ACME_DOMAIN", value "NAME", shown "no ACME";
    /// Contact e-mail given to the ACME CA (expiry and policy notices).
    acme_email: String, env "DOWNBEAT_ACME_EMAIL", value "EMAIL", shown "no contact";
    /// The ACME directory URL.
    acme_directory: String = DEFAULT_ACME_DIRECTORY.to_owned(), env "DOWNBEAT_ACME_DIRECTORY", value "URL",
        shown "Let's Encrypt (`https://acme-v02.api.letsencrypt.org/directory`)";
    /// A PEM file of extra roots trusted for the ACME directory's own HTTPS (a private or test
    /// CA such as pebble), besides the built-in Mozilla roots.
    acme_directory_ca: PathBuf, env "DOWNBEAT_ACME_DIRECTORY_CA", value "FILE", shown "the Mozilla roots only";
    /// Renew the ACME certificate when this much of its validity is left, in seconds (never in
    /// the first half of its lifetime).
    acme_renew_before_secs: u64 = 30 * 24 * 3600, env "DOWNBEAT_ACME_RENEW_BEFORE_SECS", value "SECS",
        shown "`2592000` (30 days)";
    /// Wait before retrying a failed ACME order, in seconds; doubles with each failure in a
    /// row, up to six hours. The current certificate is served meanwhile.
    acme_retry_secs: u64 = 600, env "DOWNBEAT_ACME_RETRY_SECS", value "SECS";
    /// Most HTTP(S) connections open at once; more are closed as they arrive.
    http_max_connections: usize = 4096, env "DOWNBEAT_HTTP_MAX_CONNECTIONS", value "N";
    /// Most HTTP(S) connections open at once from one client address (a school behind one
    /// NAT shares one).
    http_max_connections_per_address: usize = 256, env "DOWNBEAT_HTTP_MAX_CONNECTIONS_PER_ADDRESS", value "N";
    /// Time an HTTP client has to send a request's header (and a TLS client its handshake);
    /// also how long a kept-alive connection may sit idle, in ms.
    http_header_timeout_ms: u64 = 10_000, env "DOWNBEAT_HTTP_HEADER_TIMEOUT_MS", value "MS";
    /// Time an HTTP request has to send its body and be answered, in ms.
    http_request_timeout_ms: u64 = 30_000, env "DOWNBEAT_HTTP_REQUEST_TIMEOUT_MS", value "MS";
    /// The demo tenant's teacher secret: signing in as a teacher through `/api/demo/tokens`
    /// needs it (students sign in by name alone). The banner prints the teacher page's URL with
    /// it. 16 to 256 characters from `A-Z a-z 0-9 - . _ ~`. Only for the demo tenant.
    demo_teacher_secret: DemoSecret, env "DOWNBEAT_DEMO_TEACHER_SECRET", value "SECRET",
        shown "random, new at every start";
    /// Join a cluster of servers whose room directory is this NATS server's JetStream
    /// key-value store (`nats://host:4222`). Needs a shared PostgreSQL (`--database-url`) and
    /// configured `[[tenants]]`.
    cluster: String, env "DOWNBEAT_CLUSTER", value "URL", shown "none: this server alone";
    /// This server's name in the cluster: 1 to 64 characters from `a-z`, `0-9` and `-`.
    node_id: String, env "DOWNBEAT_NODE_ID", value "ID",
        shown "the host's name and the WebTransport port";
    /// The HTTP(S) URL clients and other nodes reach this server's API at (the cluster tells
    /// them where a room lives; its WebSocket URL is this with `/api/ws`).
    public_http_url: String, env "DOWNBEAT_PUBLIC_HTTP_URL", value "URL",
        shown "`http://` and the HTTP listener's address";
    /// How long a node's claim on its rooms lasts without a heartbeat (heartbeats come three
    /// times as often), in ms.
    cluster_lease_ms: u64 = 5_000, env "DOWNBEAT_CLUSTER_LEASE_MS", value "MS";
    /// The most this node's wall clock may be off the other nodes' (as measured over NATS)
    /// for it to take rooms over, in µs: a room's timeline moves between nodes unchanged, so
    /// the difference would move every beat by as much.
    cluster_clock_bound_us: u64 = 1_000, env "DOWNBEAT_CLUSTER_CLOCK_BOUND_US", value "US";
    /// How long SIGTERM waits for this node's rooms to be handed to other nodes before it
    /// closes those left, in ms.
    cluster_drain_ms: u64 = 10_000, env "DOWNBEAT_CLUSTER_DRAIN_MS", value "MS";
}

/// The HTTP port when `http_addr` is not given.
pub const DEFAULT_HTTP_PORT: u16 = 4480;

/// Shortest and longest demo teacher secret, in characters.
const DEMO_SECRET_LEN: RangeInclusive<usize> = 16..=256;

/// The demo tenant's teacher secret ([`Config::demo_teacher_secret`]). `Debug` shows
/// `<redacted>`, so a logged configuration never holds it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DemoSecret(String);

impl DemoSecret {
    /// A new random secret: 32 random bytes, base64url (43 characters).
    pub fn random() -> Self {
        Self(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()))
    }

    /// The secret, as it goes into the teacher page's URL and the sign-in request.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is long enough and only of characters a URL fragment carries unchanged.
    fn is_valid(&self) -> bool {
        DEMO_SECRET_LEN.contains(&self.0.len())
            && self.0.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    }
}

impl fmt::Debug for DemoSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for DemoSecret {
    type Err = std::convert::Infallible;

    /// Takes any text; [`Config::validate`] says what is wrong with it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// What `--config` is for.
const CONFIG_HELP: &str = "TOML file with any of the settings below (command line and environment win over it).";

/// One setting as the docs show it (see [`settings`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// The long flag, `--lead-ms`.
    pub flag: String,
    /// The environment variable.
    pub env: &'static str,
    /// The key in the TOML file.
    pub key: &'static str,
    /// The value's placeholder, `MS`.
    pub value: &'static str,
    /// The default as the docs say it (markdown); `None`: unset unless given.
    pub default: Option<String>,
    /// What it does.
    pub help: String,
}

/// The settings as a markdown table, the README's settings section (`downbeat settings-doc`
/// prints it).
pub fn settings_markdown() -> String {
    let mut out = String::from("| flag | environment | file key | default | what |\n|---|---|---|---|---|\n");
    let row = |out: &mut String, cells: [&str; 5]| {
        out.push('|');
        for cell in cells {
            out.push(' ');
            out.push_str(&cell.replace('|', "\\|"));
            out.push_str(" |");
        }
        out.push('\n');
    };
    row(&mut out, ["`--config FILE`", "`DOWNBEAT_CONFIG`", "", "", CONFIG_HELP]);
    for s in settings() {
        let default = s.default.unwrap_or_default();
        let flag = format!("`{} {}`", s.flag, s.value);
        let env = format!("`{}`", s.env);
        let key = format!("`{}`", s.key);
        row(&mut out, [&flag, &env, &key, &default, &s.help]);
    }
    row(
        &mut out,
        [
            "",
            "",
            "`[[tenants]]`",
            "the demo tenant",
            "The schools whose tokens are accepted (file only; see \"Schools, tokens and roles\").",
        ],
    );
    out
}

/// The README's section between `<!-- {name}: generated by `downbeat {name}-doc` -->` and
/// `<!-- end of {name} -->`, for the tests that keep it equal to what the code generates.
#[cfg(test)]
pub(crate) fn readme_section(name: &str) -> &'static str {
    let readme = include_str!("../../README.md");
    let begin = format!("<!-- {name}: generated by `downbeat {name}-doc` -->\n");
    let start = readme.find(&begin).expect("README has the section's markers") + begin.len();
    let len = readme[start..].find(&format!("<!-- end of {name} -->")).expect("README closes the section");
    &readme[start..start + len]
}

/// A setting's help: its doc comment's lines joined, then the default if any.
fn help_text(doc: &[&str], default: Option<String>) -> String {
    let mut text = doc.iter().map(|line| line.trim()).collect::<Vec<_>>().join(" ");
    if let Some(default) = default {
        text.push_str(&format!(" [default: {}]", default.replace('`', "")));
    }
    text
}

/// How a default value reads in `--help` and the docs.
trait ShowDefault {
    fn show(&self) -> String;
}

macro_rules! show_by_display {
    ($($ty:ty),*) => {$(
        impl ShowDefault for $ty {
            fn show(&self) -> String {
                self.to_string()
            }
        }
    )*};
}

show_by_display!(u16, u64, usize, String, SocketAddr);

impl ShowDefault for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl ShowDefault for Vec<String> {
    fn show(&self) -> String {
        self.join(",")
    }
}

/// The default pages directory: `web/` of the source checkout this server was built from.
pub const DEFAULT_WEB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../web");

/// The default browser package directory: `client-wasm/pkg` of the source checkout.
pub const DEFAULT_PKG_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../client-wasm/pkg");

/// Let's Encrypt's production ACME directory, the default of `acme_directory`.
pub const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// The default `aud` claim tokens must carry.
pub const DEFAULT_AUDIENCE: &str = "downbeat";

/// Fewest bytes an HS* secret may have (the HS256 output size; RFC 7518 section 3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// The `tenant` claim of operators' tokens: the realm of the server's operators, which no
/// school may take as its id.
pub const OPERATOR_REALM: &str = "operators";

/// Who operates the server (the inspector, `/inspect`): an `[operators]` table. Their tokens
/// carry `tenant = "operators"`, `role = "operator"`, this `iss` and the server's `aud`, and are
/// signed with one of these keys (a `[[operators.keys]]` table each, like a school's).
///
/// ```toml
/// [operators]
/// issuer = "https://sso.district.example/operators"
/// [[operators.keys]]
/// algorithm = "ES256"
/// public_key_file = "operators.pem"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorsConfig {
    /// The `iss` claim operators' tokens carry, exactly.
    pub issuer: String,
    /// The keys their tokens may be signed with (at least one).
    #[serde(default)]
    pub keys: Vec<TenantKeyConfig>,
}

impl OperatorsConfig {
    /// The operators as a realm shaped like a school, so their keys are checked and built by
    /// the same code.
    pub fn as_tenant(&self) -> TenantConfig {
        TenantConfig {
            id: OPERATOR_REALM.to_owned(),
            name: "Operators".to_owned(),
            issuer: self.issuer.clone(),
            keys: self.keys.clone(),
            limits: TenantLimits::default(),
            retention: TenantRetention::default(),
        }
    }
}

/// One school whose identity provider issues tokens for this server: a `[[tenants]]` table.
///
/// ```toml
/// [[tenants]]
/// id = "lincoln-elementary"
/// name = "Lincoln Elementary"
/// issuer = "https://sso.lincoln.example"
/// [[tenants.keys]]
/// kid = "2026-a"
/// algorithm = "HS256"
/// secret = "base64 of at least 32 random bytes"
/// [tenants.limits]
/// max_rooms = 20
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Stable id: 1 to 64 characters from `a-z`, `0-9` and `-`. Tokens name it in their
    /// `tenant` claim.
    pub id: String,
    /// Display name.
    pub name: String,
    /// The `iss` claim this tenant's tokens carry, exactly.
    pub issuer: String,
    /// The keys tokens may be signed with (at least one).
    #[serde(default)]
    pub keys: Vec<TenantKeyConfig>,
    /// Per-tenant limits; every field defaults.
    #[serde(default)]
    pub limits: TenantLimits,
    /// How long records are kept; every field defaults.
    #[serde(default)]
    pub retention: TenantRetention,
}

/// A key that verifies a tenant's tokens: a `[[tenants.keys]]` table. HS* keys have a
/// `secret`; the others have exactly one of `public_key_pem` and `public_key_file`.
///
/// `Debug` shows the secret as `<redacted>`. (`Serialize` does not redact: never send a
/// serialized config to a client.)
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantKeyConfig {
    /// Key id. When a token's header names a `kid`, only keys with that kid are tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The one algorithm this key is used with.
    pub algorithm: KeyAlgorithm,
    /// HS* only: base64url or standard base64 (padding optional) of at least
    /// [`MIN_SECRET_BYTES`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Public key as PEM (`-----BEGIN PUBLIC KEY-----`), for every algorithm but HS*.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// File holding the public key PEM (relative to the working directory), instead of
    /// `public_key_pem`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
}

impl fmt::Debug for TenantKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantKeyConfig")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_key_pem", &self.public_key_pem)
            .field("public_key_file", &self.public_key_file)
            .finish()
    }
}

impl TenantKeyConfig {
    /// The decoded HS* secret: `None` without a `secret`, an error if it is not base64.
    pub fn secret_bytes(&self) -> Option<Result<Vec<u8>, base64::DecodeError>> {
        self.secret.as_deref().map(decode_secret)
    }
}

/// Decodes base64url or standard base64, padded or not, ignoring surrounding whitespace.
pub(crate) fn decode_secret(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let text = text.trim().trim_end_matches('=');
    let standard: String = text
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            other => other,
        })
        .collect();
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(standard)
}

/// The signature algorithms a tenant key may use (an allow-list: `none` and the rest are
/// refused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// HMAC with SHA-256 (shared secret).
    #[serde(rename = "HS256")]
    Hs256,
    /// HMAC with SHA-384 (shared secret).
    #[serde(rename = "HS384")]
    Hs384,
    /// HMAC with SHA-512 (shared secret).
    #[serde(rename = "HS512")]
    Hs512,
    /// ECDSA on P-256 with SHA-256.
    #[serde(rename = "ES256")]
    Es256,
    /// ECDSA on P-384 with SHA-384.
    #[serde(rename = "ES384")]
    Es384,
    /// Ed25519.
    #[serde(rename = "EdDSA")]
    EdDsa,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[serde(rename = "RS256")]
    Rs256,
    /// RSASSA-PSS with SHA-256.
    #[serde(rename = "PS256")]
    Ps256,
}

impl KeyAlgorithm {
    /// The JOSE name (`HS256`, `EdDSA`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Hs384 => "HS384",
            Self::Hs512 => "HS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::EdDsa => "EdDSA",
            Self::Rs256 => "RS256",
            Self::Ps256 => "PS256",
        }
    }

    /// Whether this is an HMAC (shared secret) algorithm.
    pub const fn is_hmac(self) -> bool {
        matches!(self, Self::Hs256 | Self::Hs384 | Self::Hs512)
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-tenant limits: a `[tenants.limits]` table. Every field is optional; all must be at
/// least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    /// Most sessions at once (WebTransport and WebSocket together).
    pub max_sessions: u32,
    /// Most rooms at once.
    pub max_rooms: u32,
    /// Most members in one room (at most [`MAX_MEMBERS`], 100).
    pub max_members_per_room: u32,
    /// Failed join attempts per second, sustained, for the whole tenant: hellos and code
    /// lookups naming no live room of the tenant (a wrong, closed or another school's code).
    /// This bounds guessing join codes school-wide; while it is exhausted students' join
    /// attempts are refused with `rate_limited` (each person and each network address also
    /// has a smaller bucket of its own, so one guesser alone never exhausts this one).
    /// Successful joins are bounded by `max_sessions` and room capacity instead.
    pub joins_per_second: u32,
    /// Failed join attempts allowed in a burst.
    pub join_burst: u32,
    /// Notes per second, sustained, per student session.
    pub notes_per_second: u32,
    /// Notes allowed in a burst.
    pub note_burst: u32,
    /// Control messages per second, sustained, per session.
    pub controls_per_second: u32,
    /// Control messages allowed in a burst.
    pub control_burst: u32,
}

impl Default for TenantLimits {
    fn default() -> Self {
        Self {
            max_sessions: 500,
            max_rooms: 50,
            max_members_per_room: 40,
            joins_per_second: 2,
            join_burst: 20,
            notes_per_second: 20,
            note_burst: 40,
            controls_per_second: 10,
            control_burst: 20,
        }
    }
}

/// How long a tenant's records are kept: a `[tenants.retention]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantRetention {
    /// Days social-emotional-learning (SEL) records are kept (at least 1).
    pub sel_days: u32,
}

impl Default for TenantRetention {
    fn default() -> Self {
        Self { sel_days: 365 }
    }
}

impl TenantConfig {
    /// Checks this tenant (the `index`th in the file); the error text says what to fix.
    /// Public keys are only checked to be present here; [`crate::auth::Tenants::new`] parses them.
    fn validate(&self, index: usize) -> Result<(), String> {
        let id = &self.id;
        let id_ok = (1..=64).contains(&id.len())
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(format!("tenants[{index}].id {id:?} is not valid: use 1 to 64 characters from a-z, 0-9 and -"));
        }
        if self.name.trim().is_empty() {
            return Err(format!("tenant {id:?}: name is empty: give the school's display name"));
        }
        if let Err(bad) = check_text(&self.name, TextKind::Line) {
            return Err(format!("tenant {id:?}: name: {bad}"));
        }
        if self.issuer.is_empty() {
            return Err(format!(
                "tenant {id:?}: issuer is empty: set it to the `iss` claim the school's identity provider puts in tokens"
            ));
        }
        if self.keys.is_empty() {
            return Err(format!(
                "tenant {id:?} has no keys: add a [[tenants.keys]] table with an algorithm and a secret (HS*) or public key"
            ));
        }
        for (k, key) in self.keys.iter().enumerate() {
            let alg = key.algorithm;
            let at = format!("tenant {id:?} key {k} ({alg})");
            if key.kid.as_deref() == Some("") {
                return Err(format!("{at}: kid is empty: remove it or give the key's id"));
            }
            let has_public = key.public_key_pem.is_some() || key.public_key_file.is_some();
            if alg.is_hmac() {
                if has_public {
                    return Err(format!(
                        "{at}: HS* keys use only a secret: remove public_key_pem/public_key_file, or use the public key's algorithm"
                    ));
                }
                match key.secret_bytes() {
                    None => {
                        return Err(format!(
                            "{at}: secret is missing: give a base64 secret of at least {MIN_SECRET_BYTES} random bytes"
                        ));
                    }
                    Some(Err(_)) => {
                        return Err(format!("{at}: secret is not valid base64: give base64url or standard base64"));
                    }
                    Some(Ok(bytes)) if bytes.len() < MIN_SECRET_BYTES => {
                        return Err(format!(
                            "{at}: secret is {} bytes: use at least {MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 32`)",
                            bytes.len()
                        ));
                    }
                    Some(Ok(_)) => {}
                }
            } else {
                if key.secret.is_some() {
                    return Err(format!(
                        "{at}: a secret is only for HS* keys: remove it and give the public key, or use HS256"
                    ));
                }
                if key.public_key_pem.is_some() == key.public_key_file.is_some() {
                    return Err(format!("{at}: give exactly one of public_key_pem and public_key_file"));
                }
            }
        }
        let l = &self.limits;
        let zero = [
            ("max_sessions", l.max_sessions == 0),
            ("max_rooms", l.max_rooms == 0),
            ("max_members_per_room", l.max_members_per_room == 0),
            ("joins_per_second", l.joins_per_second == 0),
            ("join_burst", l.join_burst == 0),
            ("notes_per_second", l.notes_per_second == 0),
            ("note_burst", l.note_burst == 0),
            ("controls_per_second", l.controls_per_second == 0),
            ("control_burst", l.control_burst == 0),
        ];
        if let Some((name, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
            return Err(format!("tenant {id:?}: limits.{name} is 0: use at least 1 (or leave it out for the default)"));
        }
        if usize::try_from(l.max_members_per_room).map_or(true, |n| n > MAX_MEMBERS) {
            return Err(format!(
                "tenant {id:?}: limits.max_members_per_room is {}: use 1 to {MAX_MEMBERS} (the welcome to a full room lists every member in one frame)",
                l.max_members_per_room
            ));
        }
        if self.retention.sel_days == 0 {
            return Err(format!("tenant {id:?}: retention.sel_days is 0: use at least 1 (default 365)"));
        }
        Ok(())
    }
}

/// Why the configuration could not be used. Messages say what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML file did not parse or named an unknown setting.
    #[error("config file is not valid: {0}")]
    Toml(#[from] toml::de::Error),
    /// A value is out of range or settings contradict each other.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The embedded demo tenant's secret could not be read or created.
    #[error(
        "cannot read or create the demo tenant secret {path}: {source} (make the data directory writable, or configure [[tenants]])"
    )]
    DemoSecret {
        /// The secret file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Config {
    /// Parses the process's command line and environment, reads the `--config` file if any,
    /// merges and validates. Exits the process on `--help`/`--version` or a command-line error
    /// (as clap does).
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_args(Args::parse())
    }

    /// Reads the `--config` file named in `args` (if any), merges and validates.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file_text = match &args.config {
            Some(path) => Some(
                std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile { path: path.clone(), source })?,
            ),
            None => None,
        };
        parse_and_merge(args, file_text.as_deref())
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(msg: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid(msg.into()))
        }
        fn in_range(name: &str, value: u64, range: RangeInclusive<u64>, default: u64) -> Result<(), ConfigError> {
            if range.contains(&value) {
                return Ok(());
            }
            invalid(format!("{name} is {value}: use {} to {} (default {default})", range.start(), range.end()))
        }
        let d = Self::default();
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return invalid(
                    "tls_cert is set but tls_key is not: give both (production) or neither (development certificate)",
                );
            }
            (None, Some(_)) => {
                return invalid(
                    "tls_key is set but tls_cert is not: give both (production) or neither (development certificate)",
                );
            }
            _ => {}
        }
        in_range("tls_reload_check_ms", self.tls_reload_check_ms, 1..=3_600_000, d.tls_reload_check_ms)?;
        if let Some(domain) = &self.acme_domain {
            if self.tls_cert.is_some() {
                return invalid(
                    "acme_domain and tls_cert are both set: give either a domain (ACME obtains the certificate) or the certificate files",
                );
            }
            if self.https_addr.is_none() {
                return invalid(format!(
                    "acme_domain is set but https_addr is not: ACME validates {domain} over TLS on the HTTPS listener; set --https-addr [::]:443"
                ));
            }
            if let Err(e) = downbeat_certs::acme::key_and_csr(domain) {
                return invalid(format!("acme_domain: {e}"));
            }
            if !self.acme_directory.starts_with("https://") {
                return invalid(format!("acme_directory {:?} is not an https:// URL", self.acme_directory));
            }
            if self
                .acme_email
                .as_deref()
                .is_some_and(|email| !email.contains('@') || email.contains(char::is_whitespace))
            {
                return invalid("acme_email is not an e-mail address");
            }
        }
        in_range("acme_retry_secs", self.acme_retry_secs, 1..=86_400, d.acme_retry_secs)?;
        in_range("lead_ms", self.lead_ms, 100..=60_000, d.lead_ms)?;
        if self.send_interval_ms < 10 || self.send_interval_ms * 2 > self.lead_ms {
            return invalid(format!(
                "send_interval_ms is {}: use at least 10 and at most half of lead_ms ({}), so every beat is sent more than once before it sounds",
                self.send_interval_ms, self.lead_ms
            ));
        }
        if self.steady_send_interval_ms < self.send_interval_ms || self.steady_send_interval_ms > 10_000 {
            return invalid(format!(
                "steady_send_interval_ms is {}: use at least send_interval_ms ({}) and at most 10000, so the room shows it is alive",
                self.steady_send_interval_ms, self.send_interval_ms
            ));
        }
        if self.max_rooms == 0 {
            return invalid("max_rooms is 0: use at least 1");
        }
        if !(1..=MAX_MEMBERS).contains(&self.max_members_per_room) {
            return invalid(format!(
                "max_members_per_room is {}: use 1 to {MAX_MEMBERS} (the welcome to a full room lists every member in one frame)",
                self.max_members_per_room
            ));
        }
        if self.max_sessions == 0 {
            return invalid("max_sessions is 0: use at least 1");
        }
        // Up to an hour (the wire carries it as u32 milliseconds).
        in_range("probe_duration_ms", self.probe_duration_ms, 1..=3_600_000, d.probe_duration_ms)?;
        if self.max_probes_per_address == 0 || self.max_probes == 0 {
            return invalid("max_probes_per_address and max_probes must be at least 1, or the /check page cannot work");
        }
        if self.max_reflections_per_prompt == 0 {
            return invalid("max_reflections_per_prompt is 0: use at least 1, or students cannot answer prompts");
        }
        if self.max_handshakes_per_address == 0 || self.max_sessions_per_address == 0 {
            return invalid("max_handshakes_per_address and max_sessions_per_address must be at least 1");
        }
        if self.max_concurrent_handshakes == 0 {
            return invalid("max_concurrent_handshakes is 0: use at least 1");
        }
        in_range("hello_timeout_ms", self.hello_timeout_ms, 100..=600_000, d.hello_timeout_ms)?;
        in_range("idle_timeout_ms", self.idle_timeout_ms, 1000..=600_000, d.idle_timeout_ms)?;
        in_range("udp_buffer_bytes", self.udp_buffer_bytes, 64 << 10..=256 << 20, d.udp_buffer_bytes)?;
        in_range("worker_threads", self.worker_threads, 0..=1024, d.worker_threads)?;
        if self.keep_alive_ms == 0 || self.keep_alive_ms >= self.idle_timeout_ms {
            return invalid(format!(
                "keep_alive_ms is {}: use at least 1 and less than idle_timeout_ms ({}), or idle sessions are dropped",
                self.keep_alive_ms, self.idle_timeout_ms
            ));
        }
        for name in &self.hostnames {
            if name.is_empty() || name.len() > 253 || name.chars().any(char::is_whitespace) {
                return invalid(format!("hostname {name:?} is not a valid DNS name or IP address"));
            }
        }
        if self.audience.is_empty() {
            return invalid(format!(
                "token_audience is empty: set the `aud` claim your tokens carry (default {DEFAULT_AUDIENCE})"
            ));
        }
        if !(60..=2_592_000).contains(&self.max_token_lifetime_secs) {
            return invalid(format!(
                "max_token_lifetime_secs is {}: use 60 to 2592000 (30 days; default 86400)",
                self.max_token_lifetime_secs
            ));
        }
        if !(1..=604_800).contains(&self.room_idle_expiry_secs) {
            return invalid(format!(
                "room_idle_expiry_secs is {}: use 1 to 604800 (a week; default {})",
                self.room_idle_expiry_secs, d.room_idle_expiry_secs
            ));
        }
        in_range("seat_grace_ms", self.seat_grace_ms, 0..=600_000, d.seat_grace_ms)?;
        in_range("playout_delay_ms", self.playout_delay_ms, 10..=2000, d.playout_delay_ms)?;
        in_range("sel_queue", self.sel_queue as u64, 1..=1_000_000, d.sel_queue as u64)?;
        in_range("sel_purge_interval_secs", self.sel_purge_interval_secs, 1..=86_400, d.sel_purge_interval_secs)?;
        if self.database_url.as_deref().is_some_and(|url| url.trim().is_empty()) {
            return invalid("database_url is empty: give a postgres:// URL or a SQLite file, or leave it out");
        }
        if let Some(url) = &self.public_wt_url {
            let host = url.strip_prefix("https://").unwrap_or_default();
            if host.is_empty()
                || host.starts_with('/')
                || url.len() > 2048
                || url.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return invalid(format!(
                    "public_wt_url {url:?} is not valid: give the https:// URL pages connect to, e.g. https://music.example.org:4433/"
                ));
            }
        }
        if self.https_addr.is_some_and(|https| https == self.http_listen_addr() && https.port() != 0) {
            return invalid("https_addr is the same as http_addr: give the HTTPS listener its own port");
        }
        if let Some(metrics) = self.metrics_addr
            && metrics.port() != 0
            && (metrics == self.http_listen_addr() || Some(metrics) == self.https_addr)
        {
            return invalid("metrics_addr is the same as http_addr or https_addr: give /metrics its own port");
        }
        if self.http_max_connections == 0 {
            return invalid("http_max_connections is 0: use at least 1 (default 4096)");
        }
        if !(1..=self.http_max_connections).contains(&self.http_max_connections_per_address) {
            return invalid(format!(
                "http_max_connections_per_address is {}: use 1 to http_max_connections ({}; default 256)",
                self.http_max_connections_per_address, self.http_max_connections
            ));
        }
        if !(100..=600_000).contains(&self.http_header_timeout_ms) {
            return invalid(format!(
                "http_header_timeout_ms is {}: use 100 to 600000 (default 10000)",
                self.http_header_timeout_ms
            ));
        }
        if !(100..=3_600_000).contains(&self.http_request_timeout_ms) {
            return invalid(format!(
                "http_request_timeout_ms is {}: use 100 to 3600000 (default 30000)",
                self.http_request_timeout_ms
            ));
        }
        if let Some(secret) = &self.demo_teacher_secret {
            if !self.tenants.is_empty() {
                return invalid(
                    "demo_teacher_secret is set but [[tenants]] are configured: it is only for the embedded demo tenant; remove it",
                );
            }
            if !secret.is_valid() {
                return invalid(format!(
                    "demo_teacher_secret is not valid: use {} to {} characters from A-Z a-z 0-9 - . _ ~ (or leave it out for a random one)",
                    DEMO_SECRET_LEN.start(),
                    DEMO_SECRET_LEN.end()
                ));
            }
        }
        self.validate_cluster()?;
        let mut ids = HashSet::new();
        for (index, tenant) in self.tenants.iter().enumerate() {
            tenant.validate(index).map_err(ConfigError::Invalid)?;
            if !ids.insert(tenant.id.as_str()) {
                return invalid(format!("tenant id {:?} is used twice: give every [[tenants]] its own id", tenant.id));
            }
            if tenant.id == OPERATOR_REALM {
                return invalid(format!(
                    "tenant id {OPERATOR_REALM:?} is reserved for the server's operators: give the school another id"
                ));
            }
        }
        if let Some(operators) = &self.operators {
            operators.as_tenant().validate(0).map_err(|e| {
                let e = e.replace("tenant \"operators\"", "[operators]");
                ConfigError::Invalid(e.replace("[[tenants.keys]]", "[[operators.keys]]"))
            })?;
        }
        Ok(())
    }

    /// The address the HTTP listener binds: [`Self::http_addr`] if given, else port
    /// [`DEFAULT_HTTP_PORT`] on loopback (`127.0.0.1`) for the demo tenant, whose pages hand out
    /// tokens to whoever reaches them, and on every address (`[::]`) for configured schools.
    pub fn http_listen_addr(&self) -> SocketAddr {
        self.http_addr.unwrap_or_else(|| {
            let ip: IpAddr =
                if self.tenants.is_empty() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::UNSPECIFIED.into() };
            SocketAddr::new(ip, DEFAULT_HTTP_PORT)
        })
    }

    /// [`Self::lead_ms`] as a duration.
    pub fn lead(&self) -> Duration {
        Duration::from_millis(self.lead_ms)
    }

    /// [`Self::tls_reload_check_ms`] as a duration.
    pub fn tls_reload_check(&self) -> Duration {
        Duration::from_millis(self.tls_reload_check_ms)
    }

    /// [`Self::acme_renew_before_secs`] as a duration.
    pub fn acme_renew_before(&self) -> Duration {
        Duration::from_secs(self.acme_renew_before_secs)
    }

    /// [`Self::acme_retry_secs`] as a duration.
    pub fn acme_retry(&self) -> Duration {
        Duration::from_secs(self.acme_retry_secs)
    }

    /// [`Self::hello_timeout_ms`] as a duration.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }

    /// [`Self::idle_timeout_ms`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// [`Self::probe_duration_ms`] as a duration.
    pub fn probe_duration(&self) -> Duration {
        Duration::from_millis(self.probe_duration_ms)
    }

    /// [`Self::keep_alive_ms`] as a duration.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_millis(self.keep_alive_ms)
    }

    /// [`Self::max_token_lifetime_secs`] as a duration.
    pub fn max_token_lifetime(&self) -> Duration {
        Duration::from_secs(self.max_token_lifetime_secs)
    }

    /// [`Self::http_header_timeout_ms`] as a duration.
    pub fn http_header_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_timeout_ms)
    }

    /// [`Self::http_request_timeout_ms`] as a duration.
    pub fn http_request_timeout(&self) -> Duration {
        Duration::from_millis(self.http_request_timeout_ms)
    }

    /// [`Self::room_idle_expiry_secs`] as a duration.
    pub fn room_idle_expiry(&self) -> Duration {
        Duration::from_secs(self.room_idle_expiry_secs)
    }

    /// [`Self::seat_grace_ms`] as a duration.
    pub fn seat_grace(&self) -> Duration {
        Duration::from_millis(self.seat_grace_ms)
    }

    /// [`Self::playout_delay_ms`] as a duration.
    pub fn playout_delay(&self) -> Duration {
        Duration::from_millis(self.playout_delay_ms)
    }

    /// Checks the cluster settings: a cluster shares one PostgreSQL and configured schools.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let Some(url) = &self.cluster else {
            if self.node_id.is_some() {
                return invalid(
                    "node_id is set but cluster is not: give --cluster nats://… or leave node_id out".into(),
                );
            }
            return Ok(());
        };
        if !(url.starts_with("nats://") || url.starts_with("tls://")) {
            return invalid(format!("cluster {url:?} is not a NATS URL: give nats://host:4222"));
        }
        let postgres = self
            .database_url
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"));
        if !postgres {
            return invalid(
                "a cluster keeps children's data in one PostgreSQL all its nodes share, and SQLite is one machine's file: give --database-url postgres://…".into(),
            );
        }
        if self.tenants.is_empty() {
            return invalid(
                "a cluster needs configured [[tenants]]: the demo tenant's secret is made per data directory, so one node's tokens would not verify on another".into(),
            );
        }
        if let Some(id) = &self.node_id {
            let ok = (1..=64).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return invalid(format!("node_id {id:?} is not valid: use 1 to 64 characters from a-z, 0-9 and -"));
            }
        }
        if let Some(public) = &self.public_http_url
            && !(public.starts_with("http://") || public.starts_with("https://"))
        {
            return invalid(format!("public_http_url {public:?} is not an http:// or https:// URL"));
        }
        if !(300..=600_000).contains(&self.cluster_lease_ms) {
            return invalid(format!("cluster_lease_ms is {}: use 300 to 600000 (default 5000)", self.cluster_lease_ms));
        }
        if !(1..=1_000_000).contains(&self.cluster_clock_bound_us) {
            return invalid(format!(
                "cluster_clock_bound_us is {}: use 1 to 1000000 (default 1000)",
                self.cluster_clock_bound_us
            ));
        }
        if self.cluster_drain_ms > 600_000 {
            return invalid(format!("cluster_drain_ms is {}: use 0 to 600000 (default 10000)", self.cluster_drain_ms));
        }
        // A member whose node's host died notices at the idle timeout and comes back to the
        // node that took the room over, which held their seat from the takeover on.
        if self.cluster.is_some() && self.seat_grace_ms <= self.idle_timeout_ms {
            return invalid(format!(
                "seat_grace_ms ({}) is not above idle_timeout_ms ({}): in a cluster, members of a node whose host \
                 dies notice only at the idle timeout and would lose their seats; raise seat_grace_ms or lower \
                 idle_timeout_ms",
                self.seat_grace_ms, self.idle_timeout_ms
            ));
        }
        Ok(())
    }

    /// The SEL database URL: the configured one, or the SQLite file `downbeat.sqlite3` in the
    /// data directory.
    pub fn database_url_or_default(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("downbeat.sqlite3").display()),
        }
    }

    /// [`Self::cluster_lease_ms`] as a duration.
    pub fn cluster_lease(&self) -> Duration {
        Duration::from_millis(self.cluster_lease_ms)
    }

    /// [`Self::cluster_drain_ms`] as a duration.
    pub fn cluster_drain(&self) -> Duration {
        Duration::from_millis(self.cluster_drain_ms)
    }

    /// [`Self::sel_purge_interval_secs`] as a duration.
    pub fn sel_purge_interval(&self) -> Duration {
        Duration::from_secs(self.sel_purge_interval_secs)
    }

    /// Names for the development certificate: the loopback names, then the extra ones.
    pub fn dev_cert_hostnames(&self) -> Vec<String> {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"].iter().map(|s| (*s).to_owned()).collect();
        for name in &self.hostnames {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }
}

/// Merges command-line/environment `args` over the TOML `file_text` (if any) over the
/// defaults, and validates. Pure: reads no files and no environment.
pub fn parse_and_merge(args: Args, file_text: Option<&str>) -> Result<Config, ConfigError> {
    let file: Args = match file_text {
        Some(text) => toml::from_str(text)?,
        None => Args::default(),
    };
    let config = merge(args, file);
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        let mut argv = vec!["downbeat"];
        argv.extend_from_slice(list);
        Args::try_parse_from(argv).unwrap()
    }

    /// Merges `cli` over `file` and returns the config or the error text.
    fn check(cli: &[&str], file: Option<&str>) -> Result<Config, String> {
        parse_and_merge(args(cli), file).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid() {
        let config = check(&[], None).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.http_addr, None);
        assert_eq!(config.http_listen_addr().to_string(), "127.0.0.1:4480");
        assert_eq!(config.wt_port, 4433);
        assert_eq!(config.lead_ms, 1500);
        assert_eq!(config.tls_reload_check_ms, 10_000);
        assert_eq!(config.dev_cert_hostnames(), ["localhost", "127.0.0.1", "::1"]);
    }

    #[test]
    fn command_line_wins_over_file_which_wins_over_defaults() {
        let file = "wt_port = 5000\nlead_ms = 2000\nhostnames = [\"music.local\"]\n";
        let config = check(&["--wt-port", "6000", "--max-rooms", "5"], Some(file)).unwrap();
        assert_eq!(config.wt_port, 6000);
        assert_eq!(config.lead_ms, 2000);
        assert_eq!(config.max_rooms, 5);
        assert_eq!(config.send_interval_ms, 100);
        assert_eq!(config.hostnames, ["music.local"]);
        assert_eq!(config.dev_cert_hostnames(), ["localhost", "127.0.0.1", "::1", "music.local"]);
    }

    #[test]
    fn acme_needs_an_https_listener_a_dns_name_and_no_certificate_files() {
        let config = check(
            &["--acme-domain", "music.example.org", "--https-addr", "[::]:443", "--acme-email", "it@example.org"],
            None,
        )
        .unwrap();
        assert_eq!(config.acme_domain.as_deref(), Some("music.example.org"));
        assert_eq!(config.acme_directory, DEFAULT_ACME_DIRECTORY);
        assert_eq!(config.acme_renew_before(), Duration::from_secs(30 * 24 * 3600));
        let err = check(&["--acme-domain", "music.example.org"], None).unwrap_err();
        assert!(err.contains("https_addr is not"), "{err}");
        let err = check(&["--acme-domain", "127.0.0.1", "--https-addr", "[::]:443"], None).unwrap_err();
        assert!(err.contains("acme_domain"), "{err}");
        let err = check(
            &[
                "--acme-domain",
                "music.example.org",
                "--https-addr",
                "[::]:443",
                "--tls-cert",
                "a.pem",
                "--tls-key",
                "a.key",
            ],
            None,
        )
        .unwrap_err();
        assert!(err.contains("acme_domain and tls_cert"), "{err}");
        let file = "acme_domain = \"music.example.org\"\nhttps_addr = \"[::]:443\"\nacme_directory = \"http://plain.example/dir\"\n";
        let err = check(&[], Some(file)).unwrap_err();
        assert!(err.contains("not an https:// URL"), "{err}");
    }

    #[test]
    fn tls_reload_check_comes_from_command_line_or_file() {
        let config = check(&[], Some("tls_reload_check_ms = 250\n")).unwrap();
        assert_eq!(config.tls_reload_check_ms, 250);
        let config = check(&["--tls-reload-check-ms", "500"], Some("tls_reload_check_ms = 250\n")).unwrap();
        assert_eq!(config.tls_reload_check_ms, 500);
        let err = check(&[], Some("tls_reload_check_ms = 0\n")).unwrap_err();
        assert!(err.contains("tls_reload_check_ms is 0"), "{err}");
    }

    #[test]
    fn web_settings_merge_like_the_others() {
        let config = check(&[], None).unwrap();
        assert!(config.web_dir.ends_with("server/../web"), "{}", config.web_dir.display());
        assert!(config.pkg_dir.ends_with("server/../client-wasm/pkg"), "{}", config.pkg_dir.display());
        assert_eq!((config.public_wt_url.as_deref(), config.https_addr), (None, None));
        let file = "web_dir = \"/srv/web\"\npkg_dir = \"/srv/pkg\"\npublic_wt_url = \"https://music.example/\"\nhttps_addr = \"[::]:4443\"\n";
        let config = check(&[], Some(file)).unwrap();
        assert_eq!((config.web_dir.to_str(), config.pkg_dir.to_str()), (Some("/srv/web"), Some("/srv/pkg")));
        assert_eq!(config.public_wt_url.as_deref(), Some("https://music.example/"));
        assert_eq!(config.https_addr, Some("[::]:4443".parse().unwrap()));
        let cli = [
            "--web-dir",
            "pages",
            "--pkg-dir",
            "pkg",
            "--public-wt-url",
            "https://wt.example:8443/",
            "--https-addr",
            "127.0.0.1:9443",
        ];
        let config = check(&cli, Some(file)).unwrap();
        assert_eq!((config.web_dir.to_str(), config.pkg_dir.to_str()), (Some("pages"), Some("pkg")));
        assert_eq!(config.public_wt_url.as_deref(), Some("https://wt.example:8443/"));
        assert_eq!(config.https_addr, Some("127.0.0.1:9443".parse().unwrap()));
    }

    #[test]
    fn metrics_get_an_address_of_their_own() {
        let config = check(&["--metrics-addr", "10.0.0.5:9100"], None).unwrap();
        assert_eq!(config.metrics_addr, Some("10.0.0.5:9100".parse().unwrap()));
        assert_eq!(check(&[], None).unwrap().metrics_addr, None);
        for clash in [
            &["--http-addr", "127.0.0.1:8080", "--metrics-addr", "127.0.0.1:8080"][..],
            &["--https-addr", "127.0.0.1:8443", "--metrics-addr", "127.0.0.1:8443"][..],
        ] {
            let err = check(clash, None).unwrap_err();
            assert!(err.contains("metrics_addr is the same"), "{clash:?}: {err}");
        }
    }

    #[test]
    fn web_setting_mistakes_say_what_to_fix() {
        for url in ["http://wt.example/", "https://", "https:///x", "https://a b/", "wt.example"] {
            let err = check(&["--public-wt-url", url], None).unwrap_err();
            assert!(err.contains("public_wt_url") && err.contains("https://"), "{url}: {err}");
        }
        let err = check(&["--http-addr", "127.0.0.1:4480", "--https-addr", "127.0.0.1:4480"], None).unwrap_err();
        assert!(err.contains("https_addr is the same as http_addr"), "{err}");
        assert!(check(&["--http-addr", "127.0.0.1:0", "--https-addr", "127.0.0.1:0"], None).is_ok());
    }

    #[test]
    fn hostnames_split_on_commas() {
        let config = check(&["--hostname", "a.local,10.0.0.2", "--hostname", "b"], None).unwrap();
        assert_eq!(config.hostnames, ["a.local", "10.0.0.2", "b"]);
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let err = check(&[], Some("lead_msec = 10\n")).unwrap_err();
        assert!(err.contains("lead_msec"), "{err}");
        let err = check(&[], Some("config = \"x.toml\"\n")).unwrap_err();
        assert!(err.contains("config"), "{err}");
        let err = check(&[], Some("lead_ms = \"soon\"\n")).unwrap_err();
        assert!(err.contains("config file is not valid"), "{err}");
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let err = check(&["--tls-cert", "c.pem"], None).unwrap_err();
        assert!(err.contains("tls_key is not"), "{err}");
        let err = check(&[], Some("tls_key = \"k.pem\"\n")).unwrap_err();
        assert!(err.contains("tls_cert is not"), "{err}");
        let config = check(&["--tls-cert", "c.pem", "--tls-key", "k.pem"], None).unwrap();
        assert_eq!(config.tls_cert, Some(PathBuf::from("c.pem")));
    }

    #[test]
    fn out_of_range_values_say_what_to_fix() {
        let cases: &[(&[&str], &str)] = &[
            (&["--lead-ms", "50"], "lead_ms is 50: use 100 to 60000"),
            (&["--tls-reload-check-ms", "0"], "tls_reload_check_ms is 0: use 1 to 3600000"),
            (&["--tls-reload-check-ms", "3600001"], "tls_reload_check_ms is 3600001"),
            (&["--send-interval-ms", "900"], "at most half of lead_ms"),
            (&["--send-interval-ms", "1"], "send_interval_ms is 1"),
            (&["--steady-send-interval-ms", "50"], "steady_send_interval_ms is 50"),
            (&["--steady-send-interval-ms", "20000"], "at most 10000"),
            (&["--udp-buffer-bytes", "1000"], "udp_buffer_bytes is 1000: use 65536 to 268435456"),
            (&["--worker-threads", "5000"], "worker_threads is 5000: use 0 to 1024 (default 0)"),
            (&["--max-rooms", "0"], "max_rooms is 0"),
            (
                &["--max-members-per-room", "101"],
                "max_members_per_room is 101: use 1 to 100 (the welcome to a full room",
            ),
            (&["--max-sessions", "0"], "max_sessions is 0"),
            (&["--max-concurrent-handshakes", "0"], "max_concurrent_handshakes is 0"),
            (&["--probe-duration-ms", "0"], "probe_duration_ms is 0: use 1 to 3600000"),
            (&["--max-probes", "0"], "max_probes must be at least 1"),
            (&["--max-sessions-per-address", "0"], "max_sessions_per_address must be at least 1"),
            (&["--max-handshakes-per-address", "0"], "max_handshakes_per_address and"),
            (&["--max-probes-per-address", "0"], "max_probes_per_address and max_probes must be at least 1"),
            (&["--hello-timeout-ms", "0"], "hello_timeout_ms is 0"),
            (&["--idle-timeout-ms", "10"], "idle_timeout_ms is 10"),
            (&["--keep-alive-ms", "30000"], "less than idle_timeout_ms"),
            (&["--hostname", ""], "not a valid DNS name"),
            (&["--token-audience", ""], "token_audience is empty"),
            (&["--max-token-lifetime-secs", "59"], "max_token_lifetime_secs is 59: use 60 to 2592000"),
            (&["--max-token-lifetime-secs", "2592001"], "max_token_lifetime_secs is 2592001"),
            (&["--http-max-connections", "0"], "http_max_connections is 0"),
            (&["--http-max-connections-per-address", "0"], "http_max_connections_per_address is 0"),
            (
                &["--http-max-connections", "8", "--http-max-connections-per-address", "9"],
                "use 1 to http_max_connections (8",
            ),
            (&["--http-header-timeout-ms", "99"], "http_header_timeout_ms is 99: use 100 to 600000"),
            (&["--http-request-timeout-ms", "3600001"], "http_request_timeout_ms is 3600001"),
            (&["--room-idle-expiry-secs", "0"], "room_idle_expiry_secs is 0: use 1 to 604800"),
            (&["--room-idle-expiry-secs", "604801"], "room_idle_expiry_secs is 604801"),
            (&["--seat-grace-ms", "600001"], "seat_grace_ms is 600001: use 0 to 600000"),
            (&["--playout-delay-ms", "9"], "playout_delay_ms is 9: use 10 to 2000"),
            (&["--playout-delay-ms", "2001"], "playout_delay_ms is 2001"),
        ];
        for (cli, want) in cases {
            let err = check(cli, None).unwrap_err();
            assert!(err.contains(want), "{cli:?}: {err}");
        }
    }

    #[test]
    fn token_and_room_settings_merge_like_the_others() {
        let config = check(&[], None).unwrap();
        assert_eq!(config.audience, "downbeat");
        assert!(config.tenants.is_empty());
        assert_eq!(
            (config.room_idle_expiry(), config.seat_grace(), config.playout_delay()),
            (Duration::from_secs(1800), Duration::from_millis(15_000), Duration::from_millis(80))
        );
        let file =
            "token_audience = \"from-file\"\nroom_idle_expiry_secs = 60\nseat_grace_ms = 0\nplayout_delay_ms = 120\n";
        let config = check(&[], Some(file)).unwrap();
        assert_eq!(config.audience, "from-file");
        assert_eq!((config.room_idle_expiry_secs, config.seat_grace_ms, config.playout_delay_ms), (60, 0, 120));
        let cli = [
            "--token-audience",
            "from-cli",
            "--room-idle-expiry-secs",
            "90",
            "--seat-grace-ms",
            "5000",
            "--playout-delay-ms",
            "40",
        ];
        let config = check(&cli, Some(file)).unwrap();
        assert_eq!(config.audience, "from-cli");
        assert_eq!((config.room_idle_expiry_secs, config.seat_grace_ms, config.playout_delay_ms), (90, 5000, 40));
        // The file key is named after the flag.
        let err = check(&[], Some("audience = \"x\"\n")).unwrap_err();
        assert!(err.contains("audience"), "{err}");
    }

    /// A valid `[[tenants]]` file with one HS256 and one EdDSA key; `extra` is appended to it.
    fn tenant_file(extra: &str) -> String {
        format!(
            r#"
[[tenants]]
id = "lincoln-elementary"
name = "Lincoln Elementary"
issuer = "https://sso.lincoln.example"
[[tenants.keys]]
kid = "2026-a"
algorithm = "HS256"
secret = "{SECRET}"
[[tenants.keys]]
algorithm = "EdDSA"
public_key_file = "keys/lincoln.pem"
[tenants.limits]
max_rooms = 20
note_burst = 60
{extra}"#
        )
    }

    #[test]
    fn the_demo_listens_on_loopback_and_schools_everywhere_unless_told() {
        assert_eq!(check(&[], None).unwrap().http_listen_addr().to_string(), "127.0.0.1:4480");
        let schools = check(&[], Some(&tenant_file(""))).unwrap();
        assert_eq!(schools.http_listen_addr().to_string(), "[::]:4480");
        let told = check(&["--http-addr", "0.0.0.0:8080"], None).unwrap();
        assert_eq!(told.http_listen_addr().to_string(), "0.0.0.0:8080");
        let told = check(&["--http-addr", "127.0.0.1:8080"], Some(&tenant_file(""))).unwrap();
        assert_eq!(told.http_listen_addr().to_string(), "127.0.0.1:8080");
        // The HTTPS listener may not take the default one.
        let err = check(&["--https-addr", "127.0.0.1:4480"], None).unwrap_err();
        assert!(err.contains("https_addr is the same as http_addr"), "{err}");
    }

    #[test]
    fn a_demo_teacher_secret_is_checked_and_never_shown() {
        let secret = "correct-horse-battery.staple~42";
        let config = check(&["--demo-teacher-secret", secret], None).unwrap();
        assert_eq!(config.demo_teacher_secret.as_ref().map(DemoSecret::expose), Some(secret));
        assert!(!format!("{config:?}").contains(secret), "Debug shows the secret");
        let from_file = check(&[], Some(&format!("demo_teacher_secret = \"{secret}\"\n"))).unwrap();
        assert_eq!(from_file.demo_teacher_secret, config.demo_teacher_secret);
        for bad in ["short", "has spaces in it, sixteen+", "percent%20encoded-secret", &"x".repeat(257)] {
            let err = check(&["--demo-teacher-secret", bad], None).unwrap_err();
            assert!(err.contains("demo_teacher_secret is not valid") && err.contains("16 to 256"), "{bad}: {err}");
        }
        let err = check(&["--demo-teacher-secret", secret], Some(&tenant_file(""))).unwrap_err();
        assert!(err.contains("only for the embedded demo tenant"), "{err}");
        // A random one is long, valid and new every time.
        let (a, b) = (DemoSecret::random(), DemoSecret::random());
        assert!(a.is_valid() && a.expose().len() == 43 && a != b);
    }

    /// 32 bytes ("thirty-two-bytes-of-test-secret!"), base64url without padding.
    const SECRET: &str = "dGhpcnR5LXR3by1ieXRlcy1vZi10ZXN0LXNlY3JldCE";

    #[test]
    fn operators_come_from_the_file_and_are_checked_like_a_school() {
        let secret = "b3BlcmF0b3JzLXNlY3JldC0wMTIzNDU2Nzg5YWJjZGU";
        let ops = format!(
            "[operators]\nissuer = \"https://sso.district.example/ops\"\n[[operators.keys]]\nalgorithm = \"HS256\"\nsecret = \"{secret}\"\n"
        );
        let config = check(&[], Some(&tenant_file(&ops))).unwrap();
        let operators = config.operators.expect("operators");
        assert_eq!(operators.issuer, "https://sso.district.example/ops");
        assert_eq!(operators.keys.len(), 1);
        let err = check(&[], Some(&tenant_file("[operators]\nissuer = \"x\"\n"))).unwrap_err();
        assert!(err.contains("[operators] has no keys"), "{err}");
        let err = check(&[], Some(&tenant_file(&ops.replace("HS256", "ES256")))).unwrap_err();
        assert!(err.contains("[operators] key 0 (ES256)"), "{err}");
        let err = check(&[], Some(&tenant_file("").replace("lincoln-elementary", "operators"))).unwrap_err();
        assert!(err.contains("reserved for the server's operators"), "{err}");
    }

    #[test]
    fn tenants_come_from_the_file() {
        let config = check(&[], Some(&tenant_file("[tenants.retention]\nsel_days = 30\n"))).unwrap();
        let [tenant] = config.tenants.as_slice() else { panic!("{:?}", config.tenants) };
        assert_eq!((tenant.id.as_str(), tenant.name.as_str()), ("lincoln-elementary", "Lincoln Elementary"));
        assert_eq!(tenant.issuer, "https://sso.lincoln.example");
        assert_eq!(tenant.keys.len(), 2);
        assert_eq!((tenant.keys[0].kid.as_deref(), tenant.keys[0].algorithm), (Some("2026-a"), KeyAlgorithm::Hs256));
        assert_eq!(tenant.keys[0].secret_bytes().unwrap().unwrap().len(), 32);
        assert_eq!(tenant.keys[1].algorithm, KeyAlgorithm::EdDsa);
        assert_eq!(tenant.keys[1].public_key_file, Some(PathBuf::from("keys/lincoln.pem")));
        let limits = TenantLimits { max_rooms: 20, note_burst: 60, ..TenantLimits::default() };
        assert_eq!(tenant.limits, limits);
        assert_eq!(tenant.limits.max_sessions, 500);
        assert_eq!(tenant.retention.sel_days, 30);
        // Left out, limits and retention take their defaults.
        let config =
            check(&[], Some(&tenant_file("").replace("[tenants.limits]\nmax_rooms = 20\nnote_burst = 60\n", "")))
                .unwrap();
        assert_eq!(config.tenants[0].limits, TenantLimits::default());
        assert_eq!(config.tenants[0].retention, TenantRetention::default());
        // Tenants are file only.
        assert!(Args::try_parse_from(["downbeat", "--tenants", "x"]).is_err());
    }

    #[test]
    fn secrets_may_be_standard_or_url_base64_padded_or_not() {
        let bytes: Vec<u8> = (0_u8..40).map(|i| i.wrapping_mul(37).wrapping_add(250)).collect();
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        for engine in engines {
            assert_eq!(decode_secret(&format!(" {}\n", engine.encode(&bytes))).unwrap(), bytes);
        }
        assert!(decode_secret("not base64!").is_err());
    }

    #[test]
    fn tenant_mistakes_say_what_to_fix() {
        let one = tenant_file("");
        let cases: Vec<(String, &str)> = vec![
            (
                one.replace("lincoln-elementary", "Lincoln"),
                r#"tenants[0].id "Lincoln" is not valid: use 1 to 64 characters"#,
            ),
            (one.replace("\"lincoln-elementary\"", "\"\""), "tenants[0].id \"\" is not valid"),
            (one.replace("lincoln-elementary", &"a".repeat(65)), "is not valid: use 1 to 64"),
            (format!("{one}{}", tenant_file("")), r#"tenant id "lincoln-elementary" is used twice"#),
            (one.replace("Lincoln Elementary", ""), "name is empty"),
            (one.replace("https://sso.lincoln.example", ""), "issuer is empty: set it to the `iss`"),
            (
                "[[tenants]]\nid = \"a\"\nname = \"A\"\nissuer = \"i\"\n".to_owned(),
                r#"tenant "a" has no keys: add a [[tenants.keys]]"#,
            ),
            (
                one.replace(SECRET, "c2hvcnQ"),
                r#"tenant "lincoln-elementary" key 0 (HS256): secret is 5 bytes: use at least 32"#,
            ),
            (one.replace(SECRET, "***"), "key 0 (HS256): secret is not valid base64"),
            (one.replace(&format!("secret = \"{SECRET}\""), ""), "key 0 (HS256): secret is missing"),
            (one.replace("kid = \"2026-a\"", "kid = \"\""), "key 0 (HS256): kid is empty"),
            (
                one.replace(&format!("secret = \"{SECRET}\""), "public_key_pem = \"x\""),
                "key 0 (HS256): HS* keys use only a secret",
            ),
            (
                one.replace("public_key_file = \"keys/lincoln.pem\"", &format!("secret = \"{SECRET}\"")),
                "key 1 (EdDSA): a secret is only for HS* keys",
            ),
            (
                one.replace("public_key_file = \"keys/lincoln.pem\"", ""),
                "key 1 (EdDSA): give exactly one of public_key_pem and public_key_file",
            ),
            (
                one.replace(
                    "public_key_file = \"keys/lincoln.pem\"",
                    "public_key_file = \"k\"\npublic_key_pem = \"p\"",
                ),
                "key 1 (EdDSA): give exactly one of",
            ),
            (
                one.replace("max_rooms = 20", "max_rooms = 0"),
                r#"tenant "lincoln-elementary": limits.max_rooms is 0: use at least 1"#,
            ),
            (tenant_file("joins_per_second = 0\n"), "limits.joins_per_second is 0"),
            (tenant_file("control_burst = 0\n"), "limits.control_burst is 0"),
            (tenant_file("max_members_per_room = 101\n"), "limits.max_members_per_room is 101: use 1 to 100"),
            (tenant_file("[tenants.retention]\nsel_days = 0\n"), "retention.sel_days is 0"),
        ];
        for (file, want) in &cases {
            let err = check(&[], Some(file)).unwrap_err();
            assert!(err.contains(want), "want {want:?}, got: {err}");
        }
    }

    #[test]
    fn unknown_tenant_settings_are_refused_by_name() {
        let err = check(&[], Some(&tenant_file("").replace("HS256", "none"))).unwrap_err();
        assert!(err.contains("unknown variant `none`") && err.contains("HS256"), "{err}");
        let err = check(&[], Some(&tenant_file("").replace("HS256", "RS512"))).unwrap_err();
        assert!(err.contains("RS512"), "{err}");
        let err = check(&[], Some(&tenant_file("max_students = 3\n"))).unwrap_err();
        assert!(err.contains("max_students"), "{err}");
        let err = check(&[], Some(&tenant_file("").replace("kid =", "key_id ="))).unwrap_err();
        assert!(err.contains("key_id"), "{err}");
    }

    #[test]
    fn debug_output_redacts_key_secrets() {
        let config = check(&[], Some(&tenant_file(""))).unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains("<redacted>") && !debug.contains(SECRET), "{debug}");
    }

    #[test]
    fn the_readme_settings_table_is_the_generated_one() {
        let want = settings_markdown();
        assert_eq!(
            readme_section("settings"),
            want,
            "regenerate it with `cargo run -p downbeat-server -- settings-doc`"
        );
    }

    #[test]
    fn the_documented_flags_and_variables_are_the_parsed_ones() {
        let command = <Args as clap::CommandFactory>::command();
        let parsed: Vec<(String, String)> = command
            .get_arguments()
            .filter_map(|arg| Some((format!("--{}", arg.get_long()?), arg.get_env()?.to_str()?.to_owned())))
            .collect();
        let mut documented = vec![("--config".to_owned(), "DOWNBEAT_CONFIG".to_owned())];
        documented.extend(settings().into_iter().map(|s| (s.flag, s.env.to_owned())));
        assert_eq!(parsed, documented);
        // Each setting's file key sets it.
        for s in settings() {
            let err = check(&[], Some(&format!("{} = {{}}\n", s.key))).unwrap_err();
            assert!(!err.contains("unknown field"), "{}: {err}", s.key);
        }
    }

    #[test]
    fn bad_command_line_values_are_clap_errors() {
        assert!(Args::try_parse_from(["downbeat", "--wt-port", "70000"]).is_err());
        assert!(Args::try_parse_from(["downbeat", "--http-addr", "nowhere"]).is_err());
        assert!(Args::try_parse_from(["downbeat", "--no-such-flag"]).is_err());
    }
}
