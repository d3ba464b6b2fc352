//! Removing a lost or stolen device (spec §6.4, §9.5): another device of
//! the user, or the server's operator, removes it from the user's name; it
//! loses its sessions and its place in the directory at once, and the
//! user's remaining devices (or, where they are not admins, the admins on
//! their request) remove it from every channel. Real homeservers on
//! loopback, driven through the client SDK.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::sync_until;
use kith_client::{Client, ClientError};
use kith_proto::{ChannelId, DeviceId, LocalName, SecretKey};
use kith_testkit::{Cluster, LinkFaults, TestServer};
use serde_json::{Value, json};

const CHAT: &str = kith_chat::CONTENT_TYPE;

async fn user(dir: &Path, url: &str, name: &str) -> Client {
    Client::register(&dir.join(name), url, name, None)
        .await
        .unwrap()
}

/// Registers another device of `first`'s user in `home` (refused until
/// `first` links it) and returns it.
async fn second_device(home: &Path, url: &str, first: &mut Client) -> Client {
    let name = first.handle().split('@').next().unwrap().to_owned();
    let device = match Client::register(home, url, &name, None).await {
        Err(ClientError::NameTaken { device, .. }) => device,
        Err(e) => panic!("expected name_taken, got {e}"),
        Ok(_) => panic!("an unlinked device registered under a taken name"),
    };
    assert!(first.link_device(device).await.unwrap());
    Client::register(home, url, &name, None).await.unwrap()
}

fn ids(records: &[kith_proto::DeviceRecord]) -> Vec<DeviceId> {
    let mut ids: Vec<DeviceId> = records.iter().map(|r| r.device_id()).collect();
    ids.sort();
    ids
}

fn texts(client: &Client, channel: ChannelId) -> Vec<String> {
    client
        .messages(channel, 1000)
        .unwrap()
        .into_iter()
        .map(|m| String::from_utf8(m.body).unwrap())
        .collect()
}

async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    let answer = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_removed_device_loses_its_name_its_sessions_and_its_channels() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let url = server.url().to_owned();
    let mut laptop = user(dir.path(), &url, "alice").await;
    let mut bob = user(dir.path(), &url, "bob").await;
    // The laptop administers `general`; Bob administers `side`.
    let general = laptop.create_channel("general", CHAT).await.unwrap();
    assert_eq!(laptop.invite(general, "bob@a.test").await.unwrap(), 1);
    bob.sync().await.unwrap();
    let side = bob.create_channel("side", CHAT).await.unwrap();
    assert_eq!(bob.invite(side, "alice@a.test").await.unwrap(), 1);
    laptop.sync().await.unwrap();

    let phone_home = dir.path().join("phone");
    let mut phone = second_device(&phone_home, &url, &mut laptop).await;
    let phone_id = phone.device_id();
    laptop.sync().await.unwrap();
    bob.sync().await.unwrap();
    phone.sync().await.unwrap();
    bob.sync().await.unwrap();
    assert!(bob.members(general).unwrap().contains(&phone_id));
    assert!(bob.members(side).unwrap().contains(&phone_id));
    phone.send(general, b"from the phone").await.unwrap();
    let token = phone.api().token().unwrap().to_owned();
    let events = format!("{url}/v0/events");

    // Another user's device may not remove it, and nothing changes.
    let refused = bob.remove_device(phone_id).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Server { status: 403, code, .. } if code == "forbidden"),
        "{refused}"
    );
    assert_eq!(
        ids(&laptop.user_devices("alice@a.test").await.unwrap()),
        ids(&[laptop.record().unwrap(), phone.record().unwrap()])
    );
    assert_eq!(get(&events, Some(&token)).await.0, 200);
    assert!(bob.members(side).unwrap().contains(&phone_id));
    // A device nobody registered: 404. Itself: refused before asking.
    let unknown = DeviceId::from_bytes([7; 32]);
    let missing = laptop.remove_device(unknown).await.unwrap_err();
    assert!(
        matches!(&missing, ClientError::Server { status: 404, .. }),
        "{missing}"
    );
    let me = laptop.device_id();
    assert!(matches!(
        laptop.remove_device(me).await,
        Err(ClientError::Invalid(_))
    ));
    // Nor can a device get a sibling still listed for the handle removed
    // from a channel by asking its admins: Bob's client refuses.
    phone.request_remove_device(side, me).await.unwrap();
    let report = bob.sync().await.unwrap();
    assert!(report.removed_devices.is_empty(), "{report:?}");
    assert!(bob.members(side).unwrap().contains(&me));

    // The laptop removes the phone: from `general` itself (it is an
    // admin there), from `side` by asking Bob's client.
    let removal = laptop.remove_device(phone_id).await.unwrap();
    assert_eq!(removal.removed_from, vec![general]);
    assert_eq!(removal.requested, vec![side]);
    assert!(!laptop.members(general).unwrap().contains(&phone_id));
    assert!(!laptop.record().unwrap().links_to(&phone_id));
    // Done once: a second removal finds nothing registered.
    let again = laptop.remove_device(phone_id).await.unwrap_err();
    assert!(
        matches!(&again, ClientError::Server { status: 404, .. }),
        "{again}"
    );

    // Its session is dead, it cannot log in, nor register again.
    assert_eq!(get(&events, Some(&token)).await.0, 401);
    let (status, body) = post(
        &format!("{url}/v0/login/challenge"),
        json!({ "device": phone_id.to_string() }),
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        body["message"].as_str().unwrap().contains("was removed"),
        "{body}"
    );
    let (status, body) = post(
        &format!("{url}/v0/register"),
        json!({ "record": URL_SAFE_NO_PAD.encode(phone.record().unwrap().encode()), "name": "alice" }),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(phone.sync().await.is_err());
    assert!(phone.send(general, b"still here?").await.is_err());

    // The directory no longer lists it; its last record is still served,
    // marked removed, for the channels that compute voters from it.
    assert_eq!(
        ids(&bob.user_devices("alice@a.test").await.unwrap()),
        vec![me]
    );
    let (status, body) = get(&format!("{url}/v0/devices/{phone_id}"), None).await;
    assert_eq!(status, 200);
    assert!(body["removed_at"].as_u64().is_some(), "{body}");

    // Bob's client honours the request: the phone is out of both channels.
    let report = bob.sync().await.unwrap();
    assert_eq!(report.removed_devices, vec![(side, phone_id)]);
    assert!(!bob.members(side).unwrap().contains(&phone_id));
    assert!(!bob.members(general).unwrap().contains(&phone_id));
    laptop.sync().await.unwrap();
    assert!(!laptop.members(side).unwrap().contains(&phone_id));

    // What is sent now is at an epoch the phone's group state never
    // reaches: it cannot read it.
    let after = bob.send(general, b"after the removal").await.unwrap();
    laptop.sync().await.unwrap();
    assert!(texts(&laptop, general).contains(&"after the removal".to_owned()));
    let stored = laptop
        .api()
        .channel_messages(&general.to_string(), 0)
        .await
        .unwrap();
    let message = stored.iter().find(|m| m.id == after).unwrap();
    let bytes = URL_SAFE_NO_PAD.decode(&message.message).unwrap();
    let seed = phone.secret_key().to_seed();
    drop(phone);
    let mls = kith_mls::Device::new(
        &SecretKey::from_seed(seed),
        kith_mls::MlsStore::open(phone_home.join("mls.db")).unwrap(),
    );
    let mut group = mls.channel(general).unwrap();
    assert!(
        !matches!(
            group.process(&bytes),
            Ok(kith_mls::Incoming::Application { .. })
        ),
        "the removed phone decrypted a message sent after its removal"
    );
    drop(group);

    // Inviting alice now adds only the laptop; the laptop's syncs never
    // add the phone back.
    let mut carol = user(dir.path(), &url, "carol").await;
    let third = carol.create_channel("third", CHAT).await.unwrap();
    assert_eq!(carol.invite(third, "alice@a.test").await.unwrap(), 1);
    assert!(!carol.members(third).unwrap().contains(&phone_id));
    let report = laptop.sync().await.unwrap();
    assert!(report.linked_added.is_empty(), "{report:?}");
    assert!(!laptop.members(general).unwrap().contains(&phone_id));
}

#[tokio::test]
async fn the_operator_removes_a_device_and_the_users_devices_act_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let url = server.url().to_owned();
    let mut laptop = user(dir.path(), &url, "alice").await;
    let general = laptop.create_channel("general", CHAT).await.unwrap();
    let mut phone = second_device(&dir.path().join("phone"), &url, &mut laptop).await;
    let mut tablet = second_device(&dir.path().join("tablet"), &url, &mut laptop).await;
    let phone_id = phone.device_id();
    let report = laptop.sync().await.unwrap();
    assert_eq!(report.linked_added.len(), 2, "{report:?}");
    phone.sync().await.unwrap();
    tablet.sync().await.unwrap();
    assert_eq!(tablet.members(general).unwrap().len(), 3);

    // The user has lost the phone; the operator removes it (server
    // stopped, on its data directory).
    let mut stopped = server.stop_keeping().await;
    let data_dir = stopped.config_mut().data_dir.clone();
    let alice: LocalName = "alice".parse().unwrap();
    let bob: LocalName = "bob".parse().unwrap();
    assert!(matches!(
        kith_testkit::admin::remove_device(&data_dir, &bob, &phone_id),
        Err(kith_testkit::admin::AdminError::NotFound { .. })
    ));
    assert_eq!(
        kith_testkit::admin::list_devices(&data_dir, &alice)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        kith_testkit::admin::remove_device(&data_dir, &alice, &phone_id).unwrap(),
        2
    );
    let listed: Vec<DeviceId> = kith_testkit::admin::list_devices(&data_dir, &alice)
        .unwrap()
        .iter()
        .map(|d| d.device)
        .collect();
    assert!(!listed.contains(&phone_id) && listed.len() == 2);
    let _server = stopped.start().await;

    // Each remaining device learns it from its event stream: the laptop
    // (an admin) removes the phone from the channel and drops its link.
    let report = laptop.sync().await.unwrap();
    assert_eq!(report.removed_devices, vec![(general, phone_id)]);
    assert!(!laptop.record().unwrap().links_to(&phone_id));
    tablet.sync().await.unwrap();
    assert!(!tablet.members(general).unwrap().contains(&phone_id));
    assert!(phone.sync().await.is_err());
}

/// Faster Raft timers, as in the other federated tests.
fn quick(config: &mut kith_testkit::Config) {
    config.federation.raft_heartbeat_ms = 150;
    config.federation.raft_election_min_ms = 600;
    config.federation.raft_election_max_ms = 1200;
    config.federation.retry_base_ms = 200;
    config.federation.retry_max_ms = 2_000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removal_reaches_a_channel_across_servers() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test"], quick).await;
    let a = cluster.server("a.test").url().to_owned();
    let b = cluster.server("b.test").url().to_owned();
    let mut laptop = user(dir.path(), &a, "alice").await;
    let mut bob = user(dir.path(), &b, "bob").await;
    let side = bob.create_channel("side", CHAT).await.unwrap();
    assert_eq!(bob.invite(side, "alice@a.test").await.unwrap(), 1);
    sync_until(&mut laptop, "joining", |c| c.channel_state(side).is_ok()).await;

    let mut phone = second_device(&dir.path().join("phone"), &a, &mut laptop).await;
    let phone_id = phone.device_id();
    // The laptop asks Bob (the admin, on b.test) to add the phone.
    laptop.sync().await.unwrap();
    sync_until(&mut bob, "adding the phone", |c| {
        c.members(side).unwrap().contains(&phone_id)
    })
    .await;
    sync_until(&mut phone, "the phone joining", |c| {
        c.channel_state(side).is_ok()
    })
    .await;

    let removal = laptop.remove_device(phone_id).await.unwrap();
    assert_eq!(removal.requested, vec![side]);
    // b.test answers for alice without the phone.
    assert_eq!(
        ids(&bob.user_devices("alice@a.test").await.unwrap()),
        vec![laptop.device_id()]
    );
    // Bob's client honours the request that crossed from a.test.
    sync_until(&mut bob, "removing the phone", |c| {
        !c.members(side).unwrap().contains(&phone_id)
    })
    .await;
    sync_until(&mut laptop, "seeing the removal", |c| {
        !c.members(side).unwrap().contains(&phone_id)
    })
    .await;
    bob.send(side, b"after the removal").await.unwrap();
    sync_until(&mut laptop, "reading on", |c| {
        texts(c, side).contains(&"after the removal".to_owned())
    })
    .await;
    assert!(phone.sync().await.is_err());
}

/// A removal whose answer was lost (the server removed the device, the
/// client never heard): asked again, the client finds the device removed
/// (`removed_at`) and completes the removal on its side instead of
/// failing with the 404.
#[tokio::test]
async fn a_retried_removal_completes_on_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let url = server.url().to_owned();
    let mut laptop = user(dir.path(), &url, "alice").await;
    let phone = second_device(&dir.path().join("phone"), &url, &mut laptop).await;
    let phone_id = phone.device_id();
    laptop.sync().await.unwrap();
    assert!(laptop.record().unwrap().links_to(&phone_id));

    // The first DELETE reaches the server but not the client's bookkeeping.
    let token = laptop.api().token().unwrap().to_owned();
    let answer = reqwest::Client::new()
        .delete(format!("{url}/v0/devices/{phone_id}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 204);
    assert!(laptop.record().unwrap().links_to(&phone_id));

    laptop.remove_device(phone_id).await.unwrap();
    assert!(!laptop.record().unwrap().links_to(&phone_id));
}

/// Two servers whose links `faults` can cut: Alice's laptop and phone on
/// a.test, Bob (on b.test) the admin of `side`, which both of Alice's
/// devices are in (the phone added by Bob on the laptop's request, so
/// b.test has fetched and cached Alice's records, the phone's among them).
async fn alice_in_bobs_channel(
    dir: &Path,
    faults: &Arc<LinkFaults>,
) -> (Cluster, Client, Client, Client, ChannelId) {
    let cluster = Cluster::start(dir, &["a.test", "b.test"], |config| {
        quick(config);
        config.faults = Some(Arc::clone(faults));
    })
    .await;
    let a = cluster.server("a.test").url().to_owned();
    let b = cluster.server("b.test").url().to_owned();
    let mut laptop = user(dir, &a, "alice").await;
    let mut bob = user(dir, &b, "bob").await;
    let side = bob.create_channel("side", CHAT).await.unwrap();
    assert_eq!(bob.invite(side, "alice@a.test").await.unwrap(), 1);
    sync_until(&mut laptop, "joining", |c| c.channel_state(side).is_ok()).await;
    let mut phone = second_device(&dir.join("phone"), &a, &mut laptop).await;
    let phone_id = phone.device_id();
    laptop.sync().await.unwrap();
    sync_until(&mut bob, "adding the phone", |c| {
        c.members(side).unwrap().contains(&phone_id)
    })
    .await;
    sync_until(&mut phone, "the phone joining", |c| {
        c.channel_state(side).is_ok()
    })
    .await;
    (cluster, laptop, bob, phone, side)
}

/// Waits (bounded) until b.test, Bob's server, stores more than `count`
/// messages of `channel`, without Bob's client processing them.
async fn stored_beyond(bob: &Client, channel: ChannelId, count: usize) {
    for _ in 0..300 {
        let stored = bob
            .api()
            .channel_messages(&channel.to_string(), 0)
            .await
            .unwrap();
        if stored.len() > count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the message never reached b.test");
}

fn server_name(name: &str) -> kith_proto::ServerName {
    name.parse().unwrap()
}

/// While Alice's server is unreachable, Bob's server answers for her from
/// its cache, which still lists the removed phone: Bob's client keeps the
/// laptop's remove-device request instead of dropping it, and honours it
/// on a later sync, once the directory (a.test reached again) no longer
/// lists the phone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remove_request_checked_against_a_stale_cache_is_kept_for_later() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let (_cluster, mut laptop, mut bob, phone, side) =
        alice_in_bobs_channel(dir.path(), &faults).await;
    let phone_id = phone.device_id();
    let (a, b) = (server_name("a.test"), server_name("b.test"));

    let count = bob
        .api()
        .channel_messages(&side.to_string(), 0)
        .await
        .unwrap()
        .len();
    let removal = laptop.remove_device(phone_id).await.unwrap();
    assert_eq!(removal.requested, vec![side]);
    stored_beyond(&bob, side, count).await;

    // b.test can no longer reach a.test: it answers for Alice from its
    // cache, phone included. Bob's client does not act, nor forget.
    faults.cut(&b, &a);
    assert!(ids(&bob.user_devices("alice@a.test").await.unwrap()).contains(&phone_id));
    let report = bob.sync().await.unwrap();
    assert!(report.removed_devices.is_empty(), "{report:?}");
    assert!(bob.members(side).unwrap().contains(&phone_id));
    let report = bob.sync().await.unwrap();
    assert!(report.removed_devices.is_empty(), "{report:?}");

    // a.test reachable again: its directory no longer lists the phone. The
    // kept request waits out its back-off (a minute) on the next sync, and
    // is honoured once it is due.
    faults.heal(&b, &a);
    let report = bob.sync().await.unwrap();
    assert!(report.removed_devices.is_empty(), "{report:?}");
    bob.recheck_kept_requests().unwrap();
    let report = bob.sync().await.unwrap();
    assert_eq!(report.removed_devices, vec![(side, phone_id)]);
    assert!(!bob.members(side).unwrap().contains(&phone_id));
    // Done once: nothing is left to retry.
    let report = bob.sync().await.unwrap();
    assert!(report.removed_devices.is_empty(), "{report:?}");
    sync_until(&mut laptop, "seeing the removal", |c| {
        !c.members(side).unwrap().contains(&phone_id)
    })
    .await;
}

/// A remote device's removal travels with its record: Bob's server passes
/// `removed_at` on from Alice's, and keeps it, so that while a.test is
/// unreachable its cached answers leave the phone out and still mark it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remote_devices_removal_is_passed_through_and_cached() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let (_cluster, mut laptop, mut bob, phone, _side) =
        alice_in_bobs_channel(dir.path(), &faults).await;
    let phone_id = phone.device_id();
    let laptop_id = laptop.device_id();
    let (_, before) = bob
        .api()
        .device_status(&phone_id.to_string())
        .await
        .unwrap();
    assert_eq!(before, None);

    laptop.remove_device(phone_id).await.unwrap();
    let (_, removed_at) = bob
        .api()
        .device_status(&phone_id.to_string())
        .await
        .unwrap();
    let removed_at = removed_at.expect("b.test passes removed_at on");
    let (status, body) = get(
        &format!("{}/v0/devices/{phone_id}", laptop.server_url()),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["removed_at"].as_u64(), Some(removed_at));

    faults.cut(&server_name("b.test"), &server_name("a.test"));
    assert_eq!(
        ids(&bob.user_devices("alice@a.test").await.unwrap()),
        vec![laptop_id]
    );
    let (_, cached) = bob
        .api()
        .device_status(&phone_id.to_string())
        .await
        .unwrap();
    assert_eq!(cached, Some(removed_at));
    let (_, laptop_mark) = bob
        .api()
        .device_status(&laptop_id.to_string())
        .await
        .unwrap();
    assert_eq!(laptop_mark, None);
}

/// Alice's server stopped and Bob's server holding no copy of her records
/// (its operator made it forget them): the directory lookup that checks
/// the laptop's remove-device request is answered 502 `remote_unavailable`
/// by Bob's own (reachable) server, and so is a lookup of one of her
/// devices, a member of Bob's channel (b.test could not ask; it is not "no
/// such device"). Bob's sync still succeeds, processing its events, and
/// keeps the request; once a.test is back, a later sync honours it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_users_server_is_down_is_kept_and_the_sync_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let (mut cluster, mut laptop, mut bob, phone, side) =
        alice_in_bobs_channel(dir.path(), &faults).await;
    let phone_id = phone.device_id();

    let count = bob
        .api()
        .channel_messages(&side.to_string(), 0)
        .await
        .unwrap()
        .len();
    let removal = laptop.remove_device(phone_id).await.unwrap();
    assert_eq!(removal.requested, vec![side]);
    stored_beyond(&bob, side, count).await;

    // a.test goes down; b.test forgets what it cached of Alice's records.
    let a_down = cluster.take("a.test").stop_keeping().await;
    let b_down = cluster.take("b.test").stop_keeping().await;
    let forgotten = kith_testkit::admin::forget_remote_records(
        &dir.path().join("b.test"),
        &server_name("a.test"),
    )
    .unwrap();
    assert!(forgotten >= 2, "{forgotten}");
    cluster.put(b_down.start().await);
    let unavailable = |e: &ClientError| matches!(e, ClientError::Server { status: 502, code, .. } if code == "remote_unavailable");
    let refused = bob.user_devices("alice@a.test").await.unwrap_err();
    assert!(unavailable(&refused), "{refused}");
    let laptop_id = laptop.device_id().to_string();
    let refused = bob.api().device_record(&laptop_id).await.unwrap_err();
    assert!(unavailable(&refused), "{refused}");
    // A device nothing here names is still unknown.
    let nobody = DeviceId::from_bytes([7; 32]).to_string();
    let refused = bob.api().device_record(&nobody).await.unwrap_err();
    assert!(
        matches!(refused, ClientError::Server { status: 404, .. }),
        "{refused}"
    );

    // Bob's sync succeeds (every time) and keeps the request.
    for _ in 0..2 {
        let report = bob.sync().await.unwrap();
        assert!(report.removed_devices.is_empty(), "{report:?}");
        assert!(bob.members(side).unwrap().contains(&phone_id));
    }

    // a.test back: the kept request is honoured once its back-off is over
    // (made due here rather than waited for).
    cluster.put(a_down.start().await);
    bob.recheck_kept_requests().unwrap();
    let report = bob.sync().await.unwrap();
    assert_eq!(report.removed_devices, vec![(side, phone_id)]);
    assert!(!bob.members(side).unwrap().contains(&phone_id));
    let report = bob.sync().await.unwrap();
    assert!(report.removed_devices.is_empty(), "{report:?}");
    // Asked, a.test says it has no such device: that is 404.
    let (status, _) = get(
        &format!("{}/v0/devices/{nobody}?server=a.test", bob.server_url()),
        None,
    )
    .await;
    assert_eq!(status, 404);
}
