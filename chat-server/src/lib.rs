//! chat-server: a chat room on one single-threaded readiness loop, speaking a line protocol simple
//! enough for `nc`. `protocol` is the wire format (also used by chat-client), `framing` cuts bytes
//! into bounded lines, `room` holds the chat rules, `connection` a client's socket and bounded
//! queue, `server` the mio loop that ties them together.

pub mod connection;
pub mod framing;
pub mod guard;
pub mod protocol;
pub mod room;
pub mod server;
