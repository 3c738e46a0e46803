//! Any bytes given to the `.qnz` reader give a file or an error, never a panic, a hang or an
//! allocation the input did not pay for.
//!
//! ```text
//! cargo install cargo-fuzz
//! cargo +nightly fuzz run reader -- -max_total_time=600
//! ```
//! Seeds: `crates/qn-format/tests/fixtures/v*/*.qnz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reader) = qn_format::Reader::from_bytes(data) {
        let _ = reader.ledger();
        for view in reader.views() {
            let _ = view.decode_f32();
        }
    }
});
