//! Server configuration: command line, `DOWNBEAT_*` environment variables and an optional TOML
//! file, merged in that order of precedence over built-in defaults.
//!
//! [`Args`] is what a user may say (every field optional, so the command line, the environment
//! and the file can be merged field by field); [`Config`] is the resolved, validated result
//! the server runs with. [`parse_and_merge`] is the pure function between them.

use std::collections::HashSet;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use clap::Parser;
use serde::{Deserialize, Serialize};

use downbeat_protocol::MAX_MEMBERS;

/// What can be said on the command line, in `DOWNBEAT_*` variables, or in the TOML file given
/// by `--config` (same names, snake_case, no `config` key). Every field is optional; unset
/// fields fall back to the file, then to the defaults documented on [`Config`].
#[derive(Clone, Debug, Default, Parser, Deserialize)]
#[command(name = "downbeat", version, about = "Downbeat timing server for classroom music")]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of the settings below (command line and environment win over it).
    #[arg(long, env = "DOWNBEAT_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// HTTP/1.1 listener for the API [default: [::]:4480].
    #[arg(long, env = "DOWNBEAT_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// UDP port for WebTransport, bound dual-stack on every address [default: 4433].
    #[arg(long, env = "DOWNBEAT_WT_PORT", value_name = "PORT")]
    pub wt_port: Option<u16>,

    /// Directory for server state (development certificates) [default: ./data].
    #[arg(long, env = "DOWNBEAT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Production certificate chain (PEM). Needs --tls-key. Without both, a development
    /// certificate is generated, rotated, and its hash published for pages to pin.
    #[arg(long, env = "DOWNBEAT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Production private key (PEM). Needs --tls-cert.
    #[arg(long, env = "DOWNBEAT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// How often the production certificate and key files are checked for replacement, in ms
    /// [default: 10000]. Ignored for the development certificate.
    #[arg(long, env = "DOWNBEAT_TLS_RELOAD_CHECK_MS", value_name = "MS")]
    pub tls_reload_check_ms: Option<u64>,

    /// Extra names or addresses for the development certificate (localhost, 127.0.0.1 and ::1
    /// are always included). Repeat or separate with commas.
    #[arg(long = "hostname", env = "DOWNBEAT_HOSTNAMES", value_name = "NAME", value_delimiter = ',')]
    #[serde(default)]
    pub hostnames: Option<Vec<String>>,

    /// How far ahead beats are sent and changes announced, in ms [default: 1500].
    #[arg(long, env = "DOWNBEAT_LEAD_MS", value_name = "MS")]
    pub lead_ms: Option<u64>,

    /// Interval between beat datagrams to each member of a running room, in ms [default: 100].
    #[arg(long, env = "DOWNBEAT_SEND_INTERVAL_MS", value_name = "MS")]
    pub send_interval_ms: Option<u64>,

    /// Most rooms at once [default: 1000].
    #[arg(long, env = "DOWNBEAT_MAX_ROOMS", value_name = "N")]
    pub max_rooms: Option<usize>,

    /// Most members in one room, for every tenant (a tenant's own limit applies within it)
    /// [default: 64].
    #[arg(long, env = "DOWNBEAT_MAX_MEMBERS_PER_ROOM", value_name = "N")]
    pub max_members_per_room: Option<usize>,

    /// Most WebTransport sessions at once [default: 10000].
    #[arg(long, env = "DOWNBEAT_MAX_SESSIONS", value_name = "N")]
    pub max_sessions: Option<usize>,

    /// Most QUIC/WebTransport handshakes in progress at once [default: 256].
    #[arg(long, env = "DOWNBEAT_MAX_CONCURRENT_HANDSHAKES", value_name = "N")]
    pub max_concurrent_handshakes: Option<usize>,

    /// Time a new session has to open its control stream and say hello, in ms [default: 5000].
    #[arg(long, env = "DOWNBEAT_HELLO_TIMEOUT_MS", value_name = "MS")]
    pub hello_timeout_ms: Option<u64>,

    /// QUIC idle timeout, in ms [default: 30000].
    #[arg(long, env = "DOWNBEAT_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,

    /// QUIC keep-alive interval, in ms [default: 3000].
    #[arg(long, env = "DOWNBEAT_KEEP_ALIVE_MS", value_name = "MS")]
    pub keep_alive_ms: Option<u64>,

    /// The `aud` claim every token must carry [default: downbeat]. In the file:
    /// `token_audience`.
    #[arg(long = "token-audience", env = "DOWNBEAT_TOKEN_AUDIENCE", value_name = "AUD")]
    #[serde(rename = "token_audience")]
    pub audience: Option<String>,

    /// Longest lifetime a token may have, in seconds: a token whose `exp` is further than this
    /// from its `iat` or from now is refused [default: 86400].
    #[arg(long, env = "DOWNBEAT_MAX_TOKEN_LIFETIME_SECS", value_name = "SECS")]
    pub max_token_lifetime_secs: Option<u64>,

    /// The schools (tenants) whose tokens are accepted: file only, as `[[tenants]]` tables.
    /// None: an embedded demo tenant whose secret lives in the data directory.
    #[arg(skip)]
    pub tenants: Option<Vec<TenantConfig>>,

    /// How long a room with nobody in it is kept before it expires, in seconds [default: 1800].
    #[arg(long, env = "DOWNBEAT_ROOM_IDLE_EXPIRY_SECS", value_name = "SECS")]
    pub room_idle_expiry_secs: Option<u64>,

    /// How long a disconnected member's seat is held for them to reconnect, in ms
    /// [default: 15000].
    #[arg(long, env = "DOWNBEAT_SEAT_GRACE_MS", value_name = "MS")]
    pub seat_grace_ms: Option<u64>,

    /// How far behind the beat clock students' notes are played out, in ms [default: 80].
    #[arg(long, env = "DOWNBEAT_PLAYOUT_DELAY_MS", value_name = "MS")]
    pub playout_delay_ms: Option<u64>,

    /// Where SEL data (reflections, participation) is stored: `postgres://user:pass@host/db`,
    /// or a SQLite file (`sqlite://path` or a path) [default: `downbeat.sqlite3` in the data
    /// directory].
    #[arg(long, env = "DOWNBEAT_DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,

    /// SEL writes queued while the database is slow or down before reflections are refused
    /// with `store_unavailable` [default: 1024].
    #[arg(long, env = "DOWNBEAT_SEL_QUEUE", value_name = "N")]
    pub sel_queue: Option<usize>,

    /// How often records past a tenant's retention period are purged, in seconds
    /// [default: 3600].
    #[arg(long, env = "DOWNBEAT_SEL_PURGE_INTERVAL_SECS", value_name = "SECS")]
    pub sel_purge_interval_secs: Option<u64>,

    /// Directory of the browser classroom pages served at `/`, `/teacher` and `/student`
    /// [default: `web/` of the source checkout].
    #[arg(long, env = "DOWNBEAT_WEB_DIR", value_name = "DIR")]
    pub web_dir: Option<PathBuf>,

    /// Directory of the built browser package served at `/pkg/` (`scripts/build-wasm` builds
    /// it) [default: `client-wasm/pkg` of the source checkout].
    #[arg(long, env = "DOWNBEAT_PKG_DIR", value_name = "DIR")]
    pub pkg_dir: Option<PathBuf>,

    /// The WebTransport URL pages are told to connect to (`/api/client-config`), for a server
    /// reached under another name or port [default: `https://<the page's host>:<wt port>/`].
    #[arg(long, env = "DOWNBEAT_PUBLIC_WT_URL", value_name = "URL")]
    pub public_wt_url: Option<String>,

    /// Also serve the pages and the API over HTTPS on this address, with the server's
    /// certificate (loaded at startup) [default: no HTTPS listener].
    #[arg(long, env = "DOWNBEAT_HTTPS_ADDR", value_name = "ADDR")]
    pub https_addr: Option<SocketAddr>,

    /// Most HTTP(S) connections open at once; more are closed as they arrive [default: 4096].
    #[arg(long, env = "DOWNBEAT_HTTP_MAX_CONNECTIONS", value_name = "N")]
    pub http_max_connections: Option<usize>,

    /// Most HTTP(S) connections open at once from one client address (a school behind one
    /// NAT shares one) [default: 256].
    #[arg(long, env = "DOWNBEAT_HTTP_MAX_CONNECTIONS_PER_ADDRESS", value_name = "N")]
    pub http_max_connections_per_address: Option<usize>,

    /// Time an HTTP client has to send a request's header (and a TLS client its handshake);
    /// also how long a kept-alive connection may sit idle, in ms [default: 10000].
    #[arg(long, env = "DOWNBEAT_HTTP_HEADER_TIMEOUT_MS", value_name = "MS")]
    pub http_header_timeout_ms: Option<u64>,

    /// Time an HTTP request has to send its body and be answered, in ms [default: 30000].
    #[arg(long, env = "DOWNBEAT_HTTP_REQUEST_TIMEOUT_MS", value_name = "MS")]
    pub http_request_timeout_ms: Option<u64>,
}

/// The resolved server configuration. Build one with [`parse_and_merge`], [`Config::load`], or
/// `Config { .., ..Config::default() }` in tests; [`Config::validate`] checks it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// HTTP/1.1 listener for the API.
    pub http_addr: SocketAddr,
    /// UDP port for WebTransport (0: any free port).
    pub wt_port: u16,
    /// Directory for server state.
    pub data_dir: PathBuf,
    /// Production certificate chain (PEM); `None` for a development certificate.
    pub tls_cert: Option<PathBuf>,
    /// Production private key (PEM); set exactly when `tls_cert` is.
    pub tls_key: Option<PathBuf>,
    /// How often the production PEM files are checked for replacement, in ms.
    pub tls_reload_check_ms: u64,
    /// Extra names for the development certificate, beyond the loopback names.
    pub hostnames: Vec<String>,
    /// How far ahead beats are sent and changes announced, in ms.
    pub lead_ms: u64,
    /// Beat datagram interval for a running room, in ms.
    pub send_interval_ms: u64,
    /// Most rooms at once.
    pub max_rooms: usize,
    /// Most members in one room, whatever a tenant allows.
    pub max_members_per_room: usize,
    /// Most WebTransport sessions at once.
    pub max_sessions: usize,
    /// Most handshakes in progress at once.
    pub max_concurrent_handshakes: usize,
    /// Deadline for the control stream and hello, in ms.
    pub hello_timeout_ms: u64,
    /// QUIC idle timeout, in ms.
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive interval, in ms.
    pub keep_alive_ms: u64,
    /// The `aud` claim every token must carry.
    pub audience: String,
    /// Longest lifetime a token may have (`exp - iat` and `exp - now`), in seconds.
    pub max_token_lifetime_secs: u64,
    /// The schools whose tokens are accepted. Empty: the embedded demo tenant (see
    /// [`crate::auth::Tenants::new`]).
    pub tenants: Vec<TenantConfig>,
    /// How long an empty room is kept before it expires, in seconds.
    pub room_idle_expiry_secs: u64,
    /// How long a disconnected member's seat is held, in ms.
    pub seat_grace_ms: u64,
    /// How far behind the beat clock students' notes are played out, in ms.
    pub playout_delay_ms: u64,
    /// The SEL database; `None`: a SQLite file in the data directory
    /// ([`Self::database_url_or_default`]).
    pub database_url: Option<String>,
    /// SEL writes queued before reflections are refused with `store_unavailable`.
    pub sel_queue: usize,
    /// How often expired SEL records are purged, in seconds.
    pub sel_purge_interval_secs: u64,
    /// The browser pages (`index.html`, `teacher.html`, `student.html`, scripts, styles).
    /// Missing: the server still starts; the pages answer 404.
    pub web_dir: PathBuf,
    /// The built browser package (`scripts/build-wasm`), served at `/pkg/`. Missing: the
    /// server still starts; `/pkg/` answers 404 saying how to build it.
    pub pkg_dir: PathBuf,
    /// The WebTransport URL pages are told to connect to; `None`: derived from each request's
    /// `Host` and the WebTransport port.
    pub public_wt_url: Option<String>,
    /// An HTTPS listener serving the same routes, if any. Its certificate is the one in use
    /// when the server starts (the production PEM files or the current development
    /// certificate): rotation and `tls_reload_check_ms` reloads reach WebTransport only, so
    /// restart the server to serve a replaced certificate over HTTPS.
    pub https_addr: Option<SocketAddr>,
    /// Most HTTP(S) connections open at once.
    pub http_max_connections: usize,
    /// Most HTTP(S) connections open at once from one client address.
    pub http_max_connections_per_address: usize,
    /// Deadline for a request's header, a TLS handshake, and an idle kept-alive connection,
    /// in ms.
    pub http_header_timeout_ms: u64,
    /// Deadline for a request's body and answer, in ms.
    pub http_request_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 4480),
            wt_port: 4433,
            data_dir: PathBuf::from("./data"),
            tls_cert: None,
            tls_key: None,
            tls_reload_check_ms: 10_000,
            hostnames: Vec::new(),
            lead_ms: 1500,
            send_interval_ms: 100,
            max_rooms: 1000,
            max_members_per_room: 64,
            max_sessions: 10_000,
            max_concurrent_handshakes: 256,
            hello_timeout_ms: 5000,
            idle_timeout_ms: 30_000,
            keep_alive_ms: 3000,
            audience: DEFAULT_AUDIENCE.to_owned(),
            max_token_lifetime_secs: 86_400,
            tenants: Vec::new(),
            room_idle_expiry_secs: 1800,
            seat_grace_ms: 15_000,
            playout_delay_ms: 80,
            database_url: None,
            sel_queue: 1024,
            sel_purge_interval_secs: 3600,
            web_dir: PathBuf::from(DEFAULT_WEB_DIR),
            pkg_dir: PathBuf::from(DEFAULT_PKG_DIR),
            public_wt_url: None,
            https_addr: None,
            http_max_connections: 4096,
            http_max_connections_per_address: 256,
            http_header_timeout_ms: 10_000,
            http_request_timeout_ms: 30_000,
        }
    }
}

/// The default pages directory: `web/` of the source checkout this server was built from.
pub const DEFAULT_WEB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../web");

/// The default browser package directory: `client-wasm/pkg` of the source checkout.
pub const DEFAULT_PKG_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../client-wasm/pkg");

/// The default `aud` claim tokens must carry.
pub const DEFAULT_AUDIENCE: &str = "downbeat";

/// Fewest bytes an HS* secret may have (the HS256 output size; RFC 7518 section 3.2).
pub const MIN_SECRET_BYTES: usize = 32;

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
    /// Most WebTransport sessions at once.
    pub max_sessions: u32,
    /// Most rooms at once.
    pub max_rooms: u32,
    /// Most members in one room (at most 256).
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
                "tenant {id:?}: limits.max_members_per_room is {}: use 1 to {MAX_MEMBERS} (a welcome lists every member)",
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
        if !(1..=3_600_000).contains(&self.tls_reload_check_ms) {
            return invalid(format!(
                "tls_reload_check_ms is {}: use 1 to 3600000 (default 10000)",
                self.tls_reload_check_ms
            ));
        }
        if !(100..=60_000).contains(&self.lead_ms) {
            return invalid(format!("lead_ms is {}: use 100 to 60000 (default 1500)", self.lead_ms));
        }
        if self.send_interval_ms < 10 || self.send_interval_ms * 2 > self.lead_ms {
            return invalid(format!(
                "send_interval_ms is {}: use at least 10 and at most half of lead_ms ({}), so every beat is sent more than once before it sounds",
                self.send_interval_ms, self.lead_ms
            ));
        }
        if self.max_rooms == 0 {
            return invalid("max_rooms is 0: use at least 1");
        }
        if !(1..=MAX_MEMBERS).contains(&self.max_members_per_room) {
            return invalid(format!(
                "max_members_per_room is {}: use 1 to {MAX_MEMBERS} (a welcome lists every member)",
                self.max_members_per_room
            ));
        }
        if self.max_sessions == 0 {
            return invalid("max_sessions is 0: use at least 1");
        }
        if self.max_concurrent_handshakes == 0 {
            return invalid("max_concurrent_handshakes is 0: use at least 1");
        }
        if !(100..=600_000).contains(&self.hello_timeout_ms) {
            return invalid(format!("hello_timeout_ms is {}: use 100 to 600000 (default 5000)", self.hello_timeout_ms));
        }
        if !(1000..=600_000).contains(&self.idle_timeout_ms) {
            return invalid(format!("idle_timeout_ms is {}: use 1000 to 600000 (default 30000)", self.idle_timeout_ms));
        }
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
                "room_idle_expiry_secs is {}: use 1 to 604800 (a week; default 1800)",
                self.room_idle_expiry_secs
            ));
        }
        if self.seat_grace_ms > 600_000 {
            return invalid(format!("seat_grace_ms is {}: use 0 to 600000 (default 15000)", self.seat_grace_ms));
        }
        if !(10..=2000).contains(&self.playout_delay_ms) {
            return invalid(format!("playout_delay_ms is {}: use 10 to 2000 (default 80)", self.playout_delay_ms));
        }
        if !(1..=1_000_000).contains(&self.sel_queue) {
            return invalid(format!("sel_queue is {}: use 1 to 1000000 (default 1024)", self.sel_queue));
        }
        if !(1..=86_400).contains(&self.sel_purge_interval_secs) {
            return invalid(format!(
                "sel_purge_interval_secs is {}: use 1 to 86400 (default 3600)",
                self.sel_purge_interval_secs
            ));
        }
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
        if self.https_addr.is_some_and(|https| https == self.http_addr && https.port() != 0) {
            return invalid("https_addr is the same as http_addr: give the HTTPS listener its own port");
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
        let mut ids = HashSet::new();
        for (index, tenant) in self.tenants.iter().enumerate() {
            tenant.validate(index).map_err(ConfigError::Invalid)?;
            if !ids.insert(tenant.id.as_str()) {
                return invalid(format!("tenant id {:?} is used twice: give every [[tenants]] its own id", tenant.id));
            }
        }
        Ok(())
    }

    /// [`Self::lead_ms`] as a duration.
    pub fn lead(&self) -> Duration {
        Duration::from_millis(self.lead_ms)
    }

    /// [`Self::tls_reload_check_ms`] as a duration.
    pub fn tls_reload_check(&self) -> Duration {
        Duration::from_millis(self.tls_reload_check_ms)
    }

    /// [`Self::hello_timeout_ms`] as a duration.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.hello_timeout_ms)
    }

    /// [`Self::idle_timeout_ms`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
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

    /// The SEL database URL: the configured one, or the SQLite file `downbeat.sqlite3` in the
    /// data directory.
    pub fn database_url_or_default(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("downbeat.sqlite3").display()),
        }
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
    let d = Config::default();
    let config = Config {
        http_addr: args.http_addr.or(file.http_addr).unwrap_or(d.http_addr),
        wt_port: args.wt_port.or(file.wt_port).unwrap_or(d.wt_port),
        data_dir: args.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
        tls_cert: args.tls_cert.or(file.tls_cert),
        tls_key: args.tls_key.or(file.tls_key),
        tls_reload_check_ms: args.tls_reload_check_ms.or(file.tls_reload_check_ms).unwrap_or(d.tls_reload_check_ms),
        hostnames: args.hostnames.or(file.hostnames).unwrap_or(d.hostnames),
        lead_ms: args.lead_ms.or(file.lead_ms).unwrap_or(d.lead_ms),
        send_interval_ms: args.send_interval_ms.or(file.send_interval_ms).unwrap_or(d.send_interval_ms),
        max_rooms: args.max_rooms.or(file.max_rooms).unwrap_or(d.max_rooms),
        max_members_per_room: args.max_members_per_room.or(file.max_members_per_room).unwrap_or(d.max_members_per_room),
        max_sessions: args.max_sessions.or(file.max_sessions).unwrap_or(d.max_sessions),
        max_concurrent_handshakes: args
            .max_concurrent_handshakes
            .or(file.max_concurrent_handshakes)
            .unwrap_or(d.max_concurrent_handshakes),
        hello_timeout_ms: args.hello_timeout_ms.or(file.hello_timeout_ms).unwrap_or(d.hello_timeout_ms),
        idle_timeout_ms: args.idle_timeout_ms.or(file.idle_timeout_ms).unwrap_or(d.idle_timeout_ms),
        keep_alive_ms: args.keep_alive_ms.or(file.keep_alive_ms).unwrap_or(d.keep_alive_ms),
        audience: args.audience.or(file.audience).unwrap_or(d.audience),
        max_token_lifetime_secs: args
            .max_token_lifetime_secs
            .or(file.max_token_lifetime_secs)
            .unwrap_or(d.max_token_lifetime_secs),
        tenants: args.tenants.or(file.tenants).unwrap_or(d.tenants),
        room_idle_expiry_secs: args
            .room_idle_expiry_secs
            .or(file.room_idle_expiry_secs)
            .unwrap_or(d.room_idle_expiry_secs),
        seat_grace_ms: args.seat_grace_ms.or(file.seat_grace_ms).unwrap_or(d.seat_grace_ms),
        playout_delay_ms: args.playout_delay_ms.or(file.playout_delay_ms).unwrap_or(d.playout_delay_ms),
        database_url: args.database_url.or(file.database_url),
        sel_queue: args.sel_queue.or(file.sel_queue).unwrap_or(d.sel_queue),
        sel_purge_interval_secs: args
            .sel_purge_interval_secs
            .or(file.sel_purge_interval_secs)
            .unwrap_or(d.sel_purge_interval_secs),
        web_dir: args.web_dir.or(file.web_dir).unwrap_or(d.web_dir),
        pkg_dir: args.pkg_dir.or(file.pkg_dir).unwrap_or(d.pkg_dir),
        public_wt_url: args.public_wt_url.or(file.public_wt_url),
        https_addr: args.https_addr.or(file.https_addr),
        http_max_connections: args.http_max_connections.or(file.http_max_connections).unwrap_or(d.http_max_connections),
        http_max_connections_per_address: args
            .http_max_connections_per_address
            .or(file.http_max_connections_per_address)
            .unwrap_or(d.http_max_connections_per_address),
        http_header_timeout_ms: args
            .http_header_timeout_ms
            .or(file.http_header_timeout_ms)
            .unwrap_or(d.http_header_timeout_ms),
        http_request_timeout_ms: args
            .http_request_timeout_ms
            .or(file.http_request_timeout_ms)
            .unwrap_or(d.http_request_timeout_ms),
    };
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
        assert_eq!(config.http_addr.to_string(), "[::]:4480");
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
            (&["--max-rooms", "0"], "max_rooms is 0"),
            (&["--max-members-per-room", "257"], "use 1 to 256"),
            (&["--max-sessions", "0"], "max_sessions is 0"),
            (&["--max-concurrent-handshakes", "0"], "max_concurrent_handshakes is 0"),
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

    /// 32 bytes ("thirty-two-bytes-of-test-secret!"), base64url without padding.
    const SECRET: &str = "dGhpcnR5LXR3by1ieXRlcy1vZi10ZXN0LXNlY3JldCE";

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
            (tenant_file("max_members_per_room = 300\n"), "limits.max_members_per_room is 300: use 1 to 256"),
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
    fn bad_command_line_values_are_clap_errors() {
        assert!(Args::try_parse_from(["downbeat", "--wt-port", "70000"]).is_err());
        assert!(Args::try_parse_from(["downbeat", "--http-addr", "nowhere"]).is_err());
        assert!(Args::try_parse_from(["downbeat", "--no-such-flag"]).is_err());
    }
}
