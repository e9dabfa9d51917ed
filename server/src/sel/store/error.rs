//! The store's error: retryable or not, and safe to log.
//!
//! A driver's error text can hold row data (PostgreSQL quotes offending values) and a
//! connection error can echo the URL, so nothing of it is kept: a [`StoreError`] holds the
//! operation, a classification and the database's error code.

use std::fmt;
use std::io;

use sqlx::migrate::MigrateError;

/// What went wrong in the store. Its text never holds a password, a student id or any
/// other row data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database URL or options are not usable.
    #[error("the database URL is not valid: {0}")]
    InvalidUrl(&'static str),
    /// The database could not be reached or could not take the work now (connection refused
    /// or lost, pool timeout, locked or busy, disk full, I/O): worth retrying later.
    #[error("database unavailable during {0}")]
    Unavailable(Detail),
    /// The database refused the work (a constraint, a type, a permission) or answered with
    /// data this version cannot read: retrying the same work will fail the same way.
    #[error("database error during {0}")]
    Failed(Detail),
    /// The schema could not be brought up to date.
    #[error("migrating the database failed: {0}")]
    Migration(MigrationProblem),
}

impl StoreError {
    /// The same work may succeed later: the database was unreachable or busy, not wrong.
    /// Writes are idempotent, so a retry after an unknown outcome is safe.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Migration(MigrationProblem::Database(d)) => d.unavailable,
            Self::InvalidUrl(_) | Self::Failed(_) | Self::Migration(_) => false,
        }
    }

    /// The database refused the rows themselves (a constraint, a value it cannot store):
    /// writing the same rows again fails the same way, while other rows still go in. The
    /// writer fails only the job holding them.
    pub fn is_refused_data(&self) -> bool {
        match self {
            Self::Failed(d) => d.cause.refuses_data(),
            _ => false,
        }
    }

    /// The database refused to write because it is read-only now (a standby, or writes
    /// turned off): PostgreSQL's `25006`, SQLite's `SQLITE_READONLY` family.
    pub fn is_read_only(&self) -> bool {
        match self {
            Self::Unavailable(d) | Self::Failed(d) => match &d.cause {
                Cause::Postgres(code) => code == "25006",
                Cause::Sqlite(code) => code.parse::<i32>().is_ok_and(|c| c & 0xff == 8),
                _ => false,
            },
            _ => false,
        }
    }

    /// Classifies a driver error from a statement of `op`.
    pub(crate) fn from_sqlx(op: &'static str, error: sqlx::Error) -> Self {
        Self::from_detail(Detail::new(op, &error))
    }

    /// Classifies a driver error from getting a connection (or beginning a transaction) for
    /// `op`. Nothing of the work was looked at yet, so whatever failed is the database's
    /// availability (a refusal to connect, e.g. a database closed to connections, included),
    /// except a configuration the driver rejects.
    pub(crate) fn connecting(op: &'static str, error: sqlx::Error) -> Self {
        let mut detail = Detail::new(op, &error);
        if !matches!(error, sqlx::Error::Configuration(_)) {
            detail.unavailable = true;
        }
        Self::from_detail(detail)
    }

    /// A value read back that this version does not understand.
    pub(crate) fn corrupt(op: &'static str) -> Self {
        Self::Failed(Detail { op, cause: Cause::Decode, unavailable: false })
    }

    pub(crate) fn from_migrate(error: MigrateError) -> Self {
        let problem = match error {
            MigrateError::Execute(e) | MigrateError::ExecuteMigration(e, _) => {
                MigrationProblem::Database(Detail::new("migration", &e))
            }
            MigrateError::VersionMissing(v) | MigrateError::VersionTooNew(v, _) => MigrationProblem::Newer(v),
            MigrateError::VersionMismatch(v) => MigrationProblem::Modified(v),
            MigrateError::Dirty(v) => MigrationProblem::Dirty(v),
            _ => MigrationProblem::Other,
        };
        Self::Migration(problem)
    }

    fn from_detail(detail: Detail) -> Self {
        if detail.unavailable { Self::Unavailable(detail) } else { Self::Failed(detail) }
    }
}

/// Where a database error happened and its sanitized cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detail {
    op: &'static str,
    cause: Cause,
    unavailable: bool,
}

impl Detail {
    fn new(op: &'static str, error: &sqlx::Error) -> Self {
        let cause = Cause::of(error);
        let unavailable = cause.unavailable();
        Self { op, cause, unavailable }
    }

    /// The operation that failed (`write`, `student_summary`, ...).
    pub fn operation(&self) -> &'static str {
        self.op
    }

    /// The database's own error code, if it gave one: SQLite's extended result code or
    /// PostgreSQL's SQLSTATE.
    pub fn code(&self) -> Option<&str> {
        match &self.cause {
            Cause::Sqlite(code) => Some(code),
            Cause::Postgres(code) => Some(code),
            _ => None,
        }
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.cause)
    }
}

/// A driver error reduced to what is safe to show.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cause {
    Io(io::ErrorKind),
    Tls,
    PoolTimedOut,
    PoolClosed,
    WorkerCrashed,
    Protocol,
    Configuration,
    Decode,
    Sqlite(String),
    Postgres(String),
    Database,
    Other,
}

impl Cause {
    fn of(error: &sqlx::Error) -> Self {
        use sqlx::Error as E;
        match error {
            E::Io(e) => Self::Io(e.kind()),
            E::Tls(_) => Self::Tls,
            E::PoolTimedOut => Self::PoolTimedOut,
            E::PoolClosed => Self::PoolClosed,
            E::WorkerCrashed => Self::WorkerCrashed,
            E::Protocol(_) => Self::Protocol,
            E::Configuration(_) => Self::Configuration,
            E::ColumnDecode { .. } | E::Decode(_) | E::ColumnNotFound(_) | E::ColumnIndexOutOfBounds { .. } => {
                Self::Decode
            }
            E::Database(db) => {
                let code = db.code().map(|c| c.into_owned());
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    code.map_or(Self::Database, Self::Sqlite)
                } else if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                    code.map_or(Self::Database, Self::Postgres)
                } else {
                    Self::Database
                }
            }
            _ => Self::Other,
        }
    }

    /// Worth retrying: the database was unreachable, lost, busy, full or failing I/O.
    fn unavailable(&self) -> bool {
        match self {
            Self::Io(_) | Self::Tls | Self::PoolTimedOut | Self::PoolClosed | Self::WorkerCrashed | Self::Protocol => {
                true
            }
            // https://www.sqlite.org/rescode.html: the primary code is the low byte.
            Self::Sqlite(code) => code.parse::<i32>().is_ok_and(|c| {
                matches!(
                    c & 0xff,
                    5  // SQLITE_BUSY
                    | 6  // SQLITE_LOCKED
                    | 10 // SQLITE_IOERR
                    | 13 // SQLITE_FULL
                    | 8  // SQLITE_READONLY (the file or its directory was made read-only)
                    | 14 // SQLITE_CANTOPEN
                    | 15 // SQLITE_PROTOCOL (a WAL lock race)
                )
            }),
            // https://www.postgresql.org/docs/current/errcodes-appendix.html
            Self::Postgres(code) => {
                code.starts_with("08") // connection exception
                    || code.starts_with("53") // insufficient resources: disk full, out of memory, too many connections
                    || code.starts_with("58") // system error: I/O
                    || code.starts_with("57P") // admin or crash shutdown, cannot connect now
                    || code == "40001" // serialization failure
                    || code == "40P01" // deadlock detected
                    || code == "55P03" // lock not available
                    || code == "25006" // read-only transaction: a standby, or writes turned off for now
            }
            Self::Configuration | Self::Decode | Self::Database | Self::Other => false,
        }
    }

    /// The rows were refused for what they hold, not for the state of the database.
    fn refuses_data(&self) -> bool {
        match self {
            Self::Sqlite(code) => code.parse::<i32>().is_ok_and(|c| {
                matches!(
                    c & 0xff,
                    // SQLITE_TOOBIG (18), SQLITE_CONSTRAINT (19, a trigger's RAISE included),
                    // SQLITE_MISMATCH (20)
                    18..=20
                )
            }),
            // Class 22: data exception (a NUL in text, a value out of range); class 23:
            // integrity constraint violation.
            Self::Postgres(code) => code.starts_with("22") || code.starts_with("23"),
            _ => false,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(kind) => write!(f, "I/O error ({kind})"),
            Self::Tls => f.write_str("TLS handshake failed"),
            Self::PoolTimedOut => f.write_str("timed out waiting for a connection"),
            Self::PoolClosed => f.write_str("the connection pool is closed"),
            Self::WorkerCrashed => f.write_str("the database worker crashed"),
            Self::Protocol => f.write_str("unexpected data from the database"),
            Self::Configuration => f.write_str("invalid connection options"),
            Self::Decode => f.write_str("a stored value could not be read"),
            Self::Sqlite(code) => write!(f, "SQLite error code {code}"),
            Self::Postgres(code) => write!(f, "PostgreSQL SQLSTATE {code}"),
            Self::Database => f.write_str("the database refused the statement"),
            Self::Other => f.write_str("driver error"),
        }
    }
}

/// Why migrating failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationProblem {
    /// A statement failed.
    Database(Detail),
    /// The database was migrated by a newer version (it has migration `.0`, unknown here).
    Newer(i64),
    /// Migration `.0` changed after it was applied.
    Modified(i64),
    /// Migration `.0` was applied only in part.
    Dirty(i64),
    /// Another problem with the migration source.
    Other,
}

impl fmt::Display for MigrationProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Database(d) => write!(f, "{d}"),
            Self::Newer(v) => write!(f, "migration {v} is applied but unknown to this version (a newer version ran)"),
            Self::Modified(v) => write!(f, "migration {v} changed after it was applied"),
            Self::Dirty(v) => write!(f, "migration {v} was applied only in part"),
            Self::Other => f.write_str("the embedded migrations could not be applied"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(cause: Cause) -> StoreError {
        let unavailable = cause.unavailable();
        StoreError::from_detail(Detail { op: "write", cause, unavailable })
    }

    #[test]
    fn a_database_that_cannot_write_now_is_retried_and_rows_it_refuses_fail_alone() {
        let sqlite = |code: i32| failed(Cause::Sqlite(code.to_string()));
        let postgres = |code: &str| failed(Cause::Postgres(code.to_owned()));
        // Unavailable (the writer waits and retries): busy, locked, full, read-only, I/O; a
        // connection lost, a disk full, a standby or a frozen database.
        for e in [sqlite(5), sqlite(6), sqlite(13), sqlite(8), sqlite(1032), sqlite(10), postgres("08006")]
            .into_iter()
            .chain([postgres("53100"), postgres("25006"), postgres("57P01"), failed(Cause::Io(io::ErrorKind::Other))])
        {
            assert!(e.is_retryable() && !e.is_refused_data(), "{e}");
        }
        // The rows themselves (the writer fails only their job): constraints (a trigger's
        // RAISE, a unique or check constraint), too big, mismatched; a NUL in text, a value
        // out of range, a check violation.
        for e in [sqlite(19), sqlite(1811), sqlite(2067), sqlite(18), sqlite(20)].into_iter().chain([
            postgres("22021"),
            postgres("22003"),
            postgres("23514"),
            postgres("23505"),
        ]) {
            assert!(!e.is_retryable() && e.is_refused_data(), "{e}");
        }
        // Neither: the database is wrong for this version (a missing table, a permission);
        // the writer keeps the group and retries, so nothing queued is dropped.
        for e in [sqlite(1), postgres("42P01"), postgres("42501"), failed(Cause::Decode)] {
            assert!(!e.is_retryable() && !e.is_refused_data(), "{e}");
        }
        // Read-only, so the store reconnects rather than keeping connections that saw it.
        assert!(postgres("25006").is_read_only() && sqlite(8).is_read_only() && sqlite(1032).is_read_only());
        assert!(!postgres("53100").is_read_only() && !sqlite(13).is_read_only());
    }
}
