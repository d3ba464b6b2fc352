//! Fixtures shared by the integration tests: fixed keys and times, so every
//! run (and the test vectors) sees the same bytes.
#![allow(dead_code, unreachable_pub)]

use kith_proto::{
    DeviceId, DeviceRecord, DeviceRecordFields, InboxKey, SecretKey, ServerKey, ServerKeys,
    Sponsorship,
};

/// 2026-09-21T..., a fixed "now" in ms since the Unix epoch.
pub const NOW: u64 = 1_790_000_000_000;
pub const DAY: u64 = 24 * 3600 * 1000;

pub fn server_key() -> SecretKey {
    SecretKey::from_seed([0x5e; 32])
}

pub fn device_key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

pub fn device_id(key: &SecretKey) -> DeviceId {
    DeviceId::of(&key.public())
}

pub fn sponsorship(device: DeviceId, name: &str) -> Sponsorship {
    Sponsorship::issue(
        &server_key(),
        "example.org".parse().unwrap(),
        name.parse().unwrap(),
        device,
        NOW,
        NOW + 365 * DAY,
    )
}

pub fn fields(key: &SecretKey, name: &str, links: Vec<DeviceId>) -> DeviceRecordFields {
    DeviceRecordFields {
        sequence: 1,
        inbox_key: InboxKey::x25519([0x42; 32]),
        display_name: format!("{name}'s device"),
        links,
        sponsorships: vec![sponsorship(device_id(key), name)],
        created_at: NOW,
        updated_at: NOW,
    }
}

pub fn record(key: &SecretKey, name: &str, links: Vec<DeviceId>) -> DeviceRecord {
    DeviceRecord::sign(key, fields(key, name, links), NOW).unwrap()
}

pub fn server_keys() -> ServerKeys {
    ServerKeys::publish(
        &server_key(),
        "example.org".parse().unwrap(),
        NOW,
        vec![ServerKey {
            key: server_key().public(),
            valid_from: NOW - DAY,
            valid_until: NOW + 400 * DAY,
        }],
    )
    .unwrap()
}
