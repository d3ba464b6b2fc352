//! A store written by the JSON codec (before the binary one) keeps working:
//! its groups, pending commit and key packages load, and it moves to the
//! binary format. The fixture under `tests/fixtures/json-store` is
//! `sqlite3 .dump` of the stores of a run at the commit before the change:
//! Alice (seed 1) made channel 0707…07, added Bob (seed 2), both exchanged
//! a message, Alice left a `self_update` commit pending; Carol (seed 3) has
//! an unused key package; `server.sql` is the server's public group.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;

use common::*;
use kith_mls::{BINARY_MARKER, Device, MlsStore, PublicChannel};
use kith_proto::{ChannelId, SecretKey};

fn restore(dir: &Path, name: &str, dump: &str) -> MlsStore {
    let path = dir.join(format!("{name}.sqlite"));
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(dump)
        .unwrap();
    MlsStore::open(&path).unwrap()
}

fn hex_fixture(text: &str) -> Vec<u8> {
    hex::decode(text.trim()).unwrap()
}

/// The first byte of every key in OpenMLS's tables, and of the values a
/// commit rewrites (tree, context, secrets).
fn first_bytes(path: &Path) -> Vec<(String, Option<u8>)> {
    let connection = rusqlite::Connection::open(path).unwrap();
    let mut out = Vec::new();
    for (table, column, filter) in [
        ("openmls_group_data", "group_id", ""),
        (
            "openmls_group_data",
            "group_data",
            "WHERE data_type IN ('tree', 'context', 'message_secrets')",
        ),
        ("openmls_epoch_keys_pairs", "group_id", ""),
        ("openmls_epoch_keys_pairs", "epoch_id", ""),
        ("openmls_key_packages", "key_package_ref", ""),
        ("openmls_encryption_keys", "public_key", ""),
        ("openmls_proposals", "group_id", ""),
        ("openmls_own_leaf_nodes", "group_id", ""),
    ] {
        let firsts: Vec<Option<Vec<u8>>> = connection
            .prepare(&format!(
                "SELECT substr({column}, 1, 1) FROM {table} {filter}"
            ))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        out.extend(firsts.into_iter().map(|b| {
            (
                format!("{table}.{column}"),
                b.and_then(|b| b.first().copied()),
            )
        }));
    }
    out
}

#[test]
fn a_json_store_keeps_working_and_moves_to_the_binary_format() {
    let dir = tempfile::tempdir().unwrap();
    let id = ChannelId::from_bytes([7; 16]);
    let server_store = restore(
        dir.path(),
        "server",
        include_str!("fixtures/json-store/server.sql"),
    );
    let a = Device::new(
        &SecretKey::from_seed([1; 32]),
        restore(
            dir.path(),
            "alice",
            include_str!("fixtures/json-store/alice.sql"),
        ),
    );
    let b = Device::new(
        &SecretKey::from_seed([2; 32]),
        restore(
            dir.path(),
            "bob",
            include_str!("fixtures/json-store/bob.sql"),
        ),
    );
    let c = Device::new(
        &SecretKey::from_seed([3; 32]),
        restore(
            dir.path(),
            "carol",
            include_str!("fixtures/json-store/carol.sql"),
        ),
    );
    let pending = hex_fixture(include_str!("fixtures/json-store/alice-pending-commit.hex"));
    let carol_kp = hex_fixture(include_str!("fixtures/json-store/carol-key-package.hex"));

    let mut ca = a.channel(id).unwrap();
    let mut cb = b.channel(id).unwrap();
    let mut server = PublicChannel::load(&server_store, id).unwrap().unwrap();
    assert_eq!(ca.epoch(), 1);
    assert_eq!(ca.epoch_authenticator(), cb.epoch_authenticator());
    assert!(ca.has_pending_commit());

    // The commit left pending before the change is ordered and merged.
    let validated = server.validate_commit(&pending).unwrap();
    server.apply(validated).unwrap();
    ca.merge_pending().unwrap();
    deliver_commit(&mut cb, &pending);
    assert_eq!(ca.epoch(), 2);
    assert_eq!(ca.epoch_authenticator(), cb.epoch_authenticator());
    let m = cb.encrypt(b"after the upgrade").unwrap();
    assert_eq!(
        receive(&mut ca, &m),
        (b.device_id(), b"after the upgrade".to_vec())
    );

    // Carol's key package, stored as JSON, still opens her Welcome.
    let out = ca.add(&[carol_kp]).unwrap();
    order(&mut server, &mut ca, &out);
    deliver_commit(&mut cb, &out.commit);
    let mut cc = c.join(&out.welcome.unwrap(), &out.ratchet_tree).unwrap();
    let m = ca.encrypt(b"welcome, carol").unwrap();
    assert_eq!(
        receive(&mut cc, &m),
        (a.device_id(), b"welcome, carol".to_vec())
    );
    assert_eq!(
        receive(&mut cb, &m),
        (a.device_id(), b"welcome, carol".to_vec())
    );
    drop((ca, cb, cc, server));
    drop((a, b, c, server_store));

    // Everything written since is binary, and the keys were rewritten at
    // once; Carol's used key package is gone.
    for name in ["alice", "bob", "carol", "server"] {
        let firsts = first_bytes(&dir.path().join(format!("{name}.sqlite")));
        assert!(!firsts.is_empty(), "{name}");
        for (column, first) in firsts {
            assert_eq!(first, Some(BINARY_MARKER), "{name}: {column}");
        }
    }
}
