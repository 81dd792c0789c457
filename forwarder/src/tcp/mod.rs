//! TCP forwarding: one connection's state machine ([`relay`]) and the buffers and pipes its two
//! directions borrow while bytes are in flight ([`buffers`]).

pub mod buffers;
pub mod relay;
