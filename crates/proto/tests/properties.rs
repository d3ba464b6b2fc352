//! Property tests: every object survives encode then decode unchanged, and
//! no input — random or a mutated valid encoding — panics a decoder or
//! verifies when it should not.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{DAY, NOW};
use kith_proto::{
    ChannelId, DeviceId, DeviceRecord, DeviceRecordFields, DeviceRecordIn, Handle, InboxKey,
    SecretKey, ServerKey, ServerKeys, ServerKeysIn, ServerName, Sponsorship, SponsorshipIn,
};
use proptest::collection::{btree_set, vec};
use proptest::prelude::*;

fn server_name() -> impl Strategy<Value = ServerName> {
    let dns = "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z]([a-z0-9-]{0,10}[a-z0-9])?){0,3}";
    let ipv4 = any::<[u8; 4]>().prop_map(|o| std::net::Ipv4Addr::from(o).to_string());
    let ipv6 = any::<[u8; 16]>().prop_map(|o| format!("[{}]", std::net::Ipv6Addr::from(o)));
    (
        prop_oneof![dns.prop_map(String::from), ipv4, ipv6],
        proptest::option::of(1u16..),
    )
        .prop_map(|(host, port)| match port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        })
        .prop_filter_map("valid server name", |s| s.parse().ok())
}

fn local_name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,31}"
}

fn display_name() -> impl Strategy<Value = String> {
    "\\PC{0,20}".prop_filter("fits", |s| s.len() <= 64)
}

fn sponsorship_for(device: DeviceId) -> impl Strategy<Value = Sponsorship> {
    (
        any::<[u8; 32]>(),
        server_name(),
        local_name(),
        0..DAY,
        1..1000 * DAY,
    )
        .prop_map(move |(seed, server, name, before, lifetime)| {
            Sponsorship::issue(
                &SecretKey::from_seed(seed),
                server,
                name.parse().unwrap(),
                device,
                NOW - before,
                NOW - before + lifetime.max(before + 1),
            )
        })
}

fn record() -> impl Strategy<Value = DeviceRecord> {
    any::<[u8; 32]>().prop_flat_map(|seed| {
        let key = SecretKey::from_seed(seed);
        let id = DeviceId::of(&key.public());
        (
            any::<u64>(),
            any::<[u8; 32]>(),
            display_name(),
            btree_set(any::<[u8; 32]>(), 0..5),
            vec(sponsorship_for(id), 0..3),
            0..DAY,
        )
            .prop_map(
                move |(sequence, inbox, display_name, links, sponsorships, age)| {
                    let mut distinct: Vec<Sponsorship> = Vec::new();
                    for s in sponsorships {
                        if !distinct.iter().any(|d| d.server() == s.server()) {
                            distinct.push(s);
                        }
                    }
                    let fields = DeviceRecordFields {
                        sequence,
                        inbox_key: InboxKey::x25519(inbox),
                        display_name,
                        links: links
                            .into_iter()
                            .map(DeviceId::from_bytes)
                            .filter(|d| *d != id)
                            .collect(),
                        sponsorships: distinct,
                        created_at: NOW - age,
                        updated_at: NOW,
                    };
                    DeviceRecord::sign(&key, fields, NOW).unwrap()
                },
            )
    })
}

fn server_keys() -> impl Strategy<Value = ServerKeys> {
    (
        server_name(),
        btree_set(any::<[u8; 32]>(), 1..6),
        1..100 * DAY,
    )
        .prop_map(|(server, seeds, lifetime)| {
            let keys: Vec<SecretKey> = seeds.into_iter().map(SecretKey::from_seed).collect();
            let entries = keys
                .iter()
                .map(|k| ServerKey {
                    key: k.public(),
                    valid_from: NOW - DAY,
                    valid_until: NOW + lifetime,
                })
                .collect();
            ServerKeys::publish(&keys[0], server, NOW, entries).unwrap()
        })
}

/// Applies one mutation to a valid encoding.
fn mutate(bytes: &[u8], kind: u8, at: usize, value: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let at = at % out.len().max(1);
    match kind % 3 {
        0 => out[at] ^= value.max(1),
        1 => out.truncate(at),
        _ => out.insert(at, value),
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn record_round_trips(r in record()) {
        let bytes = r.encode();
        let back = DeviceRecordIn::decode(&bytes).unwrap().verify(NOW).unwrap();
        prop_assert_eq!(back.encode(), bytes);
        prop_assert_eq!(back, r);
    }

    #[test]
    fn sponsorship_round_trips(s in sponsorship_for(DeviceId::from_bytes([3; 32]))) {
        let bytes = s.encode();
        let back = SponsorshipIn::decode(&bytes).unwrap().verify(s.device(), NOW).unwrap();
        prop_assert_eq!(back, s);
    }

    #[test]
    fn server_keys_round_trip(k in server_keys()) {
        let bytes = k.encode();
        let back = ServerKeysIn::decode(&bytes).unwrap().verify(NOW).unwrap();
        prop_assert_eq!(back, k);
    }

    #[test]
    fn mutated_record_never_verifies(r in record(), kind in any::<u8>(), at in any::<usize>(), value in any::<u8>()) {
        let bytes = r.encode();
        let mutated = mutate(&bytes, kind, at, value);
        prop_assume!(mutated != bytes);
        let verified = DeviceRecordIn::decode(&mutated).ok().and_then(|r| r.verify(NOW).ok());
        prop_assert!(verified.is_none());
    }

    #[test]
    fn mutated_server_keys_never_verify(k in server_keys(), kind in any::<u8>(), at in any::<usize>(), value in any::<u8>()) {
        let bytes = k.encode();
        let mutated = mutate(&bytes, kind, at, value);
        prop_assume!(mutated != bytes);
        let verified = ServerKeysIn::decode(&mutated).ok().and_then(|k| k.verify(NOW).ok());
        prop_assert!(verified.is_none());
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..4096), version_zero in any::<bool>()) {
        let mut bytes = bytes;
        // Half the inputs get a valid version so the decoders go deeper.
        if version_zero && bytes.len() >= 2 {
            bytes[0] = 0;
            bytes[1] = 0;
        }
        if let Ok(r) = DeviceRecordIn::decode(&bytes) { let _ = r.verify(NOW); }
        if let Ok(s) = SponsorshipIn::decode(&bytes) { let _ = s.verify(&DeviceId::from_bytes([0; 32]), NOW); }
        if let Ok(k) = ServerKeysIn::decode(&bytes) { let _ = k.verify(NOW); }
    }

    #[test]
    fn identifiers_round_trip(name in server_name(), local in local_name(), channel in any::<[u8; 16]>()) {
        prop_assert_eq!(ServerName::parse_canonical(name.as_str()), Ok(name.clone()));
        let handle: Handle = format!("{local}@{name}").parse().unwrap();
        prop_assert_eq!(handle.to_string().parse::<Handle>(), Ok(handle.clone()));
        let channel = ChannelId::from_bytes(channel);
        prop_assert_eq!(channel.to_string().parse::<ChannelId>(), Ok(channel));
    }

    #[test]
    fn identifier_parsers_never_panic(s in "\\PC{0,80}") {
        let _ = s.parse::<ServerName>();
        let _ = s.parse::<Handle>();
        let _ = s.parse::<DeviceId>();
        let _ = s.parse::<ChannelId>();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Whatever is sealed opens to the same message for the recipient, and
    /// no single-byte change to the envelope still opens.
    #[test]
    fn inbox_seal_open(body in vec(any::<u8>(), 0..2048), kind in any::<u16>(), at in any::<usize>(), flip in 1u8..) {
        use kith_proto::inbox::{InboxKind, seal};
        let sender = SecretKey::from_seed([1; 32]);
        let recipient = kith_proto::InboxSecretKey::from_bytes([2; 32]);
        let me = DeviceId::from_bytes([3; 32]);
        let kind = InboxKind::from_u16(kind);
        let env = seal(&sender, me, &recipient.public(), kind, &body, NOW).unwrap();
        let msg = recipient.open(&me, &env).unwrap();
        prop_assert_eq!(&msg.body, &body);
        prop_assert_eq!(msg.kind, kind);
        prop_assert_eq!(msg.sender, DeviceId::of(&sender.public()));
        let mut altered = env.clone();
        let i = at % altered.len();
        altered[i] ^= flip;
        prop_assert!(recipient.open(&me, &altered).is_err());
    }

    #[test]
    fn inbox_open_never_panics(bytes in vec(any::<u8>(), 0..2048)) {
        let recipient = kith_proto::InboxSecretKey::from_bytes([2; 32]);
        let _ = recipient.open(&DeviceId::from_bytes([3; 32]), &bytes);
    }
}
