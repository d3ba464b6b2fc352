//! Decodes and verifies arbitrary bytes as a device record. A record that
//! verifies must re-encode to exactly the input.
#![no_main]

use kith_proto::DeviceRecordIn;
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_790_000_000_000;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = DeviceRecordIn::decode(data) {
        if let Ok(record) = record.verify(NOW) {
            assert_eq!(record.encode(), data);
        }
    }
});
