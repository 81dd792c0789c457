//! The supervisor <-> worker control frames (`forwarder::control`): any bytes, cut at any point,
//! through the one `FrameReader`, decoded as requests and as replies. Besides not panicking:
//! where the cut falls changes nothing, and a decoded request encodes and decodes to itself.
#![no_main]

use forwarder::control::{encode, FrameReader, Reply, Request};
use libfuzzer_sys::fuzz_target;

fn frames<T: serde::de::DeserializeOwned>(chunks: &[&[u8]]) -> Vec<Result<T, String>> {
    let mut reader = FrameReader::default();
    let mut out = Vec::new();
    for chunk in chunks {
        reader.push(chunk);
        while let Some(frame) = reader.next_frame::<T>() {
            out.push(frame.map_err(|e| e.to_string()));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let at = (cut as usize).min(data.len());
    let whole = frames::<Request>(&[data]);
    let split = frames::<Request>(&[&data[..at], &data[at..]]);
    assert_eq!(
        format!("{whole:?}"),
        format!("{split:?}"),
        "the cut changed the frames"
    );
    for request in whole.into_iter().flatten() {
        let mut bytes = Vec::new();
        encode(&request, &mut bytes).expect("a decoded request encodes");
        let back = frames::<Request>(&[&bytes]);
        assert_eq!(
            format!("{back:?}"),
            format!("{:?}", [Ok::<_, String>(request)])
        );
    }
    let _ = frames::<Reply>(&[data]);
});
