//! The decoder check shared by the `cargo fuzz` target (`fuzz/fuzz_targets/decode.rs`)
//! and the unit test that replays the checked-in corpus (`corpus/decode/`), so both hold
//! the decoder to the same rules. Not part of the API.

use crate::{Body, Event, FrameDecoder, Limits};

/// Decodes `data` as the fuzz target does: the first byte picks the split size, the rest
/// is the stream. Any bytes must give frames or a clean error, never a panic, never more
/// payload than the header declared, and a tensor header only with a size that fits.
/// Returns the number of complete frames, or the error that stopped the stream.
pub fn decode_checked(data: &[u8]) -> Result<usize, crate::WireError> {
    let Some((&first, stream)) = data.split_first() else { return Ok(0) };
    let split = usize::from(first) + 1;
    let mut dec = FrameDecoder::new(Limits { header_bytes_max: 4096, frame_bytes_max: 1 << 20 });
    let (mut declared, mut seen, mut frames) = (0u64, 0u64, 0usize);
    for piece in stream.chunks(split) {
        let mut rest = piece;
        loop {
            let (used, ev) = dec.feed(rest)?;
            rest = &rest[used..];
            match ev {
                Some(Event::Header(h)) => {
                    assert!(h.payload_bytes <= 1 << 20, "payload over the limit passed: {h:?}");
                    if let Body::Tensor { meta, .. } = &h.body {
                        assert_eq!(meta.bytes(), Some(h.payload_bytes), "tensor size disagrees with the payload");
                    }
                    declared = h.payload_bytes;
                    seen = 0;
                }
                Some(Event::Payload(p)) => {
                    seen += p.len() as u64;
                    assert!(seen <= declared, "{seen} payload bytes of {declared} declared");
                }
                Some(Event::End) => {
                    assert_eq!(seen, declared, "frame ended early");
                    frames += 1;
                }
                None if used == 0 => break,
                None => {}
            }
        }
    }
    // A frame ending exactly at the end of the input reports End on the next call.
    if let (_, Some(Event::End)) = dec.feed(&[])? {
        frames += 1;
    }
    dec.finish()?;
    Ok(frames)
}
