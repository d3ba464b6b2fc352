//! Decodes arbitrary bytes as a chat message: never a panic, and whatever
//! decodes re-encodes to the same bytes. The result is then folded with
//! itself, as a target and as an operation on a second message.
#![no_main]

use kith_chat::{ChatMessage, Entry, MessageRef, Moderators, fold};
use kith_proto::DeviceId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let decoded = ChatMessage::decode(data);
    if let Ok(m) = &decoded {
        assert_eq!(m.encode(), data);
    }
    let device = DeviceId::from_bytes([1; 32]);
    let entries = [
        Entry::decode(MessageRef::from_bytes([0; 32]), 0u8, device, 0, data),
        Entry::decode(MessageRef::from_bytes([0x33; 32]), 1u8, device, 1, data),
    ];
    let forward = fold(&entries, &Moderators::new([1u8]));
    let backward = fold(&[entries[1].clone(), entries[0].clone()], &Moderators::new([1u8]));
    assert_eq!(forward, backward);
});
