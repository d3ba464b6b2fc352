//! Commits that break Kith's rules are refused by the server and by every
//! member: adds and removals by non-admins, and leaves whose credential does
//! not name the device of their key.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use kith_mls::{
    BindingError, CIPHERSUITE_V0, Device, DeviceError, DeviceSigner, KITH_CHANNEL_EXTENSION_TYPE,
    MlsStore, PolicyError, PublicChannel, ServerError,
};
use kith_proto::{ChannelId, DeviceId, SecretKey};
use openmls::prelude::{
    BasicCredential, Capabilities, CredentialType, CredentialWithKey, ExtensionType, GroupId,
    KeyPackage, MlsGroup, MlsMessageBodyIn, MlsMessageIn, OpenMlsProvider, ProtocolVersion,
};
use tls_codec::{Deserialize as _, Serialize as _};

fn parse_key_package(store: &MlsStore, bytes: &[u8]) -> KeyPackage {
    let MlsMessageBodyIn::KeyPackage(kp) = MlsMessageIn::tls_deserialize_exact(bytes)
        .unwrap()
        .extract()
    else {
        panic!("not a key package")
    };
    kp.validate(store.crypto(), ProtocolVersion::Mls10).unwrap()
}

/// What a device's raw OpenMLS group (bypassing kith-mls's own checks)
/// commits when adding `key_packages`: (commit, welcome, tree after merge).
fn raw_add(
    secret: &SecretKey,
    device: &Device,
    id: ChannelId,
    key_packages: Vec<KeyPackage>,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let store = device.store();
    let signer = DeviceSigner::new(secret);
    let mut group = MlsGroup::load(store.storage(), &GroupId::from_slice(id.as_bytes()))
        .unwrap()
        .unwrap();
    let bundle = group
        .commit_builder()
        .propose_adds(key_packages)
        .load_psks(store.storage())
        .unwrap()
        .build(store.rand(), store.crypto(), &signer, |_| true)
        .unwrap()
        .stage_commit(store)
        .unwrap();
    let (commit, welcome, _) = bundle.into_messages();
    group.clear_pending_commit(store.storage()).unwrap();
    (
        commit.tls_serialize_detached().unwrap(),
        welcome.map(|w| w.tls_serialize_detached().unwrap()),
    )
}

/// A key package whose credential names `claimed` but whose key is `key`'s.
fn mismatched_key_package(key: &SecretKey, claimed: DeviceId, store: &MlsStore) -> Vec<u8> {
    let signer = DeviceSigner::new(key);
    let credential = CredentialWithKey {
        credential: BasicCredential::new(claimed.as_bytes().to_vec()).into(),
        signature_key: signer.public_key_bytes().to_vec().into(),
    };
    let capabilities = Capabilities::new(
        None,
        Some(&[CIPHERSUITE_V0]),
        Some(&[
            ExtensionType::Unknown(KITH_CHANNEL_EXTENSION_TYPE),
            ExtensionType::LastResort,
        ]),
        None,
        Some(&[CredentialType::Basic]),
    );
    let bundle = KeyPackage::builder()
        .leaf_node_capabilities(capabilities)
        .build(CIPHERSUITE_V0, store, &signer, credential)
        .unwrap();
    openmls::prelude::MlsMessageOut::from(bundle.key_package().clone())
        .tls_serialize_detached()
        .unwrap()
}

#[test]
fn non_admins_may_not_add_or_remove_others() {
    let a_key = SecretKey::generate();
    let b_key = SecretKey::generate();
    let a = Device::new(&a_key, MlsStore::in_memory().unwrap());
    let b = Device::new(&b_key, MlsStore::in_memory().unwrap());
    let (c, d) = (device(), device());
    let server_store = MlsStore::in_memory().unwrap();
    let id = new_channel_id();
    let mut ca = a.create_channel(id, &settings(&[a.device_id()])).unwrap();
    let mut server = PublicChannel::create(
        &server_store,
        &ca.group_info().unwrap(),
        &ca.ratchet_tree().unwrap(),
    )
    .unwrap();
    let out = ca.add(&[key_package(&b), key_package(&c)]).unwrap();
    order(&mut server, &mut ca, &out);
    let welcome = out.welcome.as_ref().unwrap();
    let mut cb = b.join(welcome, &out.ratchet_tree).unwrap();
    let mut cc = c.join(welcome, &out.ratchet_tree).unwrap();

    // B's own client refuses to add or remove others.
    let not_admin = |e: &DeviceError| matches!(e, DeviceError::Policy(PolicyError::NotAdmin { device, .. }) if *device == b.device_id());
    assert!(not_admin(&cb.add(&[key_package(&d)]).unwrap_err()));
    assert!(not_admin(&cb.remove(&[c.device_id()]).unwrap_err()));
    assert!(!cb.has_pending_commit());

    // A commit B makes anyway is refused by the server and by members.
    let kp = parse_key_package(b.store(), &key_package(&d));
    let (commit, _) = raw_add(&b_key, &b, id, vec![kp]);
    match server.validate_commit(&commit) {
        Err(ServerError::Policy(PolicyError::NotAdmin { device, action })) => {
            assert_eq!(device, b.device_id());
            assert_eq!(action, "add members");
        }
        other => panic!("expected a policy refusal, got {other:?}"),
    }
    assert!(matches!(
        cc.process(&commit),
        Err(DeviceError::Policy(PolicyError::NotAdmin { .. }))
    ));
    assert_eq!(server.epoch(), 1);

    // The admin's own add still goes through, and B's state is intact.
    let out = ca.add(&[key_package(&d)]).unwrap();
    order(&mut server, &mut ca, &out);
    deliver_commit(&mut cb, &out.commit);
    deliver_commit(&mut cc, &out.commit);
    assert_eq!(ca.epoch_authenticator(), cb.epoch_authenticator());
    assert_eq!(server.members().len(), 4);
}

#[test]
fn leaves_must_name_the_device_of_their_key() {
    let a_key = SecretKey::generate();
    let a = Device::new(&a_key, MlsStore::in_memory().unwrap());
    let server_store = MlsStore::in_memory().unwrap();
    let id = new_channel_id();
    let mut ca = a.create_channel(id, &settings(&[a.device_id()])).unwrap();
    let server = PublicChannel::create(
        &server_store,
        &ca.group_info().unwrap(),
        &ca.ratchet_tree().unwrap(),
    )
    .unwrap();

    // M's key package claims to be V (some other device).
    let m_key = SecretKey::generate();
    let m = Device::new(&m_key, MlsStore::in_memory().unwrap());
    let victim = DeviceId::of(&SecretKey::generate().public());
    let bad = mismatched_key_package(&m_key, victim, m.store());

    // The adder's client refuses it.
    match ca.add(std::slice::from_ref(&bad)) {
        Err(DeviceError::Binding(BindingError::Mismatch { claimed, actual })) => {
            assert_eq!(claimed, victim);
            assert_eq!(actual, m.device_id());
        }
        other => panic!("expected a binding refusal, got {other:?}"),
    }
    assert!(!ca.has_pending_commit());

    // A commit adding it anyway is refused by the server...
    let kp = parse_key_package(a.store(), &bad);
    let (commit, welcome) = raw_add(&a_key, &a, id, vec![kp]);
    assert!(matches!(
        server.validate_commit(&commit),
        Err(ServerError::Policy(PolicyError::Binding(
            BindingError::Mismatch { .. }
        )))
    ));
    assert_eq!(server.epoch(), 0);

    // ...and a Welcome into a tree holding such a leaf is refused by the
    // joiner (here M itself, which holds the key package's private keys).
    let mut group = MlsGroup::load(a.store().storage(), &GroupId::from_slice(id.as_bytes()))
        .unwrap()
        .unwrap();
    let kp = parse_key_package(a.store(), &bad);
    let bundle = group
        .commit_builder()
        .propose_adds([kp])
        .load_psks(a.store().storage())
        .unwrap()
        .build(
            a.store().rand(),
            a.store().crypto(),
            &DeviceSigner::new(&a_key),
            |_| true,
        )
        .unwrap()
        .stage_commit(a.store())
        .unwrap();
    group.merge_pending_commit(a.store()).unwrap();
    let tree = group
        .export_ratchet_tree()
        .tls_serialize_detached()
        .unwrap();
    let welcome2 = bundle
        .into_welcome_msg()
        .unwrap()
        .tls_serialize_detached()
        .unwrap();
    assert!(welcome.is_some());
    assert!(matches!(
        m.join(&welcome2, &tree),
        Err(DeviceError::Binding(BindingError::Mismatch { .. }))
    ));

    // A server asked to track that epoch refuses it too.
    let signer = DeviceSigner::new(&a_key);
    let info = group
        .export_group_info(a.store().crypto(), &signer, false)
        .unwrap()
        .tls_serialize_detached()
        .unwrap();
    let other_server = MlsStore::in_memory().unwrap();
    assert!(matches!(
        PublicChannel::create(&other_server, &info, &tree),
        Err(ServerError::Binding(BindingError::Mismatch { .. }))
    ));
    // Refused channels leave nothing behind.
    assert!(PublicChannel::load(&other_server, id).unwrap().is_none());
}

#[test]
fn handshakes_must_be_public_messages() {
    let a_key = SecretKey::generate();
    let a = Device::new(&a_key, MlsStore::in_memory().unwrap());
    let b = device();
    let server_store = MlsStore::in_memory().unwrap();
    let id = new_channel_id();
    let mut ca = a.create_channel(id, &settings(&[])).unwrap();
    let mut server = PublicChannel::create(
        &server_store,
        &ca.group_info().unwrap(),
        &ca.ratchet_tree().unwrap(),
    )
    .unwrap();
    let out = ca.add(&[key_package(&b)]).unwrap();
    order(&mut server, &mut ca, &out);
    let mut cb = b
        .join(out.welcome.as_ref().unwrap(), &out.ratchet_tree)
        .unwrap();

    // A's raw group, switched to encrypted handshakes, commits an update.
    let store = a.store();
    let mut group = MlsGroup::load(store.storage(), &GroupId::from_slice(id.as_bytes()))
        .unwrap()
        .unwrap();
    let config = openmls::prelude::MlsGroupJoinConfig::builder()
        .wire_format_policy(openmls::group::PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .build();
    group.set_configuration(store.storage(), &config).unwrap();
    let bundle = group
        .self_update(
            store,
            &DeviceSigner::new(&a_key),
            openmls::prelude::LeafNodeParameters::default(),
        )
        .unwrap();
    let commit = bundle.into_commit().tls_serialize_detached().unwrap();
    assert_eq!(
        wire_format(&commit),
        openmls::prelude::WireFormat::PrivateMessage
    );

    assert!(matches!(
        server.validate_commit(&commit),
        Err(ServerError::NotPublic)
    ));
    let refused = cb.process(&commit).unwrap_err();
    assert!(
        refused.to_string().contains("wire format"),
        "unexpected error: {refused}"
    );
    assert_eq!(cb.epoch(), 1);
}
