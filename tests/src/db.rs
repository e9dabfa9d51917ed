//! Fresh, empty databases for the store's tests, on either backend, and outages on demand.
//!
//! - SQLite: a file in a temporary directory, removed with the helper.
//! - PostgreSQL: `CREATE DATABASE downbeat_test_<random>` on the server named by
//!   `DOWNBEAT_TEST_POSTGRES_URL` (default [`DEFAULT_POSTGRES_URL`]), dropped `WITH (FORCE)`
//!   when the helper is dropped or by [`TestDatabase::drop_now`]. `./scripts/test` starts a
//!   local server and creates the role. A server that cannot be reached fails the test with
//!   a message saying how to start one: a backend is never skipped silently.
//!
//! [`TestDatabase::make_unavailable`] takes the database away from its clients the way
//! production loses it, so tests can see writes fail as retryable and then recover.
//! [`on_both_backends!`](crate::on_both_backends) runs an end-to-end test on each backend.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Executor};

/// The PostgreSQL server the tests use unless `DOWNBEAT_TEST_POSTGRES_URL` names another: a
/// local one with the role `./scripts/test` creates. Its database is only used to create and
/// drop the test databases.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://downbeat:downbeat@127.0.0.1:5432/postgres";

/// How long connecting to the PostgreSQL server may take before the test fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Which database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// A fresh, empty database for one test. Removed when dropped.
#[derive(Debug)]
pub struct TestDatabase {
    url: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Sqlite {
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
    Postgres {
        /// The server's URL with the maintenance database (it holds a password: never print).
        admin_url: String,
        name: String,
        dropped: bool,
    },
}

impl TestDatabase {
    /// Creates an empty database on `backend`.
    ///
    /// # Panics
    ///
    /// If PostgreSQL cannot be reached (with how to start it) or refuses to create a database.
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("creating a temporary directory");
                let path = dir.path().join("sel.db");
                Self { url: format!("sqlite://{}", path.display()), kind: Kind::Sqlite { path, _dir: dir } }
            }
            Backend::Postgres => {
                let admin_url =
                    std::env::var("DOWNBEAT_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
                let name = format!("downbeat_test_{:016x}", rand::random::<u64>());
                let mut admin = admin_connect(&admin_url).await;
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await
                    .unwrap_or_else(|e| panic!("creating database {name} on {}: {e}", redact(&admin_url)));
                let _ = admin.close().await;
                let url = with_database(&admin_url, &name);
                Self { url, kind: Kind::Postgres { admin_url, name, dropped: false } }
            }
        }
    }

    /// The URL to give `Store::open` (it holds a password on PostgreSQL: do not print it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        match self.kind {
            Kind::Sqlite { .. } => Backend::Sqlite,
            Kind::Postgres { .. } => Backend::Postgres,
        }
    }

    /// Runs `sql` as the administrator: on PostgreSQL in the server's maintenance database
    /// (for `ALTER DATABASE`, `pg_terminate_backend`, ...; the test database's name is
    /// [`TestDatabase::postgres_name`]), on SQLite in the test file over a connection of its
    /// own.
    pub async fn admin_execute(&self, sql: &str) -> anyhow::Result<()> {
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path)).await?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await?;
            }
            Kind::Postgres { admin_url, .. } => {
                let mut conn = admin_connect(admin_url).await;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await?;
            }
        }
        Ok(())
    }

    /// Runs `sql` in the test database itself, over a connection of its own (to change its
    /// schema under a running server, e.g. a rule that refuses some rows).
    pub async fn execute(&self, sql: &str) -> anyhow::Result<()> {
        match &self.kind {
            // On SQLite the administrator's connection is one to the test file.
            Kind::Sqlite { .. } => return self.admin_execute(sql).await,
            Kind::Postgres { .. } => {
                let mut conn = PgConnection::connect_with(&PgConnectOptions::from_str(&self.url)?).await?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await?;
            }
        }
        Ok(())
    }

    /// Makes the PostgreSQL database read-only (`default_transaction_read_only`, as on a
    /// standby or a database an operator froze) and ends every open session, so new ones
    /// pick it up; [`Outage::end`] makes it writable again for sessions opened from then on
    /// (open ones keep read-only, as PostgreSQL does: the client must reconnect). On SQLite,
    /// `None`.
    ///
    /// # Panics
    ///
    /// If it cannot be set up.
    pub async fn make_read_only(&self) -> Option<Outage> {
        let Kind::Postgres { admin_url, name, .. } = &self.kind else { return None };
        alter_database(admin_url, name, "SET default_transaction_read_only = on", true).await;
        Some(Outage { kind: OutageKind::ReadOnly { admin_url: admin_url.clone(), name: name.clone() } })
    }

    /// The PostgreSQL database's name (`None` on SQLite).
    pub fn postgres_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Postgres { name, .. } => Some(name),
            Kind::Sqlite { .. } => None,
        }
    }

    /// Takes the database away from every client until [`Outage::end`]:
    ///
    /// - PostgreSQL: the database stops accepting connections and every open connection to
    ///   it is terminated (as when the server restarts or the network drops).
    /// - SQLite: another connection holds the write lock (`BEGIN EXCLUSIVE`), so writers wait
    ///   out their busy timeout and fail as busy.
    ///
    /// # Panics
    ///
    /// If the outage cannot be set up.
    pub async fn make_unavailable(&self) -> Outage {
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                let options = SqliteConnectOptions::new().filename(path).busy_timeout(Duration::from_secs(5));
                let mut conn = SqliteConnection::connect_with(&options).await.expect("opening a lock connection");
                sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut conn).await.expect("taking the write lock");
                Outage { kind: OutageKind::Sqlite(conn) }
            }
            Kind::Postgres { admin_url, name, .. } => {
                alter_database(admin_url, name, "ALLOW_CONNECTIONS false", true).await;
                Outage { kind: OutageKind::Postgres { admin_url: admin_url.clone(), name: name.clone() } }
            }
        }
    }

    /// Drops the PostgreSQL database now (dropping the helper does it too, blocking a
    /// thread). Removes the SQLite file.
    pub async fn drop_now(mut self) {
        if let Kind::Postgres { admin_url, name, dropped } = &mut self.kind {
            drop_database(admin_url, name).await;
            *dropped = true;
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Kind::Postgres { admin_url, name, dropped: false } = &self.kind else { return };
        let (admin_url, name) = (admin_url.clone(), name.clone());
        // Drop cannot await, and the test's runtime may be single-threaded: drop the
        // database from a thread with a runtime of its own.
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(runtime) = runtime {
                runtime.block_on(drop_database(&admin_url, &name));
            }
        });
        let _ = dropper.join();
    }
}

/// A database outage from [`TestDatabase::make_unavailable`]; [`Outage::end`] ends it.
#[derive(Debug)]
#[must_use = "the outage lasts until `end` is called"]
pub struct Outage {
    kind: OutageKind,
}

#[derive(Debug)]
enum OutageKind {
    Sqlite(SqliteConnection),
    Postgres { admin_url: String, name: String },
    ReadOnly { admin_url: String, name: String },
}

impl Outage {
    /// Makes the database available again.
    ///
    /// # Panics
    ///
    /// If it cannot.
    pub async fn end(self) {
        match self.kind {
            OutageKind::Sqlite(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.expect("releasing the write lock");
                conn.close().await.expect("closing the lock connection");
            }
            OutageKind::Postgres { admin_url, name } => {
                alter_database(&admin_url, &name, "ALLOW_CONNECTIONS true", false).await;
            }
            // Sessions opened while it was read-only keep the setting: healing them is the
            // client's work (as after an operator's freeze), so they are left as they are.
            OutageKind::ReadOnly { admin_url, name } => {
                alter_database(&admin_url, &name, "RESET default_transaction_read_only", false).await;
            }
        }
    }
}

/// Runs `ALTER DATABASE name change` as the administrator, then (if `terminate`) ends every
/// session of the database, so the change holds for every session from then on.
async fn alter_database(admin_url: &str, name: &str, change: &str, terminate: bool) {
    let mut admin = admin_connect(admin_url).await;
    admin
        .execute(format!("ALTER DATABASE {name} {change}").as_str())
        .await
        .unwrap_or_else(|e| panic!("ALTER DATABASE {name} {change}: {e}"));
    if terminate {
        terminate_sessions(&mut admin, name).await;
    }
    let _ = admin.close().await;
}

/// Ends every session of the database `name` and waits until they are gone
/// (`pg_terminate_backend` only signals), so a change made before holds for every later one.
async fn terminate_sessions(admin: &mut PgConnection, name: &str) {
    let terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()";
    let remaining = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        sqlx::query(terminate).bind(name).execute(&mut *admin).await.expect("terminating sessions");
        let n: i64 = sqlx::query_scalar(remaining).bind(name).fetch_one(&mut *admin).await.expect("counting sessions");
        if n == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} sessions outlived pg_terminate_backend");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects to the PostgreSQL server, or panics saying how to get one.
async fn admin_connect(admin_url: &str) -> PgConnection {
    let options = PgConnectOptions::from_str(admin_url)
        .unwrap_or_else(|e| panic!("DOWNBEAT_TEST_POSTGRES_URL ({}) is not a valid URL: {e}", redact(admin_url)));
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await;
    match connect {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!("{}", unreachable_message(admin_url, &e.to_string())),
        Err(_) => panic!("{}", unreachable_message(admin_url, "timed out")),
    }
}

fn unreachable_message(admin_url: &str, why: &str) -> String {
    format!(
        "PostgreSQL is not reachable at {} ({why}). The store tests run on PostgreSQL as well as \
         SQLite and are never skipped. Run them through ./scripts/test, which starts a local \
         PostgreSQL (installing Debian's `postgresql` if needed) and creates the role; or start \
         one yourself (`pg_ctlcluster <version> main start`, see `pg_lsclusters`) and create the \
         role with `runuser -u postgres -- psql -c \"CREATE ROLE downbeat LOGIN CREATEDB PASSWORD \
         'downbeat'\"`; or set DOWNBEAT_TEST_POSTGRES_URL to a server where the user may create \
         databases.",
        redact(admin_url)
    )
}

async fn drop_database(admin_url: &str, name: &str) {
    let Ok(options) = PgConnectOptions::from_str(admin_url) else { return };
    let Ok(Ok(mut admin)) = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options)).await else {
        return;
    };
    let _ = admin.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str()).await;
    let _ = admin.close().await;
}

/// `url` with its path (the database name) replaced by `name`, query string kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// `url` without the password, for messages.
fn redact(url: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[authority_start..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..authority_start], &rest[at..])
        }
        None => url.to_owned(),
    }
}

/// Runs each `async fn $name(Backend) -> anyhow::Result<()>` as two tests, `$name::sqlite` and
/// `$name::postgres`, each on a two-thread runtime (a server and its clients).
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() -> anyhow::Result<()> {
                super::$name($crate::db::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() -> anyhow::Result<()> {
                super::$name($crate::db::Backend::Postgres).await
            }
        }
    )*};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_replace_the_path() {
        let check = |url: &str, expected: &str| assert_eq!(with_database(url, "t"), expected);
        check("postgres://u:p@h:5432/postgres", "postgres://u:p@h:5432/t");
        check("postgres://u:p@h:5432", "postgres://u:p@h:5432/t");
        check("postgresql://u@h/db?sslmode=require", "postgresql://u@h/t?sslmode=require");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
