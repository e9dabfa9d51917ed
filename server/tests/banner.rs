//! What the `downbeat` binary tells the person who started it, run as a real process: for the
//! demo, a loopback teacher page URL whose fragment carries the demo teacher secret (which
//! signs a teacher in, and appears nowhere else: not elsewhere in the banner, not in any log
//! line, even at debug level and through a teacher's sign-in); for configured schools, no
//! tokens and no secret at all.
#![cfg(unix)]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use downbeat_server::config::{TenantConfig, TenantLimits};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::Child;
use tokio::task::JoinHandle;

/// How long the server may take to print its banner, and to stop after SIGINT.
const WAIT: Duration = Duration::from_secs(20);

/// The server as a child process, and its banner.
struct Run {
    child: Child,
    banner: String,
    /// Everything the server logs, read as it comes (so the pipe never fills).
    logs: JoinHandle<std::io::Result<String>>,
}

/// Starts `downbeat` with `args` on free loopback ports, logging at debug level, and reads its
/// banner (stdout up to "Press Ctrl-C to stop.").
async fn start(data_dir: &Path, args: &[&str]) -> Result<Run> {
    let mut command = downbeat_tests::server_command(env!("CARGO_BIN_EXE_downbeat"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--http-addr", "127.0.0.1:0", "--wt-port", "0"])
        .args(args)
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1");
    let mut child = command.spawn().context("spawning the server")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let logs = tokio::spawn(async move {
        let mut logs = String::new();
        stderr.read_to_string(&mut logs).await?;
        Ok(logs)
    });
    let read = async {
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = String::new();
        while let Some(line) = lines.next_line().await? {
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("Press Ctrl-C to stop.") {
                return Ok(banner);
            }
        }
        bail!("the server's output ended before its banner did:\n{banner}")
    };
    let banner = tokio::time::timeout(WAIT, read).await.context("waiting for the banner")??;
    Ok(Run { child, banner, logs })
}

impl Run {
    /// The value after `label` on the banner's line that starts with it.
    fn line(&self, label: &str) -> Result<&str> {
        self.banner
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(str::trim)
            .with_context(|| format!("no {label:?} line in the banner:\n{}", self.banner))
    }

    /// Stops the server with SIGINT (a graceful shutdown, which logs too) and returns
    /// everything it logged.
    async fn stop(mut self) -> Result<String> {
        let pid = self.child.id().context("the server is running")?;
        let status = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status()?;
        ensure!(status.success(), "kill -INT {pid}: {status}");
        let logs = tokio::time::timeout(WAIT, self.logs).await.context("reading the logs")???;
        let exit = tokio::time::timeout(WAIT, self.child.wait()).await.context("waiting for the exit")??;
        ensure!(exit.success(), "the server exited with {exit}; its logs:\n{logs}");
        Ok(logs)
    }
}

async fn post_demo_token(http: &str, body: Value) -> Result<(u16, Value)> {
    let response = reqwest::Client::new().post(format!("{http}/api/demo/tokens")).json(&body).send().await?;
    Ok((response.status().as_u16(), response.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_banner_holds_the_teacher_secret_in_the_teacher_url_and_no_log_does() -> Result<()> {
    let data = tempfile::tempdir()?;
    let run = start(data.path(), &[]).await?;
    let http = run.line("HTTP API:")?.to_owned();
    ensure!(http.starts_with("http://127.0.0.1:"), "the demo's HTTP is on loopback: {http}");
    let teacher_page = run.line("Teacher page:")?;
    let (page, secret) = teacher_page.split_once("#secret=").with_context(|| format!("no secret in {teacher_page}"))?;
    assert_eq!(page, format!("{http}/teacher"));
    assert_eq!(secret.len(), 43, "32 random bytes in base64url: {secret}");
    assert!(secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{secret}");
    let secret = secret.to_owned();
    // The secret is in the teacher page's URL and nowhere else in the banner.
    assert_eq!(run.banner.matches(&secret).count(), 1, "{}", run.banner);
    assert_eq!(run.line("Student page:")?, format!("{http}/student"));
    // The demo prints its development tokens.
    assert!(run.banner.contains("Teacher token (t-1, Ms. Rivera):"), "{}", run.banner);

    // The secret from the banner signs a teacher in; nothing else does.
    let (status, answer) =
        post_demo_token(&http, json!({"role": "teacher", "name": "Ms. R", "secret": secret})).await?;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post_demo_token(&http, json!({"role": "teacher", "name": "Ms. R"})).await?;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("forbidden")), "{answer}");
    let (status, answer) = post_demo_token(&http, json!({"role": "student", "name": "Ana"})).await?;
    assert_eq!(status, 200, "{answer}");
    // A browser never sends the fragment: the page is served the same with or without one.
    let page = reqwest::get(teacher_page).await?;
    assert_eq!(page.status().as_u16(), 200);

    let logs = run.stop().await?;
    assert!(logs.contains("demo token minted"), "debug logging was on: {logs}");
    assert!(!logs.contains(&secret), "a log line holds the demo teacher secret:\n{logs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_school_gets_no_tokens_and_no_secret_in_the_banner() -> Result<()> {
    let data = tempfile::tempdir()?;
    #[derive(serde::Serialize)]
    struct File {
        tenants: Vec<TenantConfig>,
    }
    let config = data.path().join("downbeat.toml");
    let school = downbeat_tests::school("lincoln", &[7; 32], TenantLimits::default());
    std::fs::write(&config, toml::to_string(&File { tenants: vec![school] })?)?;
    let run = start(data.path(), &["--config", config.to_str().context("a UTF-8 path")?]).await?;
    assert_eq!(run.line("Tenants:")?, "lincoln");
    assert_eq!(run.line("Teacher page:")?, format!("{}/teacher", run.line("HTTP API:")?));
    for word in ["token", "Token", "secret", "eyJ"] {
        assert!(!run.banner.contains(word), "{word:?} in a school's banner:\n{}", run.banner);
    }
    run.stop().await?;
    Ok(())
}
