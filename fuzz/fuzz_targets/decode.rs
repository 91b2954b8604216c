//! Fuzzes the frame decoder: any bytes, split anywhere, must give frames or a clean
//! error, never a panic, and never more payload than the header declared. The check
//! itself lives in `strata_wire::fuzzing`, shared with the unit test that replays the
//! checked-in corpus (`crates/strata-wire/corpus/decode/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = strata_wire::fuzzing::decode_checked(data);
});
