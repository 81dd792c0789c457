//! The `bpf(2)` system call, just what the sockmap data path needs: `SOCKHASH` maps, the
//! stream-verdict program assembled here (fifteen instructions, so no compiler at build time),
//! attaching it, and adding and removing sockets.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `enum bpf_cmd` values used here.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;

const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
/// `BPF_NOEXIST`: a key is added once; finding it taken means a bug, not a reuse.
const BPF_NOEXIST: u64 = 1;

/// Helper function numbers (`enum bpf_func_id`).
const FN_GET_SOCKET_COOKIE: i32 = 46;
const FN_SK_REDIRECT_HASH: i32 = 72;

/// Bytes of verifier log kept when a load fails (the log says why).
const LOG_BYTES: usize = 64 * 1024;

/// Why the verdict program could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("creating the SOCKHASH map: {0}")]
    MapCreate(io::Error),
    #[error("loading the sk_skb verdict program: {err}{}", verifier(log))]
    ProgLoad { err: io::Error, log: String },
    #[error("attaching the verdict program to the map: {0}")]
    Attach(io::Error),
}

fn verifier(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!(" (verifier: {})", log.trim())
    }
}

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst register in the low four bits, src in the high four.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const JEQ_IMM: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const MOV64_REG: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV64_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const ADD64_IMM: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW (two slots)
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
/// `BPF_PSEUDO_MAP_FD`: the 64-bit immediate is a map descriptor the kernel swaps for the map.
const PSEUDO_MAP_FD: u8 = 1;

/// The stream verdict: the socket the bytes arrived on looks up its own cookie in the targets
/// map, whose entry is its peer, and the bytes leave through the peer.
///
/// An empty skb (a FIN that came alone) is dropped: the relay passes FINs on itself, and
/// redirected, an empty skb makes the peer's psock fail its send with 0 bytes, which it reports
/// as EPIPE on the peer socket and then stops sending to it.
///
/// ```text
/// r6 = r1                               ; skb
/// r2 = *(u32 *)(r1 + 0)                 ; skb->len
/// if r2 == 0 goto drop
/// r0 = bpf_get_socket_cookie(r1)
/// *(u64 *)(r10 - 8) = r0                ; key on the stack
/// r1 = r6; r2 = targets; r3 = r10 - 8; r4 = 0 (egress)
/// r0 = bpf_sk_redirect_hash(r1, r2, r3, r4)   ; SK_PASS, or SK_DROP when no peer
/// exit
/// drop: r0 = SK_DROP; exit
/// ```
fn verdict_program(map_fd: RawFd) -> [Insn; 15] {
    [
        insn(MOV64_REG, 6, 1, 0, 0),
        insn(LDX_W, 2, 1, 0, 0),
        insn(JEQ_IMM, 2, 0, 10, 0), // over the ten slots of the redirect
        insn(CALL, 0, 0, 0, FN_GET_SOCKET_COOKIE),
        insn(STX_DW, 10, 0, -8, 0),
        insn(MOV64_REG, 1, 6, 0, 0),
        insn(LD_IMM64, 2, PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_REG, 3, 10, 0, 0),
        insn(ADD64_IMM, 3, 0, 0, -8),
        insn(MOV64_IMM, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, FN_SK_REDIRECT_HASH),
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV64_IMM, 0, 0, 0, 0), // SK_DROP
        insn(EXIT, 0, 0, 0, 0),
    ]
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, zero-initialised prefix of `union bpf_attr` for this command, and
    // its size is passed along; the kernel treats the missing tail as zeros.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// A `SOCKHASH` map: keys are 8-byte socket cookies, values sockets. A socket in any sockmap has
/// a psock (the kernel's hook on it); dropping the map closes it, and a socket leaves every map
/// when it closes.
pub struct SockHash {
    fd: OwnedFd,
}

impl SockHash {
    fn create(max_entries: u32) -> Result<SockHash, BpfError> {
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_SOCKHASH,
            key_size: 8,
            value_size: 8,
            max_entries: max_entries.max(2),
            map_flags: 0,
        };
        let fd = owned(bpf(BPF_MAP_CREATE, &mut attr).map_err(BpfError::MapCreate)?);
        Ok(SockHash { fd })
    }

    /// Adds `socket` under `key`; the socket must be an established TCP socket.
    pub fn insert(&self, key: u64, socket: RawFd) -> io::Result<()> {
        let value = socket as u64;
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u64 as u64,
            value: &value as *const u64 as u64,
            flags: BPF_NOEXIST,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    /// Removes `key`'s entry. A missing key is fine.
    pub fn remove(&self, key: u64) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u64 as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(drop),
        }
    }
}

/// The verdict program and its two maps. `members` has the program attached: a socket in it has
/// its received bytes judged. `targets` is where the program looks a socket's cookie up to find
/// where the bytes go. Two maps, so a socket can be a target before its own bytes are judged (no
/// moment in which bytes find no peer and are dropped) and could stop being judged while it stays
/// a target.
pub struct Redirector {
    pub members: SockHash,
    pub targets: SockHash,
    _prog: OwnedFd,
}

impl Redirector {
    /// Creates both maps for `max_entries` sockets each, loads the program and attaches it.
    pub fn load(max_entries: u32) -> Result<Redirector, BpfError> {
        let members = SockHash::create(max_entries)?;
        let targets = SockHash::create(max_entries)?;
        let prog = load_program(targets.fd.as_raw_fd())?;
        let mut attach = ProgAttachAttr {
            target_fd: members.fd.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type: BPF_SK_SKB_STREAM_VERDICT,
            attach_flags: 0,
        };
        bpf(BPF_PROG_ATTACH, &mut attach).map_err(BpfError::Attach)?;
        Ok(Redirector {
            members,
            targets,
            _prog: prog,
        })
    }
}

/// Loads the verdict program; on failure loads it again with the verifier log switched on, so
/// the error says why.
fn load_program(map_fd: RawFd) -> Result<OwnedFd, BpfError> {
    let insns = verdict_program(map_fd);
    // "Dual MIT/GPL": the project's licence, and one the kernel counts as GPL-compatible.
    let license = c"Dual MIT/GPL";
    let mut name = [0u8; 16];
    name[..14].copy_from_slice(b"fwd_redirect\0\0");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SK_SKB,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(err) => {
            let mut log = vec![0u8; LOG_BYTES];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, &mut attr).map(|fd| drop(owned(fd)));
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(BpfError::ProgLoad {
                err,
                log: String::from_utf8_lossy(&log[..end]).into_owned(),
            })
        }
    }
}

/// The socket's cookie (`SO_COOKIE`): a number unique to it for the life of the system, which is
/// what the verdict program sees as `bpf_get_socket_cookie(skb)`.
pub fn cookie(socket: RawFd) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`.
    let r = unsafe {
        libc::getsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            &mut value as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_registers_low_then_high() {
        let p = verdict_program(7);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        // r3 = r10: dst 3 in the low nibble, src 10 in the high one.
        assert_eq!(p[8].regs, 0xa3);
        assert_eq!((p[6].regs, p[6].imm), (0x12, 7));
        // The empty-skb jump lands on the drop: 2 + 1 + 10.
        assert_eq!(p[2 + 1 + p[2].off as usize].code, MOV64_IMM);
        assert_eq!(p[12].code, EXIT);
    }
}
