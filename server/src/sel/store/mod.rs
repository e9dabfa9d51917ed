//! The SEL store: participation, room sessions, reflections and recordings in SQLite or
//! PostgreSQL.
//!
//! # Design
//!
//! - **Two backends, one SQL.** A school runs on one SQLite file; a district points the
//!   server at PostgreSQL (`postgres://` or `postgresql://`, `sslmode=require` over rustls).
//!   Every statement is written once with PostgreSQL's `$1, $2, ...` placeholders; for SQLite
//!   they become `?1, ?2, ...`, its explicitly numbered form (a `$1` there would be a *named*
//!   parameter, numbered by first appearance). The schema uses only what both agree on:
//!   BIGINT integers, TEXT strings, composite primary keys, no generated keys, booleans or
//!   blobs; sums are cast back to BIGINT because PostgreSQL widens `SUM(bigint)` to NUMERIC.
//!   One `match` per method picks the pool and the same code runs for either.
//! - **Idempotent writes.** A [`Batch`] is committed in one transaction, and every row in it
//!   carries its own key: room sessions by `(tenant, id)`, participation by `(tenant, room
//!   session, seq)`, reflections by `(tenant, student, client id)`, each inserted with `ON
//!   CONFLICT DO NOTHING`; a session's end is an update that only fills an empty end; a
//!   co-teacher added or removed is an insert or a delete of its key, applied in order. So a
//!   batch retried after a crash, a timeout or a lost commit acknowledgement changes nothing
//!   the first attempt already wrote, and a reflection keeps its first content.
//! - **Acknowledged means committed.** [`Store::write`] returns `Ok` only after the commit
//!   returned. SQLite runs in WAL mode with `synchronous=FULL`, so a commit it acknowledged
//!   survives a crash or a power loss (WAL's default, NORMAL, may lose the last commits).
//!   Writes begin `IMMEDIATE`, so they queue on the write lock for up to
//!   [`BUSY_TIMEOUT`] instead of failing on a lock upgrade.
//! - **Tenant scoping.** Every key starts with `tenant_id` and every read and delete filters
//!   by it, so a tenant never reaches another's rows, even with a known id.
//! - **Whose sessions.** A room session keeps its owner (`teacher_id`) and its co-teachers,
//!   so reads of past sessions can be limited to the teachers who ran them
//!   ([`Store::student_summary_where`], [`SessionSel::co_teachers`]); deciding who may read
//!   is the caller's.
//! - **Errors safe to log and to retry on.** [`StoreError::is_retryable`] tells an outage
//!   (worth keeping the batch and trying later) from a refusal; its text holds no password
//!   and no row data.
//!
//! The store does not decide what to record or when to flush; the room tasks do. Student ids
//! are pseudonymous token subjects; no name is ever stored.

mod error;
mod model;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::Connection as _;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

pub use audit::AuditEntry;
pub use error::{Detail, MigrationProblem, StoreError};
pub use model::{
    Batch, CoTeacherChange, Counts, Deleted, ParticipationKind, ParticipationRow, RecordedNoteRow, RecordingRow,
    RecordingStop, RecordingTimelineRow, ReflectionRow, RoomSessionRow, SessionEnd, SessionSel, SessionTeachers,
    StudentExport, StudentInSession, StudentSession, StudentSummary, Take, TakeSummary, UnknownKind,
};
pub use model::{SessionListing, SessionTimeline, TimelineBucket};

/// How long a SQLite statement waits for another connection's write lock before failing as
/// busy (retryable).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an operation waits for a pooled connection (or to open one) before failing as
/// unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite serializes writers anyway; a few connections let reads go on beside a write.
const SQLITE_CONNECTIONS: u32 = 4;

/// PostgreSQL connections per server process.
const POSTGRES_CONNECTIONS: u32 = 8;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The SEL data store: a pool on SQLite or PostgreSQL. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// Set by a write the database refused as read-only, cleared by the next write that
    /// commits: meanwhile pooled connections are closed when released rather than kept.
    /// PostgreSQL reads `default_transaction_read_only` when a session starts, so a database
    /// made writable again only heals connections opened afterwards.
    recycle: Arc<AtomicBool>,
}

/// The pool, by backend. Deliberately without `Debug`: PostgreSQL's options hold the password.
#[derive(Clone)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend_name()).finish_non_exhaustive()
    }
}

/// What differs between the backends besides the pool type.
#[derive(Clone, Copy, Debug)]
enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// `sql` with `$n` placeholders, in this backend's form.
    fn sql(self, sql: &'static str) -> Cow<'static, str> {
        match self {
            Self::Postgres => Cow::Borrowed(sql),
            Self::Sqlite => Cow::Owned(numbered_placeholders(sql)),
        }
    }

    /// Begins a transaction that writes. SQLite takes the write lock at once (waiting up to
    /// the busy timeout), so no statement inside fails upgrading a read lock.
    fn begin_write(self) -> &'static str {
        match self {
            Self::Sqlite => "BEGIN IMMEDIATE",
            Self::Postgres => "BEGIN",
        }
    }

    /// Begins a transaction whose reads all see one snapshot (SQLite's read transactions do
    /// in WAL mode; PostgreSQL's default, READ COMMITTED, takes one per statement).
    fn begin_read(self) -> &'static str {
        match self {
            Self::Sqlite => "BEGIN",
            Self::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        }
    }

    /// Every (table, TEXT column) of the store's schema, sqlx's bookkeeping excepted.
    fn text_columns(self) -> &'static str {
        match self {
            Self::Sqlite => {
                "SELECT m.name, c.name FROM sqlite_master AS m JOIN pragma_table_info(m.name) AS c \
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
                 AND m.name <> '_sqlx_migrations' \
                 AND (upper(c.type) LIKE '%TEXT%' OR upper(c.type) LIKE '%CHAR%' OR upper(c.type) LIKE '%CLOB%') \
                 ORDER BY m.name, c.cid"
            }
            Self::Postgres => {
                "SELECT CAST(c.table_name AS TEXT), CAST(c.column_name AS TEXT) \
                 FROM information_schema.columns AS c JOIN information_schema.tables AS t \
                 ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
                 WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE' \
                 AND c.table_name <> '_sqlx_migrations' \
                 AND c.data_type IN ('text', 'character varying', 'character') \
                 ORDER BY c.table_name, c.ordinal_position"
            }
        }
    }
}

/// `$1` -> `?1`. The store's SQL has no `$` inside string literals or identifiers.
fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs `$body` with `$pool` bound to the store's pool and `$dialect` to its [`Dialect`]. The
/// body is compiled once per backend, so the same code serves both.
macro_rules! with_backend {
    ($store:expr, |$pool:ident, $dialect:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($pool) => {
                let $dialect = Dialect::Sqlite;
                $body
            }
            Backend::Postgres($pool) => {
                let $dialect = Dialect::Postgres;
                $body
            }
        }
    };
}

// After the macro it uses.
mod audit;

macro_rules! session_columns {
    () => {
        "tenant_id, id, room_code, room_name, teacher_id, started_at_ms, ended_at_ms"
    };
}

macro_rules! participation_columns {
    () => {
        "tenant_id, room_session_id, seq, student_id, kind, at_ms, \
         notes, timed, on_beat, offset_abs_sum_micros, assigned, in_part, turns, offset_sum_micros"
    };
}

macro_rules! reflection_columns {
    () => {
        "tenant_id, student_id, id, room_session_id, prompt, mood, text, created_at_ms"
    };
}

macro_rules! recording_columns {
    () => {
        "tenant_id, room_session_id, take, started_at_ms, stopped_at_ms, length_nanos"
    };
}

macro_rules! recorded_note_columns {
    () => {
        "tenant_id, room_session_id, take, seq, student_id, member_id, part, midi, velocity, instrument, \
         offset_nanos, at_ms"
    };
}

/// Sums of the counts of `notes` rows, the number of `joined` rows and the first join, as
/// BIGINT on both backends.
macro_rules! participation_sums {
    () => {
        "CAST(COALESCE(SUM(CASE WHEN kind = 'notes' THEN notes ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN kind = 'notes' THEN timed ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN kind = 'notes' THEN on_beat ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN kind = 'notes' THEN offset_abs_sum_micros ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN kind = 'notes' THEN offset_sum_micros ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN kind = 'notes' THEN assigned ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN kind = 'notes' THEN in_part ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN kind = 'notes' THEN turns ELSE 0 END), 0) AS BIGINT), \
         CAST(COALESCE(SUM(CASE WHEN kind = 'joined' THEN 1 ELSE 0 END), 0) AS BIGINT), \
         MIN(CASE WHEN kind = 'joined' THEN at_ms END)"
    };
}

const INSERT_SESSION: &str = concat!(
    "INSERT INTO room_sessions (",
    session_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, id) DO NOTHING"
);

/// The first end written wins, so a retried end is a no-op.
const END_SESSION: &str =
    "UPDATE room_sessions SET ended_at_ms = $3 WHERE tenant_id = $1 AND id = $2 AND ended_at_ms IS NULL";

const INSERT_PARTICIPATION: &str = concat!(
    "INSERT INTO participation (",
    participation_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
     ON CONFLICT (tenant_id, room_session_id, seq) DO NOTHING"
);

const INSERT_REFLECTION: &str = concat!(
    "INSERT INTO reflections (",
    reflection_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (tenant_id, student_id, id) DO NOTHING"
);

const INSERT_RECORDING: &str = concat!(
    "INSERT INTO recordings (",
    recording_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant_id, room_session_id, take) DO NOTHING"
);

/// The first stop written wins, so a retried stop is a no-op.
const STOP_RECORDING: &str = "UPDATE recordings SET stopped_at_ms = $4, length_nanos = $5 \
     WHERE tenant_id = $1 AND room_session_id = $2 AND take = $3 AND stopped_at_ms IS NULL";

const INSERT_RECORDING_TIMELINE: &str = "INSERT INTO recording_timelines \
     (tenant_id, room_session_id, take, epoch, segments) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (tenant_id, room_session_id, take, epoch) DO NOTHING";

const INSERT_RECORDED_NOTE: &str = concat!(
    "INSERT INTO recorded_notes (",
    recorded_note_columns!(),
    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
     ON CONFLICT (tenant_id, room_session_id, take, seq) DO NOTHING"
);

const SESSION_RECORDINGS: &str = concat!(
    "SELECT ",
    recording_columns!(),
    ", (SELECT COUNT(*) FROM recorded_notes AS n WHERE n.tenant_id = r.tenant_id \
     AND n.room_session_id = r.room_session_id AND n.take = r.take) \
     FROM recordings AS r WHERE tenant_id = $1 AND room_session_id = $2 ORDER BY take"
);

const RECORDING: &str = concat!(
    "SELECT ",
    recording_columns!(),
    " FROM recordings WHERE tenant_id = $1 AND room_session_id = $2 AND take = $3"
);

const RECORDING_TIMELINES: &str = "SELECT tenant_id, room_session_id, take, epoch, segments \
     FROM recording_timelines WHERE tenant_id = $1 AND room_session_id = $2 AND take = $3 ORDER BY epoch";

const RECORDING_NOTES: &str = concat!(
    "SELECT ",
    recorded_note_columns!(),
    " FROM recorded_notes WHERE tenant_id = $1 AND room_session_id = $2 AND take = $3 ORDER BY seq"
);

const STUDENT_RECORDED_NOTES: &str = concat!(
    "SELECT ",
    recorded_note_columns!(),
    " FROM recorded_notes WHERE tenant_id = $1 AND student_id = $2 ORDER BY room_session_id, take, seq"
);

const DELETE_STUDENT_RECORDED_NOTES: &str = "DELETE FROM recorded_notes WHERE tenant_id = $1 AND student_id = $2";

const ADD_CO_TEACHER: &str = "INSERT INTO room_session_co_teachers (tenant_id, room_session_id, teacher_id) \
     VALUES ($1, $2, $3) ON CONFLICT (tenant_id, room_session_id, teacher_id) DO NOTHING";

const REMOVE_CO_TEACHER: &str =
    "DELETE FROM room_session_co_teachers WHERE tenant_id = $1 AND room_session_id = $2 AND teacher_id = $3";

const SESSION_CO_TEACHERS: &str = "SELECT teacher_id FROM room_session_co_teachers \
     WHERE tenant_id = $1 AND room_session_id = $2 ORDER BY teacher_id";

/// The co-teachers of the room sessions a student has any row in.
const CO_TEACHERS_OF_STUDENT: &str = "SELECT room_session_id, teacher_id FROM room_session_co_teachers \
     WHERE tenant_id = $1 AND room_session_id IN (\
     SELECT room_session_id FROM participation WHERE tenant_id = $1 AND student_id = $2 \
     UNION SELECT room_session_id FROM reflections WHERE tenant_id = $1 AND student_id = $2) \
     ORDER BY room_session_id, teacher_id";

/// Room sessions a student has any row in, oldest first.
const SESSIONS_OF_STUDENT: &str = concat!(
    "SELECT ",
    session_columns!(),
    " FROM room_sessions WHERE tenant_id = $1 AND id IN (\
     SELECT room_session_id FROM participation WHERE tenant_id = $1 AND student_id = $2 \
     UNION SELECT room_session_id FROM reflections WHERE tenant_id = $1 AND student_id = $2 \
     UNION SELECT room_session_id FROM recorded_notes WHERE tenant_id = $1 AND student_id = $2) \
     ORDER BY started_at_ms, id"
);

const STUDENT_PARTICIPATION_BY_SESSION: &str = concat!(
    "SELECT room_session_id, ",
    participation_sums!(),
    " FROM participation WHERE tenant_id = $1 AND student_id = $2 GROUP BY room_session_id"
);

const STUDENT_REFLECTIONS_BY_SESSION: &str = "SELECT room_session_id, COUNT(*) FROM reflections \
     WHERE tenant_id = $1 AND student_id = $2 GROUP BY room_session_id";

const SESSION: &str = concat!("SELECT ", session_columns!(), " FROM room_sessions WHERE tenant_id = $1 AND id = $2");

const SESSION_PARTICIPATION_BY_STUDENT: &str = concat!(
    "SELECT student_id, ",
    participation_sums!(),
    " FROM participation WHERE tenant_id = $1 AND room_session_id = $2 GROUP BY student_id"
);

const SESSION_REFLECTIONS: &str = concat!(
    "SELECT ",
    reflection_columns!(),
    " FROM reflections WHERE tenant_id = $1 AND room_session_id = $2 ORDER BY created_at_ms, student_id, id"
);

const STUDENT_PARTICIPATION: &str = concat!(
    "SELECT ",
    participation_columns!(),
    " FROM participation WHERE tenant_id = $1 AND student_id = $2 ORDER BY at_ms, room_session_id, seq"
);

const STUDENT_REFLECTIONS: &str = concat!(
    "SELECT ",
    reflection_columns!(),
    " FROM reflections WHERE tenant_id = $1 AND student_id = $2 ORDER BY created_at_ms, id"
);

const DELETE_STUDENT_PARTICIPATION: &str = "DELETE FROM participation WHERE tenant_id = $1 AND student_id = $2";
const DELETE_STUDENT_REFLECTIONS: &str = "DELETE FROM reflections WHERE tenant_id = $1 AND student_id = $2";

const PURGE_PARTICIPATION: &str = "DELETE FROM participation WHERE tenant_id = $1 AND at_ms < $2";
const PURGE_REFLECTIONS: &str = "DELETE FROM reflections WHERE tenant_id = $1 AND created_at_ms < $2";
const PURGE_RECORDED_NOTES: &str = "DELETE FROM recorded_notes WHERE tenant_id = $1 AND at_ms < $2";
/// Takes that started before the cutoff and hold no note any more (their timelines first).
macro_rules! purged_recordings {
    () => {
        "SELECT room_session_id, take FROM recordings AS r WHERE tenant_id = $1 AND started_at_ms < $2 \
         AND NOT EXISTS (SELECT 1 FROM recorded_notes AS n WHERE n.tenant_id = r.tenant_id \
             AND n.room_session_id = r.room_session_id AND n.take = r.take)"
    };
}
const PURGE_RECORDING_TIMELINES: &str = concat!(
    "DELETE FROM recording_timelines WHERE tenant_id = $1 AND EXISTS (SELECT 1 FROM (",
    purged_recordings!(),
    ") AS p WHERE p.room_session_id = recording_timelines.room_session_id AND p.take = recording_timelines.take)"
);
const PURGE_RECORDINGS: &str = "DELETE FROM recordings WHERE tenant_id = $1 AND started_at_ms < $2 \
     AND NOT EXISTS (SELECT 1 FROM recorded_notes AS n WHERE n.tenant_id = recordings.tenant_id \
         AND n.room_session_id = recordings.room_session_id AND n.take = recordings.take)";
/// Which ended sessions are purged: older than the cutoff, unless a row still refers to them
/// (a reflection written after the session ended, say).
macro_rules! purged_sessions {
    () => {
        "SELECT id FROM room_sessions WHERE tenant_id = $1 \
         AND ended_at_ms IS NOT NULL AND ended_at_ms < $2 \
         AND NOT EXISTS (SELECT 1 FROM participation AS p \
             WHERE p.tenant_id = room_sessions.tenant_id AND p.room_session_id = room_sessions.id) \
         AND NOT EXISTS (SELECT 1 FROM reflections AS r \
             WHERE r.tenant_id = room_sessions.tenant_id AND r.room_session_id = room_sessions.id) \
         AND NOT EXISTS (SELECT 1 FROM recordings AS k \
             WHERE k.tenant_id = room_sessions.tenant_id AND k.room_session_id = room_sessions.id)"
    };
}
/// The co-teachers of the sessions purged next.
const PURGE_CO_TEACHERS: &str = concat!(
    "DELETE FROM room_session_co_teachers WHERE tenant_id = $1 AND room_session_id IN (",
    purged_sessions!(),
    ")"
);
const PURGE_SESSIONS: &str =
    concat!("DELETE FROM room_sessions WHERE tenant_id = $1 AND id IN (", purged_sessions!(), ")");

type SessionTuple = (String, String, String, String, String, i64, Option<i64>);
type RecordingTuple = (String, String, i64, i64, Option<i64>, Option<i64>);
type RecordingTimelineTuple = (String, String, i64, i64, String);
type RecordedNoteTuple = (String, String, i64, i64, String, i64, Option<String>, i64, i64, i64, i64, i64);
type ParticipationTuple = (String, String, i64, String, String, i64, i64, i64, i64, i64, i64, i64, i64, i64);
type ReflectionTuple = (String, String, String, String, String, Option<i64>, Option<String>, i64);
/// A group key, the eight sums, the number of joins and the first join.
type SumsTuple = (String, i64, i64, i64, i64, i64, i64, i64, i64, i64, Option<i64>);

fn recording_row(t: RecordingTuple) -> RecordingRow {
    let (tenant_id, room_session_id, take, started_at_ms, stopped_at_ms, length_nanos) = t;
    RecordingRow { tenant_id, room_session_id, take, started_at_ms, stopped_at_ms, length_nanos }
}

fn recording_timeline_row(t: RecordingTimelineTuple) -> RecordingTimelineRow {
    let (tenant_id, room_session_id, take, epoch, segments) = t;
    RecordingTimelineRow { tenant_id, room_session_id, take, epoch, segments }
}

fn recorded_note_row(t: RecordedNoteTuple) -> RecordedNoteRow {
    let (
        tenant_id,
        room_session_id,
        take,
        seq,
        student_id,
        member_id,
        part,
        midi,
        velocity,
        instrument,
        offset_nanos,
        at_ms,
    ) = t;
    RecordedNoteRow {
        tenant_id,
        room_session_id,
        take,
        seq,
        student_id,
        member_id,
        part,
        midi,
        velocity,
        instrument,
        offset_nanos,
        at_ms,
    }
}

fn session_row(t: SessionTuple) -> RoomSessionRow {
    let (tenant_id, id, room_code, room_name, teacher_id, started_at_ms, ended_at_ms) = t;
    RoomSessionRow { tenant_id, id, room_code, room_name, teacher_id, started_at_ms, ended_at_ms }
}

fn participation_row(op: &'static str, t: ParticipationTuple) -> Result<ParticipationRow, StoreError> {
    let (
        tenant_id,
        room_session_id,
        seq,
        student_id,
        kind,
        at_ms,
        notes,
        timed,
        on_beat,
        offset,
        assigned,
        in_part,
        turns,
        signed,
    ) = t;
    let kind = kind.parse().map_err(|_| StoreError::corrupt(op))?;
    let counts = Counts {
        notes,
        timed,
        on_beat,
        offset_abs_sum_micros: offset,
        offset_sum_micros: signed,
        assigned,
        in_part,
        turns,
    };
    Ok(ParticipationRow { tenant_id, room_session_id, seq, student_id, kind, at_ms, counts })
}

fn reflection_row(t: ReflectionTuple) -> ReflectionRow {
    let (tenant_id, student_id, id, room_session_id, prompt, mood, text, created_at_ms) = t;
    ReflectionRow { tenant_id, student_id, id, room_session_id, prompt, mood, text, created_at_ms }
}

/// Aggregates of one group (a session of a student, or a student in a session).
struct Sums {
    counts: Counts,
    joins: i64,
    first_joined_at_ms: Option<i64>,
}

fn sums_entry(t: SumsTuple) -> (String, Sums) {
    let (key, notes, timed, on_beat, offset, signed, assigned, in_part, turns, joins, first_joined_at_ms) = t;
    let counts = Counts {
        notes,
        timed,
        on_beat,
        offset_abs_sum_micros: offset,
        offset_sum_micros: signed,
        assigned,
        in_part,
        turns,
    };
    (key, Sums { counts, joins, first_joined_at_ms })
}

/// `"name"`, with embedded quotes doubled: a standard SQL identifier on both backends.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Store {
    /// Connects to `url`, configures the connections and brings the schema up to date.
    ///
    /// `postgres://` and `postgresql://` URLs open PostgreSQL (with their options, e.g.
    /// `sslmode=require`). Anything else is SQLite: `sqlite://path`, `sqlite:path` or a
    /// plain path; the file is created if missing and runs in WAL mode with
    /// `synchronous=FULL` and a [`BUSY_TIMEOUT`]. Opening the same database again, or from
    /// several processes, is fine: applied migrations are skipped.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        const OP: &str = "open";
        let recycle = Arc::new(AtomicBool::new(false));
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)
                .map_err(|_| StoreError::InvalidUrl("not a usable PostgreSQL URL"))?
                .application_name("downbeat");
            let recycle = recycle.clone();
            let pool = PgPoolOptions::new()
                .max_connections(POSTGRES_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .after_release(move |_, _| {
                    let keep = !recycle.load(Ordering::Relaxed);
                    Box::pin(async move { Ok(keep) })
                })
                .connect_with(options)
                .await
                .map_err(|e| StoreError::connecting(OP, e))?;
            Backend::Postgres(pool)
        } else {
            let options = if url.starts_with("sqlite:") {
                SqliteConnectOptions::from_str(url).map_err(|_| StoreError::InvalidUrl("not a usable SQLite URL"))?
            } else if url.is_empty() {
                return Err(StoreError::InvalidUrl("empty"));
            } else {
                SqliteConnectOptions::new().filename(url)
            };
            // Children's data: the file is made 0600 before SQLite opens it, and SQLite gives
            // the WAL and shared-memory files the database file's mode.
            let file = options.get_filename();
            if file != Path::new(":memory:") {
                let private = |path: &Path| {
                    crate::private::private_file(path).map_err(|e| StoreError::connecting(OP, sqlx::Error::Io(e)))
                };
                private(file)?;
                for suffix in ["-wal", "-shm"] {
                    let mut side = file.as_os_str().to_owned();
                    side.push(suffix);
                    if Path::new(&side).exists() {
                        private(Path::new(&side))?;
                    }
                }
            }
            let options = options
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(BUSY_TIMEOUT);
            let pool = SqlitePoolOptions::new()
                .max_connections(SQLITE_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                // On a full disk (SQLITE_FULL), an I/O error or a busy deadlock, SQLite rolls
                // the whole transaction back by itself; sqlx's own ROLLBACK then fails, and it
                // goes on believing the connection is in a transaction, refusing every later
                // BEGIN on it. Such a connection is closed rather than reused. (The pool pings
                // every connection it takes back, which lets a dropped transaction's queued
                // ROLLBACK run first, so the check here sees its outcome.)
                .before_acquire(|conn, _| Box::pin(async move { Ok(!conn.is_in_transaction()) }))
                .connect_with(options)
                .await
                .map_err(|e| StoreError::connecting(OP, e))?;
            Backend::Sqlite(pool)
        };
        let store = Self { backend, recycle };
        with_backend!(store, |pool, _d| MIGRATOR.run(pool).await.map_err(StoreError::from_migrate)?);
        Ok(store)
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Checks the database answers (`SELECT 1`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        const OP: &str = "ping";
        with_backend!(self, |pool, _d| {
            let mut conn = pool.acquire().await.map_err(|e| StoreError::connecting(OP, e))?;
            sqlx::query("SELECT 1").execute(&mut *conn).await.map_err(|e| StoreError::from_sqlx(OP, e))?;
        });
        Ok(())
    }

    /// Writes `batch` in one transaction: all of it or nothing.
    ///
    /// `Ok` means committed (and on SQLite, synced). Writing a batch again is a no-op for
    /// every row already stored, so a batch whose outcome is unknown (an error, a crash, a
    /// lost acknowledgement) is simply written again. Sessions are written before their ends.
    pub async fn write(&self, batch: &Batch) -> Result<(), StoreError> {
        const OP: &str = "write";
        if batch.is_empty() {
            return Ok(());
        }
        // Runs before the transaction (and its connection) is dropped.
        let failed = |e| self.noted(StoreError::from_sqlx(OP, e));
        with_backend!(self, |pool, d| {
            let (insert_session, end_session) = (d.sql(INSERT_SESSION), d.sql(END_SESSION));
            let (insert_participation, insert_reflection) = (d.sql(INSERT_PARTICIPATION), d.sql(INSERT_REFLECTION));
            let mut tx = pool.begin_with(d.begin_write()).await.map_err(|e| StoreError::connecting(OP, e))?;
            for s in &batch.sessions {
                sqlx::query(&insert_session)
                    .bind(s.tenant_id.as_str())
                    .bind(s.id.as_str())
                    .bind(s.room_code.as_str())
                    .bind(s.room_name.as_str())
                    .bind(s.teacher_id.as_str())
                    .bind(s.started_at_ms)
                    .bind(s.ended_at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            for e in &batch.session_ends {
                sqlx::query(&end_session)
                    .bind(e.tenant_id.as_str())
                    .bind(e.id.as_str())
                    .bind(e.ended_at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            for p in &batch.participation {
                let c = &p.counts;
                sqlx::query(&insert_participation)
                    .bind(p.tenant_id.as_str())
                    .bind(p.room_session_id.as_str())
                    .bind(p.seq)
                    .bind(p.student_id.as_str())
                    .bind(p.kind.as_str())
                    .bind(p.at_ms)
                    .bind(c.notes)
                    .bind(c.timed)
                    .bind(c.on_beat)
                    .bind(c.offset_abs_sum_micros)
                    .bind(c.assigned)
                    .bind(c.in_part)
                    .bind(c.turns)
                    .bind(c.offset_sum_micros)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            let (add_co_teacher, remove_co_teacher) = (d.sql(ADD_CO_TEACHER), d.sql(REMOVE_CO_TEACHER));
            for c in &batch.co_teachers {
                sqlx::query(if c.present { &add_co_teacher } else { &remove_co_teacher })
                    .bind(c.tenant_id.as_str())
                    .bind(c.room_session_id.as_str())
                    .bind(c.teacher_id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            for r in &batch.reflections {
                sqlx::query(&insert_reflection)
                    .bind(r.tenant_id.as_str())
                    .bind(r.student_id.as_str())
                    .bind(r.id.as_str())
                    .bind(r.room_session_id.as_str())
                    .bind(r.prompt.as_str())
                    .bind(r.mood)
                    .bind(r.text.as_deref())
                    .bind(r.created_at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            let (insert_recording, stop_recording) = (d.sql(INSERT_RECORDING), d.sql(STOP_RECORDING));
            for r in &batch.recordings {
                sqlx::query(&insert_recording)
                    .bind(r.tenant_id.as_str())
                    .bind(r.room_session_id.as_str())
                    .bind(r.take)
                    .bind(r.started_at_ms)
                    .bind(r.stopped_at_ms)
                    .bind(r.length_nanos)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            let insert_timeline = d.sql(INSERT_RECORDING_TIMELINE);
            for t in &batch.recording_timelines {
                sqlx::query(&insert_timeline)
                    .bind(t.tenant_id.as_str())
                    .bind(t.room_session_id.as_str())
                    .bind(t.take)
                    .bind(t.epoch)
                    .bind(t.segments.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            let insert_note = d.sql(INSERT_RECORDED_NOTE);
            for n in &batch.recorded_notes {
                sqlx::query(&insert_note)
                    .bind(n.tenant_id.as_str())
                    .bind(n.room_session_id.as_str())
                    .bind(n.take)
                    .bind(n.seq)
                    .bind(n.student_id.as_str())
                    .bind(n.member_id)
                    .bind(n.part.as_deref())
                    .bind(n.midi)
                    .bind(n.velocity)
                    .bind(n.instrument)
                    .bind(n.offset_nanos)
                    .bind(n.at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            for s in &batch.recording_stops {
                sqlx::query(&stop_recording)
                    .bind(s.tenant_id.as_str())
                    .bind(s.room_session_id.as_str())
                    .bind(s.take)
                    .bind(s.stopped_at_ms)
                    .bind(s.length_nanos)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?;
            }
            tx.commit().await.map_err(failed)?;
        });
        self.recycle.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Notes a read-only refusal (see `recycle`); gives `e` back.
    fn noted(&self, e: StoreError) -> StoreError {
        if e.is_read_only() {
            self.recycle.store(true, Ordering::Relaxed);
        }
        e
    }

    /// A student's participation in `tenant`: totals and every room session the student has
    /// rows in, newest first. A student with no rows gets an empty summary.
    ///
    /// `sessions_attended` counts the sessions with a `joined` row; counts add up `notes`
    /// rows; reflections are counted per student and per session.
    pub async fn student_summary(&self, tenant: &str, student: &str) -> Result<StudentSummary, StoreError> {
        self.summary(tenant, student, None).await
    }

    /// [`Self::student_summary`] over only the room sessions whose teachers `readable`
    /// accepts: its sessions, totals and counts hold nothing of any other session (nor of
    /// rows whose session was purged).
    pub async fn student_summary_where(
        &self,
        tenant: &str,
        student: &str,
        readable: impl Fn(&SessionTeachers) -> bool + Sync,
    ) -> Result<StudentSummary, StoreError> {
        self.summary(tenant, student, Some(&readable)).await
    }

    async fn summary(
        &self,
        tenant: &str,
        student: &str,
        readable: Option<&(dyn Fn(&SessionTeachers) -> bool + Sync)>,
    ) -> Result<StudentSummary, StoreError> {
        const OP: &str = "student_summary";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let (sessions, co_teachers, sums, reflections) = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_read()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let sessions: Vec<SessionTuple> = sqlx::query_as(&d.sql(SESSIONS_OF_STUDENT))
                .bind(tenant)
                .bind(student)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            let co_teachers: Vec<(String, String)> = sqlx::query_as(&d.sql(CO_TEACHERS_OF_STUDENT))
                .bind(tenant)
                .bind(student)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            let sums: Vec<SumsTuple> = sqlx::query_as(&d.sql(STUDENT_PARTICIPATION_BY_SESSION))
                .bind(tenant)
                .bind(student)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            let reflections: Vec<(String, i64)> = sqlx::query_as(&d.sql(STUDENT_REFLECTIONS_BY_SESSION))
                .bind(tenant)
                .bind(student)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            (sessions, co_teachers, sums, reflections)
        });

        let mut sessions: Vec<RoomSessionRow> = sessions.into_iter().map(session_row).collect();
        let mut sums: BTreeMap<String, Sums> = sums.into_iter().map(sums_entry).collect();
        let mut reflections: BTreeMap<String, i64> = reflections.into_iter().collect();
        if let Some(readable) = readable {
            let mut teachers: BTreeMap<&str, SessionTeachers> = sessions
                .iter()
                .map(|s| (s.id.as_str(), SessionTeachers { teacher_id: s.teacher_id.clone(), co_teachers: Vec::new() }))
                .collect();
            for (session, teacher) in co_teachers {
                if let Some(t) = teachers.get_mut(session.as_str()) {
                    t.co_teachers.push(teacher);
                }
            }
            let kept: BTreeSet<String> =
                teachers.into_iter().filter(|(_, t)| readable(t)).map(|(id, _)| id.to_owned()).collect();
            sessions.retain(|s| kept.contains(&s.id));
            sums.retain(|id, _| kept.contains(id));
            reflections.retain(|id, _| kept.contains(id));
        }
        let mut summary = StudentSummary {
            student_id: student.to_owned(),
            sessions_attended: 0,
            reflections: reflections.values().sum(),
            counts: Counts::default(),
            sessions: Vec::with_capacity(sessions.len()),
        };
        // Totals come from every row, even one whose room session was purged.
        for s in sums.values() {
            summary.counts.add(&s.counts);
            if s.joins > 0 {
                summary.sessions_attended += 1;
            }
        }
        for row in sessions.into_iter().rev() {
            summary.sessions.push(StudentSession {
                counts: sums.get(&row.id).map(|s| s.counts).unwrap_or_default(),
                reflections: reflections.get(&row.id).copied().unwrap_or(0),
                room_session_id: row.id,
                room_code: row.room_code,
                room_name: row.room_name,
                started_at_ms: row.started_at_ms,
                ended_at_ms: row.ended_at_ms,
            });
        }
        Ok(summary)
    }

    /// A room session of `tenant` with its co-teachers, students (by id) and reflections
    /// (oldest first), or `None` if `tenant` has no such session.
    pub async fn session_sel(&self, tenant: &str, room_session_id: &str) -> Result<Option<SessionSel>, StoreError> {
        const OP: &str = "session_sel";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let (session, co_teachers, sums, reflections) = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_read()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let session: Option<SessionTuple> = sqlx::query_as(&d.sql(SESSION))
                .bind(tenant)
                .bind(room_session_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(failed)?;
            let Some(session) = session else {
                return Ok(None);
            };
            let co_teachers: Vec<String> = sqlx::query_scalar(&d.sql(SESSION_CO_TEACHERS))
                .bind(tenant)
                .bind(room_session_id)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            let sums: Vec<SumsTuple> = sqlx::query_as(&d.sql(SESSION_PARTICIPATION_BY_STUDENT))
                .bind(tenant)
                .bind(room_session_id)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            let reflections: Vec<ReflectionTuple> = sqlx::query_as(&d.sql(SESSION_REFLECTIONS))
                .bind(tenant)
                .bind(room_session_id)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            (session, co_teachers, sums, reflections)
        });

        let reflections: Vec<ReflectionRow> = reflections.into_iter().map(reflection_row).collect();
        let mut students: BTreeMap<String, StudentInSession> = BTreeMap::new();
        for (student_id, s) in sums.into_iter().map(sums_entry) {
            let student = StudentInSession {
                student_id: student_id.clone(),
                counts: s.counts,
                reflections: 0,
                first_joined_at_ms: s.first_joined_at_ms,
            };
            students.insert(student_id, student);
        }
        for r in &reflections {
            students
                .entry(r.student_id.clone())
                .or_insert_with(|| StudentInSession {
                    student_id: r.student_id.clone(),
                    counts: Counts::default(),
                    reflections: 0,
                    first_joined_at_ms: None,
                })
                .reflections += 1;
        }
        Ok(Some(SessionSel {
            session: session_row(session),
            co_teachers,
            students: students.into_values().collect(),
            reflections,
        }))
    }

    /// Everything `tenant` stores about `student`: the room sessions the student has rows in
    /// (oldest first), the student's participation (in time order) and reflections (oldest
    /// first). Nothing of another student, except the room sessions' own fields.
    pub async fn export_student(&self, tenant: &str, student: &str) -> Result<StudentExport, StoreError> {
        const OP: &str = "export_student";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let (sessions, participation, reflections, notes) = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_read()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let sessions: Vec<SessionTuple> = sqlx::query_as(&d.sql(SESSIONS_OF_STUDENT))
                .bind(tenant)
                .bind(student)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            let participation: Vec<ParticipationTuple> = sqlx::query_as(&d.sql(STUDENT_PARTICIPATION))
                .bind(tenant)
                .bind(student)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            let reflections: Vec<ReflectionTuple> = sqlx::query_as(&d.sql(STUDENT_REFLECTIONS))
                .bind(tenant)
                .bind(student)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            let notes: Vec<RecordedNoteTuple> = sqlx::query_as(&d.sql(STUDENT_RECORDED_NOTES))
                .bind(tenant)
                .bind(student)
                .fetch_all(&mut *tx)
                .await
                .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            (sessions, participation, reflections, notes)
        });
        Ok(StudentExport {
            tenant_id: tenant.to_owned(),
            student_id: student.to_owned(),
            room_sessions: sessions.into_iter().map(session_row).collect(),
            participation: participation.into_iter().map(|t| participation_row(OP, t)).collect::<Result<_, _>>()?,
            reflections: reflections.into_iter().map(reflection_row).collect(),
            recorded_notes: notes.into_iter().map(recorded_note_row).collect(),
        })
    }

    /// Deletes every participation row, reflection and recorded note of `student` in
    /// `tenant`, in one transaction (a hard delete; room sessions and takes, which belong to
    /// the teacher, stay without the student's notes).
    pub async fn delete_student(&self, tenant: &str, student: &str) -> Result<Deleted, StoreError> {
        const OP: &str = "delete_student";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let deleted = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_write()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let participation = sqlx::query(&d.sql(DELETE_STUDENT_PARTICIPATION))
                .bind(tenant)
                .bind(student)
                .execute(&mut *tx)
                .await
                .map_err(failed)?
                .rows_affected();
            let reflections = sqlx::query(&d.sql(DELETE_STUDENT_REFLECTIONS))
                .bind(tenant)
                .bind(student)
                .execute(&mut *tx)
                .await
                .map_err(failed)?
                .rows_affected();
            let recorded_notes = sqlx::query(&d.sql(DELETE_STUDENT_RECORDED_NOTES))
                .bind(tenant)
                .bind(student)
                .execute(&mut *tx)
                .await
                .map_err(failed)?
                .rows_affected();
            tx.commit().await.map_err(failed)?;
            Deleted { participation, reflections, recorded_notes }
        });
        Ok(deleted)
    }

    /// Retention: deletes `tenant`'s participation, reflections and recorded notes older than
    /// `cutoff_ms`, its takes that started before it and hold no note any more (with their
    /// timelines), and its room sessions that ended before it and have no rows left (with
    /// their co-teachers), in one transaction.
    /// Returns the number of rows deleted.
    pub async fn purge_before(&self, tenant: &str, cutoff_ms: i64) -> Result<u64, StoreError> {
        const OP: &str = "purge_before";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let deleted = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_write()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let mut deleted = 0;
            for sql in [
                PURGE_PARTICIPATION,
                PURGE_REFLECTIONS,
                PURGE_RECORDED_NOTES,
                PURGE_RECORDING_TIMELINES,
                PURGE_RECORDINGS,
                PURGE_CO_TEACHERS,
                PURGE_SESSIONS,
            ] {
                deleted += sqlx::query(&d.sql(sql))
                    .bind(tenant)
                    .bind(cutoff_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(failed)?
                    .rows_affected();
            }
            tx.commit().await.map_err(failed)?;
            deleted
        });
        Ok(deleted)
    }

    /// The takes of the room session `room_session_id` of `tenant`, oldest first, with the
    /// notes each holds now.
    pub async fn recordings(&self, tenant: &str, room_session_id: &str) -> Result<Vec<TakeSummary>, StoreError> {
        const OP: &str = "recordings";
        let failed = |e| StoreError::from_sqlx(OP, e);
        type Row = (String, String, i64, i64, Option<i64>, Option<i64>, i64);
        let rows: Vec<Row> = with_backend!(self, |pool, d| {
            sqlx::query_as(&d.sql(SESSION_RECORDINGS))
                .bind(tenant)
                .bind(room_session_id)
                .fetch_all(pool)
                .await
                .map_err(failed)?
        });
        Ok(rows
            .into_iter()
            .map(|(a, b, c, d, e, f, notes)| TakeSummary { recording: recording_row((a, b, c, d, e, f)), notes })
            .collect())
    }

    /// Take `take` of the room session `room_session_id` of `tenant`, whole, as of one
    /// snapshot; `None` if there is no such take.
    pub async fn recording(&self, tenant: &str, room_session_id: &str, take: i64) -> Result<Option<Take>, StoreError> {
        const OP: &str = "recording";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let found = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_read()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let recording: Option<RecordingTuple> = sqlx::query_as(&d.sql(RECORDING))
                .bind(tenant)
                .bind(room_session_id)
                .bind(take)
                .fetch_optional(&mut *tx)
                .await
                .map_err(failed)?;
            let found = match recording {
                None => None,
                Some(recording) => {
                    let timelines: Vec<RecordingTimelineTuple> = sqlx::query_as(&d.sql(RECORDING_TIMELINES))
                        .bind(tenant)
                        .bind(room_session_id)
                        .bind(take)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(failed)?;
                    let notes: Vec<RecordedNoteTuple> = sqlx::query_as(&d.sql(RECORDING_NOTES))
                        .bind(tenant)
                        .bind(room_session_id)
                        .bind(take)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(failed)?;
                    Some((recording, timelines, notes))
                }
            };
            tx.commit().await.map_err(failed)?;
            found
        });
        Ok(found.map(|(recording, timelines, notes)| Take {
            recording: recording_row(recording),
            timelines: timelines.into_iter().map(recording_timeline_row).collect(),
            notes: notes.into_iter().map(recorded_note_row).collect(),
        }))
    }

    /// For tests and audits: the number of rows, in every table of the schema (sqlx's
    /// migration bookkeeping aside) and across all tenants, with a TEXT column equal to
    /// `needle`. After [`Store::delete_student`], a student's id must count zero.
    pub async fn rows_mentioning(&self, needle: &str) -> Result<u64, StoreError> {
        const OP: &str = "rows_mentioning";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let count = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_read()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let columns: Vec<(String, String)> =
                sqlx::query_as(d.text_columns()).fetch_all(&mut *tx).await.map_err(failed)?;
            let mut tables: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (table, column) in columns {
                tables.entry(table).or_default().push(column);
            }
            let mut count: i64 = 0;
            for (table, columns) in &tables {
                let condition =
                    columns.iter().map(|c| format!("{} = $1", quote_identifier(c))).collect::<Vec<_>>().join(" OR ");
                let sql = format!("SELECT COUNT(*) FROM {} WHERE {condition}", quote_identifier(table));
                let sql = match d {
                    Dialect::Sqlite => numbered_placeholders(&sql),
                    Dialect::Postgres => sql,
                };
                let n: i64 = sqlx::query_scalar(&sql).bind(needle).fetch_one(&mut *tx).await.map_err(failed)?;
                count += n;
            }
            tx.commit().await.map_err(failed)?;
            count
        });
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Closes the pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        with_backend!(self, |pool, _d| pool.close().await);
    }
}

// ------------------------------------------------------------ sessions and their timelines

/// Which room sessions a teacher ran: owned, or co-taught as recorded with the session.
macro_rules! run_by_teacher {
    () => {
        "(s.teacher_id = $2 OR s.id IN (SELECT c.room_session_id FROM room_session_co_teachers AS c \
         WHERE c.tenant_id = $1 AND c.teacher_id = $2))"
    };
}

/// A room session's row, the students who joined it and the notes they played.
macro_rules! session_listing_columns {
    () => {
        "s.tenant_id, s.id, s.room_code, s.room_name, s.teacher_id, s.started_at_ms, s.ended_at_ms, \
         (SELECT COUNT(DISTINCT p.student_id) FROM participation AS p WHERE p.tenant_id = s.tenant_id \
             AND p.room_session_id = s.id AND p.kind = 'joined'), \
         (SELECT CAST(COALESCE(SUM(p.notes), 0) AS BIGINT) FROM participation AS p \
             WHERE p.tenant_id = s.tenant_id AND p.room_session_id = s.id AND p.kind = 'notes')"
    };
}

/// The newest `$3` room sessions of the school `$1` that the teacher `$2` ran.
const SESSIONS_OF_TEACHER: &str = concat!(
    "SELECT ",
    session_listing_columns!(),
    " FROM room_sessions AS s WHERE s.tenant_id = $1 AND ",
    run_by_teacher!(),
    " ORDER BY s.started_at_ms DESC, s.id DESC LIMIT $3"
);

/// The co-teachers of the sessions [`SESSIONS_OF_TEACHER`] lists.
const CO_TEACHERS_OF_TEACHERS_SESSIONS: &str = concat!(
    "SELECT room_session_id, teacher_id FROM room_session_co_teachers WHERE tenant_id = $1 \
     AND room_session_id IN (SELECT s.id FROM room_sessions AS s WHERE s.tenant_id = $1 AND ",
    run_by_teacher!(),
    " ORDER BY s.started_at_ms DESC, s.id DESC LIMIT $3) ORDER BY room_session_id, teacher_id"
);

/// The newest `$2` room sessions of the school `$1`.
const SESSIONS_OF_SCHOOL: &str = concat!(
    "SELECT ",
    session_listing_columns!(),
    " FROM room_sessions AS s WHERE s.tenant_id = $1 ORDER BY s.started_at_ms DESC, s.id DESC LIMIT $2"
);

/// The co-teachers of the sessions [`SESSIONS_OF_SCHOOL`] lists.
const CO_TEACHERS_OF_SCHOOLS_SESSIONS: &str = "SELECT room_session_id, teacher_id FROM room_session_co_teachers \
     WHERE tenant_id = $1 AND room_session_id IN (SELECT s.id FROM room_sessions AS s WHERE s.tenant_id = $1 \
     ORDER BY s.started_at_ms DESC, s.id DESC LIMIT $2) ORDER BY room_session_id, teacher_id";

/// When the last notes of a room session were counted (`NULL` before any).
const SESSION_LAST_NOTES: &str = "SELECT MAX(at_ms) FROM participation \
     WHERE tenant_id = $1 AND room_session_id = $2 AND kind = 'notes'";

/// A room session's notes rows grouped in stretches of `$4` ms from its start `$3` (a row
/// stamped before the start, which only a clock step makes, counts in the first): the
/// stretch's index, the students counted in it and the sums of their counts.
const SESSION_TIMELINE: &str = "SELECT (CASE WHEN at_ms > $3 THEN at_ms - $3 ELSE 0 END) / $4, \
     COUNT(DISTINCT student_id), \
     CAST(COALESCE(SUM(notes), 0) AS BIGINT), \
     CAST(COALESCE(SUM(timed), 0) AS BIGINT), \
     CAST(COALESCE(SUM(on_beat), 0) AS BIGINT), \
     CAST(COALESCE(SUM(offset_abs_sum_micros), 0) AS BIGINT), \
     CAST(COALESCE(SUM(offset_sum_micros), 0) AS BIGINT), \
     CAST(COALESCE(SUM(assigned), 0) AS BIGINT), \
     CAST(COALESCE(SUM(in_part), 0) AS BIGINT), \
     CAST(COALESCE(SUM(turns), 0) AS BIGINT) \
     FROM participation WHERE tenant_id = $1 AND room_session_id = $2 AND kind = 'notes' \
     GROUP BY 1 ORDER BY 1";

/// The widths a session's timeline is cut into, in ms, narrowest first: the first that gives
/// at most the asked number of stretches is used (past the last, whole hours).
const TIMELINE_WIDTHS_MS: [i64; 11] =
    [5_000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000, 1_800_000, 3_600_000];

/// The width of the stretches for a timeline whose last notes were counted `span_ms` after
/// the session started, so that there are at most `max_buckets` (at least 1) of them.
pub fn timeline_bucket_ms(span_ms: i64, max_buckets: usize) -> i64 {
    let max = i64::try_from(max_buckets.max(1)).unwrap_or(i64::MAX);
    let span = span_ms.max(0);
    // Stretches 0 ..= span / width: at most `max` when span / width < max.
    TIMELINE_WIDTHS_MS.into_iter().find(|w| span / w < max).unwrap_or_else(|| {
        const HOUR: i64 = 3_600_000;
        let hours = span / (HOUR * max) + 1;
        hours.saturating_mul(HOUR)
    })
}

type SessionListingTuple = (String, String, String, String, String, i64, Option<i64>, i64, i64);
/// A stretch's index, its students and the eight sums.
type TimelineTuple = (i64, i64, i64, i64, i64, i64, i64, i64, i64, i64);

/// Room sessions for listings and charts.
impl Store {
    /// The newest `limit` room sessions of `tenant`, newest first, with their co-teachers and
    /// how many students joined and notes were played: of every teacher (`teacher` is `None`),
    /// or only those `teacher` ran (owned or co-taught).
    pub async fn sessions(
        &self,
        tenant: &str,
        teacher: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SessionListing>, StoreError> {
        const OP: &str = "sessions";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let limit = i64::from(limit);
        let (rows, co_teachers) = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_read()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let (rows, co_teachers): (Vec<SessionListingTuple>, Vec<(String, String)>) = match teacher {
                Some(teacher) => (
                    sqlx::query_as(&d.sql(SESSIONS_OF_TEACHER))
                        .bind(tenant)
                        .bind(teacher)
                        .bind(limit)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(failed)?,
                    sqlx::query_as(&d.sql(CO_TEACHERS_OF_TEACHERS_SESSIONS))
                        .bind(tenant)
                        .bind(teacher)
                        .bind(limit)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(failed)?,
                ),
                None => (
                    sqlx::query_as(&d.sql(SESSIONS_OF_SCHOOL))
                        .bind(tenant)
                        .bind(limit)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(failed)?,
                    sqlx::query_as(&d.sql(CO_TEACHERS_OF_SCHOOLS_SESSIONS))
                        .bind(tenant)
                        .bind(limit)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(failed)?,
                ),
            };
            tx.commit().await.map_err(failed)?;
            (rows, co_teachers)
        });
        let mut by_session: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (session, teacher) in co_teachers {
            by_session.entry(session).or_default().push(teacher);
        }
        Ok(rows
            .into_iter()
            .map(|(tenant_id, id, room_code, room_name, teacher_id, started_at_ms, ended_at_ms, students, notes)| {
                SessionListing {
                    co_teachers: by_session.remove(&id).unwrap_or_default(),
                    session: session_row((tenant_id, id, room_code, room_name, teacher_id, started_at_ms, ended_at_ms)),
                    students,
                    notes,
                }
            })
            .collect())
    }

    /// The participation of the room session `room_session_id` of `tenant` over time, in at
    /// most `max_buckets` stretches of one width ([`timeline_bucket_ms`]) from the session's
    /// start, as of one snapshot; `None` if `tenant` has no such session.
    pub async fn session_timeline(
        &self,
        tenant: &str,
        room_session_id: &str,
        max_buckets: usize,
    ) -> Result<Option<SessionTimeline>, StoreError> {
        const OP: &str = "session_timeline";
        let failed = |e| StoreError::from_sqlx(OP, e);
        let found = with_backend!(self, |pool, d| {
            let mut tx = pool.begin_with(d.begin_read()).await.map_err(|e| StoreError::connecting(OP, e))?;
            let session: Option<SessionTuple> = sqlx::query_as(&d.sql(SESSION))
                .bind(tenant)
                .bind(room_session_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(failed)?;
            let found = match session {
                None => None,
                Some(session) => {
                    let started_at_ms = session.5;
                    let last: Option<i64> = sqlx::query_scalar(&d.sql(SESSION_LAST_NOTES))
                        .bind(tenant)
                        .bind(room_session_id)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(failed)?;
                    let bucket_ms =
                        timeline_bucket_ms(last.map_or(0, |at| at.saturating_sub(started_at_ms)), max_buckets);
                    let rows: Vec<TimelineTuple> = match last {
                        None => Vec::new(),
                        Some(_) => sqlx::query_as(&d.sql(SESSION_TIMELINE))
                            .bind(tenant)
                            .bind(room_session_id)
                            .bind(started_at_ms)
                            .bind(bucket_ms)
                            .fetch_all(&mut *tx)
                            .await
                            .map_err(failed)?,
                    };
                    Some((bucket_ms, rows))
                }
            };
            tx.commit().await.map_err(failed)?;
            found
        });
        let Some((bucket_ms, rows)) = found else { return Ok(None) };
        // Every stretch up to the last with notes, the empty ones too.
        let last = rows.last().map_or(-1, |r| r.0);
        let len = usize::try_from(last.saturating_add(1)).unwrap_or(0).min(max_buckets.max(1));
        let mut buckets: Vec<TimelineBucket> = (0..len)
            .map(|i| TimelineBucket {
                from_ms: i64::try_from(i).unwrap_or(i64::MAX).saturating_mul(bucket_ms),
                students: 0,
                counts: Counts::default(),
            })
            .collect();
        for (index, students, notes, timed, on_beat, offset, signed, assigned, in_part, turns) in rows {
            let counts = Counts {
                notes,
                timed,
                on_beat,
                offset_abs_sum_micros: offset,
                offset_sum_micros: signed,
                assigned,
                in_part,
                turns,
            };
            // Only a clock step could stamp a row past the span measured just before.
            let Some(bucket) = usize::try_from(index).ok().and_then(|i| buckets.get_mut(i)) else { continue };
            bucket.students = students;
            bucket.counts = counts;
        }
        Ok(Some(SessionTimeline { bucket_ms, buckets }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered_for_sqlite() {
        let check = |input: &str, expected: &str| assert_eq!(numbered_placeholders(input), expected);
        check("SELECT 1", "SELECT 1");
        check("a = $1 AND b = $12 OR c = $1", "a = ?1 AND b = ?12 OR c = ?1");
        check("price$ = $2", "price$ = ?2");
        check(INSERT_REFLECTION, &INSERT_REFLECTION.replace('$', "?"));
    }

    #[test]
    fn counts_convert_saturating() {
        let tally = downbeat_engine::sel::Tally { notes: u64::MAX, timed: 3, ..Default::default() };
        let counts = Counts::from(tally);
        assert_eq!(counts.notes, i64::MAX);
        assert_eq!(counts.timed, 3);
        let back = downbeat_engine::sel::Tally::from(Counts { notes: -5, turns: 7, ..counts });
        assert_eq!((back.notes, back.timed, back.turns), (0, 3, 7));
        let mut sum = Counts { notes: i64::MAX, ..Default::default() };
        sum.add(&Counts { notes: 1, on_beat: 2, ..Default::default() });
        assert_eq!((sum.notes, sum.on_beat), (i64::MAX, 2));
    }

    #[tokio::test]
    async fn sqlite_runs_in_wal_with_full_sync() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("sel.db");
        // A plain path works as well as a `sqlite://` URL.
        let store = Store::open(path.to_str().expect("a UTF-8 path")).await.expect("opens");
        let Backend::Sqlite(pool) = &store.backend else { panic!("a path opens SQLite") };
        let mut conn = pool.acquire().await.expect("a connection");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut *conn).await.expect("journal mode");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut *conn).await.expect("synchronous");
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout").fetch_one(&mut *conn).await.expect("busy timeout");
        assert_eq!((mode.as_str(), sync, busy), ("wal", 2, 5000));
        drop(conn);
        assert_eq!(format!("{store:?}"), "Store { backend: \"sqlite\", .. }");
        store.close().await;
    }

    /// Sets `PRAGMA max_page_count` on every connection of the SQLite pool (it is a setting
    /// of each connection, not of the file).
    async fn limit_pages(pool: &SqlitePool, pages: i64) {
        let mut held = Vec::new();
        for _ in 0..SQLITE_CONNECTIONS {
            let mut conn = pool.acquire().await.expect("a connection");
            sqlx::raw_sql(&format!("PRAGMA max_page_count = {pages}")).execute(&mut *conn).await.expect("limiting");
            held.push(conn);
        }
    }

    /// SQLite's full disk (`SQLITE_FULL`, here from `max_page_count`, as from a disk with no
    /// space left) rolls the whole transaction back by itself: the connection must come back
    /// usable, so writes work again once there is room.
    #[tokio::test]
    async fn a_full_sqlite_database_takes_writes_again_once_there_is_room() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = Store::open(dir.path().join("sel.db").to_str().expect("a UTF-8 path")).await.expect("opens");
        let Backend::Sqlite(pool) = &store.backend else { panic!("a path opens SQLite") };
        let row = |n: u32| ReflectionRow {
            tenant_id: "t".into(),
            student_id: format!("s-{n}"),
            id: format!("r-{n}"),
            room_session_id: "rs".into(),
            prompt: "p".into(),
            mood: None,
            text: Some("x".repeat(900)),
            created_at_ms: 1,
        };
        store.write(&Batch { reflections: vec![row(0)], ..Batch::default() }).await.expect("room at first");
        let mut conn = pool.acquire().await.expect("a connection");
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count").fetch_one(&mut *conn).await.expect("pages");
        drop(conn);
        limit_pages(pool, pages).await;
        let big = Batch { reflections: (1..50).map(row).collect(), ..Batch::default() };
        let error = store.write(&big).await.expect_err("no room");
        assert!(error.is_retryable(), "a full database is waited out: {error:?}");
        for _ in 0..3 {
            // The pool replaces a connection it closed after the failure with a fresh one,
            // which has no page limit: set it on every connection again.
            limit_pages(pool, pages).await;
            let again = store.write(&big).await.expect_err("still no room");
            assert!(again.is_retryable(), "{again:?}");
        }
        limit_pages(pool, 1 << 30).await;
        store.write(&big).await.expect("room again");
        store.close().await;
    }

    #[tokio::test]
    async fn bad_urls_are_refused_without_echoing_them() {
        let error = Store::open("postgres://user:hunter2@[::1").await.expect_err("not a URL");
        assert!(!error.is_retryable());
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = Store::open("").await.expect_err("empty");
        assert!(matches!(error, StoreError::InvalidUrl(_)));
    }

    #[test]
    fn kinds_round_trip() {
        for kind in [ParticipationKind::Joined, ParticipationKind::Left, ParticipationKind::Notes] {
            assert_eq!(kind.as_str().parse(), Ok(kind));
        }
        assert!("clapped".parse::<ParticipationKind>().is_err());
    }
}
