//! The browser classroom over real sockets: pages and the browser package with their content
//! types, cross-origin isolation on every response, no way out of the served directories,
//! what a page needs to connect, the server clock, demo sign-in (teachers only with the demo
//! teacher secret), the demo's loopback-only default address, `/metrics` on its own address, and
//! the HTTPS listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use downbeat_certs::DevIdentity;
use downbeat_server::Config;
use downbeat_server::auth::Role;
use downbeat_server::config::TenantLimits;
use downbeat_tests::{TestServer, school};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Marks the contents of files outside the served directories: no answer may contain it.
const SECRET: &str = "secret-outside-the-served-directories";

/// A page directory and a package directory (with files beside them that must never be
/// served), in one temporary directory.
struct Site {
    root: tempfile::TempDir,
}

impl Site {
    fn new() -> Result<Self> {
        let root = tempfile::tempdir()?;
        let dir = root.path();
        std::fs::create_dir_all(dir.join("web"))?;
        std::fs::create_dir_all(dir.join("pkg/snippets/x-1"))?;
        let files: &[(&str, &[u8])] = &[
            ("web/index.html", b"<!doctype html><title>Downbeat</title>"),
            ("web/teacher.html", b"<!doctype html><title>Teacher</title>"),
            ("web/student.html", b"<!doctype html><title>Student</title>"),
            ("web/app.css", b"body { margin: 0 }"),
            ("web/classroom.js", b"export const hello = 1;"),
            ("pkg/package.json", b"{\"name\": \"downbeat-client\"}"),
            ("pkg/downbeat_client.js", b"export default function init() {}"),
            ("pkg/downbeat_client_bg.wasm", b"\0asm\x01\0\0\0"),
            ("pkg/downbeat_client.d.ts", b"export function init(): void;"),
            ("pkg/snippets/x-1/inline0.js", b"export const x = 1;"),
            ("pkg/.gitignore", SECRET.as_bytes()),
            ("Cargo.toml", SECRET.as_bytes()),
            ("secret.txt", SECRET.as_bytes()),
        ];
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes)?;
        }
        Ok(Self { root })
    }

    fn web(&self) -> PathBuf {
        self.root.path().join("web")
    }

    fn pkg(&self) -> PathBuf {
        self.root.path().join("pkg")
    }

    fn serve(&self, config: &mut Config) {
        config.web_dir = self.web();
        config.pkg_dir = self.pkg();
    }
}

/// Status, headers and body of one plain-HTTP GET.
async fn get(url: &str, headers: &[(&str, &str)]) -> Result<(u16, HeaderMap, Vec<u8>)> {
    let mut request = reqwest::Client::new().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    Ok((status, headers, response.bytes().await?.to_vec()))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The headers every response carries; `public` answers (readable by any origin) allow
/// cross-origin embedding.
fn assert_isolated(headers: &HeaderMap, public: bool, what: &str) {
    assert_eq!(header(headers, "cross-origin-opener-policy"), "same-origin", "{what}");
    assert_eq!(header(headers, "cross-origin-embedder-policy"), "require-corp", "{what}");
    let resource = if public { "cross-origin" } else { "same-origin" };
    assert_eq!(header(headers, "cross-origin-resource-policy"), resource, "{what}");
    assert_eq!(header(headers, "x-content-type-options"), "nosniff", "{what}");
}

/// Sends `head` (a request line and headers, without the blank line) over a fresh TCP
/// connection, byte for byte, and returns the status and the whole answer.
async fn raw(addr: SocketAddr, head: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).context(answer.clone())?;
    Ok((status, answer))
}

fn error_of(body: &[u8]) -> (String, String) {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let field = |name: &str| value["error"][name].as_str().unwrap_or("").to_owned();
    (field("code"), field("message"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn pages_and_package_are_served_with_their_types_and_isolation() -> Result<()> {
    let site = Site::new()?;
    let server = TestServer::start_with(|c| site.serve(c)).await?;
    let base = format!("http://{}", server.http);
    let cases = [
        ("/", "web/index.html", "text/html; charset=utf-8"),
        ("/teacher", "web/teacher.html", "text/html; charset=utf-8"),
        ("/student", "web/student.html", "text/html; charset=utf-8"),
        ("/teacher.html", "web/teacher.html", "text/html; charset=utf-8"),
        ("/student.html", "web/student.html", "text/html; charset=utf-8"),
        ("/index.html", "web/index.html", "text/html; charset=utf-8"),
        ("/app.css", "web/app.css", "text/css"),
        ("/classroom.js", "web/classroom.js", "text/javascript"),
        ("/pkg/package.json", "pkg/package.json", "application/json"),
        ("/pkg/downbeat_client.js", "pkg/downbeat_client.js", "text/javascript"),
        ("/pkg/downbeat_client_bg.wasm", "pkg/downbeat_client_bg.wasm", "application/wasm"),
        ("/pkg/downbeat_client.d.ts", "pkg/downbeat_client.d.ts", "text/plain; charset=utf-8"),
        ("/pkg/snippets/x-1/inline0.js", "pkg/snippets/x-1/inline0.js", "text/javascript"),
    ];
    for (path, file, content_type) in cases {
        let (status, headers, body) = get(&format!("{base}{path}"), &[]).await?;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, std::fs::read(site.root.path().join(file))?, "{path}");
        assert_eq!(header(&headers, "content-type"), content_type, "{path}");
        assert_eq!(header(&headers, "cache-control"), "no-cache", "{path}");
        assert_isolated(&headers, false, path);

        // Revalidation: the same ETag answers 304 without a body.
        let etag = header(&headers, "etag").to_owned();
        assert!(etag.starts_with('"'), "{path}: {etag:?}");
        let (status, headers, body) = get(&format!("{base}{path}"), &[("if-none-match", &etag)]).await?;
        assert_eq!((status, body.len()), (304, 0), "{path}");
        assert_isolated(&headers, false, path);
    }

    // A changed file gets a new ETag.
    let (_, headers, _) = get(&format!("{base}/app.css"), &[]).await?;
    let old = header(&headers, "etag").to_owned();
    std::fs::write(site.web().join("app.css"), "body { margin: 1px }")?;
    let (status, headers, body) = get(&format!("{base}/app.css"), &[("if-none-match", &old)]).await?;
    assert_eq!((status, body.as_slice()), (200, b"body { margin: 1px }".as_slice()));
    assert_ne!(header(&headers, "etag"), old);

    // Hidden files and directories are not served.
    for path in ["/pkg/.gitignore", "/pkg/snippets", "/pkg/snippets/", "/pkg/", "/nope.html"] {
        let (status, headers, body) = get(&format!("{base}{path}"), &[]).await?;
        assert_eq!(status, 404, "{path}");
        assert_eq!(error_of(&body).0, "bad_request", "{path}");
        assert_isolated(&headers, false, path);
    }
    Ok(())
}

#[tokio::test]
async fn every_response_is_cross_origin_isolated() -> Result<()> {
    let site = Site::new()?;
    let server = TestServer::start_with(|c| site.serve(c)).await?;
    let base = format!("http://{}", server.http);
    let teacher = server.teacher("t-1");
    let client = reqwest::Client::new();
    let cases = [
        (client.get(format!("{base}/api/ping")), 200, true),
        (client.get(format!("{base}/api/cert-hashes")), 200, true),
        (client.get(format!("{base}/api/client-config")), 200, true),
        (client.get(format!("{base}/api/time")), 200, true),
        (client.get(format!("{base}/api/rooms")).bearer_auth(&teacher), 200, false),
        (client.get(format!("{base}/api/rooms")), 401, false),
        (client.get(format!("{base}/metrics")), 200, false),
        (client.get(format!("{base}/api/no-such-thing")), 404, false),
        (client.delete(format!("{base}/api/ping")), 405, false),
        (client.post(format!("{base}/app.css")), 405, false),
        (client.post(format!("{base}/api/demo/tokens")).json(&json!({"role": "student"})), 400, false),
    ];
    for (request, want, public) in cases {
        let request = request.build()?;
        let what = format!("{} {}", request.method(), request.url().path());
        let response = client.execute(request).await?;
        assert_eq!(response.status().as_u16(), want, "{what}");
        assert_isolated(response.headers(), public, &what);
    }
    Ok(())
}

/// `--metrics-addr` moves `/metrics` to a listener of its own (an operator network): the
/// listeners pages and clients reach answer it like any unknown route, and the metrics
/// listener serves nothing else.
#[tokio::test]
async fn metrics_on_their_own_address_are_served_there_only() -> Result<()> {
    let server = TestServer::start_with(|c| c.metrics_addr = Some("127.0.0.1:0".parse().expect("an address"))).await?;
    let metrics = server.metrics.context("a metrics listener")?;
    assert_ne!(metrics, server.http);
    let (status, _, body) = get(&format!("http://{metrics}/metrics"), &[]).await?;
    let text = String::from_utf8(body)?;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\ndownbeat_sessions_active"), "{text}");
    for url in [format!("http://{}/metrics", server.http), format!("http://{metrics}/api/ping")] {
        let (status, _, body) = get(&url, &[]).await?;
        assert_eq!((status, error_of(&body).0.as_str()), (404, "bad_request"), "{url}");
    }
    // Without the setting, /metrics is on the HTTP listener as before.
    let server = TestServer::start().await?;
    assert_eq!(server.metrics, None);
    assert_eq!(get(&format!("http://{}/metrics", server.http), &[]).await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn nothing_outside_the_served_directories_is_reachable() -> Result<()> {
    let site = Site::new()?;
    let server = TestServer::start_with(|c| site.serve(c)).await?;
    let targets = [
        "/pkg/../Cargo.toml",
        "/pkg/../secret.txt",
        "/pkg/%2e%2e/Cargo.toml",
        "/pkg/%2E%2E/Cargo.toml",
        "/pkg/..%2fCargo.toml",
        "/pkg/..%2FCargo.toml",
        "/pkg/%2e%2e%2fCargo.toml",
        "/pkg/..%5cCargo.toml",
        "/pkg/.%2e/Cargo.toml",
        "/pkg/snippets/../../Cargo.toml",
        "/pkg/....//Cargo.toml",
        "/pkg//Cargo.toml",
        "/pkg/%2fetc%2fpasswd",
        "/pkg/.gitignore",
        "/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/..%2fCargo.toml",
        "/..%2fsecret.txt",
        "/%2e%2e%2fsecret.txt",
        "/web/../secret.txt",
    ];
    for target in targets {
        let (status, answer) = raw(server.http, &format!("GET {target} HTTP/1.1\r\nHost: localhost")).await?;
        assert!(matches!(status, 400 | 404), "{target}: {answer}");
        assert!(!answer.contains(SECRET), "{target} leaked: {answer}");
        if status == 404 {
            assert!(answer.contains("\"code\":\"bad_request\""), "{target}: {answer}");
            assert!(answer.contains("cross-origin-embedder-policy: require-corp"), "{target}: {answer}");
        }
    }
    // The same names, plainly, are served: the refusals above are about the path alone.
    let (status, answer) = raw(server.http, "GET /pkg/package.json HTTP/1.1\r\nHost: localhost").await?;
    assert_eq!(status, 200, "{answer}");
    Ok(())
}

#[tokio::test]
async fn a_missing_package_or_pages_directory_says_what_to_do() -> Result<()> {
    let site = Site::new()?;
    let missing = site.root.path().join("not-built");
    let server = TestServer::start_with(|c| {
        c.web_dir = site.root.path().join("no-pages");
        c.pkg_dir = missing.clone();
    })
    .await?;
    let base = format!("http://{}", server.http);
    for path in ["/pkg/downbeat_client.js", "/pkg/downbeat_client_bg.wasm", "/pkg/package.json"] {
        let (status, headers, body) = get(&format!("{base}{path}"), &[]).await?;
        assert_eq!(status, 404, "{path}");
        let (code, message) = error_of(&body);
        assert_eq!(code, "bad_request", "{path}");
        assert_eq!(message, "the browser package is not built: run scripts/build-wasm", "{path}");
        assert!(header(&headers, "content-type").starts_with("application/json"), "{path}");
        assert_isolated(&headers, false, path);
    }
    for path in ["/", "/teacher", "/student"] {
        let (status, _, body) = get(&format!("{base}{path}"), &[]).await?;
        assert_eq!(status, 404, "{path}");
        assert!(error_of(&body).1.contains("--web-dir"), "{path}");
    }
    // The API works without them.
    assert_eq!(server.http("GET", "/api/ping", None, None).await?.0, 200);

    // A package directory without the file asked for also says how to build it.
    std::fs::create_dir_all(&missing)?;
    let (status, _, body) = get(&format!("{base}/pkg/downbeat_client.js"), &[]).await?;
    assert_eq!(status, 404);
    let (code, message) = error_of(&body);
    assert_eq!(code, "bad_request");
    assert!(message.contains("scripts/build-wasm") && message.contains("downbeat_client.js"), "{message}");
    Ok(())
}

#[tokio::test]
async fn client_config_names_the_webtransport_url_and_the_hashes() -> Result<()> {
    let server = TestServer::start().await?;
    let wt = server.wt_port;
    let url = format!("http://{}/api/client-config", server.http);
    let hashes: Vec<Value> = server.hashes.iter().map(|h| Value::from(hex(h))).collect();
    assert_eq!(hashes.len(), 2, "current and next");
    let cases = [
        ("localhost:1234", format!("https://localhost:{wt}/")),
        ("localhost", format!("https://localhost:{wt}/")),
        ("music.school.example:4480", format!("https://music.school.example:{wt}/")),
        ("192.168.1.20:4480", format!("https://192.168.1.20:{wt}/")),
        ("[::1]:4480", format!("https://[::1]:{wt}/")),
        ("[fe80::1]", format!("https://[fe80::1]:{wt}/")),
    ];
    for (host, want) in cases {
        let (status, headers, body) = get(&url, &[("host", host)]).await?;
        assert_eq!(status, 200, "{host}");
        let body: Value = serde_json::from_slice(&body)?;
        assert_eq!(body, json!({"webtransport_url": want, "certificate_hashes": hashes, "demo": true}), "{host}");
        assert_eq!(header(&headers, "access-control-allow-origin"), "*");
        assert_eq!(header(&headers, "cache-control"), "no-store");
        assert_isolated(&headers, true, host);
    }

    // Without a Host header: the loopback address.
    let (status, answer) = raw(server.http, "GET /api/client-config HTTP/1.1").await?;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(&format!("\"webtransport_url\":\"https://127.0.0.1:{wt}/\"")), "{answer}");

    // A Host that is no host is refused.
    for host in ["[nope]:1", "host:port", "a\"b"] {
        let (status, _, body) = get(&url, &[("host", host)]).await?;
        assert_eq!((status, error_of(&body).0.as_str()), (400, "bad_request"), "{host}");
    }

    // The published hashes are the ones WebTransport presents.
    let (_, _, body) = get(&url, &[]).await?;
    let body: Value = serde_json::from_slice(&body)?;
    assert_eq!(body["certificate_hashes"], Value::from(hashes));
    Ok(())
}

#[tokio::test]
async fn a_public_webtransport_url_is_given_as_configured() -> Result<()> {
    let public = "https://music.district.example:443/wt";
    let server = TestServer::start_with(|c| c.public_wt_url = Some(public.to_owned())).await?;
    let url = format!("http://{}/api/client-config", server.http);
    for host in ["localhost:1234", "[::1]:4480"] {
        let (status, _, body) = get(&url, &[("host", host)]).await?;
        assert_eq!(status, 200);
        let body: Value = serde_json::from_slice(&body)?;
        assert_eq!(body["webtransport_url"], public, "{host}");
    }
    Ok(())
}

#[tokio::test]
async fn server_time_is_the_server_clock_within_the_round_trip() -> Result<()> {
    let server = TestServer::start().await?;
    let url = format!("http://{}/api/time", server.http);
    let client = reqwest::Client::new();
    let mut last = f64::MIN;
    for _ in 0..5 {
        let before = server.clock.now().0 as f64 / 1e6;
        let response = client.get(&url).send().await?;
        let after = server.clock.now().0 as f64 / 1e6;
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(header(response.headers(), "cache-control"), "no-store");
        assert_eq!(header(response.headers(), "access-control-allow-origin"), "*");
        let body: Value = response.json().await?;
        let now = body["server_now_ms"].as_f64().context("server_now_ms")?;
        assert!(before <= now && now <= after, "{before} <= {now} <= {after}");
        assert!(now > last, "{now} after {last}");
        last = now;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Posts a demo sign-in and returns status and body.
async fn demo_sign_in(server: &TestServer, body: Value) -> Result<(u16, Value)> {
    server.http("POST", "/api/demo/tokens", None, Some(body)).await
}

/// The server's demo teacher secret.
fn teacher_secret(server: &TestServer) -> Result<String> {
    server.demo_teacher_secret.clone().context("a demo server has a teacher secret")
}

#[tokio::test]
async fn demo_sign_in_mints_working_tokens() -> Result<()> {
    let server = TestServer::start().await?;
    let secret = teacher_secret(&server)?;
    let (status, teacher) =
        demo_sign_in(&server, json!({"role": "teacher", "name": "  Ms. Rivera ", "secret": secret})).await?;
    assert_eq!(status, 200, "{teacher}");
    let token = teacher["token"].as_str().context("token")?;
    let sub = teacher["sub"].as_str().context("sub")?;
    assert!(sub.starts_with("demo-t-") && sub.len() == "demo-t-".len() + 8, "{sub}");
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let expires_at = teacher["expires_at"].as_u64().context("expires_at")?;
    assert!((now + 12 * 3600 - 5..=now + 12 * 3600 + 5).contains(&expires_at), "{expires_at} vs {now}");
    let principal = server.tenants.verify(token)?;
    assert_eq!(
        (principal.role, principal.name.as_str(), principal.subject.as_str()),
        (Role::Teacher, "Ms. Rivera", sub)
    );
    assert_eq!(principal.expires_at_unix, expires_at);
    // The token works: the teacher lists (no) rooms and makes one.
    assert_eq!(server.http("GET", "/api/rooms", Some(token), None).await?, (200, json!({"rooms": []})));
    let code = server.create_room(token, 100.0, 3).await?;

    let (status, student) = demo_sign_in(&server, json!({"role": "student", "name": "Ana"})).await?;
    assert_eq!(status, 200, "{student}");
    let student_token = student["token"].as_str().context("token")?;
    let student_sub = student["sub"].as_str().context("sub")?;
    assert!(student_sub.starts_with("demo-s-"), "{student_sub}");
    let principal = server.tenants.verify(student_token)?;
    assert_eq!((principal.role, principal.name.as_str()), (Role::Student, "Ana"));
    // A student may not do what a teacher does, but joins the teacher's room.
    let (status, body) = server.http("GET", "/api/rooms", Some(student_token), None).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")));
    let client = server.connect(&code, student_token).await?;
    drop(client);

    // Every sign-in is a new pseudonymous person.
    let (_, again) = demo_sign_in(&server, json!({"role": "student", "name": "Ana"})).await?;
    assert_ne!(again["sub"], student["sub"]);
    // Names up to the protocol's limit are taken.
    let (status, _) = demo_sign_in(&server, json!({"role": "student", "name": "é".repeat(32)})).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test]
async fn a_demo_teacher_or_admin_token_needs_the_teacher_secret_and_students_need_none() -> Result<()> {
    let server = TestServer::start().await?;
    let secret = teacher_secret(&server)?;
    // A random one for this run: 32 bytes, base64url.
    assert_eq!(secret.len(), 43, "{secret}");
    let near_miss = format!("{}{}", &secret[..42], if secret.ends_with('A') { 'B' } else { 'A' });
    let wrong = [
        json!({"role": "teacher", "name": "Mallory"}),
        json!({"role": "teacher", "name": "Mallory", "secret": null}),
        json!({"role": "teacher", "name": "Mallory", "secret": ""}),
        json!({"role": "teacher", "name": "Mallory", "secret": "guess"}),
        json!({"role": "teacher", "name": "Mallory", "secret": &secret[..42]}),
        json!({"role": "teacher", "name": "Mallory", "secret": near_miss}),
        json!({"role": "teacher", "name": "Mallory", "secret": format!("{secret}x")}),
        json!({"role": "teacher", "name": "Mallory", "secret": secret.to_uppercase()}),
        // An admin exports and deletes children's data: the same secret guards it.
        json!({"role": "admin", "name": "Mallory"}),
        json!({"role": "admin", "name": "Mallory", "secret": "guess"}),
    ];
    for body in &wrong {
        let (status, answer) = demo_sign_in(&server, body.clone()).await?;
        assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("forbidden")), "{body}: {answer}");
        assert!(answer.get("token").is_none(), "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("teacher secret") && !message.contains(&secret), "{message}");
    }
    assert_eq!(server.stats.refused.get(downbeat_protocol::ErrorCode::Forbidden), wrong.len() as u64);

    // With the secret, a teacher token that runs the class.
    let (status, answer) =
        demo_sign_in(&server, json!({"role": "teacher", "name": "Ms. Rivera", "secret": secret})).await?;
    assert_eq!(status, 200, "{answer}");
    let teacher = answer["token"].as_str().context("token")?;
    assert_eq!(server.tenants.verify(teacher)?.role, Role::Teacher);
    let code = server.create_room(teacher, 100.0, 4).await?;
    let (status, answer) = demo_sign_in(&server, json!({"role": "admin", "name": "Data", "secret": secret})).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(server.tenants.verify(answer["token"].as_str().context("token")?)?.role, Role::Admin);

    // Students sign in by name alone, and a secret (right or wrong) makes them no teacher.
    for body in [
        json!({"role": "student", "name": "Ana"}),
        json!({"role": "student", "name": "Ben", "secret": "guess"}),
        json!({"role": "student", "name": "Chloe", "secret": secret}),
    ] {
        let (status, answer) = demo_sign_in(&server, body.clone()).await?;
        assert_eq!(status, 200, "{body}: {answer}");
        let token = answer["token"].as_str().context("token")?;
        assert_eq!(server.tenants.verify(token)?.role, Role::Student, "{body}");
        drop(server.connect(&code, token).await?);
    }

    // A configured secret is the one asked for.
    let chosen = "our-staff-room-secret-2026";
    let server = TestServer::start_with(|c| c.demo_teacher_secret = Some(chosen.parse().expect("any text"))).await?;
    assert_eq!(server.demo_teacher_secret.as_deref(), Some(chosen));
    let (status, _) = demo_sign_in(&server, json!({"role": "teacher", "name": "T", "secret": secret})).await?;
    assert_eq!(status, 403, "another run's secret is refused");
    let (status, _) = demo_sign_in(&server, json!({"role": "teacher", "name": "T", "secret": chosen})).await?;
    assert_eq!(status, 200);
    Ok(())
}

/// The demo binds its HTTP listener to loopback unless told otherwise: this binds the real
/// default port, 4480, so it fails if another server holds that port on this machine.
#[tokio::test]
async fn the_demo_listens_on_loopback_only_by_default() -> Result<()> {
    let server = TestServer::start_with(|c| c.http_addr = None).await?;
    assert_eq!(server.http, "127.0.0.1:4480".parse::<SocketAddr>()?);
    assert_eq!(server.http("GET", "/api/ping", None, None).await?.0, 200);
    // From this machine's own non-loopback address (the one it would reach the internet
    // from, if it has one; connecting a UDP socket sends nothing), the port is closed.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let outward = probe.connect("192.0.2.1:9").and_then(|()| probe.local_addr()).map(|a| a.ip());
    match outward {
        Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => {
            let reached = tokio::net::TcpStream::connect((ip, 4480)).await;
            assert!(reached.is_err(), "the demo's HTTP port answers on {ip}");
            eprintln!("port 4480 closed on {ip}, as it should be");
        }
        other => eprintln!("no non-loopback address to probe from ({other:?}); the bound address was checked"),
    }
    Ok(())
}

#[tokio::test]
async fn demo_sign_in_refuses_bad_names_and_roles() -> Result<()> {
    let server = TestServer::start().await?;
    let cases = [
        json!({"role": "student", "name": ""}),
        json!({"role": "student", "name": "   "}),
        json!({"role": "student", "name": "a".repeat(65)}),
        json!({"role": "student", "name": "é".repeat(33)}),
        json!({"role": "student", "name": "Ana\nBen"}),
        json!({"role": "principal", "name": "Ana"}),
        json!({"role": "student", "name": "Ana\u{0}"}),
        json!({"role": "student", "name": "Ana\u{2028}Ben"}),
        json!({"role": "Teacher", "name": "Ana"}),
        json!({"role": "student"}),
        json!({"name": "Ana"}),
        json!({"role": "student", "name": "Ana", "tenant": "other"}),
        json!({"role": "student", "name": 7}),
    ];
    for body in cases {
        let (status, answer) = demo_sign_in(&server, body.clone()).await?;
        assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("bad_request")), "{body}: {answer}");
    }
    let (_, answer) = demo_sign_in(&server, json!({"role": "principal", "name": "Ana"})).await?;
    assert!(answer["error"]["message"].as_str().unwrap_or("").contains("admin"), "{answer}");
    let (_, answer) = demo_sign_in(&server, json!({"role": "student", "name": ""})).await?;
    assert!(answer["error"]["message"].as_str().unwrap_or("").contains("64"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn demo_sign_in_is_rate_limited_per_client() -> Result<()> {
    let server = TestServer::start().await?;
    let mut taken = 0;
    let refusal = loop {
        let (status, body) = demo_sign_in(&server, json!({"role": "student", "name": "Ana"})).await?;
        if status != 200 {
            break (status, body);
        }
        taken += 1;
        ensure!(taken < 80, "never refused");
    };
    assert!((60..80).contains(&taken), "{taken}");
    assert_eq!((refusal.0, refusal.1["error"]["code"].as_str()), (429, Some("rate_limited")), "{}", refusal.1);
    assert!(server.stats.refused.get(downbeat_protocol::ErrorCode::RateLimited) >= 1);
    Ok(())
}

#[tokio::test]
async fn demo_sign_in_exists_only_for_the_demo_tenant() -> Result<()> {
    let server = TestServer::start_with(|c| c.tenants = vec![school("a", &[7; 32], TenantLimits::default())]).await?;
    let body = json!({"role": "teacher", "name": "Ms. Rivera"});
    let unknown = server.http("POST", "/api/no-such-route", None, Some(body.clone())).await?;
    assert_eq!(unknown.0, 404);
    assert_eq!(server.http("POST", "/api/demo/tokens", None, Some(body)).await?, unknown);
    let (_, config) = server.http("GET", "/api/client-config", None, None).await?;
    assert_eq!(config["demo"], false);
    Ok(())
}

/// A development identity made before the server starts, so the test knows the certificate
/// the server loads from the same directory.
fn dev_identity(data: &Path) -> Result<DevIdentity> {
    let names: Vec<String> = ["localhost", "127.0.0.1", "::1"].iter().map(|s| (*s).to_owned()).collect();
    Ok(DevIdentity::load_or_create(&data.join("certs"), &names, SystemTime::now())?)
}

/// A client that trusts only `cert_der`.
fn https_client(cert_der: &[u8]) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_der(cert_der)?)
        .build()?)
}

#[tokio::test]
async fn https_serves_the_pages_with_the_development_certificate() -> Result<()> {
    let site = Site::new()?;
    let data = tempfile::tempdir()?;
    let identity = dev_identity(data.path())?;
    let server = TestServer::start_with(|c| {
        site.serve(c);
        c.data_dir = data.path().to_path_buf();
        c.https_addr = Some("127.0.0.1:0".parse().expect("an address"));
    })
    .await?;
    assert_eq!(server.hashes.first(), Some(&identity.current.sha256()), "the server loaded the prepared identity");
    let https = server.https.context("an HTTPS address")?;
    assert_ne!(https.port(), server.http.port());

    // A client that sends nothing holds no one up.
    let _silent = tokio::net::TcpStream::connect(https).await?;

    let client = https_client(&identity.current.cert_der)?;
    let base = format!("https://127.0.0.1:{}", https.port());
    let response = client.get(format!("{base}/")).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(header(response.headers(), "content-type"), "text/html; charset=utf-8");
    assert_isolated(response.headers(), false, "GET / over HTTPS");
    assert_eq!(response.bytes().await?.as_ref(), std::fs::read(site.web().join("index.html"))?.as_slice());

    let response = client.get(format!("{base}/pkg/downbeat_client_bg.wasm")).send().await?;
    assert_eq!(header(response.headers(), "content-type"), "application/wasm");

    let config: Value = client.get(format!("{base}/api/client-config")).send().await?.json().await?;
    assert_eq!(config["webtransport_url"], format!("https://127.0.0.1:{}/", server.wt_port));
    let hashes: Vec<Value> = server.hashes.iter().map(|h| Value::from(hex(h))).collect();
    assert_eq!(config["certificate_hashes"], Value::from(hashes));

    let (status, _) = demo_sign_in_over(&client, &base).await?;
    assert_eq!(status, 200);

    // A client that does not trust the certificate is refused.
    let stranger = reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).build()?;
    assert!(stranger.get(format!("{base}/")).send().await.is_err());
    Ok(())
}

async fn demo_sign_in_over(client: &reqwest::Client, base: &str) -> Result<(u16, Value)> {
    let response =
        client.post(format!("{base}/api/demo/tokens")).json(&json!({"role": "student", "name": "Ana"})).send().await?;
    Ok((response.status().as_u16(), response.json().await?))
}

#[tokio::test]
async fn https_serves_production_certificates() -> Result<()> {
    let site = Site::new()?;
    let certs = tempfile::tempdir()?;
    let identity = dev_identity(certs.path())?;
    let (cert_pem, key_pem) = identity.current.to_pem();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, cert_pem)?;
    std::fs::write(&key, key_pem)?;
    let server = TestServer::start_with(|c| {
        site.serve(c);
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
        c.https_addr = Some("127.0.0.1:0".parse().expect("an address"));
    })
    .await?;
    let https = server.https.context("an HTTPS address")?;
    let client = https_client(&identity.current.cert_der)?;
    let base = format!("https://127.0.0.1:{}", https.port());
    let response = client.get(format!("{base}/teacher")).send().await?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.bytes().await?.as_ref(), std::fs::read(site.web().join("teacher.html"))?.as_slice());
    let config: Value = client.get(format!("{base}/api/client-config")).send().await?.json().await?;
    assert_eq!(config["certificate_hashes"], json!([]), "browser-trusted certificates need no pinning");
    Ok(())
}
