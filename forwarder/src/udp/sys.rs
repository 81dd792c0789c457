//! The two system calls std does not offer for UDP: receiving a datagram together with the local
//! address it was sent to, and sending one from a chosen local address (`IP_PKTINFO` /
//! `IPV6_PKTINFO`). A socket bound to `0.0.0.0` on a host with several addresses must answer from
//! the address the client used, or the client's socket (and any NAT) drops the reply. And their
//! batched forms ([`RecvBatch`], [`SendBatch`]: `recvmmsg`/`sendmmsg`), one system call for many
//! datagrams.

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
            write_pktinfo(&mut msg, &mut cmsg, from);
        }
        libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Points `msg` at `cmsg` holding a pktinfo that makes `from` the datagram's source address.
///
/// # Safety
/// `msg` must be otherwise initialised; `cmsg` must outlive its use in a system call.
unsafe fn write_pktinfo(msg: &mut libc::msghdr, cmsg: &mut CmsgBuf, from: IpAddr) {
    // SAFETY: the header and its data are written inside `cmsg`, which is large enough for either
    // pktinfo (CMSG_SPACE of in6_pktinfo is 32 bytes, the buffer 64).
    unsafe {
        {
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
            let hdr = libc::CMSG_FIRSTHDR(msg);
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
    }
}

/// Reads a socket address the kernel wrote into `storage`.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in = unsafe {
                std::ptr::read_unaligned((storage as *const libc::sockaddr_storage).cast())
            };
            Some(SocketAddr::from((
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 = unsafe {
                std::ptr::read_unaligned((storage as *const libc::sockaddr_storage).cast())
            };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Buffers for receiving up to `slots` datagrams with one `recvmmsg`: every slot is as large as
/// the largest datagram, so none is ever cut.
pub struct RecvBatch {
    slot_len: usize,
    data: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    cmsgs: Box<[CmsgBuf]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
}

impl RecvBatch {
    pub fn new(slots: usize, slot_len: usize) -> RecvBatch {
        RecvBatch {
            slot_len,
            data: vec![0u8; slots * slot_len].into_boxed_slice(),
            // SAFETY: all-zero is a valid value of these plain C structs.
            names: (0..slots).map(|_| unsafe { mem::zeroed() }).collect(),
            cmsgs: vec![[0u64; 8]; slots].into_boxed_slice(),
            iovs: (0..slots)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: as above.
            hdrs: (0..slots).map(|_| unsafe { mem::zeroed() }).collect(),
        }
    }

    pub fn slots(&self) -> usize {
        self.hdrs.len()
    }

    /// Receives what is waiting, up to every slot; returns how many datagrams (at least one, or
    /// `WouldBlock`).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let slots = self.hdrs.len();
        for i in 0..slots {
            self.iovs[i] = libc::iovec {
                iov_base: self.data[i * self.slot_len..].as_mut_ptr().cast(),
                iov_len: self.slot_len,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = mem::size_of::<CmsgBuf>();
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at buffers of this struct, of the lengths given, which live
        // as long as the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                slots as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Datagram `i` of the last [`recv`](Self::recv).
    pub fn get(&self, i: usize) -> (Received, &[u8]) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(self.slot_len);
        let from = socket_addr(&self.names[i])
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let got = Received {
            len,
            from,
            to: parse_pktinfo(&self.cmsgs[i], h.msg_hdr.msg_controllen),
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
        let start = i * self.slot_len;
        (got, &self.data[start..start + len])
    }
}

/// One datagram to send with [`SendBatch::send`].
pub struct Outgoing<'a> {
    pub data: &'a [u8],
    /// Destination; `None` on a connected socket.
    pub to: Option<SocketAddr>,
    /// Source address to send from (pktinfo); `None` for the kernel's choice.
    pub from: Option<IpAddr>,
}

/// Scratch space for one `sendmmsg` of many datagrams.
#[derive(Default)]
pub struct SendBatch {
    names: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<CmsgBuf>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    /// Sends `msgs` in order with as few system calls as the kernel allows. Returns how many were
    /// sent before the first that failed, and that failure (the rest were not tried).
    pub fn send(&mut self, fd: RawFd, msgs: &[Outgoing]) -> (usize, Option<io::Error>) {
        let n = msgs.len();
        // SAFETY: all-zero is a valid value of these plain C structs.
        self.names.resize_with(n, || unsafe { mem::zeroed() });
        self.cmsgs.resize(n, [0u64; 8]);
        self.iovs.resize_with(n, || libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        });
        self.hdrs.resize_with(n, || unsafe { mem::zeroed() });
        for (i, m) in msgs.iter().enumerate() {
            self.iovs[i] = libc::iovec {
                iov_base: m.data.as_ptr() as *mut libc::c_void,
                iov_len: m.data.len(),
            };
            // SAFETY: as above.
            let mut h: libc::msghdr = unsafe { mem::zeroed() };
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            if let Some(to) = m.to {
                let addr = SockAddr::from(to);
                // SAFETY: a SockAddr's bytes fit a sockaddr_storage.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        addr.as_ptr().cast::<u8>(),
                        (&mut self.names[i] as *mut libc::sockaddr_storage).cast::<u8>(),
                        addr.len() as usize,
                    );
                }
                h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = addr.len();
            }
            if let Some(from) = m.from {
                // SAFETY: the control buffer lives in self until the call below.
                unsafe { write_pktinfo(&mut h, &mut self.cmsgs[i], from) };
            }
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            };
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: headers from `sent` on point at live buffers built above.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[sent..].as_mut_ptr(),
                    (n - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return (sent, Some(e));
            }
            if r == 0 {
                break;
            }
            sent += r as usize;
        }
        (sent, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn batches_keep_boundaries_sources_and_destinations() {
        let server = UdpSocket::bind("0.0.0.0:0").unwrap();
        enable_pktinfo(server.as_raw_fd(), false).unwrap();
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sizes = [0usize, 1, 1400, 65_507, 3];
        for (i, &n) in sizes.iter().enumerate() {
            client
                .send_to(&vec![i as u8; n], ("127.0.0.5", port))
                .unwrap();
        }
        let mut rx = RecvBatch::new(4, 65_536);
        let mut got = Vec::new();
        while got.len() < sizes.len() {
            let n = rx.recv(server.as_raw_fd()).unwrap();
            assert!(n <= 4);
            for i in 0..n {
                let (r, data) = rx.get(i);
                assert_eq!(r.from, client.local_addr().unwrap());
                assert_eq!(r.to, Some("127.0.0.5".parse().unwrap()));
                assert!(!r.truncated);
                got.push(data.to_vec());
            }
        }
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d, &vec![i as u8; sizes[i]]);
        }
        let mut tx = SendBatch::default();
        let msgs: Vec<Outgoing> = got
            .iter()
            .map(|d| Outgoing {
                data: d,
                to: Some(client.local_addr().unwrap()),
                from: Some("127.0.0.5".parse().unwrap()),
            })
            .collect();
        let (sent, err) = tx.send(server.as_raw_fd(), &msgs);
        assert_eq!((sent, err.map(|e| e.to_string())), (5, None));
        let mut buf = vec![0u8; 65_536];
        for (i, &n) in sizes.iter().enumerate() {
            let (len, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(len, n);
            assert!(buf[..len].iter().all(|&b| b == i as u8));
            assert_eq!(from, SocketAddr::from(([127, 0, 0, 5], port)));
        }
        assert_eq!(
            rx.recv(server.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

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
