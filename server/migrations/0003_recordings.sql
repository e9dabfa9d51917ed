-- Recordings ("takes") of a room session, started and stopped by its teachers. Times inside a
-- take are nanoseconds from its start (offset_nanos), so a take reads back without the
-- server's clock. Notes are children's data: each row names its player (a pseudonymous token
-- subject), so a student's export holds their notes and their deletion removes them (the
-- take stays, without them).

CREATE TABLE recordings (
    tenant_id TEXT NOT NULL,
    room_session_id TEXT NOT NULL,
    take BIGINT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    -- Set once, when the take stops (or the room closes).
    stopped_at_ms BIGINT,
    length_nanos BIGINT,
    PRIMARY KEY (tenant_id, room_session_id, take)
);

-- Retention.
CREATE INDEX recordings_time ON recordings (tenant_id, started_at_ms);

-- The timeline a take ran on: as it started and after every change while it ran, one row per
-- epoch. `segments` is JSON: [{offset_nanos, start_beat, tempo_micro_bpm, beats_per_bar,
-- running, count_in_bars}].
CREATE TABLE recording_timelines (
    tenant_id TEXT NOT NULL,
    room_session_id TEXT NOT NULL,
    take BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    segments TEXT NOT NULL,
    PRIMARY KEY (tenant_id, room_session_id, take, epoch)
);

-- Every note the room accepted while the take ran. `seq` is given by the room (unique in the
-- take), so a retried write inserts nothing.
CREATE TABLE recorded_notes (
    tenant_id TEXT NOT NULL,
    room_session_id TEXT NOT NULL,
    take BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    student_id TEXT NOT NULL,
    member_id BIGINT NOT NULL,
    part TEXT,
    midi BIGINT NOT NULL,
    velocity BIGINT NOT NULL,
    instrument BIGINT NOT NULL,
    offset_nanos BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, room_session_id, take, seq)
);

-- A student's export and deletion.
CREATE INDEX recorded_notes_student ON recorded_notes (tenant_id, student_id);
-- Retention.
CREATE INDEX recorded_notes_time ON recorded_notes (tenant_id, at_ms);
