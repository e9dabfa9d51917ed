//! Rooms in the server: the registry, the handle everything else uses, and one task per room.
//!
//! - `registry`: [`Rooms`], live rooms by tenant and join code, the room limits, the
//!   failed-join buckets, and codes closed in the last day. Its lock guards only its maps and is
//!   never held across an await.
//! - `handle`: [`RoomHandle`], a cheap way to reach one room's task through its bounded
//!   command queue, and what a session brings when it joins.
//! - `task`: one task per room, the shell around [`downbeat_engine::room::Room`]: it feeds the
//!   engine commands and the time and moves its outputs to sockets and to the SEL writer.
//! - `sel`: the room's SEL work as store rows and writer jobs.
//! - `inspect`: what the operators' inspector sees of a room and its sessions, and the live
//!   copy of its events an observer gets (by member id, never a child's name or words).
//!
//! Dependencies point one way: the registry spawns tasks and hands out handles; a task knows
//! only the handle's types, never the registry (the registry hears a room ended when its task
//! returns).

mod handle;
mod inspect;
mod registry;
mod sel;
mod task;

pub(crate) use self::handle::{DatagramKind, Departure, Joining, Kick, Outgoing, Peer, RoomHandle, RoomMeta};
pub(crate) use self::inspect::{MAX_OBSERVERS, OBSERVER_QUEUE, PathFigures, RoomInspection, SessionCounters};
pub(crate) use self::registry::{Rooms, RoomsConfig};
