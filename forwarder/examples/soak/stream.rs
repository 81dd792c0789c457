//! The soak's wire format: a 32-byte header from the client, then each side sends its own
//! pseudo-random stream and a FIN. Every byte is a function of (seed, position), so the receiver
//! checks each chunk as it arrives, however the network splits it, without keeping the stream.

/// "SOAK" in the header's first four bytes: anything else is a stray connection.
pub const MAGIC: u32 = 0x534f_414b;
pub const HEADER_LEN: usize = 32;
/// Bytes the backend sends first on every connection: its id, so a client knows which backend
/// a lost connection was on.
pub const ID_LEN: usize = 8;

/// The backend reads slowly (a slow reader on the backend side).
pub const FLAG_SLOW_BACKEND: u32 = 1;
/// The backend sends its id and then holds the connection until the client closes it.
pub const FLAG_HOLD: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub flags: u32,
    pub seed: u64,
    /// Bytes the client sends after the header (client → backend).
    pub up_len: u64,
    /// Bytes the backend sends after its id (backend → client).
    pub down_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..16].copy_from_slice(&self.seed.to_be_bytes());
        b[16..24].copy_from_slice(&self.up_len.to_be_bytes());
        b[24..32].copy_from_slice(&self.down_len.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Option<Header> {
        let word =
            |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().unwrap_or([0; 8]));
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        (magic == MAGIC).then(|| Header {
            flags: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            seed: word(8..16),
            up_len: word(16..24),
            down_len: word(24..32),
        })
    }
}

/// The seed of the backend → client stream, distinct from the client → backend one.
pub fn down_seed(seed: u64) -> u64 {
    seed ^ 0x9e37_79b9_7f4a_7c15
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The stream's bytes from `offset` on, into `buf`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *b = splitmix(seed ^ (pos / 8)).to_le_bytes()[(pos % 8) as usize];
    }
}

/// True when `got` is exactly the stream's bytes at `offset`.
pub fn matches(seed: u64, offset: u64, got: &[u8]) -> bool {
    let mut want = vec![0u8; got.len()];
    fill(seed, offset, &mut want);
    want == got
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_split_checks_the_same_bytes() {
        let mut whole = vec![0u8; 100];
        fill(7, 3, &mut whole);
        assert!(matches(7, 3, &whole));
        assert!(matches(7, 50, &whole[47..]));
        assert!(!matches(8, 3, &whole));
        whole[10] ^= 1;
        assert!(!matches(7, 3, &whole));
    }
}
