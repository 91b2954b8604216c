//! Fuzzes the frame decoder: any bytes, split anywhere, must give frames or a clean
//! error, never a panic, and never more payload than the header declared.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_wire::{Event, FrameDecoder, Limits};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The first byte picks the split size, the rest is the stream.
    let split = usize::from(data[0]) + 1;
    let mut dec = FrameDecoder::new(Limits { header_bytes_max: 4096, frame_bytes_max: 1 << 20 });
    let mut declared = 0u64;
    let mut seen = 0u64;
    for piece in data[1..].chunks(split) {
        let mut rest = piece;
        loop {
            let Ok((used, ev)) = dec.feed(rest) else { return };
            rest = &rest[used..];
            match ev {
                Some(Event::Header(h)) => {
                    assert!(h.payload_bytes <= 1 << 20);
                    declared = h.payload_bytes;
                    seen = 0;
                }
                Some(Event::Payload(p)) => {
                    seen += p.len() as u64;
                    assert!(seen <= declared);
                }
                Some(Event::End) => assert_eq!(seen, declared),
                None if used == 0 => break,
                None => {}
            }
        }
    }
    let _ = dec.finish();
});
