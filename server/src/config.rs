//! Server configuration: command line, `DOWNBEAT_*` environment variables and an optional TOML
//! file, merged in that order of precedence over built-in defaults.
//!
//! [`Args`] is what a user may say (every field optional, so the command line, the environment
//! and the file can be merged field by field); [`Config`] is the resolved, validated result
//! the server runs with. [`parse_and_merge`] is the pure function between them.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use downbeat_protocol::{MAX_MEMBERS, MAX_TOKEN_LEN};

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

    /// Most members in one room [default: 64].
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

    /// Development bearer token for the HTTP API and the hello. If unset, a random one is
    /// generated at startup and printed.
    #[arg(long, env = "DOWNBEAT_DEV_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub dev_token: Option<String>,
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
    /// Most members in one room.
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
    /// Development bearer token; `None`: generate a random one at startup.
    pub dev_token: Option<String>,
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
            dev_token: None,
        }
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
}

impl Config {
    /// Parses the process's command line and environment, reads the `--config` file if any,
    /// merges and validates. Exits the process on `--help`/`--version` or a command-line error
    /// (as clap does).
    pub fn load() -> Result<Self, ConfigError> {
        let args = Args::parse();
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
        if let Some(token) = &self.dev_token {
            if token.len() < 8 || token.len() > MAX_TOKEN_LEN {
                return invalid(format!(
                    "dev_token must be 8 to {MAX_TOKEN_LEN} bytes (or leave it unset for a random one)"
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return invalid("dev_token must be printable ASCII without spaces (it travels in an HTTP header)");
            }
        }
        for name in &self.hostnames {
            if name.is_empty() || name.len() > 253 || name.chars().any(char::is_whitespace) {
                return invalid(format!("hostname {name:?} is not a valid DNS name or IP address"));
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
        dev_token: args.dev_token.or(file.dev_token),
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
        assert!(config.dev_token.is_none());
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
            (&["--dev-token", "short"], "dev_token must be 8"),
            (&["--dev-token", "has space here"], "printable ASCII"),
            (&["--hostname", ""], "not a valid DNS name"),
        ];
        for (cli, want) in cases {
            let err = check(cli, None).unwrap_err();
            assert!(err.contains(want), "{cli:?}: {err}");
        }
    }

    #[test]
    fn bad_command_line_values_are_clap_errors() {
        assert!(Args::try_parse_from(["downbeat", "--wt-port", "70000"]).is_err());
        assert!(Args::try_parse_from(["downbeat", "--http-addr", "nowhere"]).is_err());
        assert!(Args::try_parse_from(["downbeat", "--no-such-flag"]).is_err());
    }
}
