//! Children's words and names never reach the log: a whole SEL round (prompt, reflection,
//! notes, summary, export, delete) runs with every Downbeat and sqlx log line captured at
//! TRACE, and the capture holds neither the child's display name nor what they wrote.
//!
//! A file of its own: it installs the process-wide tracing subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::{Result, ensure};
use downbeat_server::auth::Role;
use downbeat_tests::TestServer;
use downbeat_tests::db::{Backend, TestDatabase};
use serde_json::json;

/// Log output, kept in memory.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const NAME: &str = "Zelda Quartermain";
const WORDS: &str = "I felt brave when I played the drum solo 4711";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_name_or_reflection_text_is_logged() -> Result<()> {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "trace,quinn=info,quinn_proto=info,wtransport=info,h3=info,rustls=info,hyper=info,reqwest=info",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let db = TestDatabase::new(Backend::Sqlite).await;
    let url = db.url().to_owned();
    let server = TestServer::start_with(|c| c.database_url = Some(url)).await?;
    let teacher_token = server.teacher("t-1");
    let code = server.create_room(&teacher_token, 120.0, 4).await?;
    let teacher = server.connect(&code, &teacher_token).await?;
    let zelda = server.connect(&code, &server.token(Role::Student, "s-zq", NAME)).await?;
    teacher.set_prompt("What made you proud?").await?;
    downbeat_tests::events_until(&zelda, |e| matches!(e, downbeat_client::Event::Prompt(Some(_)))).await?;
    let prompt = zelda.prompt().map(|p| p.id).unwrap_or_default();
    zelda.wait_synced(std::time::Duration::from_secs(10)).await?;
    zelda.play_note(60, 100, 0)?;
    zelda.reflect([9; 16], prompt, Some(4), Some(WORDS)).await?;
    downbeat_tests::events_until(&teacher, |e| matches!(e, downbeat_client::Event::Reflection(_))).await?;
    // Export and delete are the school admin's.
    let admin_token = server.admin("a-1");
    for (method, path, token) in [
        ("GET", format!("/api/rooms/{code}/sel"), &teacher_token),
        ("GET", "/api/students/s-zq/summary".to_owned(), &teacher_token),
        ("GET", "/api/students/s-zq/export".to_owned(), &admin_token),
        ("DELETE", "/api/students/s-zq".to_owned(), &admin_token),
    ] {
        let (status, body) = server.http(method, &path, Some(token), None).await?;
        ensure!(status == 200, "{method} {path}: {status} {body}");
    }
    let (status, _) = server
        .http("POST", &format!("/api/rooms/{code}/prompt"), Some(&teacher_token), Some(json!({"text": ""})))
        .await?;
    ensure!(status == 200);
    drop((zelda, teacher, server));

    let log =
        String::from_utf8_lossy(&capture.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned();
    // The capture is real: the round was logged.
    ensure!(log.contains("student data deleted") && log.contains("reflection prompt set"), "log capture is empty");
    ensure!(!log.contains(NAME) && !log.contains("Zelda"), "a child's name reached the log");
    ensure!(!log.contains("drum solo 4711"), "a reflection's words reached the log");
    Ok(())
}
