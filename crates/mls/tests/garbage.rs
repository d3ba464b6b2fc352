//! Random and corrupted bytes into every entry point that takes bytes from
//! outside: errors, never panics.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::cell::RefCell;

use common::*;
use kith_mls::{ChannelExtension, MlsStore, PublicChannel};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Debug, Clone)]
enum Input {
    Random(Vec<u8>),
    /// One of the valid samples with one byte changed (or cut short).
    Corrupted {
        sample: usize,
        at: usize,
        byte: u8,
        truncate: bool,
    },
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(Input::Random),
        (any::<usize>(), any::<usize>(), any::<u8>(), any::<bool>()).prop_map(
            |(sample, at, byte, truncate)| Input::Corrupted {
                sample,
                at,
                byte,
                truncate
            }
        ),
    ]
}

#[test]
fn bytes_from_outside_never_panic() {
    let (a, b, c) = (device(), device(), device());
    let server_store = MlsStore::in_memory().unwrap();
    let mut ca = a.create_channel(new_channel_id(), &settings(&[])).unwrap();
    let mut server = PublicChannel::create(
        &server_store,
        &ca.group_info().unwrap(),
        &ca.ratchet_tree().unwrap(),
    )
    .unwrap();
    let out = ca.add(&[key_package(&b)]).unwrap();
    order(&mut server, &mut ca, &out);
    let cb = b
        .join(out.welcome.as_ref().unwrap(), &out.ratchet_tree)
        .unwrap();

    // Valid samples of every kind, to corrupt.
    let app = ca.encrypt(b"sample").unwrap();
    let next = ca.add(&[key_package(&c)]).unwrap();
    ca.clear_pending().unwrap();
    let samples = [
        app,
        next.commit.clone(),
        next.welcome.clone().unwrap(),
        next.group_info.clone(),
        next.ratchet_tree.clone(),
        key_package(&c),
        ca.extension().unwrap().encode(),
    ];

    let cb = RefCell::new(cb);
    let server = RefCell::new(server);
    let fresh_server = MlsStore::in_memory().unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 500,
        ..Config::default()
    });
    runner
        .run(&input(), |input| {
            let bytes = match input {
                Input::Random(bytes) => bytes,
                Input::Corrupted {
                    sample,
                    at,
                    byte,
                    truncate,
                } => {
                    let mut bytes = samples[sample % samples.len()].clone();
                    let at = at % bytes.len();
                    if truncate {
                        bytes.truncate(at);
                    } else {
                        bytes[at] ^= byte.max(1);
                    }
                    bytes
                }
            };
            let _ = cb.borrow_mut().process(&bytes);
            let _ = server.borrow().validate_commit(&bytes);
            let _ = server.borrow_mut().add_proposal(&bytes);
            let _ = server.borrow().check_group_info(&bytes);
            let _ = ChannelExtension::decode(&bytes);
            let _ = c.join(&bytes, &next.ratchet_tree);
            let _ = c.join(next.welcome.as_ref().unwrap(), &bytes);
            let _ = PublicChannel::create(&fresh_server, &bytes, &next.ratchet_tree);
            let _ = PublicChannel::create(&fresh_server, &next.group_info, &bytes);
            Ok(())
        })
        .unwrap();

    // Nothing was corrupted: B still reads A, and the server still takes
    // the real commit.
    let mut cb = cb.into_inner();
    let m = ca.encrypt(b"still here").unwrap();
    assert_eq!(
        receive(&mut cb, &m),
        (a.device_id(), b"still here".to_vec())
    );
    let server = server.into_inner();
    assert_eq!(server.epoch(), 1);
    assert!(server.validate_commit(&next.commit).is_ok());
}
