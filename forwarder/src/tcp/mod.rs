//! TCP forwarding: one connection's state machine ([`relay`]), the two directions of bytes it
//! moves ([`direction`]), and the buffers and pipes a direction borrows while bytes are in flight
//! ([`buffers`]).

pub mod buffers;
pub mod direction;
pub mod relay;
