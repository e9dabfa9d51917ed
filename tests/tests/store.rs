//! The SEL store on both backends, for real: every test runs once on a SQLite file and once
//! on a fresh PostgreSQL database (`sqlite::name` and `postgres::name`).

use anyhow::Result;
use downbeat_server::sel::store::{
    Batch, CoTeacherChange, Counts, Deleted, ParticipationKind, ParticipationRow, ReflectionRow, RoomSessionRow,
    SessionEnd, SessionTimeline, Store, StudentInSession, StudentSession, TimelineBucket, timeline_bucket_ms,
};
use downbeat_tests::db::{Backend, TestDatabase};

/// Generates `sqlite::$name` and `postgres::$name` for each `async fn $name(Backend)`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

on_both_backends!(
    migrating_twice_is_fine,
    summary_adds_up,
    a_batch_written_twice_is_stored_once,
    a_retried_reflection_keeps_its_first_content,
    session_view,
    export_holds_the_student_and_nobody_else,
    delete_removes_every_mention,
    tenants_never_see_each_other,
    purge_removes_what_is_older_than_the_cutoff,
    an_outage_fails_writes_as_retryable_until_it_ends,
    co_teachers_are_kept_with_their_session_in_order,
    sessions_are_listed_for_who_ran_them_and_cut_into_a_timeline,
);

const T: &str = "school-a";

fn session(tenant: &str, id: &str, started_at_ms: i64) -> RoomSessionRow {
    RoomSessionRow {
        tenant_id: tenant.into(),
        id: id.into(),
        room_code: format!("CODE-{id}"),
        room_name: format!("Room {id}"),
        teacher_id: "teacher-1".into(),
        started_at_ms,
        ended_at_ms: None,
    }
}

fn end(tenant: &str, id: &str, ended_at_ms: i64) -> SessionEnd {
    SessionEnd { tenant_id: tenant.into(), id: id.into(), ended_at_ms }
}

fn event(
    tenant: &str,
    room_session: &str,
    seq: i64,
    student: &str,
    kind: ParticipationKind,
    at_ms: i64,
) -> ParticipationRow {
    ParticipationRow {
        tenant_id: tenant.into(),
        room_session_id: room_session.into(),
        seq,
        student_id: student.into(),
        kind,
        at_ms,
        counts: Counts::default(),
    }
}

fn notes(tenant: &str, room_session: &str, seq: i64, student: &str, at_ms: i64, counts: Counts) -> ParticipationRow {
    ParticipationRow { counts, ..event(tenant, room_session, seq, student, ParticipationKind::Notes, at_ms) }
}

/// Counts with distinct numbers in every field, scaled by `k`.
fn counts(k: i64) -> Counts {
    Counts {
        notes: 10 * k,
        timed: 9 * k,
        on_beat: 7 * k,
        offset_abs_sum_micros: 123_456 * k,
        offset_sum_micros: -23_456 * k,
        assigned: 5 * k,
        in_part: 4 * k,
        turns: 3 * k,
    }
}

fn reflection(
    tenant: &str,
    student: &str,
    id: &str,
    room_session: &str,
    text: &str,
    created_at_ms: i64,
) -> ReflectionRow {
    ReflectionRow {
        tenant_id: tenant.into(),
        student_id: student.into(),
        id: id.into(),
        room_session_id: room_session.into(),
        prompt: "How did playing together feel?".into(),
        mood: Some(4),
        text: Some(text.into()),
        created_at_ms,
    }
}

/// Two room sessions of tenant `tenant`: `stu-1` joins both, plays in both and reflects on
/// both; `stu-2` joins the first only; `stu-3` only reflects on the first.
fn classroom(tenant: &str) -> Batch {
    Batch {
        sessions: vec![session(tenant, "rs-1", 1_000), session(tenant, "rs-2", 50_000)],
        session_ends: vec![end(tenant, "rs-1", 20_000)],
        participation: vec![
            event(tenant, "rs-1", 1, "stu-1", ParticipationKind::Joined, 1_100),
            event(tenant, "rs-1", 2, "stu-2", ParticipationKind::Joined, 1_200),
            notes(tenant, "rs-1", 3, "stu-1", 5_000, counts(1)),
            notes(tenant, "rs-1", 4, "stu-2", 5_000, counts(2)),
            notes(tenant, "rs-1", 5, "stu-1", 9_000, counts(3)),
            event(tenant, "rs-1", 6, "stu-1", ParticipationKind::Left, 10_000),
            // A second join in the same session is still one session attended.
            event(tenant, "rs-1", 7, "stu-1", ParticipationKind::Joined, 11_000),
            event(tenant, "rs-2", 1, "stu-1", ParticipationKind::Joined, 50_100),
            notes(tenant, "rs-2", 2, "stu-1", 55_000, counts(5)),
        ],
        reflections: vec![
            reflection(tenant, "stu-1", "r-1", "rs-1", "It felt good to keep the beat", 19_000),
            reflection(tenant, "stu-3", "r-1", "rs-1", "I listened", 18_000),
            reflection(tenant, "stu-1", "r-2", "rs-2", "We were together", 60_000),
        ],
        co_teachers: Vec::new(),
        ..Batch::default()
    }
}

fn sum(parts: &[Counts]) -> Counts {
    let mut total = Counts::default();
    for c in parts {
        total.add(c);
    }
    total
}

async fn open(db: &TestDatabase) -> Result<Store> {
    Ok(Store::open(db.url()).await?)
}

async fn migrating_twice_is_fine(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    assert_eq!(store.backend_name(), if backend == Backend::Sqlite { "sqlite" } else { "postgres" });
    store.ping().await?;
    store.write(&classroom(T)).await?;
    let before = store.student_summary(T, "stu-1").await?;
    store.close().await;

    let again = open(&db).await?;
    // And a third time while the second is open, as a second server process would.
    let third = open(&db).await?;
    assert_eq!(again.student_summary(T, "stu-1").await?, before);
    assert_eq!(third.student_summary(T, "stu-1").await?, before);
    again.close().await;
    third.close().await;
    Ok(())
}

async fn summary_adds_up(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    store.write(&classroom(T)).await?;

    let s = store.student_summary(T, "stu-1").await?;
    assert_eq!(s.student_id, "stu-1");
    assert_eq!(s.sessions_attended, 2);
    assert_eq!(s.reflections, 2);
    assert_eq!(s.counts, counts(9));
    assert_eq!(
        s.sessions,
        vec![
            StudentSession {
                room_session_id: "rs-2".into(),
                room_code: "CODE-rs-2".into(),
                room_name: "Room rs-2".into(),
                started_at_ms: 50_000,
                ended_at_ms: None,
                counts: counts(5),
                reflections: 1,
            },
            StudentSession {
                room_session_id: "rs-1".into(),
                room_code: "CODE-rs-1".into(),
                room_name: "Room rs-1".into(),
                started_at_ms: 1_000,
                ended_at_ms: Some(20_000),
                counts: counts(4),
                reflections: 1,
            },
        ]
    );
    assert_eq!(s.counts, sum(&s.sessions.iter().map(|x| x.counts).collect::<Vec<_>>()));

    let s2 = store.student_summary(T, "stu-2").await?;
    assert_eq!((s2.sessions_attended, s2.reflections, s2.counts), (1, 0, counts(2)));
    assert_eq!(s2.sessions.len(), 1);

    // Reflected without a stored join: the session is listed but not attended.
    let s3 = store.student_summary(T, "stu-3").await?;
    assert_eq!((s3.sessions_attended, s3.reflections, s3.counts), (0, 1, Counts::default()));
    assert_eq!(s3.sessions.iter().map(|x| x.room_session_id.as_str()).collect::<Vec<_>>(), ["rs-1"]);

    let nobody = store.student_summary(T, "stu-404").await?;
    assert_eq!((nobody.sessions_attended, nobody.reflections, nobody.sessions.len()), (0, 0, 0));

    // Big counts survive the round trip exactly (no float or NUMERIC rounding).
    let big = Counts { notes: 1 << 52, offset_abs_sum_micros: (1 << 60) + 1, ..Counts::default() };
    store.write(&Batch { participation: vec![notes(T, "rs-2", 3, "stu-4", 56_000, big)], ..Batch::default() }).await?;
    assert_eq!(store.student_summary(T, "stu-4").await?.counts, big);
    store.close().await;
    Ok(())
}

async fn a_batch_written_twice_is_stored_once(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    let batch = classroom(T);
    store.write(&batch).await?;
    let summary = store.student_summary(T, "stu-1").await?;
    let export = store.export_student(T, "stu-1").await?;
    let sel = store.session_sel(T, "rs-1").await?;
    let mentions = store.rows_mentioning(T).await?;
    assert_eq!(mentions, 2 + 9 + 3);

    // A retry after a lost acknowledgement, and another after a crash.
    store.write(&batch).await?;
    store.write(&batch).await?;
    assert_eq!(store.student_summary(T, "stu-1").await?, summary);
    assert_eq!(store.export_student(T, "stu-1").await?, export);
    assert_eq!(store.session_sel(T, "rs-1").await?, sel);
    assert_eq!(store.rows_mentioning(T).await?, mentions);

    // A later end does not move the first one.
    store.write(&Batch { session_ends: vec![end(T, "rs-1", 99_000)], ..Batch::default() }).await?;
    assert_eq!(store.session_sel(T, "rs-1").await?.map(|s| s.session.ended_at_ms), Some(Some(20_000)));

    // A batch overlapping the stored rows inserts only the new ones.
    let mut next = Batch::default();
    next.participation.push(batch.participation[2].clone());
    next.participation.push(notes(T, "rs-2", 3, "stu-1", 56_000, counts(1)));
    store.write(&next).await?;
    assert_eq!(store.student_summary(T, "stu-1").await?.counts, counts(10));

    // An empty batch is fine.
    store.write(&Batch::default()).await?;
    store.close().await;
    Ok(())
}

async fn a_retried_reflection_keeps_its_first_content(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    store.write(&classroom(T)).await?;
    let mut retry = reflection(T, "stu-1", "r-1", "rs-1", "A different text", 30_000);
    retry.mood = None;
    store.write(&Batch { reflections: vec![retry], ..Batch::default() }).await?;

    let export = store.export_student(T, "stu-1").await?;
    let r1: Vec<_> = export.reflections.iter().filter(|r| r.id == "r-1").collect();
    assert_eq!(r1.len(), 1);
    assert_eq!(r1[0].text.as_deref(), Some("It felt good to keep the beat"));
    assert_eq!((r1[0].mood, r1[0].created_at_ms), (Some(4), 19_000));
    assert_eq!(store.rows_mentioning("A different text").await?, 0);

    // The same client id from another student is another reflection.
    let other = reflection(T, "stu-2", "r-1", "rs-1", "Mine", 19_500);
    store.write(&Batch { reflections: vec![other], ..Batch::default() }).await?;
    assert_eq!(store.student_summary(T, "stu-2").await?.reflections, 1);
    assert_eq!(store.student_summary(T, "stu-1").await?.reflections, 2);
    store.close().await;
    Ok(())
}

async fn session_view(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    let batch = classroom(T);
    store.write(&batch).await?;

    let sel = store.session_sel(T, "rs-1").await?.expect("rs-1 is stored");
    assert_eq!(sel.session, RoomSessionRow { ended_at_ms: Some(20_000), ..batch.sessions[0].clone() });
    assert_eq!(
        sel.students,
        vec![
            StudentInSession {
                student_id: "stu-1".into(),
                counts: counts(4),
                reflections: 1,
                first_joined_at_ms: Some(1_100)
            },
            StudentInSession {
                student_id: "stu-2".into(),
                counts: counts(2),
                reflections: 0,
                first_joined_at_ms: Some(1_200)
            },
            StudentInSession {
                student_id: "stu-3".into(),
                counts: Counts::default(),
                reflections: 1,
                first_joined_at_ms: None
            },
        ]
    );
    // Oldest first.
    assert_eq!(sel.reflections, vec![batch.reflections[1].clone(), batch.reflections[0].clone()]);

    let rs2 = store.session_sel(T, "rs-2").await?.expect("rs-2 is stored");
    assert_eq!(rs2.session.ended_at_ms, None);
    assert_eq!(rs2.students.len(), 1);
    assert_eq!(store.session_sel(T, "rs-404").await?, None);
    store.close().await;
    Ok(())
}

async fn export_holds_the_student_and_nobody_else(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    let batch = classroom(T);
    store.write(&batch).await?;

    let export = store.export_student(T, "stu-1").await?;
    assert_eq!((export.tenant_id.as_str(), export.student_id.as_str()), (T, "stu-1"));
    let sessions: Vec<_> = export.room_sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(sessions, ["rs-1", "rs-2"]);
    let mine: Vec<_> = batch.participation.iter().filter(|p| p.student_id == "stu-1").cloned().collect();
    assert_eq!(export.participation, mine);
    let mine: Vec<_> = batch.reflections.iter().filter(|r| r.student_id == "stu-1").cloned().collect();
    assert_eq!(export.reflections, mine);

    let json = serde_json::to_string(&export)?;
    for other in ["stu-2", "stu-3", "I listened"] {
        assert!(!json.contains(other), "the export mentions {other}");
    }
    assert!(json.contains("\"kind\":\"joined\""), "kinds serialize in snake_case: {json}");

    let nobody = store.export_student(T, "stu-404").await?;
    assert!(nobody.room_sessions.is_empty() && nobody.participation.is_empty() && nobody.reflections.is_empty());
    store.close().await;
    Ok(())
}

async fn delete_removes_every_mention(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    store.write(&classroom(T)).await?;
    assert_eq!(store.rows_mentioning("stu-1").await?, 9);
    let others = (store.student_summary(T, "stu-2").await?, store.student_summary(T, "stu-3").await?);
    let export_2 = store.export_student(T, "stu-2").await?;

    let deleted = store.delete_student(T, "stu-1").await?;
    assert_eq!(deleted, Deleted { participation: 7, reflections: 2, recorded_notes: 0 });
    assert_eq!(store.rows_mentioning("stu-1").await?, 0);
    assert_eq!(store.rows_mentioning("It felt good to keep the beat").await?, 0);
    let gone = store.export_student(T, "stu-1").await?;
    assert!(gone.room_sessions.is_empty() && gone.participation.is_empty() && gone.reflections.is_empty());

    assert_eq!((store.student_summary(T, "stu-2").await?, store.student_summary(T, "stu-3").await?), others);
    assert_eq!(store.export_student(T, "stu-2").await?, export_2);
    // Room sessions are the teacher's and stay.
    assert!(store.session_sel(T, "rs-2").await?.is_some());

    // Deleting again deletes nothing.
    assert_eq!(store.delete_student(T, "stu-1").await?, Deleted::default());
    store.close().await;
    Ok(())
}

async fn tenants_never_see_each_other(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    let (a, b) = ("school-a", "school-b");
    store.write(&classroom(a)).await?;
    let a_summary = store.student_summary(a, "stu-1").await?;
    let a_sel = store.session_sel(a, "rs-1").await?;

    // B knows A's ids and still reads nothing.
    let s = store.student_summary(b, "stu-1").await?;
    assert_eq!((s.sessions_attended, s.reflections, s.counts, s.sessions.len()), (0, 0, Counts::default(), 0));
    assert_eq!(store.session_sel(b, "rs-1").await?, None);
    let e = store.export_student(b, "stu-1").await?;
    assert!(e.room_sessions.is_empty() && e.participation.is_empty() && e.reflections.is_empty());
    assert_eq!(store.delete_student(b, "stu-1").await?, Deleted::default());
    assert_eq!(store.purge_before(b, i64::MAX).await?, 0);
    assert_eq!(store.student_summary(a, "stu-1").await?, a_summary);
    assert_eq!(store.session_sel(a, "rs-1").await?, a_sel);

    // The same ids in B are B's own rows, and the keys do not collide.
    let mut b_batch = Batch {
        sessions: vec![session(b, "rs-1", 7_000)],
        participation: vec![
            event(b, "rs-1", 1, "stu-1", ParticipationKind::Joined, 7_100),
            notes(b, "rs-1", 2, "stu-1", 7_200, counts(100)),
        ],
        reflections: vec![reflection(b, "stu-1", "r-1", "rs-1", "Other school", 7_300)],
        ..Batch::default()
    };
    b_batch.sessions[0].room_name = "B's room".into();
    store.write(&b_batch).await?;
    let s = store.student_summary(b, "stu-1").await?;
    assert_eq!((s.sessions_attended, s.reflections, s.counts), (1, 1, counts(100)));
    assert_eq!(store.session_sel(b, "rs-1").await?.map(|s| s.session.room_name), Some("B's room".into()));
    assert_eq!(store.student_summary(a, "stu-1").await?, a_summary);
    assert_eq!(store.session_sel(a, "rs-1").await?, a_sel);

    // Deleting in B leaves A alone.
    assert_eq!(
        store.delete_student(b, "stu-1").await?,
        Deleted { participation: 2, reflections: 1, recorded_notes: 0 }
    );
    assert_eq!(store.student_summary(a, "stu-1").await?, a_summary);
    store.close().await;
    Ok(())
}

async fn purge_removes_what_is_older_than_the_cutoff(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    store.write(&classroom(T)).await?;
    store.write(&classroom("school-b")).await?;
    // A late reflection on rs-1 keeps rs-1 past its purge.
    let late = reflection(T, "stu-2", "r-9", "rs-1", "Later", 70_000);
    store.write(&Batch { reflections: vec![late], ..Batch::default() }).await?;

    // Before 10_000: participation at 1_100, 1_200, 5_000, 5_000, 9_000; no reflection; rs-1
    // ended later.
    assert_eq!(store.purge_before(T, 10_000).await?, 5);
    let s = store.student_summary(T, "stu-1").await?;
    assert_eq!((s.sessions_attended, s.counts), (2, counts(5)));
    assert_eq!(store.student_summary(T, "stu-2").await?.counts, Counts::default());
    // Purging again at the same cutoff deletes nothing.
    assert_eq!(store.purge_before(T, 10_000).await?, 0);

    // Before 60_000: the rest of rs-1's participation (2), rs-2's (2) and the reflections at
    // 18_000 and 19_000 (2); rs-1 ended at 20_000 but the late reflection still refers to it.
    assert_eq!(store.purge_before(T, 60_000).await?, 6);
    assert!(store.session_sel(T, "rs-1").await?.is_some());
    assert_eq!(store.rows_mentioning("stu-3").await?, 1, "only school-b's stu-3 is left");

    // Before 80_000: the last two reflections, then rs-1 has nothing left and goes; rs-2 is
    // still open and stays.
    assert_eq!(store.purge_before(T, 80_000).await?, 3);
    assert_eq!(store.session_sel(T, "rs-1").await?, None);
    assert!(store.session_sel(T, "rs-2").await?.is_some());

    // The other tenant was not touched.
    let b = store.student_summary("school-b", "stu-1").await?;
    assert_eq!((b.sessions_attended, b.reflections, b.counts), (2, 2, counts(9)));
    store.close().await;
    Ok(())
}

async fn an_outage_fails_writes_as_retryable_until_it_ends(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    let batch = classroom(T);
    store.write(&Batch { sessions: batch.sessions.clone(), ..Batch::default() }).await?;

    let outage = db.make_unavailable().await;
    let error = store.write(&batch).await.expect_err("the database is unavailable");
    assert!(error.is_retryable(), "{error} ({error:?}) should be retryable");
    let text = error.to_string();
    for secret in ["downbeat:downbeat", "stu-1", "It felt good"] {
        assert!(!text.contains(secret), "the error text '{text}' leaks {secret}");
    }
    outage.end().await;

    // The same batch goes in whole, once.
    store.write(&batch).await?;
    store.ping().await?;
    assert_eq!(store.student_summary(T, "stu-1").await?.counts, counts(9));
    store.close().await;
    db.drop_now().await;
    Ok(())
}

fn co_teacher(tenant: &str, room_session: &str, teacher: &str, present: bool) -> CoTeacherChange {
    CoTeacherChange {
        tenant_id: tenant.into(),
        room_session_id: room_session.into(),
        teacher_id: teacher.into(),
        present,
    }
}

/// Co-teachers added and removed are applied in order (within a batch and when retried),
/// read back with their session, limit a summary to the sessions a reader's filter accepts,
/// and are purged with their session.
async fn co_teachers_are_kept_with_their_session_in_order(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    store.write(&classroom(T)).await?;
    let changes = Batch {
        co_teachers: vec![
            co_teacher(T, "rs-1", "t-co", true),
            co_teacher(T, "rs-1", "t-gone", true),
            co_teacher(T, "rs-1", "t-gone", false),
            co_teacher(T, "rs-1", "t-back", false),
            co_teacher(T, "rs-1", "t-back", true),
            co_teacher("school-b", "rs-1", "t-b", true),
        ],
        ..Batch::default()
    };
    store.write(&changes).await?;
    store.write(&changes).await?;
    let sel = store.session_sel(T, "rs-1").await?.expect("rs-1 is stored");
    assert_eq!(sel.co_teachers, ["t-back", "t-co"]);
    assert_eq!(store.session_sel(T, "rs-2").await?.map(|s| s.co_teachers), Some(Vec::new()));

    // A summary limited to the sessions `t-co` ran: rs-1 only, its totals alone.
    let all = store.student_summary(T, "stu-1").await?;
    let ran = |t: &downbeat_server::sel::store::SessionTeachers| t.co_teachers.iter().any(|c| c == "t-co");
    let mine = store.student_summary_where(T, "stu-1", ran).await?;
    assert_eq!(mine.sessions.len(), 1);
    assert_eq!(mine.sessions[0].room_session_id, "rs-1");
    assert_eq!((mine.sessions_attended, mine.reflections, mine.counts), (1, 1, sum(&[counts(1), counts(3)])));
    assert_eq!(all.sessions.len(), 2);
    let owners = store.student_summary_where(T, "stu-1", |t| t.teacher_id == "teacher-1").await?;
    assert_eq!(owners, all);
    let nobody = store.student_summary_where(T, "stu-1", |_| false).await?;
    assert_eq!((nobody.sessions.len(), nobody.reflections, nobody.counts), (0, 0, Counts::default()));

    // rs-1 (ended at 20_000) goes with its rows, and its co-teachers with it; school b's stay.
    store.purge_before(T, 100_000).await?;
    assert_eq!(store.session_sel(T, "rs-1").await?, None);
    assert_eq!(store.rows_mentioning("t-co").await?, 0);
    assert_eq!(store.rows_mentioning("t-b").await?, 1);
    store.close().await;
    Ok(())
}

/// The sessions a teacher ran (owned or co-taught), the school's for its admins, newest
/// first; a session's notes rows in stretches from its start, the empty ones included, on
/// both backends' integer division.
async fn sessions_are_listed_for_who_ran_them_and_cut_into_a_timeline(backend: Backend) -> Result<()> {
    let db = TestDatabase::new(backend).await;
    let store = open(&db).await?;
    store.write(&classroom(T)).await?;
    store.write(&classroom("school-b")).await?;
    let more = Batch {
        sessions: vec![session(T, "rs-3", 100_000)],
        participation: vec![
            event(T, "rs-3", 1, "stu-1", ParticipationKind::Joined, 100_100),
            // Stamped before the session's start (a clock step): counted in the first stretch.
            notes(T, "rs-3", 2, "stu-1", 99_000, counts(1)),
            notes(T, "rs-3", 3, "stu-1", 117_000, counts(2)),
            notes(T, "rs-3", 4, "stu-2", 119_999, counts(3)),
        ],
        co_teachers: vec![co_teacher(T, "rs-1", "t-co", true)],
        ..Batch::default()
    };
    store.write(&more).await?;

    let listed = |sessions: &[downbeat_server::sel::store::SessionListing]| -> Vec<(String, i64, i64)> {
        sessions.iter().map(|s| (s.session.id.clone(), s.students, s.notes)).collect()
    };
    let all = store.sessions(T, None, 50).await?;
    let want = |id: &str, students, notes| (id.to_owned(), students, notes);
    assert_eq!(listed(&all), vec![want("rs-3", 1, 60), want("rs-2", 1, 50), want("rs-1", 2, 60)]);
    assert_eq!(all[2].co_teachers, ["t-co"]);
    assert_eq!(all[2].session, RoomSessionRow { ended_at_ms: Some(20_000), ..session(T, "rs-1", 1_000) });
    assert_eq!(listed(&store.sessions(T, Some("teacher-1"), 2).await?), vec![want("rs-3", 1, 60), want("rs-2", 1, 50)]);
    let co = store.sessions(T, Some("t-co"), 50).await?;
    assert_eq!((listed(&co), co[0].co_teachers.clone()), (vec![want("rs-1", 2, 60)], vec!["t-co".to_owned()]));
    assert!(store.sessions(T, Some("t-other"), 50).await?.is_empty());
    assert!(store.sessions(T, Some("stu-1"), 50).await?.is_empty());
    assert!(store.sessions("school-c", None, 50).await?.is_empty());

    // rs-1 started at 1 000 ms; notes counted at 5 000 (two students) and 9 000: stretches of
    // 5 s from the start.
    let bucket = |from_ms, students, counts| TimelineBucket { from_ms, students, counts };
    let rs1 = store.session_timeline(T, "rs-1", 60).await?.expect("rs-1 is stored");
    assert_eq!(
        rs1,
        SessionTimeline {
            bucket_ms: 5_000,
            buckets: vec![bucket(0, 2, sum(&[counts(1), counts(2)])), bucket(5_000, 1, counts(3))]
        }
    );
    // One stretch at most: 10 s wide.
    let one = store.session_timeline(T, "rs-1", 1).await?.expect("rs-1 is stored");
    assert_eq!(one.bucket_ms, 10_000);
    assert_eq!(one.buckets, vec![bucket(0, 2, sum(&[counts(1), counts(2), counts(3)]))]);
    // rs-3: 19 999 ms of notes in 5 s stretches, two of them empty.
    let rs3 = store.session_timeline(T, "rs-3", 60).await?.expect("rs-3 is stored");
    let empty = Counts::default();
    assert_eq!(
        rs3.buckets,
        vec![
            bucket(0, 1, counts(1)),
            bucket(5_000, 0, empty),
            bucket(10_000, 0, empty),
            bucket(15_000, 2, sum(&[counts(2), counts(3)])),
        ]
    );
    // A session without notes has no stretches; none of another school or unknown.
    store.write(&Batch { sessions: vec![session(T, "rs-quiet", 5)], ..Batch::default() }).await?;
    let quiet = store.session_timeline(T, "rs-quiet", 60).await?.expect("rs-quiet is stored");
    assert!(quiet.buckets.is_empty());
    assert_eq!(store.session_timeline("school-c", "rs-1", 60).await?, None);
    assert_eq!(store.session_timeline(T, "rs-404", 60).await?, None);
    store.close().await;
    Ok(())
}

#[test]
fn timeline_widths_keep_within_the_asked_stretches() {
    assert_eq!(timeline_bucket_ms(0, 60), 5_000);
    assert_eq!(timeline_bucket_ms(-5, 60), 5_000);
    // Stretches 0 to 59 of 5 s, then 10 s wide.
    assert_eq!(timeline_bucket_ms(299_999, 60), 5_000);
    assert_eq!(timeline_bucket_ms(300_000, 60), 10_000);
    // A 45-minute lesson: one stretch a minute.
    assert_eq!(timeline_bucket_ms(45 * 60_000, 60), 60_000);
    // A day: whole hours.
    assert_eq!(timeline_bucket_ms(24 * 3_600_000, 10), 3 * 3_600_000);
    for span in [0, 1, 4_999, 5_000, 59_999, 3_600_000, 86_400_000, 7 * 86_400_000] {
        for max in [1, 2, 7, 60] {
            let width = timeline_bucket_ms(span, max);
            assert!(span / width < max as i64, "{span} ms in {max}: {width} ms wide");
        }
    }
}
