//! Decodes and verifies arbitrary bytes as a sponsorship; the first 32 bytes
//! name the device it is checked against.
#![no_main]

use kith_proto::{DeviceId, SponsorshipIn};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_790_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((device, rest)) = data.split_first_chunk::<32>() else { return };
    if let Ok(s) = SponsorshipIn::decode(rest) {
        if let Ok(s) = s.verify(&DeviceId::from_bytes(*device), NOW) {
            assert_eq!(s.encode(), rest);
        }
    }
});
