-- What the server's operators did from the inspector: who (the operator's token subject and
-- name), what, on which school's room or session, when, and how it ended. No child's id,
-- name or words are ever written here, so a child's deletion has nothing to remove.

CREATE TABLE operator_audit (
    -- Random, 128 bits, hex.
    id TEXT PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    operator_id TEXT NOT NULL,
    operator_name TEXT NOT NULL,
    action TEXT NOT NULL,
    tenant_id TEXT,
    room_code TEXT,
    -- What was acted on inside the room, e.g. `session 12` or `note 72`.
    target TEXT,
    -- `ok`, or the stable error code the action was refused with; NULL while it runs.
    outcome TEXT
);

CREATE INDEX operator_audit_time ON operator_audit (at_ms);
