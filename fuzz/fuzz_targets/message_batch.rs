//! Decodes arbitrary bytes as a multi-message send body (spec §6.7, "Send
//! several messages, binary"). A body that decodes must re-encode to
//! exactly the input, within the limits it was decoded with; a refusal
//! must name a message that exists in the input's framing.
#![no_main]

use kith_proto::batch::{BatchError, decode_batch, encode_batch};
use libfuzzer_sys::fuzz_target;

/// Small limits, so that going over them is reachable.
const MAX_MESSAGES: usize = 8;
const MAX_MESSAGE_BYTES: usize = 512;

fuzz_target!(|data: &[u8]| {
    match decode_batch(data, MAX_MESSAGES, MAX_MESSAGE_BYTES) {
        Ok(messages) => {
            assert!(!messages.is_empty() && messages.len() <= MAX_MESSAGES);
            assert!(messages
                .iter()
                .all(|m| !m.is_empty() && m.len() <= MAX_MESSAGE_BYTES));
            assert_eq!(encode_batch(messages.iter().copied()), data);
        }
        Err(e) => {
            if let Some(index) = e.index() {
                assert!(index < MAX_MESSAGES);
            }
            assert_eq!(e == BatchError::Empty, data.is_empty());
        }
    }
});
