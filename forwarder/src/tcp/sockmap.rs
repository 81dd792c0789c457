//! The sockmap data path (`--data-path sockmap`): a worker's verdict program and maps, and
//! putting a client/backend pair into them so the kernel sends each socket's received bytes out
//! of its peer without waking us. In the targets map each socket is stored under its *peer's*
//! cookie: the verdict program looks up the cookie of the socket the bytes arrived on and finds
//! the peer. In the members map (the program's) each is under its own.

use std::io;
use std::os::fd::RawFd;

use mio::{Registry, Token};

use crate::tcp::bpf::{self, BpfError, Redirector};

pub use crate::tcp::data_path::DataPath;

/// The data path the workers will use for `wanted`: sockmap only if the verdict program loads
/// here (after any `--user` change), which is said once, at start. Workers load their own maps.
pub fn check(wanted: DataPath) -> DataPath {
    if wanted != DataPath::Sockmap {
        return wanted;
    }
    match Sockmap::load(2) {
        Ok(_) => {
            // Opt-in with a known hazard: say it where the operator looks first.
            tracing::warn!(
                "data path: sockmap (the kernel moves established connections' bytes); \
                 behind a backend that stops reading, the kernel queues what the client sends \
                 without bound (README, forwarder: kernel data path)"
            );
            DataPath::Sockmap
        }
        Err(e) => {
            tracing::warn!("sockmap data path unavailable ({e}); using splice");
            DataPath::Splice
        }
    }
}

/// A worker's verdict program and maps.
pub struct Sockmap {
    kernel: Redirector,
}

/// The map keys of a joined pair, removed again by [`Sockmap::leave`].
#[derive(Debug)]
pub struct Joined {
    client_key: u64,
    backend_key: u64,
}

impl Sockmap {
    /// Loads the program and a map for `max_sockets` sockets (two per connection). Fails without
    /// CAP_BPF and CAP_NET_ADMIN, or on a kernel without sockmap.
    pub fn load(max_sockets: usize) -> Result<Sockmap, BpfError> {
        let max = u32::try_from(max_sockets).unwrap_or(u32::MAX);
        Ok(Sockmap {
            kernel: Redirector::load(max)?,
        })
    }

    /// Puts an established pair into the maps; from then on the kernel moves their bytes.
    ///
    /// Both become targets first, then members: when a socket's bytes are first judged, its
    /// peer is there to take them. Bytes that arrived before a socket joined sit in its receive
    /// queue, and the verdict only runs when the socket is told of new data, which may never
    /// come (a request sent before the backend answered, a server's greeting): setting
    /// `SO_RCVLOWAT` makes TCP check its queue and signal, which runs the verdict over the queued
    /// bytes, in order, ahead of anything later. On failure nothing is left in the maps and the
    /// pair can be relayed in user space as if nothing happened.
    pub fn join(&self, client: RawFd, backend: RawFd) -> io::Result<Joined> {
        let joined = Joined {
            client_key: bpf::cookie(client)?,
            backend_key: bpf::cookie(backend)?,
        };
        let (c, b) = (joined.client_key, joined.backend_key);
        let k = &self.kernel;
        let result = k
            .targets
            .insert(c, backend)
            .and_then(|()| k.targets.insert(b, client))
            .and_then(|()| k.members.insert(c, client))
            .and_then(|()| k.members.insert(b, backend))
            .and_then(|()| set_rcvlowat(client, 1))
            .and_then(|()| set_rcvlowat(backend, 1));
        if let Err(e) = result {
            self.leave(&joined);
            return Err(e);
        }
        Ok(joined)
    }

    /// Takes a pair out of the maps (closing the sockets would too; this makes it explicit and
    /// immediate, before a reset is sent). Members first: nothing is judged once its target left.
    pub fn leave(&self, joined: &Joined) {
        let k = &self.kernel;
        for map in [&k.members, &k.targets] {
            for key in [joined.client_key, joined.backend_key] {
                if let Err(e) = map.remove(key) {
                    tracing::debug!("removing a socket from a sockmap: {e}");
                }
            }
        }
    }
}

fn set_rcvlowat(socket: RawFd, bytes: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int from a live local.
    let r = unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Re-arms `socket` in the worker's epoll set for hang-ups and errors only: received bytes and
/// send-buffer room no longer wake the worker (the kernel moves the bytes). mio offers no
/// interest without EPOLLIN, so this modifies the registration directly; mio keeps no state of
/// its own about it, and the token stays the same.
pub fn watch_hangups_only(registry: &Registry, socket: RawFd, token: Token) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut event = libc::epoll_event {
        events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: token.0 as u64,
    };
    // SAFETY: epoll_ctl on the registry's epoll descriptor and a socket registered in it.
    let r = unsafe {
        libc::epoll_ctl(
            registry.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            socket,
            &mut event,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The kernel path without the forwarder: two loopback connections joined by hand. Needs
    //! CAP_BPF and CAP_NET_ADMIN; without them the tests say so and pass (the fallback test in
    //! tests/data_path.rs covers that case).

    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn loaded() -> Option<Sockmap> {
        match Sockmap::load(64) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("sockmap not available here, skipping: {e}");
                None
            }
        }
    }

    #[test]
    fn bytes_queued_before_joining_and_after_pass_in_order() {
        let Some(map) = loaded() else { return };
        // user ↔ client (ours) and backend (ours) ↔ server.
        let (mut user, client) = pair();
        let (backend, mut server) = pair();
        user.write_all(b"early ").unwrap();
        server.write_all(b"greeting ").unwrap();
        std::thread::sleep(Duration::from_millis(50)); // let both queue before the join
        let joined = map.join(client.as_raw_fd(), backend.as_raw_fd()).unwrap();
        user.write_all(b"late").unwrap();
        server.write_all(b"reply").unwrap();
        for (s, want) in [
            (&mut server, &b"early late"[..]),
            (&mut user, b"greeting reply"),
        ] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = vec![0u8; want.len()];
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, want);
        }
        map.leave(&joined);
        drop((client, backend));
        user.shutdown(Shutdown::Both).unwrap();
    }

    #[test]
    fn a_socket_that_saw_a_fin_cannot_join() {
        let Some(map) = loaded() else { return };
        let (user, client) = pair();
        let (backend, _server) = pair();
        user.shutdown(Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(map.join(client.as_raw_fd(), backend.as_raw_fd()).is_err());
        // Nothing was left behind: the backend can still join with a fresh client.
        let (_user2, client2) = pair();
        map.join(client2.as_raw_fd(), backend.as_raw_fd()).unwrap();
    }
}
