//! The seed corpus of the `inbox_envelope` fuzz target
//! (`fuzz/seeds/inbox_envelope/`): real envelopes sealed to the key and
//! device the target opens with, so the fuzzer starts past the HPKE open
//! and reaches the inner message's decoding and signature check.
//!
//! Run with `KITH_WRITE_SEEDS=1` to rewrite them. Everything in them is
//! fixed but the HPKE ephemeral key (and so the ciphertext), which `seal`
//! draws at random by design; without the variable the test checks that
//! the committed seeds still open to exactly the messages below.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;

use kith_proto::inbox::seal;
use kith_proto::{DeviceId, InboxKind, InboxSecretKey, SecretKey};

/// What `fuzz/fuzz_targets/inbox_envelope.rs` opens with.
const TARGET_KEY: [u8; 32] = [7; 32];
const TARGET_DEVICE: [u8; 32] = [1; 32];

fn dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fuzz/seeds/inbox_envelope"
    ))
}

/// Each seed: file name, sender seed, kind, body, `sent_at`.
fn messages() -> Vec<(&'static str, u8, InboxKind, Vec<u8>, u64)> {
    vec![
        (
            "welcome",
            2,
            InboxKind::Welcome,
            b"an MLS Welcome".to_vec(),
            1_700_000_000_000,
        ),
        ("direct", 3, InboxKind::Direct, b"hello".to_vec(), 1),
        ("notice", 4, InboxKind::Notice, Vec::new(), 0),
        (
            "unknown_kind",
            5,
            InboxKind::Unknown(0x7fff),
            vec![0xff; 3],
            u64::MAX,
        ),
        (
            "long_body",
            6,
            InboxKind::Direct,
            (0..=255u8).cycle().take(2000).collect(),
            42,
        ),
    ]
}

#[test]
fn inbox_envelope_seeds_open_with_the_targets_key() {
    let key = InboxSecretKey::from_bytes(TARGET_KEY);
    let me = DeviceId::from_bytes(TARGET_DEVICE);
    if std::env::var_os("KITH_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        for (name, sender, kind, body, sent_at) in messages() {
            let sender = SecretKey::from_seed([sender; 32]);
            let envelope = seal(&sender, me, &key.public(), kind, &body, sent_at).unwrap();
            std::fs::write(dir().join(name), envelope).unwrap();
        }
    }
    for (name, sender, kind, body, sent_at) in messages() {
        let envelope = std::fs::read(dir().join(name))
            .unwrap_or_else(|e| panic!("fuzz/seeds/inbox_envelope/{name}: {e}"));
        let opened = key
            .open(&me, &envelope)
            .unwrap_or_else(|e| panic!("{name} does not open: {e}"));
        let sender = SecretKey::from_seed([sender; 32]).public();
        assert_eq!(opened.sender, DeviceId::of(&sender), "{name}");
        assert_eq!(opened.sender_key, sender, "{name}");
        assert_eq!(opened.kind, kind, "{name}");
        assert_eq!(opened.body, body, "{name}");
        assert_eq!(opened.sent_at, sent_at, "{name}");
    }
}
