//! Federation between real homeservers on loopback (testkit clusters with a
//! resolve map): remote users, devices and key-package claims, inbox
//! deposits through the durable outbox (also across restarts), signed
//! request checks, and blocking.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Device, TIMEOUT, TestServer, b64, client, now_ms, record_of, send, unb64};
use kith_proto::{FederationRequest, SecretKey, ServerName};
use kith_server::Config;
use kith_testkit::Cluster;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn fast_retries(config: &mut Config) {
    config.federation.retry_base_ms = 50;
    config.federation.retry_max_ms = 300;
    config.federation.request_timeout_ms = 5_000;
    config.federation.connect_timeout_ms = 1_000;
}

fn view(cluster: &Cluster, name: &str) -> TestServer {
    let s = cluster.server(name);
    TestServer::view(s.url(), s.name())
}

/// Waits (bounded) until `f` returns `Some`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn inbox_events(device: &Device, server: &TestServer) -> Vec<Value> {
    let (status, body) = device.get(server, "/v0/events").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "inbox")
        .cloned()
        .collect()
}

async fn upload_packages(device: &Device, server: &TestServer, n: u8) {
    let packages: Vec<String> = (1..=n).map(|i| b64(&[i; 8])).collect();
    let (status, body) = device
        .post(
            server,
            "/v0/keypackages",
            json!({ "packages": packages, "last_resort": b64(b"last") }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn remote_users_devices_claims_and_deposits() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], fast_retries).await;
    let (a, b, c) = (
        view(&cluster, "a.test"),
        view(&cluster, "b.test"),
        view(&cluster, "c.test"),
    );
    let alice = Device::join(&a, "alice").await;
    let bob = Device::join(&b, "bob").await;
    let carol = Device::join(&c, "carol").await;
    upload_packages(&bob, &b, 2).await;

    // alice, on a.test, looks bob up through her own server.
    let (status, body) = alice.get(&a, "/v0/users/bob@b.test").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let records = body["records"].as_array().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(record_of(&records[0]), bob.record);
    // The record is cached: the device endpoint knows where to refresh it.
    let (status, body) = alice.get(&a, &format!("/v0/devices/{}", bob.id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(record_of(&body["record"]), bob.record);
    // A device never seen needs its server named; then it is fetched.
    let (status, _) = alice.get(&a, &format!("/v0/devices/{}", carol.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = alice
        .get(&a, &format!("/v0/devices/{}?server=c.test", carol.id))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(record_of(&body["record"]), carol.record);
    // Unknown users of another server are 404.
    let (status, _) = alice.get(&a, "/v0/users/nobody@b.test").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A newer record of bob replaces the cached one on the next lookup.
    let mut bob = bob;
    let newer = bob.next_record(|f| f.display_name = "bob's new name".into());
    assert_eq!(bob.put_record(&b, &newer).await.0, StatusCode::OK);
    bob.record = newer;
    let (_, body) = alice.get(&a, "/v0/users/bob@b.test").await;
    assert_eq!(
        record_of(&body["records"][0]).display_name(),
        "bob's new name"
    );

    // Claims go to bob's server: ordinary packages, then the last resort.
    for expected in [[1u8; 8].to_vec(), [2u8; 8].to_vec(), b"last".to_vec()] {
        let (status, body) = alice
            .post(
                &a,
                "/v0/keypackages/claim",
                json!({ "handle": "bob@b.test" }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let p = &body["packages"][0];
        assert_eq!(p["device"], bob.id.to_string());
        assert_eq!(unb64(p["package"].as_str().unwrap()), expected);
        assert_eq!(p["last_resort"], expected == b"last");
    }

    // A deposit for bob is queued at a.test and lands in bob's inbox.
    let (status, body) = alice.deposit(&a, &bob.id, b"sealed for bob").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["queued"], true);
    let events = eventually("bob's inbox event", || async {
        let events = inbox_events(&bob, &b).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        unb64(events[0]["envelope"].as_str().unwrap()),
        b"sealed for bob"
    );
    // carol, on a third server, reaches bob too.
    let (status, _) = carol.get(&c, "/v0/users/bob@b.test").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = carol.deposit(&c, &bob.id, b"from carol").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    eventually("bob's second inbox event", || async {
        (inbox_events(&bob, &b).await.len() == 2).then_some(())
    })
    .await;
    cluster.stop().await;
}

#[tokio::test]
async fn deposits_wait_in_the_outbox_while_the_receiver_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), &["a.test", "b.test"], fast_retries).await;
    let (a, b) = (view(&cluster, "a.test"), view(&cluster, "b.test"));
    let mut alice = Device::join(&a, "alice").await;
    let mut bob = Device::join(&b, "bob").await;
    let (status, _) = alice.get(&a, "/v0/users/bob@b.test").await;
    assert_eq!(status, StatusCode::OK);

    let b_down = cluster.take("b.test").stop_keeping().await;
    for n in 0..3u8 {
        let (status, body) = alice.deposit(&a, &bob.id, &[n; 4]).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    // The sender restarts too while the receiver is down: the queue is
    // durable.
    let a_server = cluster.take("a.test").restart().await;
    cluster.put(a_server);
    cluster.put(b_down.start().await);
    alice.login(&a).await;
    bob.login(&b).await;
    let events = eventually("three deposits after b.test is back", || async {
        let events = inbox_events(&bob, &b).await;
        (events.len() >= 3).then_some(events)
    })
    .await;
    let mut got: Vec<Vec<u8>> = events
        .iter()
        .map(|e| unb64(e["envelope"].as_str().unwrap()))
        .collect();
    got.sort();
    assert_eq!(got, vec![vec![0; 4], vec![1; 4], vec![2; 4]]);
    // Nothing is delivered twice, even with retries.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(inbox_events(&bob, &b).await.len(), 3);
    cluster.stop().await;
}

/// The signing key of a server, read from its data directory.
fn server_key(dir: &Path) -> SecretKey {
    let text = std::fs::read_to_string(dir.join(kith_server::KEY_FILE)).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut seed = [0u8; 32];
    hex::decode_to_slice(table["seed"].as_str().unwrap(), &mut seed).unwrap();
    SecretKey::from_seed(seed)
}

/// What a bad-request case sends and the error code it must get back.
type Case<'a> = (&'a str, (String, String), Vec<u8>, &'a str);

struct Forge<'a> {
    key: &'a SecretKey,
    origin: &'a str,
    signed_origin: &'a str,
    destination: &'a str,
    timestamp: u64,
    nonce: [u8; 16],
}

impl Forge<'_> {
    fn headers(&self, method: &str, path: &str, body: &[u8]) -> (String, String) {
        let request = FederationRequest::new(
            self.signed_origin.parse().unwrap(),
            self.destination.parse().unwrap(),
            method,
            path,
            body,
            self.timestamp,
            self.nonce,
        );
        (
            self.origin.to_owned(),
            b64(&request.sign(self.key).encode()),
        )
    }
}

async fn raw_post(
    base: &str,
    path: &str,
    body: &[u8],
    (origin, signature): (String, String),
) -> (StatusCode, Value) {
    send(
        client()
            .post(format!("{base}{path}"))
            .header("Kith-Origin", origin)
            .header("Kith-Signature", signature)
            .header("Content-Type", "application/json")
            .body(body.to_vec()),
    )
    .await
}

#[tokio::test]
async fn bad_federation_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test"], |c| {
        fast_retries(c);
        // A name that resolves to a closed port: its keys cannot be fetched.
        c.resolve.insert(
            "gone.test".parse::<ServerName>().unwrap(),
            "http://127.0.0.1:1".into(),
        );
    })
    .await;
    let b = view(&cluster, "b.test");
    let bob = Device::join(&b, "bob").await;
    let a_key = server_key(cluster.server("a.test").data_dir());
    let path = format!("/v0/federation/inbox/{}", bob.id);
    let body = json!({ "deposit_id": "00112233445566778899aabbccddeeff", "envelope": b64(b"hi") })
        .to_string()
        .into_bytes();
    let now = now_ms();
    let good = Forge {
        key: &a_key,
        origin: "a.test",
        signed_origin: "a.test",
        destination: "b.test",
        timestamp: now,
        nonce: [1; 16],
    };

    let stranger = SecretKey::generate();
    let cases: Vec<Case<'_>> = vec![
        (
            "signed by a key a.test does not publish",
            Forge {
                key: &stranger,
                nonce: [2; 16],
                ..good
            }
            .headers("POST", &path, &body),
            body.clone(),
            "bad_signature",
        ),
        (
            "stale",
            Forge {
                timestamp: now - 10 * 60 * 1000,
                nonce: [3; 16],
                ..good
            }
            .headers("POST", &path, &body),
            body.clone(),
            "stale_request",
        ),
        (
            "from the future",
            Forge {
                timestamp: now + 10 * 60 * 1000,
                nonce: [4; 16],
                ..good
            }
            .headers("POST", &path, &body),
            body.clone(),
            "stale_request",
        ),
        (
            "for another server",
            Forge {
                destination: "c.test",
                nonce: [5; 16],
                ..good
            }
            .headers("POST", &path, &body),
            body.clone(),
            "wrong_destination",
        ),
        (
            "header origin differs from the signed one",
            Forge {
                origin: "gone.test",
                nonce: [6; 16],
                ..good
            }
            .headers("POST", &path, &body),
            body.clone(),
            "bad_signature",
        ),
        (
            "claims an origin whose keys cannot be had",
            Forge {
                origin: "gone.test",
                signed_origin: "gone.test",
                nonce: [7; 16],
                ..good
            }
            .headers("POST", &path, &body),
            body.clone(),
            "unknown_origin",
        ),
        (
            "body changed after signing",
            Forge {
                nonce: [8; 16],
                ..good
            }
            .headers("POST", &path, &body),
            b"{\"deposit_id\":\"00112233445566778899aabbccddeeff\",\"envelope\":\"eHg\"}".to_vec(),
            "bad_signature",
        ),
        (
            "signed for another path",
            Forge {
                nonce: [9; 16],
                ..good
            }
            .headers("POST", "/v0/federation/inbox/00", &body),
            body.clone(),
            "bad_signature",
        ),
        (
            "garbage signature header",
            ("a.test".into(), "not-base64!".into()),
            body.clone(),
            "bad_signature",
        ),
    ];
    for (what, headers, sent_body, code) in cases {
        let got = raw_post(&b.base, &path, &sent_body, headers).await;
        assert_eq!(got.0, StatusCode::UNAUTHORIZED, "{what}: {}", got.1);
        assert_eq!(got.1["error"], code, "{what}: {}", got.1);
    }
    assert!(inbox_events(&bob, &b).await.is_empty());

    // The genuine request goes through once; its replay is refused.
    let headers = good.headers("POST", &path, &body);
    let got = raw_post(&b.base, &path, &body, headers.clone()).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["duplicate"], false);
    let replay = raw_post(&b.base, &path, &body, headers).await;
    assert_eq!(replay.0, StatusCode::UNAUTHORIZED, "{}", replay.1);
    assert_eq!(replay.1["error"], "replayed_request");
    // The same deposit re-sent in a fresh request is deduplicated.
    let again = Forge {
        nonce: [10; 16],
        ..good
    }
    .headers("POST", &path, &body);
    let got = raw_post(&b.base, &path, &body, again).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    assert_eq!(got.1["duplicate"], true);
    assert_eq!(inbox_events(&bob, &b).await.len(), 1);
    cluster.stop().await;
}

#[tokio::test]
async fn blocked_servers_are_refused_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], |config| {
        fast_retries(config);
        if config.server_name.as_str() == "c.test" {
            config
                .blocked_servers
                .insert("a.test".parse::<ServerName>().unwrap());
        }
    })
    .await;
    let (a, b, c) = (
        view(&cluster, "a.test"),
        view(&cluster, "b.test"),
        view(&cluster, "c.test"),
    );
    let alice = Device::join(&a, "alice").await;
    let bob = Device::join(&b, "bob").await;
    let carol = Device::join(&c, "carol").await;
    upload_packages(&carol, &c, 1).await;

    // a.test's requests are refused by c.test.
    for (status, body) in [
        alice.get(&a, "/v0/users/carol@c.test").await,
        alice
            .post(
                &a,
                "/v0/keypackages/claim",
                json!({ "handle": "carol@c.test" }),
            )
            .await,
        alice
            .get(&a, &format!("/v0/devices/{}?server=c.test", carol.id))
            .await,
    ] {
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"], "blocked", "{body}");
    }
    // c.test refuses to fetch, claim or deposit toward a.test.
    let (status, body) = carol.get(&c, "/v0/users/alice@a.test").await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::FORBIDDEN, json!("blocked"))
    );
    let (status, body) = carol
        .post(
            &c,
            "/v0/keypackages/claim",
            json!({ "handle": "alice@a.test" }),
        )
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::FORBIDDEN, json!("blocked"))
    );
    // A signed request from a.test straight to c.test: 403 blocked.
    let a_key = server_key(cluster.server("a.test").data_dir());
    let path = "/v0/federation/users/carol@c.test";
    let request = FederationRequest::new(
        "a.test".parse().unwrap(),
        "c.test".parse().unwrap(),
        "GET",
        path,
        b"",
        now_ms(),
        [1; 16],
    );
    let (status, body) = send(
        client()
            .get(format!("{}{path}", c.base))
            .header("Kith-Origin", "a.test")
            .header("Kith-Signature", b64(&request.sign(&a_key).encode())),
    )
    .await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::FORBIDDEN, json!("blocked"))
    );
    // Nothing was claimed, and b.test is unaffected.
    let (status, body) = bob
        .post(
            &b,
            "/v0/keypackages/claim",
            json!({ "handle": "carol@c.test" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        unb64(body["packages"][0]["package"].as_str().unwrap()),
        [1; 8]
    );
    cluster.stop().await;
}

/// Replaces a device's stored record in a stopped server's database, as a
/// compromised or buggy server might.
fn overwrite_record(data_dir: &Path, device: &kith_proto::DeviceId, record: &[u8]) {
    let db = rusqlite::Connection::open(data_dir.join(kith_server::DB_FILE)).unwrap();
    let changed = db
        .execute(
            "UPDATE devices SET record = ?1 WHERE device = ?2",
            rusqlite::params![record, device.as_bytes().as_slice()],
        )
        .unwrap();
    assert_eq!(changed, 1);
}

/// What another server sends is checked: a rolled-back record loses to the
/// cached newer one, and a sponsorship made with a key the server does not
/// publish is dropped.
#[tokio::test]
async fn remote_records_are_verified_and_never_go_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), &["a.test", "b.test"], fast_retries).await;
    let a = view(&cluster, "a.test");
    let b = view(&cluster, "b.test");
    let alice = Device::join(&a, "alice").await;
    let mut mallory = Device::join(&b, "mallory").await;
    let first = mallory.record.clone();
    let lookup = || alice.get(&a, "/v0/users/mallory@b.test");
    assert_eq!(record_of(&lookup().await.1["records"][0]), first);
    let second = mallory.next_record(|f| f.display_name = "second".into());
    assert_eq!(mallory.put_record(&b, &second).await.0, StatusCode::OK);
    mallory.record = second.clone();
    assert_eq!(record_of(&lookup().await.1["records"][0]), second);

    // b.test serves the older version again: a.test keeps the newer one.
    let b_dir = cluster.server("b.test").data_dir().to_owned();
    let stopped = cluster.take("b.test").stop_keeping().await;
    overwrite_record(&b_dir, &mallory.id, &first.encode());
    cluster.put(stopped.start().await);
    let (status, body) = lookup().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(record_of(&body["records"][0]), second);

    // b.test serves a record whose sponsorship a key it does not publish
    // signed: dropped, so the user has no valid record.
    let rogue = SecretKey::generate();
    let forged_sponsorship = kith_proto::Sponsorship::issue(
        &rogue,
        "b.test".parse().unwrap(),
        "mallory".parse().unwrap(),
        mallory.id,
        now_ms(),
        now_ms() + 3_600_000,
    );
    let forged = mallory.next_record(|f| f.sponsorships = vec![forged_sponsorship]);
    let stopped = cluster.take("b.test").stop_keeping().await;
    overwrite_record(&b_dir, &mallory.id, &forged.encode());
    cluster.put(stopped.start().await);
    let (status, body) = lookup().await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // The device endpoint still serves the last good record it cached.
    let (status, body) = alice.get(&a, &format!("/v0/devices/{}", mallory.id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(record_of(&body["record"]), second);
    cluster.stop().await;
}

/// Deposits from one origin server are rate limited (429, which the
/// sender's outbox retries later).
#[tokio::test]
async fn deposits_per_origin_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test"], |c| {
        fast_retries(c);
        c.limits.federation_deposits_per_minute = 2;
    })
    .await;
    let b = view(&cluster, "b.test");
    let bob = Device::join(&b, "bob").await;
    let a_key = server_key(cluster.server("a.test").data_dir());
    let path = format!("/v0/federation/inbox/{}", bob.id);
    for n in 0..3u8 {
        let body = json!({ "deposit_id": hex::encode([n; 16]), "envelope": b64(&[n]) })
            .to_string()
            .into_bytes();
        let headers = Forge {
            key: &a_key,
            origin: "a.test",
            signed_origin: "a.test",
            destination: "b.test",
            timestamp: now_ms(),
            nonce: [n; 16],
        }
        .headers("POST", &path, &body);
        let (status, answer) = raw_post(&b.base, &path, &body, headers).await;
        if n < 2 {
            assert_eq!(status, StatusCode::OK, "{answer}");
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
            assert_eq!(answer["error"], "rate_limited");
        }
    }
    assert_eq!(inbox_events(&bob, &b).await.len(), 2);
    cluster.stop().await;
}
