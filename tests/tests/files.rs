//! The server's files on disk: children's data and secrets readable by the server's user only.
#![cfg(unix)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use downbeat_tests::TestServer;

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path).with_context(|| path.display().to_string())?.permissions().mode() & 0o777)
}

/// Every file of the data directory that holds data or a secret, with the mode it must have.
fn private_files(data: &Path) -> Result<Vec<(std::path::PathBuf, u32)>> {
    let mut files = vec![
        (data.to_path_buf(), 0o700),
        (data.join("downbeat.sqlite3"), 0o600),
        (data.join("downbeat.sqlite3-wal"), 0o600),
        (data.join("downbeat.sqlite3-shm"), 0o600),
        (data.join("demo-tenant.secret"), 0o600),
        (data.join("certs"), 0o700),
    ];
    for entry in std::fs::read_dir(data.join("certs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "key") {
            files.push((path, 0o600));
        }
    }
    Ok(files)
}

#[tokio::test]
async fn a_new_data_directory_and_the_database_its_wal_secrets_and_keys_are_private() -> Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("state");
    let server = TestServer::start_with(|c| c.data_dir = data.clone()).await?;
    // A room's session row is written: the database is in use, its WAL too.
    server.create_room(&server.teacher("t-1"), 100.0, 4).await?;
    let files = private_files(&data)?;
    assert!(files.len() > 6, "no keys found: {files:?}");
    for (path, want) in files {
        assert_eq!(mode(&path)?, want, "{}", path.display());
    }
    Ok(())
}

#[tokio::test]
async fn an_existing_data_directory_and_database_open_to_others_are_made_private() -> Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("state");
    std::fs::create_dir(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))?;
    let database = data.join("downbeat.sqlite3");
    std::fs::write(&database, b"")?;
    std::fs::set_permissions(&database, std::fs::Permissions::from_mode(0o644))?;
    let server = TestServer::start_with(|c| c.data_dir = data.clone()).await?;
    server.create_room(&server.teacher("t-1"), 100.0, 4).await?;
    for (path, want) in private_files(&data)? {
        assert_eq!(mode(&path)?, want, "{}", path.display());
    }
    Ok(())
}
