//! Parses arbitrary text as every identifier; whatever parses must print
//! back to a canonical form that parses to the same value.
#![no_main]

use kith_proto::{ChannelId, DeviceId, Handle, ServerName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(name) = text.parse::<ServerName>() {
        assert_eq!(ServerName::parse_canonical(name.as_str()), Ok(name));
    }
    if let Ok(handle) = text.parse::<Handle>() {
        assert_eq!(handle.to_string().parse::<Handle>(), Ok(handle));
    }
    if let Ok(id) = text.parse::<DeviceId>() {
        assert_eq!(id.to_string().parse::<DeviceId>(), Ok(id));
    }
    if let Ok(id) = text.parse::<ChannelId>() {
        assert_eq!(id.to_string().parse::<ChannelId>(), Ok(id));
    }
});
