//! The one authorization decision: may this principal do this operation, in this room?
//!
//! Every entry point (the HTTP API and the control stream of either transport) calls
//! [`authorize`] before it touches a room or a child's data, so the rules live in one place.
//! The role comes from the verified token alone; a room says who runs it ([`RoomAccess`]):
//! its owner (the teacher whose token created it) and the co-teachers the owner added. A past
//! room session says the same from the SEL store, as it was when the session ran.
//!
//! | | student | teacher, not running the room | owner or co-teacher | admin |
//! |---|---|---|---|---|
//! | see a room, join it | ✓ | ✓ | ✓ | see only |
//! | create rooms, list one's own | | ✓ | ✓ | |
//! | controls (timeline, mute, assign, remove, prompt, close) | | | ✓ | |
//! | add and remove co-teachers | | | owner only | |
//! | the room's SEL data (live feed, its sessions, reflections) | | | ✓ | ✓ |
//! | a student's summary | | sessions they ran | sessions they ran | all |
//! | export or delete a student's data | | | | ✓ |
//!
//! Operators (the server's, not a school's: [`Role::Operator`]) do nothing in this table: they
//! use the inspector ([`Operation::Inspect`]), which shows rooms and sessions by member id and
//! transport figures, never a child's name or anything a child wrote.
//!
//! Nobody reaches another tenant's rooms. Admins are the school's data stewards, not
//! anyone's teacher: they read and manage data but never join, create or run a room, so a
//! data role cannot disrupt a lesson and a teacher's token cannot reach every child's record.
//! Checks that depend on the room's state (is the target a member, is it a student) are made
//! by the room itself and refused with the same [`Refusal`] type.

use std::borrow::Cow;

use downbeat_protocol::{ControlOp, ErrorCode};

use crate::auth::{Principal, Role};

/// What a principal asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation<'a> {
    /// Create a room.
    CreateRoom,
    /// List one's own rooms.
    ListRooms,
    /// See a room and its presence.
    ViewRoom,
    /// Join a room.
    Join,
    /// A teacher control.
    Control(&'a ControlOp),
    /// Add or remove a co-teacher of a room.
    ManageCoTeachers,
    /// Read SEL data: of a room (its live feed, its sessions' summaries and reflections), or
    /// with no room a student's summary, which then holds only the sessions
    /// [`sessions_readable_by`] the reader.
    ReadSel,
    /// Export or delete one student's data.
    ManageStudentData,
    /// Use the inspector: see every school's rooms and sessions (ids and figures only) and act
    /// on them.
    Inspect,
}

impl Operation<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::CreateRoom => "create rooms",
            Self::ListRooms => "list rooms",
            Self::ViewRoom => "see this room",
            Self::Join => "join this room",
            Self::Control(ControlOp::Timeline(_)) => "change the tempo, meter or start and stop",
            Self::Control(ControlOp::Mute { .. }) => "mute members",
            Self::Control(ControlOp::Assign { .. }) => "assign parts",
            Self::Control(ControlOp::Remove { .. }) => "remove members",
            Self::Control(ControlOp::Close) => "close the room",
            Self::Control(ControlOp::Prompt { .. }) => "ask reflection questions",
            Self::Control(ControlOp::StartRecording | ControlOp::StopRecording) => "record the class",
            Self::Control(ControlOp::PlayRecording { .. } | ControlOp::StopPlayback) => "play recordings back",
            Self::ManageCoTeachers => "add or remove co-teachers",
            Self::ReadSel => "read reflections and participation",
            Self::ManageStudentData => "export or delete a student's data",
            Self::Inspect => "use the inspector",
        }
    }
}

/// A room, or a past room session, as authorization sees it: whose it is.
pub(crate) trait RoomAccess {
    /// The school it belongs to.
    fn tenant(&self) -> &str;
    /// The subject of the teacher who created it.
    fn owner(&self) -> &str;
    /// Whether `subject` is one of its co-teachers.
    fn has_co_teacher(&self, subject: &str) -> bool;
}

/// Whether `who` runs `room`: a teacher who owns or co-teaches it.
fn runs(who: &Principal, room: &dyn RoomAccess) -> bool {
    who.role == Role::Teacher && (room.owner() == who.subject || room.has_co_teacher(&who.subject))
}

/// A refused request: a stable code and a message safe to show, and for a hello whose room
/// lives on another server of the cluster, where it lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: Cow<'static, str>,
    pub(crate) moved: Option<Box<downbeat_protocol::Moved>>,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self { code, message: message.into(), moved: None }
    }

    /// The room lives on another server: `moved`, saying where.
    pub(crate) fn moved(to: downbeat_protocol::Moved) -> Self {
        Self { moved: Some(Box::new(to)), ..Self::new(ErrorCode::Moved, "the room lives on another server") }
    }

    /// What a session refused at its hello is told before it closes: where the room lives, or
    /// the error.
    pub(crate) fn answer(&self) -> downbeat_protocol::ServerMessage {
        match &self.moved {
            Some(to) => downbeat_protocol::ServerMessage::Moved((**to).clone()),
            None => downbeat_engine::room::error_frame(self.code, None, &self.message),
        }
    }
}

/// Whether `who` may do `op` in `room` (`None` for operations on no room: creating and
/// listing rooms, a student's summary, export and delete). Refusals change nothing.
pub(crate) fn authorize(who: &Principal, room: Option<&dyn RoomAccess>, op: Operation<'_>) -> Result<(), Refusal> {
    let forbidden = |message: String| Err(Refusal::new(ErrorCode::Forbidden, message));
    let role = who.role;
    match (role, op) {
        (Role::Operator, Operation::Inspect) => return Ok(()),
        (_, Operation::Inspect) => return forbidden(format!("only the server's operators may {}", op.name())),
        (Role::Operator, _) => {
            return forbidden(format!(
                "operators run the server from the inspector; they may not {} (nor read children's data)",
                op.name()
            ));
        }
        _ => {}
    }
    if let Some(room) = room
        && room.tenant() != &*who.tenant
    {
        return Err(Refusal::new(ErrorCode::WrongTenant, "this room belongs to another school"));
    }
    match op {
        Operation::ViewRoom => Ok(()),
        Operation::Join if role == Role::Admin => {
            forbidden("admins look after the school's data and do not join rooms".to_owned())
        }
        Operation::Join => Ok(()),
        Operation::CreateRoom | Operation::ListRooms | Operation::Control(_) | Operation::ManageCoTeachers
            if role != Role::Teacher =>
        {
            forbidden(format!("only teachers may {}", op.name()))
        }
        Operation::CreateRoom | Operation::ListRooms => Ok(()),
        Operation::Control(_) => match room {
            Some(room) if runs(who, room) => Ok(()),
            _ => forbidden(format!("only this room's teacher and co-teachers may {}", op.name())),
        },
        Operation::ManageCoTeachers => match room {
            Some(room) if room.owner() == who.subject => Ok(()),
            _ => forbidden(format!("only the teacher who created this room may {}", op.name())),
        },
        Operation::ReadSel => match (role, room) {
            (Role::Admin, _) | (Role::Teacher, None) => Ok(()),
            (Role::Teacher, Some(room)) if runs(who, room) => Ok(()),
            (Role::Teacher, Some(_)) => {
                forbidden(format!("only this room's teacher and co-teachers may {}", op.name()))
            }
            (Role::Student | Role::Operator, _) => forbidden(format!("only teachers may {}", op.name())),
        },
        Operation::ManageStudentData if role == Role::Admin => Ok(()),
        Operation::ManageStudentData => forbidden(format!("only the school's admins may {}", op.name())),
        // Decided above.
        Operation::Inspect => forbidden(format!("only the server's operators may {}", op.name())),
    }
}

/// Whose room sessions `who`, allowed [`Operation::ReadSel`] on no room, reads across rooms
/// (a student's summary): `None` for every session of the school (admins), otherwise only
/// those run by `Some(subject)`, its owner or a co-teacher.
pub(crate) fn sessions_readable_by(who: &Principal) -> Option<&str> {
    (who.role != Role::Admin).then_some(who.subject.as_str())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use downbeat_protocol::{Assignment, Change};

    use super::*;

    fn principal(tenant: &str, role: Role, subject: &str) -> Principal {
        Principal {
            tenant: Arc::from(tenant),
            subject: subject.into(),
            role,
            name: "Ana".into(),
            expires_at_unix: u64::MAX,
        }
    }

    struct Room {
        tenant: &'static str,
        owner: &'static str,
        co_teachers: Vec<&'static str>,
    }

    impl RoomAccess for Room {
        fn tenant(&self) -> &str {
            self.tenant
        }
        fn owner(&self) -> &str {
            self.owner
        }
        fn has_co_teacher(&self, subject: &str) -> bool {
            self.co_teachers.contains(&subject)
        }
    }

    fn controls() -> [ControlOp; 10] {
        [
            ControlOp::Timeline(Change::Stop),
            ControlOp::Mute { member: 2, muted: true },
            ControlOp::Assign { member: 2, assignment: Assignment::default() },
            ControlOp::Remove { member: 2 },
            ControlOp::Close,
            ControlOp::Prompt { text: downbeat_protocol::PromptText::truncating("How did we do?") },
            ControlOp::StartRecording,
            ControlOp::StopRecording,
            ControlOp::PlayRecording { take: 1, tempo: None },
            ControlOp::StopPlayback,
        ]
    }

    #[test]
    fn what_each_role_may_do_on_no_room() {
        let teacher = principal("a", Role::Teacher, "t-1");
        let student = principal("a", Role::Student, "s-1");
        let admin = principal("a", Role::Admin, "a-1");
        for op in [Operation::CreateRoom, Operation::ListRooms] {
            assert_eq!(authorize(&teacher, None, op), Ok(()));
            for who in [&student, &admin] {
                let refusal = authorize(who, None, op).unwrap_err();
                assert_eq!(refusal.code, ErrorCode::Forbidden);
                assert!(refusal.message.starts_with("only teachers may"), "{}", refusal.message);
            }
        }
        assert_eq!(authorize(&teacher, None, Operation::ReadSel), Ok(()));
        assert_eq!(authorize(&admin, None, Operation::ReadSel), Ok(()));
        assert_eq!(authorize(&student, None, Operation::ReadSel).unwrap_err().code, ErrorCode::Forbidden);
        assert_eq!(sessions_readable_by(&teacher), Some("t-1"));
        assert_eq!(sessions_readable_by(&admin), None);
        assert_eq!(authorize(&admin, None, Operation::ManageStudentData), Ok(()));
        for who in [&teacher, &student] {
            let refusal = authorize(who, None, Operation::ManageStudentData).unwrap_err();
            assert_eq!(refusal.code, ErrorCode::Forbidden);
            assert!(refusal.message.contains("admins"), "{}", refusal.message);
        }
    }

    #[test]
    fn a_room_is_run_by_its_owner_and_co_teachers_only() {
        let room = Room { tenant: "a", owner: "t-owner", co_teachers: vec!["t-co"] };
        let owner = principal("a", Role::Teacher, "t-owner");
        let co = principal("a", Role::Teacher, "t-co");
        let other = principal("a", Role::Teacher, "t-other");
        let student = principal("a", Role::Student, "s-1");
        let admin = principal("a", Role::Admin, "a-1");
        // A student or admin token naming the owner's subject is still not a teacher's.
        let student_named_owner = principal("a", Role::Student, "t-owner");
        let admin_named_owner = principal("a", Role::Admin, "t-owner");
        for op in controls().iter().map(Operation::Control) {
            assert_eq!(authorize(&owner, Some(&room), op), Ok(()));
            assert_eq!(authorize(&co, Some(&room), op), Ok(()));
            let refusal = authorize(&other, Some(&room), op).unwrap_err();
            assert_eq!(refusal.code, ErrorCode::Forbidden);
            assert!(refusal.message.starts_with("only this room's teacher"), "{}", refusal.message);
            for who in [&student, &admin, &student_named_owner, &admin_named_owner] {
                let refusal = authorize(who, Some(&room), op).unwrap_err();
                assert_eq!(refusal.code, ErrorCode::Forbidden);
                assert!(refusal.message.starts_with("only teachers may"), "{}", refusal.message);
            }
        }
        assert_eq!(authorize(&owner, Some(&room), Operation::ManageCoTeachers), Ok(()));
        for who in [&co, &other, &student, &admin, &student_named_owner] {
            assert_eq!(
                authorize(who, Some(&room), Operation::ManageCoTeachers).unwrap_err().code,
                ErrorCode::Forbidden
            );
        }
        for who in [&owner, &co, &admin] {
            assert_eq!(authorize(who, Some(&room), Operation::ReadSel), Ok(()));
        }
        for who in [&other, &student, &student_named_owner] {
            assert_eq!(authorize(who, Some(&room), Operation::ReadSel).unwrap_err().code, ErrorCode::Forbidden);
        }
        for who in [&owner, &co, &other, &student] {
            assert_eq!(authorize(who, Some(&room), Operation::ViewRoom), Ok(()));
            assert_eq!(authorize(who, Some(&room), Operation::Join), Ok(()));
        }
        assert_eq!(authorize(&admin, Some(&room), Operation::ViewRoom), Ok(()));
        assert_eq!(authorize(&admin, Some(&room), Operation::Join).unwrap_err().code, ErrorCode::Forbidden);
    }

    #[test]
    fn nobody_reaches_another_tenant() {
        let room = Room { tenant: "b", owner: "t-1", co_teachers: vec![] };
        for role in [Role::Teacher, Role::Student, Role::Admin] {
            let who = principal("a", role, "t-1");
            for op in [Operation::ViewRoom, Operation::Join, Operation::Control(&ControlOp::Close), Operation::ReadSel]
            {
                assert_eq!(authorize(&who, Some(&room), op).unwrap_err().code, ErrorCode::WrongTenant);
            }
        }
    }

    #[test]
    fn operators_inspect_and_do_nothing_else() {
        // Even an operator token that names the room's school and its owner's subject.
        let room = Room { tenant: "a", owner: "t-1", co_teachers: vec!["t-1"] };
        let operator = principal("a", Role::Operator, "t-1");
        assert_eq!(authorize(&operator, None, Operation::Inspect), Ok(()));
        let close = ControlOp::Close;
        let school_ops = [
            Operation::CreateRoom,
            Operation::ListRooms,
            Operation::ViewRoom,
            Operation::Join,
            Operation::Control(&close),
            Operation::ManageCoTeachers,
            Operation::ReadSel,
            Operation::ManageStudentData,
        ];
        for op in school_ops {
            for room in [None, Some(&room as &dyn RoomAccess)] {
                let refusal = authorize(&operator, room, op).unwrap_err();
                assert_eq!(refusal.code, ErrorCode::Forbidden, "{op:?}");
                assert!(refusal.message.starts_with("operators run the server"), "{}", refusal.message);
            }
        }
        for role in [Role::Teacher, Role::Student, Role::Admin] {
            let refusal = authorize(&principal("a", role, "t-1"), None, Operation::Inspect).unwrap_err();
            assert_eq!(refusal.code, ErrorCode::Forbidden);
        }
    }
}
