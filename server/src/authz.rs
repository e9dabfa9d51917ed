//! The one authorization decision: may this principal do this operation in this room?
//!
//! Every entry point (the HTTP API and the control stream) calls [`authorize`] before it
//! touches a room, so the rules live in one place: a principal acts only within its own
//! tenant, and only teachers create, list, control or close rooms. The role comes from the
//! verified token alone. Checks that depend on the room's state (is the target a member, is
//! it a student) are made by the room itself and refused with the same [`Refusal`] type.

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
    /// Read SEL summaries, reflections and the live feed.
    ReadSel,
    /// Export or delete one student's data.
    ManageStudentData,
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
            Self::ReadSel => "read reflections and participation",
            Self::ManageStudentData => "export or delete a student's data",
        }
    }
}

/// A refused request: a stable code and a message safe to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: Cow<'static, str>,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self { code, message: message.into() }
    }
}

/// Whether `who` may do `op` in a room of `room_tenant` (`None` for operations on no room:
/// creating and listing). Refusals change nothing.
pub(crate) fn authorize(who: &Principal, room_tenant: Option<&str>, op: Operation<'_>) -> Result<(), Refusal> {
    if let Some(tenant) = room_tenant
        && tenant != &*who.tenant
    {
        return Err(Refusal::new(ErrorCode::WrongTenant, "this room belongs to another school"));
    }
    let teacher_only = matches!(
        op,
        Operation::CreateRoom
            | Operation::ListRooms
            | Operation::Control(_)
            | Operation::ReadSel
            | Operation::ManageStudentData
    );
    if teacher_only && who.role != Role::Teacher {
        return Err(Refusal::new(ErrorCode::Forbidden, format!("only teachers may {}", op.name())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use downbeat_protocol::{Assignment, Change};

    use super::*;

    fn principal(tenant: &str, role: Role) -> Principal {
        Principal {
            tenant: Arc::from(tenant),
            subject: "s-1".into(),
            role,
            name: "Ana".into(),
            expires_at_unix: u64::MAX,
        }
    }

    #[test]
    fn teachers_and_students_within_their_tenant() {
        let controls = [
            ControlOp::Timeline(Change::Stop),
            ControlOp::Mute { member: 2, muted: true },
            ControlOp::Assign { member: 2, assignment: Assignment::default() },
            ControlOp::Remove { member: 2 },
            ControlOp::Close,
            ControlOp::Prompt { text: downbeat_protocol::PromptText::truncating("How did we do?") },
        ];
        let teacher = principal("a", Role::Teacher);
        let student = principal("a", Role::Student);
        for op in [Operation::CreateRoom, Operation::ListRooms, Operation::ReadSel, Operation::ManageStudentData] {
            assert_eq!(authorize(&teacher, None, op), Ok(()));
            assert_eq!(authorize(&student, None, op).unwrap_err().code, ErrorCode::Forbidden);
        }
        for op in controls.iter().map(Operation::Control) {
            assert_eq!(authorize(&teacher, Some("a"), op), Ok(()));
            let refusal = authorize(&student, Some("a"), op).unwrap_err();
            assert_eq!(refusal.code, ErrorCode::Forbidden);
            assert!(refusal.message.starts_with("only teachers may"), "{}", refusal.message);
        }
        for op in [Operation::ViewRoom, Operation::Join] {
            assert_eq!(authorize(&teacher, Some("a"), op), Ok(()));
            assert_eq!(authorize(&student, Some("a"), op), Ok(()));
        }
    }

    #[test]
    fn nobody_reaches_another_tenant() {
        for role in [Role::Teacher, Role::Student] {
            let who = principal("a", role);
            for op in [Operation::ViewRoom, Operation::Join, Operation::Control(&ControlOp::Close)] {
                assert_eq!(authorize(&who, Some("b"), op).unwrap_err().code, ErrorCode::WrongTenant);
            }
        }
    }
}
