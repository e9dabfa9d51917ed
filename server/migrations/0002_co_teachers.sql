-- The co-teachers of a room session, added and removed by the room's owner while it runs:
-- the rows left when it ends are the teachers who co-taught it, who keep reading its SEL
-- data (the owner is room_sessions.teacher_id). Purged with their session.
CREATE TABLE room_session_co_teachers (
    tenant_id TEXT NOT NULL,
    room_session_id TEXT NOT NULL,
    teacher_id TEXT NOT NULL,
    PRIMARY KEY (tenant_id, room_session_id, teacher_id)
);
