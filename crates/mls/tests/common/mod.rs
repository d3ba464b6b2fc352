//! Shared helpers: devices on in-memory stores, a channel tracked by a
//! server, and message delivery with certificate-free merging (the ordering
//! group is simulated by the server accepting commits in order).
#![allow(dead_code, unreachable_pub)]

use kith_mls::{
    CIPHERSUITE_V0, Channel, ChannelExtension, ChannelSettings, CommitOutput, ContentType, Device,
    Incoming, MlsStore, Policy, PublicChannel,
};
use kith_proto::{ChannelId, DeviceId, SecretKey};
use openmls::prelude::{MlsMessageIn, WireFormat};
use tls_codec::Deserialize as _;

pub fn device() -> Device {
    Device::new(&SecretKey::generate(), MlsStore::in_memory().unwrap())
}

pub fn settings(admins: &[DeviceId]) -> ChannelSettings {
    ChannelSettings::new(ChannelExtension::new(
        ContentType::kith_chat_v1(),
        "general".parse().unwrap(),
        Policy::new(admins.iter().copied()).unwrap(),
    ))
}

pub fn key_package(device: &Device) -> Vec<u8> {
    device
        .key_packages(1, CIPHERSUITE_V0)
        .unwrap()
        .pop()
        .unwrap()
}

pub fn wire_format(message: &[u8]) -> WireFormat {
    MlsMessageIn::tls_deserialize_exact(message)
        .unwrap()
        .wire_format()
}

/// The server accepts `out`'s commit and the committer merges it.
pub fn order(server: &mut PublicChannel<'_>, committer: &mut Channel<'_>, out: &CommitOutput) {
    let validated = server.validate_commit(&out.commit).unwrap();
    assert_eq!(validated.info(), &out.info);
    server.apply(validated).unwrap();
    committer.merge_pending().unwrap();
}

/// A member processes an accepted commit and merges it.
pub fn deliver_commit(member: &mut Channel<'_>, commit: &[u8]) {
    match member.process(commit).unwrap() {
        Incoming::Commit(staged) => member.merge_staged(staged).unwrap(),
        other => panic!("expected a commit, got {other:?}"),
    }
}

/// A member decrypts an application message.
pub fn receive(member: &mut Channel<'_>, message: &[u8]) -> (DeviceId, Vec<u8>) {
    match member.process(message).unwrap() {
        Incoming::Application { sender, data, aad } => {
            assert!(aad.is_empty(), "ordinary messages carry no AAD");
            (sender, data)
        }
        other => panic!("expected application data, got {other:?}"),
    }
}

pub fn new_channel_id() -> ChannelId {
    ChannelId::random()
}
