//! The SNI peek (`forwarder::tcp::sni::read_client_hello`): any bytes, and any prefix of them,
//! read as the start of a TLS connection. Besides not panicking: a prefix of bytes that read as
//! incomplete or whole never reads as an error the whole bytes would not give (the reader is fed
//! what was peeked so far, so growing input must not turn an answer into a different one), and a
//! name read is a lower-case host name.
#![no_main]

use forwarder::tcp::sni::{read_client_hello, Hello, MAX_HELLO};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HELLO)];
    let whole = read_client_hello(data);
    if let Ok(Hello::Complete(Some(name))) = &whole {
        assert!(!name.is_empty() && name.len() <= 253);
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)));
    }
    if let Some(&cut) = data.first() {
        let at = (cut as usize * data.len() / 255).min(data.len());
        match read_client_hello(&data[..at]) {
            // Once an answer, more bytes give the same answer.
            Ok(Hello::Complete(name)) => assert_eq!(whole, Ok(Hello::Complete(name))),
            Ok(Hello::NotTls) => assert_eq!(whole, Ok(Hello::NotTls)),
            _ => {}
        }
    }
});
