//! Decodes arbitrary bytes as a signed federation request (what
//! `Kith-Signature` carries) and checks its signature. Whatever decodes
//! re-encodes to exactly the input.
#![no_main]

use kith_proto::FederationRequestIn;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = FederationRequestIn::decode(data) {
        assert_eq!(request.encode(), data);
        let _ = request.verify_signature();
        let _ = request.request().body_matches(data);
    }
});
