//! Records that must be rejected, each with the specific error that says why.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use kith_proto::codec::{DecodeError, WireObject};
use kith_proto::{
    DeviceRecord, DeviceRecordIn, RecordError, RecordUpdate, RecordUpdateError, SecretKey,
    ServerKey, ServerKeys, ServerKeysError, ServerKeysIn, SignatureError, Sponsorship,
    SponsorshipError, SponsorshipIn, group_users, mutually_linked,
};

fn decode_verify(bytes: &[u8]) -> Result<DeviceRecord, RecordError> {
    DeviceRecordIn::decode(bytes)?.verify(NOW)
}

/// Flips one bit in the signature (the last bytes of the encoding).
fn flip_last_bit(mut bytes: Vec<u8>) -> Vec<u8> {
    *bytes.last_mut().unwrap() ^= 1;
    bytes
}

#[test]
fn valid_record_round_trips() {
    let key = device_key(1);
    let record = record(&key, "alice", vec![]);
    let back = decode_verify(&record.encode()).unwrap();
    assert_eq!(back, record);
    assert_eq!(
        back.handles().next().unwrap().to_string(),
        "alice@example.org"
    );
    assert_eq!(back.device_id(), device_id(&key));
}

#[test]
fn forged_signature_is_rejected() {
    let bytes = flip_last_bit(record(&device_key(1), "alice", vec![]).encode());
    assert!(matches!(
        decode_verify(&bytes),
        Err(RecordError::Signature(SignatureError::Invalid { .. }))
    ));
}

#[test]
fn record_signed_by_another_key_is_rejected() {
    // Mallory re-signs Alice's content with her own key but keeps Alice's
    // identity key in the record: the signature cannot verify.
    let alice = record(&device_key(1), "alice", vec![]);
    let mallory = record(&device_key(2), "alice", vec![]);
    let mut bytes = alice.encode();
    let sig_len = 64;
    let mallory_bytes = mallory.encode();
    let n = bytes.len();
    bytes[n - sig_len..].copy_from_slice(&mallory_bytes[mallory_bytes.len() - sig_len..]);
    assert!(matches!(
        decode_verify(&bytes),
        Err(RecordError::Signature(_))
    ));
}

#[test]
fn every_truncation_is_rejected() {
    let bytes = record(&device_key(1), "alice", vec![]).encode();
    for len in 0..bytes.len() {
        let err = decode_verify(&bytes[..len]).unwrap_err();
        assert!(
            matches!(err, RecordError::Decode(DecodeError::Malformed { .. })),
            "truncated to {len}: {err}"
        );
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = record(&device_key(1), "alice", vec![]).encode();
    bytes.push(0);
    assert!(matches!(
        decode_verify(&bytes),
        Err(RecordError::Decode(DecodeError::TrailingBytes {
            count: 1,
            ..
        }))
    ));
}

#[test]
fn oversized_input_is_rejected_before_parsing() {
    let mut bytes = record(&device_key(1), "alice", vec![]).encode();
    bytes.resize(DeviceRecordIn::MAX_LEN + 1, 0);
    assert!(matches!(
        decode_verify(&bytes),
        Err(RecordError::Decode(DecodeError::Oversize { .. }))
    ));
}

#[test]
fn unknown_version_is_rejected() {
    let mut bytes = record(&device_key(1), "alice", vec![]).encode();
    bytes[1] = 1;
    assert!(matches!(
        decode_verify(&bytes),
        Err(RecordError::Decode(DecodeError::UnknownVersion {
            version: 1,
            ..
        }))
    ));
}

#[test]
fn signature_replayed_as_another_type_is_rejected() {
    // A sponsorship's bytes are not a device record...
    let sponsorship = sponsorship(device_id(&device_key(1)), "alice").encode();
    assert!(DeviceRecordIn::decode(&sponsorship).is_err());
    // ...and a valid signature under another label does not verify as a
    // record, even over exactly the record's to-be-signed bytes.
    let key = device_key(1);
    let record = record(&key, "alice", vec![]);
    let bytes = record.encode();
    // The signature is the last field: a 2-byte length prefix (0x4040, the
    // varint for 64) and 64 bytes.
    assert_eq!(bytes[bytes.len() - 66..bytes.len() - 64], [0x40, 0x40]);
    let tbs = &bytes[..bytes.len() - 66];
    let wrong_label = key.sign(kith_proto::Label::Sponsorship, tbs);
    let mut forged = tbs.to_vec();
    forged.extend_from_slice(&[0x40, 0x40]);
    forged.extend_from_slice(&wrong_label);
    assert!(matches!(
        decode_verify(&forged),
        Err(RecordError::Signature(SignatureError::Invalid {
            label: kith_proto::Label::DeviceRecord
        }))
    ));
    // The same bytes signed under the right label do verify: the label is
    // the only difference.
    let right = key.sign(kith_proto::Label::DeviceRecord, tbs);
    forged.truncate(tbs.len() + 2);
    forged.extend_from_slice(&right);
    assert_eq!(decode_verify(&forged).unwrap(), record);
}

#[test]
fn expired_sponsorship_is_rejected() {
    let key = device_key(1);
    let mut f = fields(&key, "alice", vec![]);
    f.sponsorships = vec![Sponsorship::issue(
        &server_key(),
        "example.org".parse().unwrap(),
        "alice".parse().unwrap(),
        device_id(&key),
        NOW - 10 * DAY,
        NOW - DAY,
    )];
    let err = DeviceRecord::sign(&key, f, NOW).unwrap_err();
    assert!(matches!(
        err,
        RecordError::Sponsorship {
            error: SponsorshipError::Expired { .. },
            ..
        }
    ));
}

#[test]
fn sponsorship_for_another_device_is_rejected() {
    let key = device_key(1);
    let mut f = fields(&key, "alice", vec![]);
    f.sponsorships = vec![sponsorship(device_id(&device_key(2)), "alice")];
    assert!(matches!(
        DeviceRecord::sign(&key, f, NOW).unwrap_err(),
        RecordError::Sponsorship {
            error: SponsorshipError::WrongDevice { .. },
            ..
        }
    ));
}

#[test]
fn forged_sponsorship_is_rejected() {
    let device = device_id(&device_key(1));
    let mut bytes = sponsorship(device, "alice").encode();
    let n = bytes.len();
    bytes[n - 1] ^= 0x80;
    let err = SponsorshipIn::decode(&bytes)
        .unwrap()
        .verify(&device, NOW)
        .unwrap_err();
    assert!(matches!(
        err,
        SponsorshipError::Signature(SignatureError::Invalid { .. })
    ));
}

#[test]
fn sponsorship_key_must_be_published_by_its_server() {
    let s = sponsorship(device_id(&device_key(1)), "alice");
    s.check_server_keys(&server_keys()).unwrap();
    // A key list of the same server that does not hold the signing key.
    let other = SecretKey::from_seed([7; 32]);
    let keys = ServerKeys::publish(
        &other,
        "example.org".parse().unwrap(),
        NOW,
        vec![ServerKey {
            key: other.public(),
            valid_from: NOW - DAY,
            valid_until: NOW + DAY,
        }],
    )
    .unwrap();
    assert!(matches!(
        s.check_server_keys(&keys),
        Err(SponsorshipError::KeyNotPublished { .. })
    ));
    // A key list of another server.
    let keys = ServerKeys::publish(
        &server_key(),
        "evil.example".parse().unwrap(),
        NOW,
        vec![ServerKey {
            key: server_key().public(),
            valid_from: NOW - DAY,
            valid_until: NOW + DAY,
        }],
    )
    .unwrap();
    assert!(matches!(
        s.check_server_keys(&keys),
        Err(SponsorshipError::KeysForOtherServer { .. })
    ));
}

#[test]
fn server_keys_must_be_signed_by_a_listed_valid_key() {
    let outsider = SecretKey::from_seed([8; 32]);
    let err = ServerKeys::publish(
        &outsider,
        "example.org".parse().unwrap(),
        NOW,
        vec![ServerKey {
            key: server_key().public(),
            valid_from: NOW - DAY,
            valid_until: NOW + DAY,
        }],
    )
    .unwrap_err();
    assert_eq!(err, ServerKeysError::SignerNotValid);
    // Listed, but already expired when publishing.
    let err = ServerKeys::publish(
        &server_key(),
        "example.org".parse().unwrap(),
        NOW,
        vec![ServerKey {
            key: server_key().public(),
            valid_from: NOW - 2 * DAY,
            valid_until: NOW - DAY,
        }],
    )
    .unwrap_err();
    assert_eq!(err, ServerKeysError::SignerNotValid);
    let mut bytes = server_keys().encode();
    let n = bytes.len();
    bytes[n - 3] ^= 1;
    assert!(matches!(
        ServerKeysIn::decode(&bytes).unwrap().verify(NOW),
        Err(ServerKeysError::Signature(_))
    ));
}

#[test]
fn record_from_the_future_is_rejected() {
    let key = device_key(1);
    let mut f = fields(&key, "alice", vec![]);
    f.updated_at = NOW + DAY;
    assert!(matches!(
        DeviceRecord::sign(&key, f, NOW),
        Err(RecordError::FromFuture { .. })
    ));
}

#[test]
fn bad_fields_are_rejected() {
    let key = device_key(1);
    let me = device_id(&key);
    let other = device_id(&device_key(2));
    type Change = Box<dyn Fn(&mut kith_proto::DeviceRecordFields)>;
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|f| f.display_name = "x".repeat(65)),
            "display name",
        ),
        (
            Box::new(|f| f.display_name = "bell\u{7}".into()),
            "display name",
        ),
        (Box::new(move |f| f.links = vec![me]), "link"),
        (Box::new(move |f| f.links = vec![other, other]), "link"),
        (Box::new(|f| f.created_at = f.updated_at + 1), "created_at"),
        (
            Box::new(|f| f.sponsorships.push(f.sponsorships[0].clone())),
            "two sponsorships",
        ),
    ];
    for (change, expect) in cases {
        let mut f = fields(&key, "alice", vec![]);
        change(&mut f);
        let err = DeviceRecord::sign(&key, f, NOW).unwrap_err().to_string();
        assert!(err.contains(expect), "{err:?} does not mention {expect:?}");
    }
}

#[test]
fn update_rule() {
    let key = device_key(1);
    let v1 = record(&key, "alice", vec![]);
    let mut f = v1.fields();
    f.sequence = 2;
    f.display_name = "renamed".into();
    let v2 = DeviceRecord::sign(&key, f.clone(), NOW).unwrap();
    assert_eq!(v2.supersedes(&v1), Ok(RecordUpdate::Newer));
    assert_eq!(v2.supersedes(&v2.clone()), Ok(RecordUpdate::Unchanged));
    // Replaying the old record is a rollback.
    assert_eq!(
        v1.supersedes(&v2),
        Err(RecordUpdateError::SequenceWentBackwards {
            current: 2,
            offered: 1
        })
    );
    // Same sequence, different content: equivocation.
    f.display_name = "another name".into();
    let v2b = DeviceRecord::sign(&key, f, NOW).unwrap();
    assert_eq!(
        v2b.supersedes(&v2),
        Err(RecordUpdateError::Equivocation { sequence: 2 })
    );
    // A record of another device never replaces this one.
    let bob = record(&device_key(2), "bob", vec![]);
    assert!(matches!(
        bob.supersedes(&v1),
        Err(RecordUpdateError::DifferentDevice { .. })
    ));
}

#[test]
fn users_are_mutual_links() {
    let (ka, kb, kc, kd) = (device_key(1), device_key(2), device_key(3), device_key(4));
    let (a, b, c, d) = (
        device_id(&ka),
        device_id(&kb),
        device_id(&kc),
        device_id(&kd),
    );
    // a <-> b <-> c form one user; d claims a, but a does not name d.
    let ra = record(&ka, "alice", vec![b]);
    let rb = record(&kb, "alice", vec![a, c]);
    let rc = record(&kc, "alice", vec![b]);
    let rd = record(&kd, "mallory", vec![a]);
    assert!(mutually_linked(&ra, &rb));
    assert!(!mutually_linked(&ra, &rd));
    let users = group_users(&[rd.clone(), rc.clone(), rb.clone(), ra.clone()]);
    assert_eq!(users.len(), 2);
    let alice = users
        .iter()
        .find(|u| u.devices().iter().any(|r| r.device_id() == a))
        .unwrap();
    let mut ids: Vec<_> = alice.devices().iter().map(|r| r.device_id()).collect();
    ids.sort();
    let mut want = vec![a, b, c];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(alice.handles().len(), 1);
    let mallory = users
        .iter()
        .find(|u| u.devices().iter().any(|r| r.device_id() == d))
        .unwrap();
    assert_eq!(mallory.devices().len(), 1);
}

#[test]
fn non_minimal_length_prefix_is_rejected() {
    // The same sponsorship with its server name's length written in two
    // bytes (0x400b) instead of one (0x0b): a second encoding of the same
    // object must not decode, or signatures would not name one byte string.
    let device = device_id(&device_key(1));
    let bytes = sponsorship(device, "alice").encode();
    assert_eq!(&bytes[..3], &[0, 0, 0x0b]);
    let mut stretched = vec![0, 0, 0x40, 0x0b];
    stretched.extend_from_slice(&bytes[3..]);
    assert!(matches!(
        SponsorshipIn::decode(&stretched),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn verified_records_reuse_only_what_still_verifies() {
    let mut cache = kith_proto::VerifiedRecords::new(2);
    let key = device_key(1);
    let bytes = record(&key, "alice", vec![]).encode();
    let first = cache.verify(&bytes, NOW).expect("a valid record verifies");
    // A hit gives the same record.
    assert_eq!(cache.verify(&bytes, NOW + DAY), Some(first.clone()));
    // After its sponsorship expired, the cached record is not served.
    assert_eq!(cache.verify(&bytes, NOW + 366 * DAY), None);
    // Nor before the time it was verified at: verified again, and a
    // record from too far in the future fails.
    assert_eq!(cache.verify(&bytes, NOW - 30 * DAY), None);
    // Other bytes are verified on their own: a flipped signature bit fails
    // even though a record of the same device is cached.
    let mut forged = bytes.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(cache.verify(&forged, NOW), None);
    assert_eq!(cache.verify(&bytes, NOW), Some(first));
    // Garbage is refused, not a panic.
    assert_eq!(cache.verify(b"\x00\x01garbage", NOW), None);
}
