//! The two system calls std does not offer for UDP: receiving a datagram together with the local
//! address it was sent to, and sending one from a chosen local address (`IP_PKTINFO` /
//! `IPV6_PKTINFO`). A socket bound to `0.0.0.0` on a host with several addresses must answer from
//! the address the client used, or the client's socket (and any NAT) drops the reply.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;

use socket2::SockAddr;

/// Control-message space for one pktinfo (either family), 8-byte aligned as cmsghdr needs.
type CmsgBuf = [u64; 8];

/// One received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    /// The local address the datagram was sent to (when pktinfo is enabled on the socket).
    pub to: Option<IpAddr>,
    /// The datagram was larger than the buffer (the rest is lost).
    pub truncated: bool,
}

/// Asks the kernel to report each datagram's destination address on `fd`.
pub fn enable_pktinfo(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let (level, name) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    // SAFETY: a valid option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&on as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets a socket's receive and send buffers to `bytes` each: past `net.core.[rw]mem_max` when
/// the process may (`SO_RCVBUFFORCE` needs CAP_NET_ADMIN), else as far as the limit allows.
pub fn set_buffers(fd: RawFd, bytes: usize) {
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for name in [force, plain] {
            // SAFETY: a valid option value of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    name,
                    (&value as *const libc::c_int).cast(),
                    mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

/// Receives one datagram (non-blocking sockets return `WouldBlock`).
pub fn recv_from_to(fd: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg: CmsgBuf = [0; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut flags = 0;
    let mut control_len = 0;
    // SAFETY: try_init hands us storage for a socket address and its length; recvmsg writes at
    // most that much and sets the length.
    let (len, from) = unsafe {
        SockAddr::try_init(|storage, addr_len| {
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_name = storage.cast();
            msg.msg_namelen = *addr_len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = mem::size_of::<CmsgBuf>();
            let n = libc::recvmsg(fd, &mut msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            *addr_len = msg.msg_namelen;
            flags = msg.msg_flags;
            control_len = msg.msg_controllen;
            Ok(n as usize)
        })
    }?;
    let from = from.as_socket().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "datagram from a non-IP address")
    })?;
    Ok(Received {
        len,
        from,
        to: parse_pktinfo(&cmsg, control_len),
        truncated: flags & libc::MSG_TRUNC != 0,
    })
}

/// Finds a pktinfo control message in a buffer recvmsg filled.
fn parse_pktinfo(cmsg: &CmsgBuf, control_len: usize) -> Option<IpAddr> {
    // SAFETY: walking the control buffer with the kernel's own macros over a msghdr that points at
    // it; every header the walk returns lies inside the buffer.
    unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_control = cmsg.as_ptr() as *mut libc::c_void;
        msg.msg_controllen = control_len.min(mem::size_of::<CmsgBuf>());
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() && (*hdr).cmsg_len > 0 {
            let data = libc::CMSG_DATA(hdr);
            match ((*hdr).cmsg_level, (*hdr).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                    return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        info.ipi_addr.s_addr,
                    ))));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                    return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
                }
                _ => {}
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
        None
    }
}

/// Sends one datagram to `to`, from local address `from` when given (else the kernel's choice).
pub fn send_from_to(
    fd: RawFd,
    buf: &[u8],
    to: SocketAddr,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    let to = SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cmsg: CmsgBuf = [0; 8];
    // SAFETY: msghdr points at live buffers of the lengths given; the control message is built
    // with the kernel's macros inside `cmsg`, which is large enough for either pktinfo.
    let n = unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(from) = from {
            msg.msg_control = cmsg.as_mut_ptr().cast();
            let (level, kind, size) = match from {
                IpAddr::V4(_) => (
                    libc::IPPROTO_IP,
                    libc::IP_PKTINFO,
                    mem::size_of::<libc::in_pktinfo>(),
                ),
                IpAddr::V6(_) => (
                    libc::IPPROTO_IPV6,
                    libc::IPV6_PKTINFO,
                    mem::size_of::<libc::in6_pktinfo>(),
                ),
            };
            msg.msg_controllen = libc::CMSG_SPACE(size as u32) as usize;
            let hdr = libc::CMSG_FIRSTHDR(&msg);
            (*hdr).cmsg_level = level;
            (*hdr).cmsg_type = kind;
            (*hdr).cmsg_len = libc::CMSG_LEN(size as u32) as usize;
            let data = libc::CMSG_DATA(hdr);
            match from {
                IpAddr::V4(ip) => {
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(ip).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(data.cast(), info);
                }
                IpAddr::V6(ip) => {
                    let info = libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: ip.octets(),
                        },
                        ipi6_ifindex: 0,
                    };
                    std::ptr::write_unaligned(data.cast(), info);
                }
            }
        }
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn destination_is_reported_and_replies_leave_from_the_chosen_address() {
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        enable_pktinfo(server.as_raw_fd(), false).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"hello", ("127.0.0.3", port)).unwrap();
        let mut buf = [0u8; 64];
        let got = recv_from_to(server.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"hello");
        assert_eq!(got.from, client.local_addr().unwrap());
        assert_eq!(got.to, Some("127.0.0.3".parse().unwrap()));
        assert!(!got.truncated);
        send_from_to(server.as_raw_fd(), b"back", got.from, got.to).unwrap();
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"back");
        assert_eq!(from, SocketAddr::from(([127, 0, 0, 3], port)));
    }
}
