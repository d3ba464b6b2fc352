//! Decodes and verifies arbitrary bytes as a server key list.
#![no_main]

use kith_proto::ServerKeysIn;
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_790_000_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(keys) = ServerKeysIn::decode(data) {
        if let Ok(keys) = keys.verify(NOW) {
            assert_eq!(keys.encode(), data);
        }
    }
});
