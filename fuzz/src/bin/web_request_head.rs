//! The page's follower of HTTP request heads (`web::guard::Exchange`), which times each head and
//! body. Besides not panicking: however the bytes are cut into reads, it ends in the same phase,
//! and it never holds more than the head limit.
#![no_main]

use forwarder::web::fuzzing::Exchange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let at = (cut as usize * 7).min(data.len());
    let mut whole = Exchange::new();
    let a = whole.read(data);
    let mut split = Exchange::new();
    let b = split
        .read(&data[..at])
        .and_then(|()| split.read(&data[at..]));
    assert_eq!(a, b, "the cut changed the verdict");
    if a.is_ok() {
        assert_eq!(whole.wait(), split.wait(), "the cut changed the phase");
    }
    // The server answering, then more bytes: never a panic.
    whole.wrote();
    let _ = whole.read(data);
});
