//! Whole-channel scenarios with real OpenMLS: three devices, a server
//! tracking the public state, application data, removal, and two commits
//! racing for one epoch.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use kith_mls::{
    ADD_DEVICE_REQUEST_AAD, Incoming, LEAVE_REQUEST_AAD, MlsStore, PublicChannel,
    REMOVE_DEVICE_REQUEST_AAD, ServerError,
};
use openmls::prelude::WireFormat;

#[test]
fn three_devices_create_add_talk_remove_and_race() {
    let (a, b, c) = (device(), device(), device());
    let server_store = MlsStore::in_memory().unwrap();

    // A creates the channel; the server starts tracking it at epoch 0.
    let id = new_channel_id();
    let mut ca = a.create_channel(id, &settings(&[a.device_id()])).unwrap();
    assert_eq!(ca.epoch(), 0);
    let ext = ca.extension().unwrap();
    assert_eq!(ext.content_type.as_str(), "application/vnd.kith.chat.v1");
    assert_eq!(ext.name.as_str(), "general");
    let mut server = PublicChannel::create(
        &server_store,
        &ca.group_info().unwrap(),
        &ca.ratchet_tree().unwrap(),
    )
    .unwrap();
    assert_eq!(server.members(), vec![a.device_id()]);
    assert_eq!(server.epoch(), 0);

    // A adds B and C in one commit; it stays pending until ordered.
    let genesis_info = ca.group_info().unwrap();
    server.check_group_info(&genesis_info).unwrap();
    let out = ca.add(&[key_package(&b), key_package(&c)]).unwrap();
    assert!(matches!(
        server.check_group_info(&out.group_info),
        Err(ServerError::GroupInfoMismatch(_))
    ));
    assert!(ca.has_pending_commit());
    assert_eq!(ca.epoch(), 0);
    assert_eq!(wire_format(&out.commit), WireFormat::PublicMessage);
    assert_eq!(out.info.epoch, 0);
    assert_eq!(out.info.sender, a.device_id());
    assert_eq!(out.info.added, vec![b.device_id(), c.device_id()]);
    assert!(out.info.removed.is_empty());
    assert_eq!(out.info.commit_hash, kith_mls::commit_hash(&out.commit));
    order(&mut server, &mut ca, &out);
    assert_eq!((ca.epoch(), server.epoch()), (1, 1));
    // The GroupInfo that came with the commit describes the new epoch.
    server.check_group_info(&out.group_info).unwrap();
    assert!(matches!(
        server.check_group_info(&genesis_info),
        Err(ServerError::GroupInfoMismatch(_))
    ));
    assert_eq!(server.ratchet_tree().unwrap(), ca.ratchet_tree().unwrap());
    assert_eq!(out.ratchet_tree, ca.ratchet_tree().unwrap());

    // B and C join with the Welcome and the tree the server keeps.
    let welcome = out.welcome.as_ref().unwrap();
    let mut cb = b.join(welcome, &server.ratchet_tree().unwrap()).unwrap();
    let mut cc = c.join(welcome, &server.ratchet_tree().unwrap()).unwrap();
    assert_eq!(cb.id(), id);
    assert_eq!(cb.extension().unwrap(), ca.extension().unwrap());
    let mut members = vec![a.device_id(), b.device_id(), c.device_id()];
    members.sort();
    let mut seen = server.members();
    seen.sort();
    assert_eq!(seen, members);

    // Application data both ways, byte for byte: Kith adds no framing.
    let payloads: [&[u8]; 4] = [b"hello", b"", &[0u8, 1, 2, 255], &[0x42; 5000]];
    for payload in payloads {
        let m = ca.encrypt(payload).unwrap();
        assert_eq!(wire_format(&m), WireFormat::PrivateMessage);
        assert_eq!(receive(&mut cb, &m), (a.device_id(), payload.to_vec()));
        assert_eq!(receive(&mut cc, &m), (a.device_id(), payload.to_vec()));
        let m = cb.encrypt(payload).unwrap();
        assert_eq!(receive(&mut ca, &m), (b.device_id(), payload.to_vec()));
        assert_eq!(receive(&mut cc, &m), (b.device_id(), payload.to_vec()));
    }
    // A device's own message echoed back is recognised, not an error.
    let m = cc.encrypt(b"mine").unwrap();
    assert!(matches!(cc.process(&m).unwrap(), Incoming::OwnApplication));

    // Two commits race for epoch 1: A updates its leaf, B updates its leaf.
    let a_commit = ca.self_update().unwrap();
    let b_commit = cb.self_update().unwrap();
    assert_eq!((a_commit.info.epoch, b_commit.info.epoch), (1, 1));
    let first = server.validate_commit(&a_commit.commit).unwrap();
    let second = server.validate_commit(&b_commit.commit).unwrap();
    server.apply(first).unwrap();
    ca.merge_pending().unwrap();
    assert!(matches!(
        server.apply(second),
        Err(ServerError::WrongEpoch { current: 2, got: 1 })
    ));
    assert!(matches!(
        server.validate_commit(&b_commit.commit),
        Err(ServerError::WrongEpoch { current: 2, got: 1 })
    ));
    server.check_group_info(&a_commit.group_info).unwrap();
    assert!(server.check_group_info(&b_commit.group_info).is_err());
    // The loser clears its pending commit, takes the winner, retries.
    cb.clear_pending().unwrap();
    assert!(!cb.has_pending_commit());
    deliver_commit(&mut cb, &a_commit.commit);
    deliver_commit(&mut cc, &a_commit.commit);
    let retry = cb.self_update().unwrap();
    assert_eq!(retry.info.epoch, 2);
    order(&mut server, &mut cb, &retry);
    deliver_commit(&mut ca, &retry.commit);
    deliver_commit(&mut cc, &retry.commit);
    assert_eq!([ca.epoch(), cb.epoch(), cc.epoch(), server.epoch()], [3; 4]);
    assert_eq!(ca.epoch_authenticator(), cb.epoch_authenticator());
    assert_eq!(ca.epoch_authenticator(), cc.epoch_authenticator());

    // A removes C. C sees that the commit removes it.
    let out = ca.remove(&[c.device_id()]).unwrap();
    assert_eq!(out.info.removed, vec![c.device_id()]);
    assert!(out.welcome.is_none());
    order(&mut server, &mut ca, &out);
    deliver_commit(&mut cb, &out.commit);
    match cc.process(&out.commit).unwrap() {
        Incoming::Commit(staged) => {
            assert!(staged.removes_me());
            cc.merge_staged(staged).unwrap();
        }
        other => panic!("expected a commit, got {other:?}"),
    }
    assert!(!cc.is_active());
    assert_eq!(server.members().len(), 2);
    assert!(!server.members().contains(&c.device_id()));

    // C cannot read what is sent after its removal.
    let m = ca.encrypt(b"after C left").unwrap();
    assert_eq!(
        receive(&mut cb, &m),
        (a.device_id(), b"after C left".to_vec())
    );
    assert!(cc.process(&m).is_err());
    assert_eq!(ca.epoch_authenticator(), cb.epoch_authenticator());

    // A can add C back; C's old state is replaced.
    let out = ca.add(&[key_package(&c)]).unwrap();
    order(&mut server, &mut ca, &out);
    deliver_commit(&mut cb, &out.commit);
    drop(cc);
    let mut cc = c
        .join(
            out.welcome.as_ref().unwrap(),
            &server.ratchet_tree().unwrap(),
        )
        .unwrap();
    assert!(cc.is_active());
    assert_eq!(cc.epoch_authenticator(), ca.epoch_authenticator());
    let m = cb.encrypt(b"welcome back").unwrap();
    assert_eq!(
        receive(&mut cc, &m),
        (b.device_id(), b"welcome back".to_vec())
    );
    // Joining a channel one is active in again is refused.
    assert!(matches!(
        c.join(
            out.welcome.as_ref().unwrap(),
            &server.ratchet_tree().unwrap()
        ),
        Err(kith_mls::DeviceError::Mls { .. } | kith_mls::DeviceError::ChannelExists(_))
    ));
}

#[test]
fn a_member_may_leave_by_proposal() {
    let (a, b) = (device(), device());
    let server_store = MlsStore::in_memory().unwrap();
    let mut ca = a
        .create_channel(new_channel_id(), &settings(&[a.device_id()]))
        .unwrap();
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

    // B (not an admin) proposes its own removal; anyone may commit it.
    let proposal = cb.leave().unwrap();
    assert_eq!(wire_format(&proposal), WireFormat::PublicMessage);
    assert_eq!(server.add_proposal(&proposal).unwrap(), b.device_id());
    match ca.process(&proposal).unwrap() {
        Incoming::Proposal { sender } => assert_eq!(sender, b.device_id()),
        other => panic!("expected a proposal, got {other:?}"),
    }
    let out = ca.commit_pending_proposals().unwrap();
    assert_eq!(out.info.removed, vec![b.device_id()]);
    order(&mut server, &mut ca, &out);
    assert_eq!(server.members(), vec![a.device_id()]);
    match cb.process(&out.commit).unwrap() {
        Incoming::Commit(staged) => assert!(staged.removes_me()),
        other => panic!("expected a commit, got {other:?}"),
    }
}

/// Where a PrivateMessage's `authenticated_data` starts in an MLSMessage:
/// version (2), wire format (2), group id (1 + 16), epoch (8), content type
/// (1); then the AAD's length (one byte when short) and its bytes.
const AAD_LEN_AT: usize = 2 + 2 + 1 + 16 + 8 + 1;

fn with_aad(message: &[u8], aad: &[u8]) -> Vec<u8> {
    let old = usize::from(message[AAD_LEN_AT]);
    assert!(old < 64 && aad.len() < 64, "one-byte lengths only");
    let mut out = message[..AAD_LEN_AT].to_vec();
    out.push(u8::try_from(aad.len()).unwrap());
    out.extend_from_slice(aad);
    out.extend_from_slice(&message[AAD_LEN_AT + 1 + old..]);
    out
}

#[test]
fn a_leave_request_names_its_own_sender_and_its_aad_is_authenticated() {
    let (a, b, c) = (device(), device(), device());
    let server_store = MlsStore::in_memory().unwrap();
    let mut ca = a
        .create_channel(new_channel_id(), &settings(&[a.device_id()]))
        .unwrap();
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

    // The wire bytes are exactly: empty payload, AAD `kith-leave-v0`.
    let request = cb.leave_request().unwrap();
    assert_eq!(wire_format(&request), WireFormat::PrivateMessage);
    assert_eq!(usize::from(request[AAD_LEN_AT]), LEAVE_REQUEST_AAD.len());
    assert_eq!(
        &request[AAD_LEN_AT + 1..AAD_LEN_AT + 1 + LEAVE_REQUEST_AAD.len()],
        b"kith-leave-v0"
    );
    let incoming = ca.process(&request).unwrap();
    assert_eq!(incoming.leave_request(), Some(b.device_id()));
    match incoming {
        Incoming::Application { sender, data, aad } => {
            assert_eq!((sender, data.as_slice()), (b.device_id(), &b""[..]));
            assert_eq!(aad, b"kith-leave-v0");
        }
        other => panic!("expected application data, got {other:?}"),
    }

    // The AAD does not stick to the next message: it is ordinary.
    let after = cb.encrypt(b"still here").unwrap();
    assert_eq!(after[AAD_LEN_AT], 0);
    let incoming = ca.process(&after).unwrap();
    assert_eq!(incoming.leave_request(), None);
    assert_eq!(
        cc.process(&request).unwrap().leave_request(),
        Some(b.device_id())
    );
    assert_eq!(receive(&mut cc, &after).1, b"still here");

    // Neither an empty ordinary message nor a payload with the leave AAD is
    // a leave request.
    let empty = cc.encrypt(b"").unwrap();
    assert_eq!(ca.process(&empty).unwrap().leave_request(), None);
    let odd = cc.encrypt_with_aad(b"x", LEAVE_REQUEST_AAD).unwrap();
    assert_eq!(ca.process(&odd).unwrap().leave_request(), None);

    // A server (or anyone on the path) cannot turn C's message into a leave
    // request, nor strip the AAD from B's: the AAD is signed and is AEAD
    // associated data, so the changed message does not decrypt.
    let ordinary = cc.encrypt(b"").unwrap();
    let forged = with_aad(&ordinary, LEAVE_REQUEST_AAD);
    assert!(ca.process(&forged).is_err());
    let request = cb.leave_request().unwrap();
    let stripped = with_aad(&request, b"");
    assert!(ca.process(&stripped).is_err());
    // The untouched originals still decrypt afterwards.
    assert_eq!(
        ca.process(&request).unwrap().leave_request(),
        Some(b.device_id())
    );
    assert_eq!(ca.process(&ordinary).unwrap().leave_request(), None);
}

#[test]
fn last_resort_key_package_can_be_used_twice() {
    let (a, b) = (device(), device());
    let kp = b.last_resort_key_package(kith_mls::CIPHERSUITE_V0).unwrap();
    for _ in 0..2 {
        let mut ca = a.create_channel(new_channel_id(), &settings(&[])).unwrap();
        let out = ca.add(std::slice::from_ref(&kp)).unwrap();
        ca.merge_pending().unwrap();
        let mut cb = b
            .join(out.welcome.as_ref().unwrap(), &out.ratchet_tree)
            .unwrap();
        let m = ca.encrypt(b"hi").unwrap();
        assert_eq!(receive(&mut cb, &m).1, b"hi");
        // The same Welcome again cannot clobber the live channel.
        assert!(matches!(
            b.join(out.welcome.as_ref().unwrap(), &out.ratchet_tree),
            Err(kith_mls::DeviceError::ChannelExists(id)) if id == ca.id()
        ));
    }
}

#[test]
fn an_add_device_request_names_its_sender_and_exactly_one_device() {
    let (a, b, d) = (device(), device(), device());
    let server_store = MlsStore::in_memory().unwrap();
    let mut ca = a
        .create_channel(new_channel_id(), &settings(&[a.device_id()]))
        .unwrap();
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

    let wanted = d.device_id();
    let request = cb
        .encrypt_with_aad(wanted.as_bytes(), ADD_DEVICE_REQUEST_AAD)
        .unwrap();
    let incoming = ca.process(&request).unwrap();
    assert_eq!(incoming.add_device_request(), Some((b.device_id(), wanted)));
    assert_eq!(incoming.leave_request(), None);
    // Not a request: a payload that is not one DeviceId, the AAD missing,
    // or the leave AAD.
    for (data, aad) in [
        (&wanted.as_bytes()[..31], ADD_DEVICE_REQUEST_AAD),
        (&[0u8; 33][..], ADD_DEVICE_REQUEST_AAD),
        (&wanted.as_bytes()[..], &b""[..]),
        (&wanted.as_bytes()[..], LEAVE_REQUEST_AAD),
    ] {
        let message = cb.encrypt_with_aad(data, aad).unwrap();
        assert_eq!(ca.process(&message).unwrap().add_device_request(), None);
    }

    // A remove-device request has the same shape under its own AAD, and
    // is never taken for an add-device request or the other way round.
    let request = cb
        .encrypt_with_aad(wanted.as_bytes(), REMOVE_DEVICE_REQUEST_AAD)
        .unwrap();
    let incoming = ca.process(&request).unwrap();
    assert_eq!(
        incoming.remove_device_request(),
        Some((b.device_id(), wanted))
    );
    assert_eq!(incoming.add_device_request(), None);
    for (data, aad) in [
        (&wanted.as_bytes()[..31], REMOVE_DEVICE_REQUEST_AAD),
        (&wanted.as_bytes()[..], ADD_DEVICE_REQUEST_AAD),
        (&wanted.as_bytes()[..], LEAVE_REQUEST_AAD),
    ] {
        let message = cb.encrypt_with_aad(data, aad).unwrap();
        assert_eq!(ca.process(&message).unwrap().remove_device_request(), None);
    }
}

/// The server's GroupInfo check (spec §9.8, §10.4) compares the GroupInfo
/// with the state it computed and verifies the one signature, instead of
/// rebuilding the tree: any member may sign, under the leaf it names, and
/// a wrong signer, signature or confirmation tag is refused.
#[test]
fn group_info_check_wants_the_named_signer_and_the_servers_state() {
    let (a, b) = (device(), device());
    let server_store = MlsStore::in_memory().unwrap();
    let mut ca = a
        .create_channel(new_channel_id(), &settings(&[a.device_id()]))
        .unwrap();
    let mut server = PublicChannel::create(
        &server_store,
        &ca.group_info().unwrap(),
        &ca.ratchet_tree().unwrap(),
    )
    .unwrap();
    let out = ca.add(&[key_package(&b)]).unwrap();
    order(&mut server, &mut ca, &out);
    let cb = b
        .join(
            out.welcome.as_ref().unwrap(),
            &server.ratchet_tree().unwrap(),
        )
        .unwrap();
    server.check_group_info(&out.group_info).unwrap();
    // Signed by another member, naming its own leaf: the same epoch.
    server.check_group_info(&cb.group_info().unwrap()).unwrap();

    // An Ed25519 GroupInfo ends with `... confirmation_tag (1 + 32 bytes),
    // signer (4), signature (2 + 64)`.
    let good = &out.group_info;
    let len = good.len();
    let refused = |bytes: &[u8]| {
        assert!(
            matches!(
                server.check_group_info(bytes),
                Err(ServerError::GroupInfoMismatch(_))
            ),
            "{:?}",
            server.check_group_info(bytes)
        );
    };
    let mut bad_signature = good.clone();
    bad_signature[len - 1] ^= 1;
    refused(&bad_signature);
    let mut bad_tag = good.clone();
    bad_tag[len - 71] ^= 1;
    refused(&bad_tag);
    // A's signature, naming B's leaf (1), or a leaf nobody holds.
    assert_eq!(&good[len - 70..len - 66], &0u32.to_be_bytes());
    for signer in [1u32, 7] {
        let mut other = good.clone();
        other[len - 70..len - 66].copy_from_slice(&signer.to_be_bytes());
        refused(&other);
    }
    // Cut short, or with bytes after it.
    assert!(server.check_group_info(&good[..len - 1]).is_err());
    let mut longer = good.clone();
    longer.push(0);
    assert!(server.check_group_info(&longer).is_err());
}
