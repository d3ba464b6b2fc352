//! Decodes arbitrary bytes as a binary event list (spec §6.8). A list that
//! decodes must re-encode to exactly the input, and every compact message
//! must carry the channel and epoch its MLS header names.
#![no_main]

use kith_proto::events::{EventFrame, decode_frames, encode_frame, private_message_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frames) = decode_frames(data) {
        let mut body = Vec::new();
        for frame in &frames {
            if let EventFrame::Compact { event, .. } = frame {
                assert_eq!(
                    private_message_header(event.message()),
                    Some((event.channel(), event.epoch()))
                );
            }
            encode_frame(frame, &mut body);
        }
        assert_eq!(body, data);
    }
});
