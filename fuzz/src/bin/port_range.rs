//! Port ranges in the rules (`forwarder::rules::parse_port_range`, `parse_listen`) and the
//! overlap index: any text read as a range or a listen field; a range read back from its text is
//! the same range; ranges claimed in the index overlap exactly when a naive check says so.
#![no_main]

use forwarder::rules::range::{PortIndex, PortRange};
use forwarder::rules::{parse_listen, parse_port_range, Proto};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for field in text.split('\n') {
        if let Ok(r) = parse_port_range(field) {
            assert!(r.first >= 1 && r.first <= r.last);
            assert_eq!(parse_port_range(&r.to_string()), Ok(r));
        }
        if let Ok(l) = parse_listen(field) {
            assert_eq!(l.addr.port(), l.ports.first);
            assert_eq!(parse_listen(&l.to_string()), Ok(l));
        }
    }
    // Pairs of bytes as ranges claimed in turn.
    let mut index = PortIndex::default();
    let mut kept: Vec<PortRange> = Vec::new();
    for (line, pair) in data.chunks_exact(3).enumerate() {
        let first = u16::from_be_bytes([pair[0], pair[1]]).max(1);
        let r = PortRange { first, last: first.saturating_add(pair[2] as u16) };
        let naive = kept.iter().find(|k| k.first <= r.last && r.first <= k.last).copied();
        match (index.claim(r, Proto::Tcp, line), naive) {
            (Ok(o), Some(k)) => assert_eq!((o.range, k), (r, r)),
            (Ok(_), None) => kept.push(r),
            (Err(o), Some(_)) => assert_ne!(o.range, r),
            (Err(o), None) => panic!("refused {r:?} for {o:?}"),
        }
    }
});
