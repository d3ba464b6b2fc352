//! Opens arbitrary bytes as an inbox envelope with a fixed device key. Only
//! a correctly sealed, correctly signed message may open.
#![no_main]

use kith_proto::{DeviceId, InboxSecretKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = InboxSecretKey::from_bytes([7; 32]);
    let me = DeviceId::from_bytes([1; 32]);
    let _ = key.open(&me, data);
});
