-- The SEL store's tables. One SQL for SQLite and PostgreSQL: BIGINT integers (Unix
-- milliseconds for times), TEXT strings, no generated keys, no booleans, no blobs.
-- Every row carries tenant_id and every key starts with it. Student ids are pseudonymous
-- token subjects, never names.

-- One room's run, from creation to close.
CREATE TABLE room_sessions (
    tenant_id TEXT NOT NULL,
    id TEXT NOT NULL,
    room_code TEXT NOT NULL,
    room_name TEXT NOT NULL,
    teacher_id TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    ended_at_ms BIGINT,
    PRIMARY KEY (tenant_id, id)
);

-- Retention: ended sessions by end time.
CREATE INDEX room_sessions_ended ON room_sessions (tenant_id, ended_at_ms);

-- What a student did in a session: joined, left, or a batch of note counts. `seq` is given
-- by the room session (unique within it), so a retried batch hits the primary key and
-- inserts nothing.
CREATE TABLE participation (
    tenant_id TEXT NOT NULL,
    room_session_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    student_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('joined', 'left', 'notes')),
    at_ms BIGINT NOT NULL,
    notes BIGINT NOT NULL,
    timed BIGINT NOT NULL,
    on_beat BIGINT NOT NULL,
    offset_abs_sum_micros BIGINT NOT NULL,
    assigned BIGINT NOT NULL,
    in_part BIGINT NOT NULL,
    turns BIGINT NOT NULL,
    -- Also serves the per-session queries.
    PRIMARY KEY (tenant_id, room_session_id, seq)
);

-- A student's summary, export and deletion.
CREATE INDEX participation_student ON participation (tenant_id, student_id, room_session_id);
-- Retention.
CREATE INDEX participation_time ON participation (tenant_id, at_ms);

-- A student's answer to a reflection prompt. `id` is chosen by the client, so a retry of the
-- same answer is a no-op and the first content wins.
CREATE TABLE reflections (
    tenant_id TEXT NOT NULL,
    student_id TEXT NOT NULL,
    id TEXT NOT NULL,
    room_session_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    mood BIGINT,
    text TEXT,
    created_at_ms BIGINT NOT NULL,
    -- Also serves a student's summary, export and deletion.
    PRIMARY KEY (tenant_id, student_id, id)
);

-- A session's reflections, oldest first.
CREATE INDEX reflections_session ON reflections (tenant_id, room_session_id, created_at_ms);
-- Retention.
CREATE INDEX reflections_time ON reflections (tenant_id, created_at_ms);
