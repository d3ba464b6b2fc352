//! Decodes arbitrary bytes as an ordering certificate and checks it against
//! a fixed voter set. A certificate that verifies must re-encode to exactly
//! the input.
#![no_main]

use kith_order::{OrderingCertificateIn, VoterSet};
use kith_proto::{SecretKey, ServerName};
use libfuzzer_sys::fuzz_target;

fn voters() -> VoterSet {
    VoterSet::new((1u8..=3).filter_map(|i| {
        let name: ServerName = format!("s{i}.example").parse().ok()?;
        Some((name, vec![SecretKey::from_seed([i; 32]).public()]))
    }))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = OrderingCertificateIn::decode(data) {
        if let Ok(cert) = cert.verify(&voters()) {
            assert_eq!(cert.encode(), data);
        }
    }
});
