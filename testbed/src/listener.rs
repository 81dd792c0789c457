//! Listening sockets with `SO_REUSEPORT`, so several worker processes each own a listener on one
//! port and the kernel spreads new connections across them.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Socket, Type};

/// Backlog large enough for a burst of thousands of connects (the kernel caps it at somaxconn).
pub const BACKLOG: i32 = 4096;

/// Binds a non-blocking listener on `addr` with `SO_REUSEADDR` and `SO_REUSEPORT`.
pub fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // An IPv6 listener also taking IPv4 would collide with a separate IPv4 rule on that port.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
