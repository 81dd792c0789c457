//! TCP forwarding: one connection's state machine ([`relay`]), the two directions of bytes it
//! moves ([`direction`]), and the buffers and pipes a direction borrows while bytes are in flight
//! ([`buffers`]), and the PROXY protocol header ([`proxy`]). With `--data-path sockmap` the
//! kernel moves the bytes instead ([`sockmap`], [`bpf`]) and a relay only watches the counters of
//! each direction ([`kernel_direction`]).

pub mod bpf;
pub mod buffers;
pub mod direction;
pub mod kernel_direction;
pub mod proxy;
pub mod relay;
pub mod sni;
pub mod sockmap;
