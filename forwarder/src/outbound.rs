//! The backend side of a connection: which address, interface and mark the forwarder's own
//! socket toward a backend uses (`source=`, `interface=`, `mark=`, `--source`). One place builds
//! that socket for TCP relays, UDP sessions and health checks, and one place checks on load that
//! the host can honour what a row asks for.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::control::PoolSpec;
use crate::rules::BackendOptions;

/// Transparent connects to one backend that time out before the forwarder says why they likely
/// do (once).
pub const TRANSPARENT_HINT_AFTER: u64 = 5;

/// Counts a timed-out connect to `backend`; at the [`TRANSPARENT_HINT_AFTER`]th for a
/// transparent backend, says once what the likely cause is.
pub fn note_timeout(backend: &crate::control::BackendSpec, shared: &crate::stats::Shared) {
    if !backend.options.transparent {
        return;
    }
    let slot = shared.backend(backend.slot);
    let n = slot
        .transparent_timeouts
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    if n == TRANSPARENT_HINT_AFTER {
        tracing::warn!(
            "backend {}: {n} transparent connects timed out: do replies to client addresses route \
             back through this host? see docs/transparent.md (forwarder transparent-setup print)",
            backend.addr
        );
    }
}

/// Whether a socket made for backend options `a` serves backend options `b` as well (a UDP
/// session moving to another backend keeps its socket).
pub fn same_socket(a: &BackendOptions, b: &BackendOptions) -> bool {
    a.source == b.source
        && a.interface == b.interface
        && a.mark == b.mark
        && a.transparent == b.transparent
}

/// Whether a backend's socket needs anything beyond what a plain `connect` gives.
pub fn is_plain(options: &BackendOptions) -> bool {
    options.source.is_none()
        && options.interface.is_none()
        && options.mark.is_none()
        && !options.transparent
}

/// A non-blocking TCP socket toward `backend` with the row's outbound options, its connect
/// started (EINPROGRESS is the normal answer). The source port is left to `connect`
/// (`IP_BIND_ADDRESS_NO_PORT`): a bind with port 0 would pick a port before the kernel knows
/// the destination, and so exhaust the ephemeral range at one port per connection instead of
/// per (source, destination) pair.
///
/// With `transparent` the socket is bound to `client`'s address (`IP_TRANSPARENT` lets a socket
/// use an address that is not the host's), so the backend sees the client as the source.
pub fn connect_tcp(
    backend: SocketAddr,
    options: &BackendOptions,
    client: IpAddr,
) -> io::Result<mio::net::TcpStream> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    prepare(&socket, options, true, backend, Some(client))?;
    match socket.connect(&backend.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(mio::net::TcpStream::from_std(socket.into()))
}

/// A blocking connect with the row's outbound options, for health checks: from the gateway's own
/// address even for a transparent backend (a check has no client).
pub fn connect_tcp_blocking(
    backend: SocketAddr,
    options: &BackendOptions,
    timeout: std::time::Duration,
) -> io::Result<std::net::TcpStream> {
    if is_plain(&BackendOptions {
        transparent: false,
        ..options.clone()
    }) {
        return std::net::TcpStream::connect_timeout(&backend, timeout);
    }
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    prepare(&socket, options, true, backend, None)?;
    socket.connect_timeout(&backend.into(), timeout)?;
    Ok(socket.into())
}

/// A non-blocking UDP socket bound with the row's outbound options (an ephemeral port; with
/// `transparent`, on `client`'s address), not yet connected.
pub fn bind_udp(
    backend: SocketAddr,
    options: &BackendOptions,
    client: IpAddr,
) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    prepare(&socket, options, false, backend, Some(client))?;
    if options.source.is_none() && !options.transparent {
        let any: SocketAddr = if backend.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        socket.bind(&any.into())?;
    }
    Ok(socket.into())
}

/// Mark, device and source address, in the order the kernel needs them: the device and mark
/// before the bind, so the bind (and the route the connect picks) already sees them.
fn prepare(
    socket: &Socket,
    options: &BackendOptions,
    tcp: bool,
    backend: SocketAddr,
    client: Option<IpAddr>,
) -> io::Result<()> {
    if let Some(mark) = options.mark {
        socket.set_mark(mark)?;
    }
    if let Some(name) = &options.interface {
        socket.bind_device(Some(name.as_bytes()))?;
    }
    let transparent_source = match client {
        Some(client) if options.transparent => Some(same_family(client, backend)?),
        _ => None,
    };
    if transparent_source.is_some() {
        if backend.is_ipv4() {
            socket.set_ip_transparent_v4(true)?;
        } else {
            socket.set_ip_transparent_v6(true)?;
        }
    }
    if let Some(ip) = options.source.or(transparent_source) {
        if tcp {
            set_bind_address_no_port(socket)?;
        }
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    Ok(())
}

/// The client's address in the backend's family (a dual-stack listener reports IPv4 clients as
/// `::ffff:a.b.c.d`); an IPv6 client cannot be the source toward an IPv4 backend, nor the reverse.
fn same_family(client: IpAddr, backend: SocketAddr) -> io::Result<IpAddr> {
    let client = match client {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
        v4 => v4,
    };
    if client.is_ipv4() == backend.is_ipv4() {
        Ok(client)
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("transparent: client {client} and backend {backend} are of different families"),
        ))
    }
}

fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid descriptor, and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Checks on load what a row's outbound options ask of the host: the source address is one of
/// its own and of the destination's family, the interface exists. The message names the option.
pub fn check(options: &BackendOptions, dest: SocketAddr) -> Result<(), String> {
    if let Some(ip) = options.source {
        if ip.is_ipv4() != dest.is_ipv4() {
            return Err(format!(
                "source={ip} is {} but the destination {dest} is {}",
                family(ip),
                family(dest.ip())
            ));
        }
        check_local("source", ip)?;
    }
    if let Some(name) = &options.interface {
        check_interface(name)?;
    }
    Ok(())
}

/// `ip` is an address of this host: binding to it works (a socket bound to an address the host
/// does not have fails with EADDRNOTAVAIL, which is what a connect would meet later).
pub fn check_local(what: &str, ip: IpAddr) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!("{what}={ip} is not a unicast address"));
    }
    match UdpSocket::bind(SocketAddr::new(ip, 0)) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Err(format!(
            "{what}={ip} is not an address of this host (ip -br addr lists them)"
        )),
        Err(e) => Err(format!("{what}={ip}: cannot bind to it: {e}")),
    }
}

fn check_interface(name: &str) -> Result<(), String> {
    let Ok(c) = std::ffi::CString::new(name) else {
        return Err(format!("interface=\"{name}\" is not an interface name"));
    };
    // SAFETY: a NUL-terminated string that lives across the call.
    if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
        return Err(format!(
            "interface={name}: no such interface on this host (ip -br link lists them)"
        ));
    }
    Ok(())
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// `--source ADDR` (at most one per family): checked to be an address of this host.
pub fn parse_default_sources(values: &[IpAddr]) -> Result<Vec<IpAddr>, String> {
    let mut seen: Vec<IpAddr> = Vec::new();
    for &ip in values {
        if let Some(other) = seen.iter().find(|o| o.is_ipv4() == ip.is_ipv4()) {
            return Err(format!(
                "--source {ip}: --source {other} already names the {} source (one per family)",
                family(ip)
            ));
        }
        check_local("--source", ip).map_err(|m| m.replacen("--source=", "--source ", 1))?;
        seen.push(ip);
    }
    Ok(seen)
}

/// Gives every backend without its own `source=` the `--source` address of its family.
pub fn apply_default_sources(specs: &mut [PoolSpec], defaults: &[IpAddr]) {
    if defaults.is_empty() {
        return;
    }
    for backend in specs.iter_mut().flat_map(|p| p.backends.iter_mut()) {
        if backend.options.source.is_none() {
            backend.options.source = defaults
                .iter()
                .copied()
                .find(|ip| ip.is_ipv4() == backend.addr.is_ipv4());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(source: Option<&str>, interface: Option<&str>) -> BackendOptions {
        BackendOptions {
            source: source.map(|s| s.parse().unwrap()),
            interface: interface.map(String::from),
            ..BackendOptions::default()
        }
    }

    #[test]
    fn load_checks_name_the_option_and_why() {
        let v4: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(check(&opts(Some("127.0.0.2"), Some("lo")), v4), Ok(()));
        assert_eq!(
            check(&opts(Some("192.0.2.1"), None), v4).unwrap_err(),
            "source=192.0.2.1 is not an address of this host (ip -br addr lists them)"
        );
        assert_eq!(
            check(&opts(Some("127.0.0.2"), None), v6).unwrap_err(),
            "source=127.0.0.2 is IPv4 but the destination [::1]:80 is IPv6"
        );
        assert_eq!(
            check(&opts(None, Some("nosuch9")), v4).unwrap_err(),
            "interface=nosuch9: no such interface on this host (ip -br link lists them)"
        );
    }

    #[test]
    fn default_sources_are_one_per_family_and_fill_only_rows_without_one() {
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        assert!(parse_default_sources(&[a, b])
            .unwrap_err()
            .starts_with("--source 127.0.0.3: --source 127.0.0.2 already names the IPv4"));
        assert_eq!(
            parse_default_sources(&["192.0.2.7".parse().unwrap()]).unwrap_err(),
            "--source 192.0.2.7 is not an address of this host (ip -br addr lists them)"
        );
        let spec = |addr: &str, source: Option<IpAddr>| crate::control::BackendSpec {
            name: "b".into(),
            addr: addr.parse().unwrap(),
            slot: 0,
            port_range: false,
            line: 0,
            options: BackendOptions {
                source,
                ..BackendOptions::default()
            },
        };
        let mut specs = vec![PoolSpec {
            listen: "0.0.0.0:1".parse().unwrap(),
            ports: 1,
            steered: false,
            proto: Default::default(),
            slot: 0,
            options: Default::default(),
            backends: vec![
                spec("127.0.0.1:1", None),
                spec("127.0.0.1:2", Some(b)),
                spec("[::1]:3", None),
            ],
        }];
        apply_default_sources(&mut specs, &[a]);
        let got: Vec<Option<IpAddr>> = specs[0].backends.iter().map(|b| b.options.source).collect();
        assert_eq!(got, [Some(a), Some(b), None]);
    }

    #[test]
    fn a_tcp_connect_leaves_from_the_source_named() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = listener.local_addr().unwrap();
        let any = "0.0.0.0".parse().unwrap();
        let _s = connect_tcp(backend, &opts(Some("127.0.0.5"), Some("lo")), any).unwrap();
        let (_, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), "127.0.0.5".parse::<IpAddr>().unwrap());
        let u = bind_udp(backend, &opts(Some("127.0.0.6"), None), any).unwrap();
        assert_eq!(
            u.local_addr().unwrap().ip(),
            "127.0.0.6".parse::<IpAddr>().unwrap()
        );
    }
}
