//! TCP forwarding: one connection's state machine ([`relay`]), the two directions of bytes it
//! moves ([`direction`]), and the buffers and pipes a direction borrows while bytes are in flight
//! ([`buffers`]), and the PROXY protocol header ([`proxy`]).

pub mod buffers;
pub mod direction;
pub mod proxy;
pub mod relay;
