//! The PROXY protocol v1/v2 reader (`forwarder::tcp::proxy::parse`) on any bytes a client may
//! send first. Besides not panicking: a header never claims more bytes than it was given, every
//! prefix of a complete header is "not yet" (the reader waits for more instead of refusing), and
//! what the forwarder itself writes parses back to the same addresses.
#![no_main]

use forwarder::tcp::proxy::{encode, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    if let Ok(Some(header)) = parse(data) {
        assert!(header.len <= data.len(), "header longer than its input");
        for cut in 1..header.len {
            assert_eq!(
                parse(&data[..cut]),
                Ok(None),
                "prefix of {cut} bytes refused"
            );
        }
        assert_eq!(parse(&data[..header.len]), Ok(Some(header)));
        if let Some((src, dst)) = header.addrs {
            for version in [
                forwarder::rules::options::ProxyVersion::V1,
                forwarder::rules::options::ProxyVersion::V2,
            ] {
                let written = encode(version, src, dst);
                let back = parse(&written).expect("our own header").expect("complete");
                assert_eq!(back.len, written.len());
            }
        }
    }
});
