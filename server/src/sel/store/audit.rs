//! The operators' audit log: one row per inspector action, written before the action is
//! carried out (an action that cannot be logged is not done) and completed with its outcome.

use serde::Serialize;

use super::{Backend, Dialect, Store, StoreError};

/// One inspector action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    /// Random, 128 bits, hex.
    pub id: String,
    /// When it was asked, Unix milliseconds.
    pub at_ms: i64,
    /// The operator's token subject.
    pub operator_id: String,
    /// The operator's display name.
    pub operator_name: String,
    /// What was asked: `observe`, `test_note`, `test_prompt`, `close_room`, `end_session`.
    pub action: String,
    /// The school acted on.
    pub tenant_id: Option<String>,
    /// The room acted on.
    pub room_code: Option<String>,
    /// What inside the room, e.g. `session 12`.
    pub target: Option<String>,
    /// `ok`, or the stable code it was refused with; `None` while it runs (or if the server
    /// stopped before it ended).
    pub outcome: Option<String>,
}

const INSERT: &str = "INSERT INTO operator_audit \
    (id, at_ms, operator_id, operator_name, action, tenant_id, room_code, target, outcome) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
const OUTCOME: &str = "UPDATE operator_audit SET outcome = $2 WHERE id = $1";
const NEWEST: &str = "SELECT id, at_ms, operator_id, operator_name, action, tenant_id, room_code, target, outcome \
    FROM operator_audit ORDER BY at_ms DESC, id DESC LIMIT $1";

impl Store {
    /// Writes `entry` (committed, and synced on SQLite, before it returns `Ok`).
    pub async fn audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        const OP: &str = "audit";
        with_backend!(self, |pool, d| {
            sqlx::query(&d.sql(INSERT))
                .bind(&entry.id)
                .bind(entry.at_ms)
                .bind(&entry.operator_id)
                .bind(&entry.operator_name)
                .bind(&entry.action)
                .bind(&entry.tenant_id)
                .bind(&entry.room_code)
                .bind(&entry.target)
                .bind(&entry.outcome)
                .execute(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(OP, e))?;
        });
        Ok(())
    }

    /// Records how the action `id` ended.
    pub async fn audit_outcome(&self, id: &str, outcome: &str) -> Result<(), StoreError> {
        const OP: &str = "audit_outcome";
        with_backend!(self, |pool, d| {
            sqlx::query(&d.sql(OUTCOME))
                .bind(id)
                .bind(outcome)
                .execute(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(OP, e))?;
        });
        Ok(())
    }

    /// The newest `limit` entries, newest first.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        const OP: &str = "audit_log";
        let entries = with_backend!(self, |pool, d| {
            sqlx::query_as::<_, AuditEntry>(&d.sql(NEWEST))
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await
                .map_err(|e| StoreError::from_sqlx(OP, e))?
        });
        Ok(entries)
    }
}
