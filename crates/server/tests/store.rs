//! The storage conformance suite: every backend runs the same tests through
//! `store_suite!`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kith_proto::{ChannelId, DeviceId, LocalName};
use kith_server::store::{
    ChannelRow, Claimed, CommitRow, DeviceRow, EpochState, NewCommit, NewMessage, Registered,
    RemoteRecord, Store, StoreError,
};

fn dev(n: u8) -> DeviceId {
    DeviceId::from_bytes([n; 32])
}

fn name(s: &str) -> LocalName {
    s.parse().unwrap()
}

fn row(n: u8, local: &str) -> DeviceRow {
    DeviceRow {
        device: dev(n),
        name: name(local),
        identity_key: [n; 32],
        record: vec![n, 1],
        record_at: 1000,
        registered_at: 1000,
    }
}

fn register_and_names(s: &dyn Store) {
    assert_eq!(s.device_count().unwrap(), 0);
    assert_eq!(s.register(&row(1, "alice")).unwrap(), Registered::New);
    assert_eq!(s.register(&row(1, "alice")).unwrap(), Registered::Existing);
    assert!(matches!(
        s.register(&row(2, "alice")),
        Err(StoreError::NameTaken(_))
    ));
    assert!(matches!(
        s.register(&row(1, "bob")),
        Err(StoreError::DeviceHasOtherName(_))
    ));
    assert_eq!(s.register(&row(2, "bob")).unwrap(), Registered::New);
    assert_eq!(s.device_count().unwrap(), 2);
    assert_eq!(s.device(&dev(1)).unwrap(), Some(row(1, "alice")));
    assert_eq!(s.device(&dev(9)).unwrap(), None);
    let alices = s.devices_named(&name("alice")).unwrap();
    assert_eq!(alices, vec![row(1, "alice")]);
    assert!(s.devices_named(&name("carol")).unwrap().is_empty());
}

/// Removing a device (spec §6.4) takes it off its name with everything it
/// held, remembers it with its last row, and bars it from registering
/// again; the name's other devices keep theirs.
fn removing_a_device(s: &dyn Store) {
    s.register(&row(1, "alice")).unwrap();
    s.register_linked(&row(2, "alice")).unwrap();
    for d in [1, 2] {
        s.put_session(&[d; 32], &dev(d), 99).unwrap();
        s.put_challenge(&dev(d), &[d + 10; 32], 500, 100, 4)
            .unwrap();
        s.add_key_packages(&dev(d), &[vec![d]], Some(&[d, d]), 10)
            .unwrap();
        s.deposit_inbox(&dev(d), b"sealed", 10, 10, &|_| "{}".into())
            .unwrap();
        s.append_event(&dev(d), "test", "{}", 11).unwrap();
    }
    let (removed, told) = s
        .remove_device(&dev(1), Some(&dev(2)), 5000, "{\"removed\":1}")
        .unwrap()
        .unwrap();
    assert_eq!(removed, row(1, "alice"));
    // The remaining device is told in the removal's own transaction.
    assert_eq!(told.len(), 1);
    assert_eq!(told[0].0, dev(2));
    assert_eq!(
        (told[0].1.kind.as_str(), told[0].1.payload.as_str()),
        ("device_removed", "{\"removed\":1}")
    );
    assert_eq!(s.events(&dev(2), 0, 10).unwrap().last(), Some(&told[0].1));
    assert_eq!(s.device(&dev(1)).unwrap(), None);
    assert_eq!(
        s.devices_named(&name("alice")).unwrap(),
        vec![row(2, "alice")]
    );
    assert_eq!(s.device_count().unwrap(), 1);
    assert_eq!(s.session(&[1; 32]).unwrap(), None);
    assert_eq!(s.take_challenge(&dev(1), &[11; 32]).unwrap(), None);
    assert_eq!(s.claim_key_package(&dev(1)).unwrap(), Claimed::Exhausted);
    assert!(s.inbox(&dev(1), 0, 10).unwrap().is_empty());
    assert!(s.events(&dev(1), 0, 10).unwrap().is_empty());
    let removed = s.removed_device(&dev(1)).unwrap().unwrap();
    assert_eq!((removed.row, removed.removed_at), (row(1, "alice"), 5000));
    assert!(matches!(
        s.register(&row(1, "alice")),
        Err(StoreError::DeviceRemoved(_))
    ));
    assert!(matches!(
        s.register_linked(&row(1, "alice")),
        Err(StoreError::DeviceRemoved(_))
    ));
    // Nothing more is stored for it, whoever looked it up before.
    assert!(matches!(
        s.append_event(&dev(1), "test", "{}", 5001),
        Err(StoreError::UnknownDevice(_))
    ));
    assert!(matches!(
        s.deposit_inbox(&dev(1), b"late", 5001, 10, &|_| "{}".into()),
        Err(StoreError::UnknownDevice(_))
    ));
    assert!(s.events(&dev(1), 0, 10).unwrap().is_empty());
    assert!(s.inbox(&dev(1), 0, 10).unwrap().is_empty());
    // A login that looked the device up before the removal gets no session.
    assert!(matches!(
        s.put_session(&[7; 32], &dev(1), 99),
        Err(StoreError::UnknownDevice(d)) if d == dev(1)
    ));
    assert_eq!(s.session(&[7; 32]).unwrap(), None);
    assert_eq!(s.remove_device(&dev(1), None, 6000, "{}").unwrap(), None);
    assert_eq!(s.remove_device(&dev(9), None, 6000, "{}").unwrap(), None);
    // The removed device cannot remove its sibling back, nor can a device
    // of another name: refused, nothing changes.
    s.register(&row(3, "bob")).unwrap();
    for by in [dev(1), dev(3), dev(9)] {
        assert!(matches!(
            s.remove_device(&dev(2), Some(&by), 6000, "{}"),
            Err(StoreError::RemoverGone(d)) if d == by
        ));
    }
    assert_eq!(s.device(&dev(2)).unwrap(), Some(row(2, "alice")));
    // A name is released only once no device holds it.
    assert!(!s.release_name(&name("alice")).unwrap());
    assert!(!s.release_name(&name("carol")).unwrap());
    assert_eq!(s.removed_device(&dev(9)).unwrap(), None);
    assert_eq!(s.removed_device(&dev(2)).unwrap(), None);
    // The other device of the name keeps everything.
    assert_eq!(s.session(&[2; 32]).unwrap(), Some((dev(2), 99)));
    assert_eq!(s.take_challenge(&dev(2), &[12; 32]).unwrap(), Some(500));
    assert_eq!(s.key_package_count(&dev(2)).unwrap(), (1, true));
    assert_eq!(s.inbox(&dev(2), 0, 10).unwrap().len(), 1);
    assert_eq!(s.events(&dev(2), 0, 10).unwrap().len(), 3);

    // Once the last device is gone (the operator's path), the name can be
    // released and a new device registers under it as a new account.
    s.remove_device(&dev(2), None, 7000, "{}").unwrap().unwrap();
    assert!(matches!(
        s.register(&row(4, "alice")),
        Err(StoreError::NameTaken(_))
    ));
    assert!(s.release_name(&name("alice")).unwrap());
    assert!(!s.release_name(&name("alice")).unwrap());
    assert_eq!(s.register(&row(4, "alice")).unwrap(), Registered::New);
    assert!(matches!(
        s.register_linked(&row(2, "alice")),
        Err(StoreError::DeviceRemoved(_))
    ));
}

fn replace_record_is_compare_and_swap(s: &dyn Store) {
    s.register(&row(1, "alice")).unwrap();
    assert!(!s.replace_record(&dev(1), b"stale", b"new", 2000).unwrap());
    assert!(s.replace_record(&dev(1), &[1, 1], b"new", 2000).unwrap());
    let got = s.device(&dev(1)).unwrap().unwrap();
    assert_eq!((got.record.as_slice(), got.record_at), (&b"new"[..], 2000));
    assert!(matches!(
        s.replace_record(&dev(9), b"x", b"y", 1),
        Err(StoreError::UnknownDevice(_))
    ));
}

fn challenges_are_single_use(s: &dyn Store) {
    s.put_challenge(&dev(1), &[7; 32], 500, 100, 4).unwrap();
    assert_eq!(s.take_challenge(&dev(2), &[7; 32]).unwrap(), None);
    assert_eq!(s.take_challenge(&dev(1), &[7; 32]).unwrap(), Some(500));
    assert_eq!(s.take_challenge(&dev(1), &[7; 32]).unwrap(), None);
}

fn challenges_are_bounded(s: &dyn Store) {
    // Expired ones are dropped when a new one is stored.
    s.put_challenge(&dev(1), &[1; 32], 150, 100, 4).unwrap();
    s.put_challenge(&dev(1), &[2; 32], 1000, 200, 4).unwrap();
    assert_eq!(s.take_challenge(&dev(1), &[1; 32]).unwrap(), None);
    // At most 4 per device: the oldest go.
    for i in 3..=6u8 {
        s.put_challenge(&dev(1), &[i; 32], 1000, 200, 4).unwrap();
    }
    assert_eq!(s.take_challenge(&dev(1), &[2; 32]).unwrap(), None);
    for i in 3..=6u8 {
        assert_eq!(s.take_challenge(&dev(1), &[i; 32]).unwrap(), Some(1000));
    }
}

fn sessions(s: &dyn Store) {
    assert_eq!(s.session(&[3; 32]).unwrap(), None);
    assert!(matches!(
        s.put_session(&[3; 32], &dev(1), 99),
        Err(StoreError::UnknownDevice(d)) if d == dev(1)
    ));
    assert_eq!(s.session(&[3; 32]).unwrap(), None);
    s.register(&row(1, "alice")).unwrap();
    s.put_session(&[3; 32], &dev(1), 99).unwrap();
    assert_eq!(s.session(&[3; 32]).unwrap(), Some((dev(1), 99)));
}

fn key_packages(s: &dyn Store) {
    assert_eq!(s.claim_key_package(&dev(1)).unwrap(), Claimed::Exhausted);
    assert_eq!(
        s.add_key_packages(&dev(1), &[b"a".to_vec(), b"b".to_vec()], None, 3)
            .unwrap(),
        2
    );
    assert!(matches!(
        s.add_key_packages(&dev(1), &[b"c".to_vec(), b"d".to_vec()], Some(b"lr"), 3),
        Err(StoreError::TooManyKeyPackages {
            limit: 3,
            stored: 2
        })
    ));
    // Nothing of the refused upload was kept, not even its last resort.
    assert_eq!(s.key_package_count(&dev(1)).unwrap(), (2, false));
    assert_eq!(
        s.add_key_packages(&dev(1), &[], Some(b"lr1"), 3).unwrap(),
        2
    );
    assert_eq!(
        s.add_key_packages(&dev(1), &[], Some(b"lr2"), 3).unwrap(),
        2
    );
    assert_eq!(s.key_package_count(&dev(1)).unwrap(), (2, true));
    // Oldest first, each once; then the (latest) last resort, again and again.
    assert_eq!(
        s.claim_key_package(&dev(1)).unwrap(),
        Claimed::Package(b"a".to_vec())
    );
    assert_eq!(
        s.claim_key_package(&dev(1)).unwrap(),
        Claimed::Package(b"b".to_vec())
    );
    for _ in 0..2 {
        assert_eq!(
            s.claim_key_package(&dev(1)).unwrap(),
            Claimed::LastResort(b"lr2".to_vec())
        );
    }
    assert_eq!(s.key_package_count(&dev(1)).unwrap(), (0, true));
    // Other devices are separate.
    assert_eq!(s.claim_key_package(&dev(2)).unwrap(), Claimed::Exhausted);
}

fn inbox_and_its_events(s: &dyn Store) {
    let payload = |item: &kith_server::store::InboxItem| format!("{{\"id\":{}}}", item.id);
    // Nothing is filed for a device not registered here (or removed, §6.4).
    assert!(matches!(
        s.deposit_inbox(&dev(1), b"one", 10, 2, &payload),
        Err(StoreError::UnknownDevice(d)) if d == dev(1)
    ));
    assert!(s.events(&dev(1), 0, 10).unwrap().is_empty());
    s.register(&row(1, "alice")).unwrap();
    let (a, ea) = s.deposit_inbox(&dev(1), b"one", 10, 2, &payload).unwrap();
    let (b, eb) = s.deposit_inbox(&dev(1), b"two", 11, 2, &payload).unwrap();
    assert!(b.id > a.id && eb.cursor > ea.cursor);
    assert_eq!(ea.kind, "inbox");
    assert_eq!(ea.payload, format!("{{\"id\":{}}}", a.id));
    assert!(matches!(
        s.deposit_inbox(&dev(1), b"three", 12, 2, &payload),
        Err(StoreError::InboxFull { limit: 2 })
    ));
    // The refused deposit left no event behind.
    assert_eq!(s.events(&dev(1), 0, 10).unwrap().len(), 2);
    let items = s.inbox(&dev(1), 0, 10).unwrap();
    assert_eq!(items, vec![a.clone(), b.clone()]);
    assert_eq!(s.inbox(&dev(1), a.id, 10).unwrap(), vec![b.clone()]);
    assert_eq!(s.inbox(&dev(1), 0, 1).unwrap(), vec![a.clone()]);
    assert!(s.inbox(&dev(2), 0, 10).unwrap().is_empty());
    assert!(!s.delete_inbox(&dev(2), a.id).unwrap(), "not the owner");
    assert!(s.delete_inbox(&dev(1), a.id).unwrap());
    assert!(!s.delete_inbox(&dev(1), a.id).unwrap());
    assert_eq!(s.inbox(&dev(1), 0, 10).unwrap(), vec![b]);
}

fn event_log_and_acks(s: &dyn Store) {
    assert_eq!(s.acked_cursor(&dev(1)).unwrap(), 0);
    assert_eq!(s.ack_events(&dev(1), 5).unwrap(), 0, "nothing to ack yet");
    assert!(matches!(
        s.append_event(&dev(1), "test", "{}", 1),
        Err(StoreError::UnknownDevice(d)) if d == dev(1)
    ));
    assert!(s.events(&dev(1), 0, 10).unwrap().is_empty());
    s.register(&row(1, "alice")).unwrap();
    s.register(&row(2, "bob")).unwrap();
    let e1 = s.append_event(&dev(1), "test", "{\"n\":1}", 1).unwrap();
    let other = s.append_event(&dev(2), "test", "{}", 2).unwrap();
    let e2 = s.append_event(&dev(1), "test", "{\"n\":2}", 3).unwrap();
    let e3 = s.append_event(&dev(1), "test", "{\"n\":3}", 4).unwrap();
    assert!(e1.cursor < e2.cursor && e2.cursor < e3.cursor);
    assert_eq!(
        s.events(&dev(1), 0, 10).unwrap(),
        vec![e1.clone(), e2.clone(), e3.clone()]
    );
    assert_eq!(s.events(&dev(1), e1.cursor, 1).unwrap(), vec![e2.clone()]);
    assert_eq!(s.events(&dev(2), 0, 10).unwrap(), vec![other.clone()]);
    // Acks are cumulative, drop what they cover, and never go backwards.
    assert_eq!(s.ack_events(&dev(1), e2.cursor).unwrap(), e2.cursor);
    assert_eq!(s.acked_cursor(&dev(1)).unwrap(), e2.cursor);
    assert_eq!(s.events(&dev(1), 0, 10).unwrap(), vec![e3.clone()]);
    assert_eq!(s.ack_events(&dev(1), e1.cursor).unwrap(), e2.cursor);
    // Never beyond the newest event, so future events are not lost.
    assert_eq!(s.ack_events(&dev(1), u64::MAX / 2).unwrap(), e3.cursor);
    let e4 = s.append_event(&dev(1), "test", "{}", 5).unwrap();
    assert!(e4.cursor > e3.cursor);
    assert_eq!(
        s.events(&dev(1), s.acked_cursor(&dev(1)).unwrap(), 10)
            .unwrap(),
        vec![e4]
    );
    // Other devices' logs are untouched.
    assert_eq!(s.events(&dev(2), 0, 10).unwrap(), vec![other]);
}

/// An append names the device's append before it (`prev`), whatever path
/// it came by and whatever was acked since; or names nothing. Reads name
/// nothing.
fn appends_name_the_event_before(s: &dyn Store) {
    for (n, local) in [(1, "one"), (2, "two"), (3, "three")] {
        s.register(&crate::row(n, local)).unwrap();
    }
    let e1 = s.append_event(&dev(1), "test", "{}", 1).unwrap();
    assert!(matches!(e1.prev, None | Some(0)), "{e1:?}");
    let other = s.append_event(&dev(2), "test", "{}", 2).unwrap();
    let e2 = s.append_event(&dev(1), "test", "{}", 3).unwrap();
    assert_eq!(e2.prev, Some(e1.cursor));
    // Acked and gone, the event before is still the one before.
    s.ack_events(&dev(1), e2.cursor).unwrap();
    let (_, e3) = s
        .deposit_inbox(&dev(1), b"env", 4, 10, &|_| "{}".into())
        .unwrap();
    assert_eq!(e3.prev, Some(e2.cursor));
    // A message's events, one per recipient, each after its own log's.
    let row = ChannelRow {
        channel: chan(1),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1, 2, 3])).unwrap();
    let message = NewMessage {
        id: [1; 32],
        epoch: 0,
        sender: dev(3),
        message: vec![1; 3],
        received_at: 50,
    };
    let (_, events) = s
        .store_message(&chan(1), &message, &|m| format!("{{\"seq\":{}}}", m.seq))
        .unwrap();
    let prevs: Vec<(DeviceId, Option<u64>)> = events.iter().map(|(d, e)| (*d, e.prev)).collect();
    assert_eq!(
        prevs,
        vec![(dev(1), Some(e3.cursor)), (dev(2), Some(other.cursor))]
    );
    assert!(
        s.events(&dev(1), 0, 10)
            .unwrap()
            .iter()
            .all(|e| e.prev.is_none())
    );
}

fn chan(n: u8) -> ChannelId {
    ChannelId::from_bytes([n; 16])
}

fn epoch_state(epoch: u64, members: &[u8]) -> EpochState {
    EpochState {
        epoch,
        ratchet_tree: vec![1, epoch as u8],
        group_info: vec![2, epoch as u8],
        members: members.iter().map(|n| dev(*n)).collect(),
    }
}

fn new_commit(channel: ChannelId, epoch: u64, members: &[u8]) -> NewCommit {
    NewCommit {
        channel,
        commit: CommitRow {
            epoch,
            commit: vec![3, epoch as u8],
            commit_hash: [epoch as u8; 32],
            welcome: (epoch == 0).then(|| vec![4]),
            certificate: None,
        },
        next: epoch_state(epoch + 1, members),
        name: format!("name{}", epoch + 1),
        content_type: "text/plain".into(),
    }
}

fn channels_and_commits(s: &dyn Store) {
    let row = ChannelRow {
        channel: chan(1),
        name: "general".into(),
        content_type: "application/octet-stream".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1])).unwrap();
    assert!(matches!(
        s.create_channel(&row, &epoch_state(0, &[2])),
        Err(StoreError::ChannelExists(_))
    ));
    assert_eq!(s.channel(&chan(1)).unwrap(), Some(row.clone()));
    assert_eq!(s.channel(&chan(2)).unwrap(), None);
    assert_eq!(s.channels_of(&dev(1)).unwrap(), vec![row.clone()]);
    assert!(s.channels_of(&dev(2)).unwrap().is_empty());
    assert!(s.is_member(&chan(1), &dev(1)).unwrap());
    assert!(!s.is_member(&chan(1), &dev(2)).unwrap());

    // Epoch 0 adds 2 and 3; epoch 1 removes 3.
    s.store_commit(&new_commit(chan(1), 0, &[1, 2, 3])).unwrap();
    assert!(matches!(
        s.store_commit(&new_commit(chan(1), 0, &[1])),
        Err(StoreError::EpochConflict {
            current: 1,
            got: 0,
            ..
        })
    ));
    assert!(matches!(
        s.store_commit(&new_commit(chan(9), 0, &[1])),
        Err(StoreError::UnknownChannel(_))
    ));
    s.store_commit(&new_commit(chan(1), 1, &[1, 2])).unwrap();
    let now = s.channel(&chan(1)).unwrap().unwrap();
    assert_eq!((now.epoch, now.name.as_str()), (2, "name2"));
    assert_eq!(now.content_type, "text/plain");
    assert_eq!(
        s.epoch_state(&chan(1), 1).unwrap(),
        Some(epoch_state(1, &[1, 2, 3]))
    );
    assert_eq!(
        s.epoch_state(&chan(1), 2).unwrap(),
        Some(epoch_state(2, &[1, 2]))
    );
    assert_eq!(s.epoch_state(&chan(1), 3).unwrap(), None);
    assert!(!s.is_member(&chan(1), &dev(3)).unwrap());
    assert!(s.was_member(&chan(1), &dev(3)).unwrap());
    assert!(!s.was_member(&chan(1), &dev(4)).unwrap());
    assert!(s.channels_of(&dev(3)).unwrap().is_empty());

    let commits = s.commits(&chan(1), 0, 10).unwrap();
    assert_eq!(commits.len(), 2);
    assert_eq!(commits[0], new_commit(chan(1), 0, &[]).commit);
    assert_eq!(s.commits(&chan(1), 1, 10).unwrap().len(), 1);
    assert_eq!(s.commits(&chan(1), 0, 1).unwrap().len(), 1);
    assert_eq!(s.commit(&chan(1), 1).unwrap().unwrap().epoch, 1);
    assert_eq!(s.commit(&chan(1), 2).unwrap(), None);

    // Certifying appends one event per member registered here (3 is
    // another server's device) before the commit, once.
    s.register(&crate::row(1, "one")).unwrap();
    s.register(&crate::row(2, "two")).unwrap();
    let events = s
        .certify_commit(&chan(1), 1, b"cert", "{\"c\":1}", 7)
        .unwrap()
        .unwrap();
    let to: Vec<DeviceId> = events.iter().map(|(d, _)| *d).collect();
    assert_eq!(to, vec![dev(1), dev(2)]);
    assert_eq!(events[0].1.kind, "commit");
    assert_eq!(s.events(&dev(2), 0, 10).unwrap().len(), 1);
    assert!(s.events(&dev(3), 0, 10).unwrap().is_empty());
    assert_eq!(
        s.certify_commit(&chan(1), 1, b"other", "{}", 8).unwrap(),
        None
    );
    assert_eq!(
        s.commit(&chan(1), 1)
            .unwrap()
            .unwrap()
            .certificate
            .as_deref(),
        Some(&b"cert"[..])
    );
    assert_eq!(s.events(&dev(2), 0, 10).unwrap().len(), 1);
    assert!(s.certify_commit(&chan(1), 5, b"cert", "{}", 8).is_err());
}

/// The deferred form stores what `store_message` stores; once its token
/// is waited for, the message is there, and a repeat is deduplicated.
fn deferred_messages_match(s: &dyn Store) {
    let row = ChannelRow {
        channel: chan(2),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1, 2])).unwrap();
    s.register(&crate::row(2, "two")).unwrap();
    let payload = |m: &kith_server::store::MessageRow| format!("{{\"seq\":{}}}", m.seq);
    let message = NewMessage {
        id: [9; 32],
        epoch: 0,
        sender: dev(1),
        message: vec![9; 3],
        received_at: 70,
    };
    let (stored, events, token) = s
        .store_message_deferred(&chan(2), &message, &payload)
        .unwrap();
    s.wait_durable(token).unwrap();
    assert_eq!(stored.seq, 1);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, dev(2));
    assert_eq!(s.messages(&chan(2), 0, 10).unwrap(), vec![stored.clone()]);
    let (again, events, token) = s
        .store_message_deferred(&chan(2), &message, &payload)
        .unwrap();
    s.wait_durable(token).unwrap();
    assert_eq!((again, events.len()), (stored, 0));
}

/// A batch is stored in its order at consecutive sequence numbers, each
/// message with its events, a repeat (also within the batch) deduplicated;
/// a batch for an unknown channel stores nothing.
fn batches_are_stored_in_order(s: &dyn Store) {
    let row = ChannelRow {
        channel: chan(3),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1, 2])).unwrap();
    s.register(&crate::row(2, "two")).unwrap();
    let payload = |m: &kith_server::store::MessageRow| format!("{{\"seq\":{}}}", m.seq);
    let message = |n: u8| NewMessage {
        id: [n; 32],
        epoch: 0,
        sender: dev(1),
        message: vec![n; 3],
        received_at: 80,
    };
    let batch = [message(5), message(6), message(5), message(7)];
    let (rows, events, token) = s
        .store_messages_deferred(&chan(3), &batch, &payload)
        .unwrap();
    s.wait_durable(token).unwrap();
    let seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 1, 3]);
    let payloads: Vec<&str> = events.iter().map(|(_, e)| e.payload.as_str()).collect();
    assert_eq!(payloads, ["{\"seq\":1}", "{\"seq\":2}", "{\"seq\":3}"]);
    assert!(events.iter().all(|(d, _)| *d == dev(2)));
    assert_eq!(s.events(&dev(2), 0, 10).unwrap().len(), 3);
    let stored: Vec<[u8; 32]> = s
        .messages(&chan(3), 0, 10)
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(stored, [[5; 32], [6; 32], [7; 32]]);
    assert!(matches!(
        s.store_messages_deferred(&chan(4), &[message(8)], &payload),
        Err(StoreError::UnknownChannel(_))
    ));
    assert!(s.messages(&chan(4), 0, 10).unwrap().is_empty());
}

/// Several messages stored as one batch: each gets what it would alone, in
/// the order given; one that fails (here: an unknown channel) fails alone,
/// and a repeated id in the same batch is found, not stored twice.
fn batched_messages_match(s: &dyn Store) {
    let row = ChannelRow {
        channel: chan(1),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1, 2, 3])).unwrap();
    for (n, local) in [(1, "one"), (2, "two"), (3, "three")] {
        s.register(&crate::row(n, local)).unwrap();
    }
    let before = s.append_event(&dev(2), "test", "{}", 1).unwrap();
    let message = |n: u8, sender: u8| NewMessage {
        id: [n; 32],
        epoch: 0,
        sender: dev(sender),
        message: vec![n; 3],
        received_at: 50 + u64::from(n),
    };
    let batch = [
        (chan(1), message(1, 1)),
        (chan(9), message(2, 1)),
        (chan(1), message(3, 2)),
        (chan(1), message(1, 1)),
        (chan(1), message(4, 3)),
    ];
    let payload = |c: &ChannelId, m: &kith_server::store::MessageRow| {
        format!("{{\"channel\":\"{c}\",\"seq\":{}}}", m.seq)
    };
    let results = s.store_messages(&batch, &payload);
    assert_eq!(results.len(), 5);
    let mut results = results.into_iter();
    let (m1, e1) = results.next().unwrap().unwrap();
    assert!(matches!(
        results.next().unwrap(),
        Err(StoreError::UnknownChannel(c)) if c == chan(9)
    ));
    let (m3, e3) = results.next().unwrap().unwrap();
    let (again, none) = results.next().unwrap().unwrap();
    let (m4, e4) = results.next().unwrap().unwrap();
    assert_eq!((m1.seq, m3.seq, m4.seq), (1, 2, 3));
    assert_eq!((again, none.len()), (m1.clone(), 0));
    let to = |events: &[(DeviceId, kith_server::store::Event)]| -> Vec<DeviceId> {
        events.iter().map(|(d, _)| *d).collect()
    };
    assert_eq!(to(&e1), [dev(2), dev(3)]);
    assert_eq!(to(&e3), [dev(1), dev(3)]);
    assert_eq!(to(&e4), [dev(1), dev(2)]);
    assert_eq!(
        e1[0].1.payload,
        format!("{{\"channel\":\"{}\",\"seq\":1}}", chan(1))
    );
    // Each event names the one before it in its device's log, also within
    // the batch.
    assert_eq!(e1[0].1.prev, Some(before.cursor));
    assert_eq!(e4[1].1.prev, Some(e1[0].1.cursor));
    assert_eq!(e4[0].1.prev, Some(e3[0].1.cursor));
    assert_eq!(
        s.messages(&chan(1), 0, 10).unwrap(),
        vec![m1.clone(), m3, m4]
    );
    let seqs = |d: u8| -> Vec<String> {
        s.events(&dev(d), 0, 10)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "message")
            .map(|e| e.payload)
            .collect()
    };
    let p = |seq: u64| format!("{{\"channel\":\"{}\",\"seq\":{seq}}}", chan(1));
    assert_eq!(seqs(1), [p(2), p(3)]);
    assert_eq!(seqs(2), [p(1), p(3)]);
    assert_eq!(seqs(3), [p(1), p(2)]);
    assert!(s.store_messages(&[], &payload).is_empty());
}

fn messages_and_their_events(s: &dyn Store) {
    let row = ChannelRow {
        channel: chan(1),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1, 2, 3, 4]))
        .unwrap();
    // 4 is another server's device: no events for it here.
    for (n, local) in [(1, "one"), (2, "two"), (3, "three")] {
        s.register(&crate::row(n, local)).unwrap();
    }
    let payload = |m: &kith_server::store::MessageRow| format!("{{\"seq\":{}}}", m.seq);
    let message = |n: u8| NewMessage {
        id: [n; 32],
        epoch: 0,
        sender: dev(1),
        message: vec![n; 3],
        received_at: 50 + u64::from(n),
    };
    let (m1, events) = s.store_message(&chan(1), &message(1), &payload).unwrap();
    assert_eq!(m1.seq, 1);
    let to: Vec<DeviceId> = events.iter().map(|(d, _)| *d).collect();
    assert_eq!(to, vec![dev(2), dev(3)], "everyone but the sender");
    assert_eq!(events[0].1.payload, "{\"seq\":1}");
    assert_eq!(events[0].1.kind, "message");
    // The same id again: the same row, no events.
    let (again, events) = s.store_message(&chan(1), &message(1), &payload).unwrap();
    assert_eq!((again, events.len()), (m1.clone(), 0));
    let (m2, _) = s.store_message(&chan(1), &message(2), &payload).unwrap();
    assert_eq!(m2.seq, 2);
    assert_eq!(s.events(&dev(2), 0, 10).unwrap().len(), 2);
    // Each recipient reads every payload whole, also after another
    // recipient of the same messages acked them (a backend may store a
    // payload once for all its recipients).
    let payloads = |d: u8| -> Vec<String> {
        s.events(&dev(d), 0, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect()
    };
    assert_eq!(payloads(2), ["{\"seq\":1}", "{\"seq\":2}"]);
    let newest = s.events(&dev(2), 0, 10).unwrap()[1].cursor;
    s.ack_events(&dev(2), newest).unwrap();
    assert!(payloads(2).is_empty());
    assert_eq!(payloads(3), ["{\"seq\":1}", "{\"seq\":2}"]);
    assert!(s.events(&dev(1), 0, 10).unwrap().is_empty());
    assert_eq!(
        s.messages(&chan(1), 0, 10).unwrap(),
        vec![m1.clone(), m2.clone()]
    );
    assert_eq!(s.messages(&chan(1), 1, 10).unwrap(), vec![m2]);
    assert_eq!(s.messages(&chan(1), 0, 1).unwrap(), vec![m1]);
    assert!(s.messages(&chan(2), 0, 10).unwrap().is_empty());
    assert!(matches!(
        s.store_message(&chan(2), &message(3), &payload),
        Err(StoreError::UnknownChannel(_))
    ));
    // Sequence numbers are per channel.
    let other = ChannelRow {
        channel: chan(2),
        ..row
    };
    s.create_channel(&other, &epoch_state(0, &[1])).unwrap();
    let (first, events) = s.store_message(&chan(2), &message(1), &payload).unwrap();
    assert_eq!((first.seq, events.len()), (1, 0));
}

fn server(s: &str) -> kith_proto::ServerName {
    s.parse().unwrap()
}

fn remote_records(s: &dyn Store) {
    assert_eq!(s.remote_record(&dev(1)).unwrap(), None);
    let mut r = RemoteRecord {
        device: dev(1),
        server: server("b.test"),
        record: vec![1, 2],
        fetched_at: 10,
    };
    s.put_remote_record(&r).unwrap();
    assert_eq!(s.remote_record(&dev(1)).unwrap(), Some(r.clone()));
    r.record = vec![3];
    r.fetched_at = 20;
    s.put_remote_record(&r).unwrap();
    assert_eq!(s.remote_record(&dev(1)).unwrap(), Some(r.clone()));
    assert_eq!(s.remote_record(&dev(2)).unwrap(), None);
    assert_eq!(s.remote_records_from(&r.server).unwrap(), vec![r.clone()]);
    assert_eq!(
        s.remote_records_from(&"elsewhere.test".parse().unwrap())
            .unwrap(),
        vec![]
    );
    // A removal mark: kept with its first time, beside the record.
    assert_eq!(s.remote_removed(&dev(1)).unwrap(), None);
    s.mark_remote_removed(&dev(1), 30).unwrap();
    s.mark_remote_removed(&dev(1), 40).unwrap();
    assert_eq!(s.remote_removed(&dev(1)).unwrap(), Some(30));
    assert_eq!(s.remote_removed(&dev(2)).unwrap(), None);
    assert_eq!(s.remote_record(&dev(1)).unwrap(), Some(r));
}

fn outbox_queue(s: &dyn Store) {
    assert_eq!(s.next_outbox_due().unwrap(), None);
    assert!(s.due_outbox(100, 10).unwrap().is_empty());
    let b = server("b.test");
    let first = s
        .enqueue_outbox(&b, "/v0/federation/inbox/x", b"one", 100)
        .unwrap();
    let second = s
        .enqueue_outbox(&server("c.test:8448"), "/p", b"two", 200)
        .unwrap();
    assert!(second > first);
    assert_eq!(s.next_outbox_due().unwrap(), Some(100));
    let due = s.due_outbox(150, 10).unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (
            due[0].id,
            &due[0].destination,
            due[0].path.as_str(),
            due[0].body.as_slice()
        ),
        (first, &b, "/v0/federation/inbox/x", &b"one"[..])
    );
    assert_eq!(
        (due[0].attempts, due[0].next_at, due[0].created_at),
        (0, 100, 100)
    );
    s.retry_outbox(first, 1, 500).unwrap();
    let due = s.due_outbox(300, 10).unwrap();
    assert_eq!(due.iter().map(|i| i.id).collect::<Vec<_>>(), vec![second]);
    assert_eq!(s.due_outbox(300, 0).unwrap().len(), 0);
    let due = s.due_outbox(500, 10).unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].attempts, 1);
    assert!(s.remove_outbox(first).unwrap());
    assert!(!s.remove_outbox(first).unwrap());
    assert_eq!(s.next_outbox_due().unwrap(), Some(200));
}

fn remote_deposits_are_deduplicated(s: &dyn Store) {
    let a = server("a.test");
    assert!(matches!(
        s.deposit_remote_inbox(&a, &[1; 16], &dev(1), b"env", 5, 10, &|_| "{}".into()),
        Err(StoreError::UnknownDevice(_))
    ));
    s.register(&row(1, "alice")).unwrap();
    let (id, event) = s
        .deposit_remote_inbox(&a, &[1; 16], &dev(1), b"env", 5, 10, &|i| {
            format!("{{\"id\":{}}}", i.id)
        })
        .unwrap();
    let event = event.unwrap();
    assert_eq!(event.kind, "inbox");
    assert_eq!(event.payload, format!("{{\"id\":{id}}}"));
    // The same deposit again: same item, no event, nothing filed.
    let (again, none) = s
        .deposit_remote_inbox(&a, &[1; 16], &dev(1), b"env", 6, 10, &|_| "{}".into())
        .unwrap();
    assert_eq!((again, none), (id, None));
    // Another origin may use the same deposit id.
    let (other, event) = s
        .deposit_remote_inbox(
            &server("c.test"),
            &[1; 16],
            &dev(1),
            b"env2",
            7,
            10,
            &|_| "{}".into(),
        )
        .unwrap();
    assert!(other != id && event.is_some());
    assert_eq!(s.inbox(&dev(1), 0, 10).unwrap().len(), 2);
    assert_eq!(s.events(&dev(1), 0, 10).unwrap().len(), 2);
    // A full inbox refuses and records nothing, so a retry can succeed.
    assert!(matches!(
        s.deposit_remote_inbox(&a, &[2; 16], &dev(1), b"x", 8, 2, &|_| "{}".into()),
        Err(StoreError::InboxFull { .. })
    ));
    let (_, event) = s
        .deposit_remote_inbox(&a, &[2; 16], &dev(1), b"x", 9, 10, &|_| "{}".into())
        .unwrap();
    assert!(event.is_some());
}

/// Runs every conformance test against fresh stores from `$make`.
/// Cursors, ids and epochs come from clients as u64; those past what the
/// backend can store find nothing rather than failing.
fn lookups_past_i64_find_nothing(s: &dyn Store) {
    let row = ChannelRow {
        channel: chan(1),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1])).unwrap();
    let message = NewMessage {
        id: [1; 32],
        epoch: 0,
        sender: dev(1),
        message: vec![1; 3],
        received_at: 50,
    };
    s.store_message(&chan(1), &message, &|m| format!("{{\"seq\":{}}}", m.seq))
        .unwrap();
    s.register(&crate::row(1, "alice")).unwrap();
    s.deposit_inbox(&dev(1), b"one", 10, 2, &|i| format!("{{\"id\":{}}}", i.id))
        .unwrap();
    for big in [1 << 63, u64::MAX] {
        assert!(s.inbox(&dev(1), big, 10).unwrap().is_empty());
        assert!(!s.delete_inbox(&dev(1), big).unwrap());
        assert!(s.events(&dev(1), big, 10).unwrap().is_empty());
        assert_eq!(s.epoch_state(&chan(1), big).unwrap(), None);
        assert_eq!(s.commit(&chan(1), big).unwrap(), None);
        assert!(s.commits(&chan(1), big, 10).unwrap().is_empty());
        assert!(s.messages(&chan(1), big, 10).unwrap().is_empty());
    }
    assert_eq!(s.inbox(&dev(1), 0, 10).unwrap().len(), 1);
}

macro_rules! store_suite {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            fn make() -> Box<dyn Store> {
                Box::new($make)
            }

            #[test]
            fn register_and_names() {
                super::register_and_names(make().as_ref());
            }
            #[test]
            fn removing_a_device() {
                super::removing_a_device(make().as_ref());
            }
            #[test]
            fn replace_record_is_compare_and_swap() {
                super::replace_record_is_compare_and_swap(make().as_ref());
            }
            #[test]
            fn challenges_are_single_use() {
                super::challenges_are_single_use(make().as_ref());
            }
            #[test]
            fn challenges_are_bounded() {
                super::challenges_are_bounded(make().as_ref());
            }
            #[test]
            fn sessions() {
                super::sessions(make().as_ref());
            }
            #[test]
            fn key_packages() {
                super::key_packages(make().as_ref());
            }
            #[test]
            fn inbox_and_its_events() {
                super::inbox_and_its_events(make().as_ref());
            }
            #[test]
            fn event_log_and_acks() {
                super::event_log_and_acks(make().as_ref());
            }
            #[test]
            fn appends_name_the_event_before() {
                super::appends_name_the_event_before(make().as_ref());
            }
            #[test]
            fn channels_and_commits() {
                super::channels_and_commits(make().as_ref());
            }
            #[test]
            fn remote_records() {
                super::remote_records(make().as_ref());
            }

            #[test]
            fn outbox_queue() {
                super::outbox_queue(make().as_ref());
            }

            #[test]
            fn remote_deposits_are_deduplicated() {
                super::remote_deposits_are_deduplicated(make().as_ref());
            }

            #[test]
            fn messages_and_their_events() {
                super::messages_and_their_events(make().as_ref());
            }

            #[test]
            fn lookups_past_i64_find_nothing() {
                super::lookups_past_i64_find_nothing(make().as_ref());
            }

            #[test]
            fn deferred_messages_match() {
                super::deferred_messages_match(make().as_ref());
            }

            #[test]
            fn batches_are_stored_in_order() {
                super::batches_are_stored_in_order(make().as_ref());
            }

            #[test]
            fn batched_messages_match() {
                super::batched_messages_match(make().as_ref());
            }
        }
    };
}

store_suite!(memory, kith_server::MemoryStore::new());
store_suite!(sqlite, kith_server::SqliteStore::open_in_memory().unwrap());

/// The SQLite backend keeps everything across reopening the file.
#[test]
fn sqlite_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kith.db");
    let cursor;
    {
        let s = kith_server::SqliteStore::open(&path).unwrap();
        s.register(&row(1, "alice")).unwrap();
        s.add_key_packages(&dev(1), &[b"kp".to_vec()], Some(b"lr"), 10)
            .unwrap();
        s.deposit_inbox(&dev(1), b"env", 5, 10, &|_| "{}".into())
            .unwrap();
        cursor = s.append_event(&dev(1), "test", "{}", 6).unwrap().cursor;
        s.ack_events(&dev(1), cursor - 1).unwrap();
    }
    let s = kith_server::SqliteStore::open(&path).unwrap();
    assert_eq!(s.device(&dev(1)).unwrap(), Some(row(1, "alice")));
    assert_eq!(s.key_package_count(&dev(1)).unwrap(), (1, true));
    assert_eq!(s.inbox(&dev(1), 0, 10).unwrap().len(), 1);
    assert_eq!(s.acked_cursor(&dev(1)).unwrap(), cursor - 1);
    let events = s.events(&dev(1), 0, 10).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].cursor, cursor);
    s.enqueue_outbox(&server("b.test"), "/p", b"queued", 8)
        .unwrap();
    drop(s);
    let s = kith_server::SqliteStore::open(&path).unwrap();
    assert_eq!(s.due_outbox(8, 10).unwrap().len(), 1);
    // Cursors keep growing after a restart; an append names the event
    // before it only if that is the one before.
    let next = s.append_event(&dev(1), "test", "{}", 7).unwrap();
    assert!(next.cursor > cursor);
    assert!(next.prev.is_none_or(|c| c == cursor), "{next:?}");
}

/// Writers on several threads at once (whose fsyncs the SQLite backend
/// shares: group commit) each find their write stored once their call
/// returns, and after reopening the file.
#[test]
fn sqlite_concurrent_writers_all_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kith.db");
    let store = std::sync::Arc::new(kith_server::SqliteStore::open(&path).unwrap());
    for n in 1..=4u8 {
        store.register(&row(n, &format!("user{n}"))).unwrap();
    }
    let writers: Vec<_> = (1..=4u8)
        .map(|n| {
            let store = std::sync::Arc::clone(&store);
            std::thread::spawn(move || {
                (0..25u64)
                    .map(|i| {
                        let event = store.append_event(&dev(n), "test", "{}", i).unwrap();
                        // Visible to a read as soon as the write returned.
                        let seen = store.events(&dev(n), event.cursor - 1, 1).unwrap();
                        assert_eq!(seen, vec![event.clone()]);
                        event
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let written: Vec<Vec<_>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    drop(store);
    let s = kith_server::SqliteStore::open(&path).unwrap();
    for (n, events) in (1..=4u8).zip(written) {
        assert_eq!(s.events(&dev(n), 0, 100).unwrap(), events);
    }
}

/// A payload that several devices' events share is stored once, and goes
/// when the last of them is acked.
#[test]
fn sqlite_shared_payloads_go_with_their_last_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kith.db");
    let s = kith_server::SqliteStore::open(&path).unwrap();
    let row = ChannelRow {
        channel: chan(1),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1, 2, 3])).unwrap();
    for (n, local) in [(1, "one"), (2, "two"), (3, "three")] {
        s.register(&crate::row(n, local)).unwrap();
    }
    let message = NewMessage {
        id: [1; 32],
        epoch: 0,
        sender: dev(1),
        message: vec![1; 3],
        received_at: 51,
    };
    let (_, events) = s
        .store_message(&chan(1), &message, &|m| format!("{{\"seq\":{}}}", m.seq))
        .unwrap();
    assert_eq!(events.len(), 2);
    let shared = || -> i64 {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.query_row("SELECT COUNT(*) FROM event_payloads", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(shared(), 1, "one payload for two events");
    s.ack_events(&dev(2), events[0].1.cursor).unwrap();
    assert_eq!(shared(), 1, "device 3 still has it");
    assert_eq!(s.events(&dev(3), 0, 10).unwrap()[0].payload, "{\"seq\":1}");
    s.ack_events(&dev(3), events[1].1.cursor).unwrap();
    assert_eq!(shared(), 0);
}

/// A database of schema 3 (events without `shared`) opens, keeps its
/// events and takes shared payloads.
#[test]
fn sqlite_opens_a_schema_3_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kith.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE events (
                cursor INTEGER PRIMARY KEY AUTOINCREMENT,
                device BLOB NOT NULL,
                kind TEXT NOT NULL,
                payload TEXT NOT NULL,
                created_at INTEGER NOT NULL
            );
            PRAGMA user_version = 3;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO events (device, kind, payload, created_at) VALUES (?1, 'test', '{}', 5)",
            [dev(2).as_bytes().as_slice()],
        )
        .unwrap();
    }
    let s = kith_server::SqliteStore::open(&path).unwrap();
    let old = s.events(&dev(2), 0, 10).unwrap();
    assert_eq!((old.len(), old[0].payload.as_str()), (1, "{}"));
    drop(s);
    // Opening it again (the column is there now) works too.
    let s = kith_server::SqliteStore::open(&path).unwrap();
    assert_eq!(s.events(&dev(2), 0, 10).unwrap(), old);
}

/// Removing a device releases its references to shared payloads, as an
/// ack does: the payload goes with the last event that holds it.
#[test]
fn sqlite_a_removed_device_releases_its_shared_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kith.db");
    let s = kith_server::SqliteStore::open(&path).unwrap();
    let row = ChannelRow {
        channel: chan(1),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1, 2, 3])).unwrap();
    for (n, local) in [(1, "one"), (2, "two"), (3, "three")] {
        s.register(&crate::row(n, local)).unwrap();
    }
    let message = NewMessage {
        id: [1; 32],
        epoch: 0,
        sender: dev(1),
        message: vec![1; 3],
        received_at: 51,
    };
    let (_, events) = s
        .store_message(&chan(1), &message, &|m| format!("{{\"seq\":{}}}", m.seq))
        .unwrap();
    assert_eq!(events.len(), 2);
    let shared = || -> i64 {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.query_row("SELECT COUNT(*) FROM event_payloads", [], |r| r.get(0))
            .unwrap()
    };
    s.remove_device(&dev(2), None, 60, "{}").unwrap().unwrap();
    assert_eq!(shared(), 1, "device 3 still has it");
    assert_eq!(s.events(&dev(3), 0, 10).unwrap()[0].payload, "{\"seq\":1}");
    // No more events for the removed device, though still a member.
    let next = NewMessage {
        id: [2; 32],
        ..message
    };
    let (_, events) = s
        .store_message(&chan(1), &next, &|m| format!("{{\"seq\":{}}}", m.seq))
        .unwrap();
    assert_eq!(events.len(), 1);
    s.ack_events(&dev(3), events[0].1.cursor).unwrap();
    assert_eq!(shared(), 0);
}

/// A message that fails halfway through its rows, inside a batch (here a
/// trigger refuses its second event row), leaves nothing behind: not its
/// row, not its first event, not its sequence number, not a cursor that a
/// later event would name as the one before it. The batch's other
/// messages are stored, durably, as if it had not been there.
#[test]
fn sqlite_a_message_failing_inside_a_batch_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kith.db");
    let s = kith_server::SqliteStore::open(&path).unwrap();
    let row = ChannelRow {
        channel: chan(1),
        name: "general".into(),
        content_type: "text/plain".into(),
        epoch: 0,
        created_at: 100,
    };
    s.create_channel(&row, &epoch_state(0, &[1, 2, 3])).unwrap();
    for (n, local) in [(1, "one"), (2, "two"), (3, "three")] {
        s.register(&crate::row(n, local)).unwrap();
    }
    // Another connection, as an operator's tool would be: the store sees
    // the trigger at its next statement.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER doomed BEFORE INSERT ON events
             WHEN NEW.shared IS NOT NULL
              AND EXISTS (SELECT 1 FROM events WHERE shared = NEW.shared)
              AND (SELECT payload FROM event_payloads WHERE id = NEW.shared) LIKE '%doomed%'
             BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
        )
        .unwrap();
    let message = |n: u8| NewMessage {
        id: [n; 32],
        epoch: 0,
        sender: dev(1),
        message: vec![n; 3],
        received_at: 50 + u64::from(n),
    };
    let payload = |_: &ChannelId, m: &kith_server::store::MessageRow| {
        let tag = if m.message[0] == 2 { "doomed" } else { "fine" };
        format!("{{\"seq\":{},\"tag\":\"{tag}\"}}", m.seq)
    };
    let batch = [
        (chan(1), message(1)),
        (chan(1), message(2)),
        (chan(1), message(3)),
    ];
    let results = s.store_messages(&batch, &payload);
    let mut results = results.into_iter();
    let (m1, e1) = results.next().unwrap().unwrap();
    assert!(matches!(
        results.next().unwrap(),
        Err(StoreError::Sqlite(_))
    ));
    let (m3, e3) = results.next().unwrap().unwrap();
    assert_eq!((m1.seq, m3.seq), (1, 2));
    for ((d1, first), (d3, second)) in e1.iter().zip(&e3) {
        assert_eq!(d1, d3);
        assert_eq!(second.prev, Some(first.cursor), "{d1}");
    }
    drop(s);
    // Durable, and nothing of the failed message.
    let s = kith_server::SqliteStore::open(&path).unwrap();
    assert_eq!(s.messages(&chan(1), 0, 10).unwrap(), vec![m1, m3]);
    for d in [2, 3] {
        let tags: Vec<String> = s
            .events(&dev(d), 0, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(
            tags,
            [
                "{\"seq\":1,\"tag\":\"fine\"}",
                "{\"seq\":2,\"tag\":\"fine\"}"
            ],
            "device {d}"
        );
    }
    // Its id was never stored: sent again (the fault gone), it is new.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("DROP TRIGGER doomed")
        .unwrap();
    let again = s.store_messages(&[(chan(1), message(2))], &payload);
    let (m2, e2) = again.into_iter().next().unwrap().unwrap();
    assert_eq!((m2.seq, e2.len()), (3, 2));
}
