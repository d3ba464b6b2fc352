//! The client API end to end: real servers on loopback, driven over HTTP.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{Device, TestServer, assert_error, b64, client, now_ms, record_of, send, unb64};
use kith_proto::{DeviceId, ServerKeysIn, SponsorshipIn};
use kith_server::{Backend, Registration};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn server_info_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let (status, info) = send(client().get(server.url("/v0/server"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["name"], "a.example");
    assert_eq!(info["version"], 0);
    assert_eq!(info["registration"], "open");
    let keys = ServerKeysIn::decode(&unb64(info["server_keys"].as_str().unwrap()))
        .unwrap()
        .verify(now_ms())
        .unwrap();
    assert_eq!(keys.server().as_str(), "a.example");

    let raw = client()
        .get(server.url("/.well-known/kith/server-keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::OK);
    assert_eq!(
        raw.headers()["content-type"].to_str().unwrap(),
        "application/octet-stream"
    );
    assert_eq!(raw.bytes().await.unwrap().to_vec(), keys.encode());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(kith_server::KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    server.stop().await;
}

#[tokio::test]
async fn register_login_publish_and_fetch() {
    let dir = tempfile::tempdir().unwrap();
    // Another server's name resolves to a closed loopback port.
    let server = TestServer::start_with(dir.path(), "a.example", |c| {
        c.resolve.insert(
            "elsewhere.example".parse().unwrap(),
            "http://127.0.0.1:1".into(),
        );
    })
    .await;
    let mut alice = Device::new();
    let (status, body) = alice.register_raw(&server, "Alice", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["handle"], "alice@a.example");
    let sponsorship = SponsorshipIn::decode(&unb64(body["sponsorship"].as_str().unwrap()))
        .unwrap()
        .verify(&alice.id, now_ms())
        .unwrap();
    assert_eq!(sponsorship.handle().to_string(), "alice@a.example");
    // The sponsorship's key is the one the server publishes.
    let (_, info) = send(client().get(server.url("/v0/server"))).await;
    let keys = ServerKeysIn::decode(&unb64(info["server_keys"].as_str().unwrap()))
        .unwrap()
        .verify(now_ms())
        .unwrap();
    sponsorship.check_server_keys(&keys).unwrap();

    // Registering again is idempotent.
    let (status, again) = alice.register_raw(&server, "alice", None).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["handle"], "alice@a.example");

    // Until the sponsored record is published, the user has no devices.
    let (status, _) = send(client().get(server.url("/v0/users/alice@a.example"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    alice.login(&server).await;
    alice.publish(&server, sponsorship).await;
    let (status, body) = alice.put_record(&server, &alice.record).await;
    assert_eq!(
        (status, &body["result"]),
        (StatusCode::OK, &json!("unchanged"))
    );

    let bob = Device::join(&server, "bob").await;

    let (status, body) = send(client().get(server.url(&format!("/v0/devices/{}", alice.id)))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(record_of(&body["record"]), alice.record);

    for (device, handle) in [(&alice, "alice@a.example"), (&bob, "bob@a.example")] {
        let (status, body) = send(client().get(server.url(&format!("/v0/users/{handle}")))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let records = body["records"].as_array().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(record_of(&records[0]), device.record);
    }

    let unknown = DeviceId::from_bytes([9; 32]);
    assert_error(
        &send(client().get(server.url(&format!("/v0/devices/{unknown}")))).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &send(client().get(server.url("/v0/users/carol@a.example"))).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // Another server's handle is asked of that server (tests/federation.rs);
    // one that cannot be reached is 502.
    assert_error(
        &send(client().get(server.url("/v0/users/alice@elsewhere.example"))).await,
        StatusCode::BAD_GATEWAY,
        "remote_unavailable",
    );
    server.stop().await;
}

#[tokio::test]
async fn name_taken() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let alice = Device::join(&server, "alice").await;
    let mallory = Device::new();
    assert_error(
        &mallory.register_raw(&server, "alice", None).await,
        StatusCode::CONFLICT,
        "name_taken",
    );
    // A registered device cannot take a second name either.
    assert_error(
        &alice.register_raw(&server, "alice2", None).await,
        StatusCode::CONFLICT,
        "conflict",
    );
    server.stop().await;
}

#[tokio::test]
async fn closed_registration_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let closed = TestServer::start_with(dir.path(), "closed.example", |c| {
        c.registration = Registration::Closed;
    })
    .await;
    let (_, info) = send(client().get(closed.url("/v0/server"))).await;
    assert_eq!(info["registration"], "closed");
    let device = Device::new();
    assert_error(
        &device
            .register_raw(&closed, "alice", Some("anything"))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    closed.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let by_token = TestServer::start_with(dir.path(), "token.example", |c| {
        c.registration = Registration::Token("let-me-in".into());
    })
    .await;
    let (_, info) = send(client().get(by_token.url("/v0/server"))).await;
    assert_eq!(info["registration"], "token");
    assert_error(
        &device.register_raw(&by_token, "alice", None).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &device.register_raw(&by_token, "alice", Some("wrong")).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (status, body) = device
        .register_raw(&by_token, "alice", Some("let-me-in"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    by_token.stop().await;
}

#[tokio::test]
async fn login_rejects_bad_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let alice = Device::join(&server, "alice").await;
    let impostor = Device::new();

    // Signed by the wrong key.
    let (challenge, expires_at) = alice.login_challenge(&server).await;
    let wrong = impostor.answer(&server, &challenge, expires_at);
    assert_error(
        &alice.login_raw(&server, &challenge, &wrong).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    // The challenge was used up by the failed attempt.
    let right = alice.answer(&server, &challenge, expires_at);
    assert_error(
        &alice.login_raw(&server, &challenge, &right).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    // An answer bound to another server name is refused.
    let (challenge, expires_at) = alice.login_challenge(&server).await;
    let other = kith_proto::LoginChallenge::new(
        "b.example".parse().unwrap(),
        alice.id,
        challenge.as_slice().try_into().unwrap(),
        expires_at,
    )
    .sign(&alice.key);
    assert_error(
        &alice.login_raw(&server, &challenge, &other).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    // A challenge never issued.
    assert_error(
        &alice.login_raw(&server, &[0; 32], &right).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    // Unknown devices get no challenge.
    assert_error(
        &send(
            client()
                .post(server.url("/v0/login/challenge"))
                .json(&json!({ "device": impostor.id.to_string() })),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    // Endpoints that need a session refuse a missing or unknown token.
    assert_error(
        &impostor.get(&server, "/v0/inbox").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &send(client().get(server.url("/v0/inbox")).bearer_auth("bogus")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    server.stop().await;
}

#[tokio::test]
async fn record_updates_follow_the_update_rule() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let mut alice = Device::join(&server, "alice").await; // holds sequence 2
    let v3 = alice.next_record(|f| f.display_name = "v3".into());
    assert_eq!(alice.put_record(&server, &v3).await.1["result"], "newer");
    let old = std::mem::replace(&mut alice.record, v3.clone());

    // Rollback to sequence 2.
    assert_error(
        &alice.put_record(&server, &old).await,
        StatusCode::CONFLICT,
        "sequence_went_backwards",
    );
    // Another record with sequence 3.
    let mut fork = v3.fields();
    fork.display_name = "fork".into();
    let fork = kith_proto::DeviceRecord::sign(&alice.key, fork, now_ms()).unwrap();
    assert_error(
        &alice.put_record(&server, &fork).await,
        StatusCode::CONFLICT,
        "equivocation",
    );
    // Without this server's sponsorship.
    let unsponsored = alice.next_record(|f| f.sponsorships.clear());
    assert_error(
        &alice.put_record(&server, &unsponsored).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // Another device's record.
    let bob = Device::join(&server, "bob").await;
    assert_error(
        &alice.put_record(&server, &bob.record).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    // Not a record at all.
    assert_error(
        &alice
            .post(
                &server,
                "/v0/register",
                json!({ "record": b64(b"junk"), "name": "x" }),
            )
            .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    // Through all of that, the held record stayed v3.
    let (_, body) = send(client().get(server.url(&format!("/v0/devices/{}", alice.id)))).await;
    assert_eq!(record_of(&body["record"]), v3);
    server.stop().await;
}

#[tokio::test]
async fn key_packages_are_claimed_once_then_last_resort() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), "a.example", |c| {
        c.limits.max_key_package_bytes = 64;
        c.limits.max_key_packages_per_upload = 3;
    })
    .await;
    let alice = Device::join(&server, "alice").await;
    let bob = Device::join(&server, "bob").await;

    let (status, body) = alice
        .post(
            &server,
            "/v0/keypackages",
            json!({ "packages": [b64(b"kp1"), b64(b"kp2")], "last_resort": b64(b"lr") }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stored"], 3);
    let (_, count) = alice.get(&server, "/v0/keypackages/count").await;
    assert_eq!(count, json!({ "available": 2, "last_resort": true }));

    let claim = json!({ "handle": "alice@a.example" });
    let mut got = Vec::new();
    for _ in 0..4 {
        let (status, body) = bob
            .post(&server, "/v0/keypackages/claim", claim.clone())
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let packages = body["packages"].as_array().unwrap();
        assert_eq!(packages.len(), 1);
        assert_eq!(packages[0]["device"], alice.id.to_string());
        assert!(body["exhausted"].as_array().unwrap().is_empty());
        got.push((
            unb64(packages[0]["package"].as_str().unwrap()),
            packages[0]["last_resort"].as_bool().unwrap(),
        ));
    }
    assert_eq!(
        got,
        vec![
            (b"kp1".to_vec(), false),
            (b"kp2".to_vec(), false),
            (b"lr".to_vec(), true),
            (b"lr".to_vec(), true),
        ]
    );

    // Bob uploaded nothing: exhausted.
    let (status, body) = alice
        .post(
            &server,
            "/v0/keypackages/claim",
            json!({ "handle": "bob@a.example" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["packages"].as_array().unwrap().is_empty());
    assert_eq!(body["exhausted"], json!([bob.id.to_string()]));

    // A claim narrowed to devices: only those of the user (a device that
    // is not the user's finds nothing); bad lists are refused.
    let (status, body) = bob
        .post(
            &server,
            "/v0/keypackages/claim",
            json!({ "handle": "alice@a.example", "devices": [alice.id.to_string()] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["packages"][0]["device"], alice.id.to_string());
    assert_error(
        &bob.post(
            &server,
            "/v0/keypackages/claim",
            json!({ "handle": "alice@a.example", "devices": [bob.id.to_string()] }),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    for devices in [json!([]), json!(["zz"]), json!([1])] {
        let (status, body) = bob
            .post(
                &server,
                "/v0/keypackages/claim",
                json!({ "handle": "alice@a.example", "devices": devices }),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{devices}: {body}");
    }

    // Limits and bad input.
    assert_error(
        &alice
            .post(
                &server,
                "/v0/keypackages",
                json!({ "packages": [b64(&[0; 65])] }),
            )
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    let four: Vec<String> = (0..4u8).map(|i| b64(&[i])).collect();
    assert_error(
        &alice
            .post(&server, "/v0/keypackages", json!({ "packages": four }))
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    assert_error(
        &alice
            .post(
                &server,
                "/v0/keypackages",
                json!({ "packages": ["not base64!"] }),
            )
            .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &alice
            .post(
                &server,
                "/v0/keypackages/claim",
                json!({ "handle": "carol@a.example" }),
            )
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &alice
            .post(
                &server,
                "/v0/keypackages/claim",
                json!({ "handle": "no handle" }),
            )
            .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    // The refused uploads stored nothing.
    let (_, count) = alice.get(&server, "/v0/keypackages/count").await;
    assert_eq!(count, json!({ "available": 0, "last_resort": true }));
    server.stop().await;
}

#[tokio::test]
async fn inbox_deposit_list_delete() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), "a.example", |c| {
        c.limits.max_envelope_bytes = 1024;
    })
    .await;
    let alice = Device::join(&server, "alice").await;
    let bob = Device::join(&server, "bob").await;

    let (status, first) = bob.deposit(&server, &alice.id, b"sealed 1").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, second) = bob.deposit(&server, &alice.id, b"sealed 2").await;
    assert!(second["id"].as_u64().unwrap() > first["id"].as_u64().unwrap());

    let (status, body) = alice.get(&server, "/v0/inbox").await;
    assert_eq!(status, StatusCode::OK);
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], first["id"]);
    assert_eq!(unb64(items[0]["envelope"].as_str().unwrap()), b"sealed 1");
    assert!(items[0]["received_at"].as_u64().unwrap() > 0);
    // Bob's inbox is his own.
    assert!(
        bob.get(&server, "/v0/inbox").await.1["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let delete = |device: &Device, id: &serde_json::Value| {
        let req = device.http.delete(server.url(&format!("/v0/inbox/{id}")));
        device.authed(req)
    };
    // Bob cannot delete Alice's item; deleting is idempotent.
    assert_eq!(
        delete(&bob, &first["id"]).send().await.unwrap().status(),
        204
    );
    assert_eq!(
        delete(&alice, &first["id"]).send().await.unwrap().status(),
        204
    );
    assert_eq!(
        delete(&alice, &first["id"]).send().await.unwrap().status(),
        204
    );
    let (_, body) = alice.get(&server, "/v0/inbox").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    assert_eq!(body["items"][0]["id"], second["id"]);

    assert_error(
        &bob.deposit(&server, &DeviceId::from_bytes([1; 32]), b"x")
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &bob.deposit(&server, &alice.id, &[0; 1025]).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    assert_error(
        &Device::new()
            .deposit(&server, &alice.id, b"anonymous")
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_error(
        &send(delete(&alice, &json!("nope"))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    server.stop().await;
}

#[tokio::test]
async fn inbox_deposits_are_rate_limited_per_sender() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), "a.example", |c| {
        c.limits.inbox_deposit_burst = 2;
        c.limits.inbox_deposits_per_minute = 1;
    })
    .await;
    let alice = Device::join(&server, "alice").await;
    let bob = Device::join(&server, "bob").await;
    let carol = Device::join(&server, "carol").await;
    for _ in 0..2 {
        assert_eq!(
            bob.deposit(&server, &alice.id, b"hi").await.0,
            StatusCode::OK
        );
    }
    let limited = bob.deposit(&server, &alice.id, b"hi").await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 0);
    // Another sender has its own bucket.
    assert_eq!(
        carol.deposit(&server, &alice.id, b"hi").await.0,
        StatusCode::OK
    );
    let (_, body) = alice.get(&server, "/v0/inbox").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn garbage_and_oversized_bodies_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), "a.example", |c| {
        c.limits.max_body_bytes = 4096;
        c.backend = Backend::Memory;
    })
    .await;
    let http = client();
    let register = server.url("/v0/register");
    let cases = [
        http.post(&register)
            .header("content-type", "application/json")
            .body("{not json"),
        http.post(&register)
            .header("content-type", "application/json")
            .body("[1,2,3]"),
        http.post(&register)
            .json(&json!({ "record": 5, "name": "alice" })),
        http.post(&register)
            .json(&json!({ "record": "", "name": "alice", "extra": 1 })),
        http.post(&register)
            .json(&json!({ "record": "!!!", "name": "alice" })),
        http.post(&register)
            .json(&json!({ "record": b64(&[0, 0, 1]), "name": "alice" })),
        http.post(&register)
            .json(&json!({ "record": b64(&[0, 7]), "name": "alice" })),
        http.post(&register).body("no content type"),
    ];
    for case in cases {
        assert_error(&send(case).await, StatusCode::BAD_REQUEST, "bad_request");
    }
    let device = Device::new();
    assert_error(
        &send(http.post(&register).json(&json!({
            "record": b64(&device.record.encode()), "name": "not a name!"
        })))
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let big = json!({ "record": "A".repeat(5000), "name": "alice" });
    assert_error(
        &send(http.post(&register).json(&big)).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
    );
    // Other paths: unknown routes, wrong methods, bad path parameters.
    assert_error(
        &send(http.get(server.url("/v0/nothing"))).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &send(http.delete(server.url("/v0/server"))).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    assert_error(
        &send(http.get(server.url("/v0/devices/xyz"))).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    // None of it registered anything.
    let metrics = http.get(server.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(text.contains("kith_registered_devices 0"), "{text}");
    let (status, _) = device.register_raw(&server, "alice", None).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let alice = Device::join(&server, "alice").await;
    let bob = Device::join(&server, "bob").await;
    bob.deposit(&server, &alice.id, b"x").await;
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "kith_registered_devices 2",
        "kith_inbox_deposits_total 1",
        "kith_event_streams_connected 0",
        "kith_http_requests_total{method=\"POST\",status=\"200\"}",
        "kith_storage_seconds_count",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    server.stop().await;
}
