//! A device's MLS state survives closing and reopening its SQLite store.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use kith_mls::{Device, DeviceError, MlsStore, PublicChannel};
use kith_proto::SecretKey;

#[test]
fn state_survives_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice-mls.sqlite");
    let a_key = SecretKey::generate();
    let b = device();
    let server_store = MlsStore::in_memory().unwrap();
    let id = new_channel_id();

    let (welcome, tree, pending, authenticator) = {
        let a = Device::new(&a_key, MlsStore::open(&path).unwrap());
        let mut ca = a.create_channel(id, &settings(&[])).unwrap();
        let mut server = PublicChannel::create(
            &server_store,
            &ca.group_info().unwrap(),
            &ca.ratchet_tree().unwrap(),
        )
        .unwrap();
        let out = ca.add(&[key_package(&b)]).unwrap();
        order(&mut server, &mut ca, &out);
        // A pending commit is persisted too.
        let pending = ca.self_update().unwrap();
        assert!(ca.has_pending_commit());
        let authenticator = ca.epoch_authenticator();
        (
            out.welcome.unwrap(),
            out.ratchet_tree,
            pending,
            authenticator,
        )
    };
    let mut cb = b.join(&welcome, &tree).unwrap();
    let to_a = cb.encrypt(b"while you were away").unwrap();

    // Reopen from the file.
    let a = Device::new(&a_key, MlsStore::open(&path).unwrap());
    let mut ca = a.channel(id).unwrap();
    assert_eq!(ca.epoch(), 1);
    assert_eq!(ca.epoch_authenticator(), authenticator);
    assert_eq!(ca.epoch_authenticator(), cb.epoch_authenticator());
    assert!(ca.has_pending_commit());
    assert_eq!(
        receive(&mut ca, &to_a),
        (b.device_id(), b"while you were away".to_vec())
    );

    // The pending commit from before the restart can still be merged.
    let mut server = PublicChannel::load(&server_store, id).unwrap().unwrap();
    order(&mut server, &mut ca, &pending);
    deliver_commit(&mut cb, &pending.commit);
    assert_eq!(ca.epoch_authenticator(), cb.epoch_authenticator());
    let m = ca.encrypt(b"back").unwrap();
    assert_eq!(receive(&mut cb, &m), (a.device_id(), b"back".to_vec()));

    // A store that never had the channel does not know it.
    let fresh = Device::new(&a_key, MlsStore::in_memory().unwrap());
    assert!(matches!(
        fresh.channel(id),
        Err(DeviceError::UnknownChannel(_))
    ));
}

#[test]
fn a_batch_stores_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::new(
        &SecretKey::generate(),
        MlsStore::open(dir.path().join("mls.sqlite")).unwrap(),
    );
    // A failed operation's writes are rolled back.
    let refused = new_channel_id();
    let outcome = device.store().batch(|| {
        device.create_channel(refused, &settings(&[]))?;
        Err::<(), DeviceError>(DeviceError::Internal("refused after writing".into()))
    });
    assert!(outcome.is_err());
    assert!(matches!(
        device.channel(refused),
        Err(DeviceError::UnknownChannel(_))
    ));
    // A panicking one's too, and the store keeps working afterwards.
    let panicked = new_channel_id();
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = device.store().batch(|| {
            device.create_channel(panicked, &settings(&[]))?;
            a_bug()
        });
    }));
    assert!(unwound.is_err());
    assert!(device.channel(panicked).is_err());
    // A successful one's are stored, and so are plain writes after it.
    let kept = new_channel_id();
    device
        .store()
        .batch(|| device.create_channel(kept, &settings(&[])).map(|_| ()))
        .unwrap();
    let after = new_channel_id();
    device.create_channel(after, &settings(&[])).unwrap();
    drop(device);
    let reopened = Device::new(
        &SecretKey::generate(),
        MlsStore::open(dir.path().join("mls.sqlite")).unwrap(),
    );
    assert!(reopened.channel(kept).is_ok());
    assert!(reopened.channel(after).is_ok());
    assert!(reopened.channel(refused).is_err());
}

#[test]
fn an_open_batch_commits_rolls_back_and_drops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mls.sqlite");
    let device = Device::new(&SecretKey::generate(), MlsStore::open(&path).unwrap());
    let store = device.store();
    // Rolled back: nothing of it stays.
    let rolled = new_channel_id();
    let open = store.begin().unwrap();
    device.create_channel(rolled, &settings(&[])).unwrap();
    store.rollback(open);
    assert!(device.channel(rolled).is_err());
    // Dropped without a verdict: rolled back too, and the next batch
    // starts afresh rather than joining the dead one.
    let dropped = new_channel_id();
    let open = store.begin().unwrap();
    device.create_channel(dropped, &settings(&[])).unwrap();
    drop(open);
    let kept = new_channel_id();
    store
        .batch(|| device.create_channel(kept, &settings(&[])).map(|_| ()))
        .unwrap();
    assert!(device.channel(dropped).is_err());
    // Committed, with a nested batch (a merge, say) joining it and a
    // nested open batch whose rollback leaves the outer one to decide.
    let outer = new_channel_id();
    let nested = new_channel_id();
    let open = store.begin().unwrap();
    device.create_channel(outer, &settings(&[])).unwrap();
    store
        .batch(|| device.create_channel(nested, &settings(&[])).map(|_| ()))
        .unwrap();
    let inner = store.begin().unwrap();
    store.rollback(inner);
    store.commit(open).unwrap();
    drop(device);
    let reopened = Device::new(&SecretKey::generate(), MlsStore::open(&path).unwrap());
    assert!(reopened.channel(kept).is_ok());
    assert!(reopened.channel(outer).is_ok());
    assert!(reopened.channel(nested).is_ok());
    assert!(reopened.channel(dropped).is_err());
    assert!(reopened.channel(rolled).is_err());
}

fn a_bug() -> Result<(), DeviceError> {
    panic!("a bug in the middle of a batch")
}

#[test]
fn the_pending_flag_is_read_without_loading_the_group() {
    let a = device();
    let b = device();
    let server_store = MlsStore::in_memory().unwrap();
    let id = new_channel_id();
    assert!(matches!(
        a.has_pending_commit(id),
        Err(DeviceError::UnknownChannel(_))
    ));
    let mut ca = a.create_channel(id, &settings(&[])).unwrap();
    let mut server = PublicChannel::create(
        &server_store,
        &ca.group_info().unwrap(),
        &ca.ratchet_tree().unwrap(),
    )
    .unwrap();
    assert!(!a.has_pending_commit(id).unwrap());
    let out = ca.add(&[key_package(&b)]).unwrap();
    assert!(a.has_pending_commit(id).unwrap());
    assert_eq!(a.has_pending_commit(id).unwrap(), ca.has_pending_commit());
    order(&mut server, &mut ca, &out);
    assert!(!a.has_pending_commit(id).unwrap());
    ca.self_update().unwrap();
    assert!(a.has_pending_commit(id).unwrap());
    ca.clear_pending().unwrap();
    assert!(!a.has_pending_commit(id).unwrap());
}
