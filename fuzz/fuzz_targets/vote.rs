//! Decodes and verifies arbitrary bytes as a vote. A vote that verifies
//! must re-encode to exactly the input.
#![no_main]

use kith_order::VoteIn;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(vote) = VoteIn::decode(data) {
        if let Ok(vote) = vote.verify() {
            assert_eq!(vote.encode(), data);
        }
    }
});
