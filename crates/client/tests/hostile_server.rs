//! A homeserver that hands its user a commit whose ordering certificate
//! does not verify cannot make the client merge it. The hostile server is a
//! proxy in front of a real `kithd` that corrupts every certificate on its
//! way to one client. The same proxy also slips a made-up `device_removed`
//! event into a client's event stream: the client checks the directory
//! before it acts on one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kith_client::{Client, ClientError};
use kith_proto::events::{EventFrame, OCTET_STREAM, decode_frames, encode_frame};
use kith_testkit::TestServer;
use serde_json::Value;

#[derive(Clone)]
struct Proxy {
    upstream: String,
    tamper: Arc<AtomicBool>,
    /// An event to slip, once, into the next non-empty binary page of
    /// events (before its last event, with that event's cursor, so that
    /// no real event is skipped).
    inject: Arc<Mutex<Option<Value>>>,
    http: reqwest::Client,
}

/// Flips a bit in every `certificate` field in the answer.
fn corrupt(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "certificate"
                    && let Some(text) = v.as_str()
                {
                    let mut bytes = URL_SAFE_NO_PAD.decode(text).unwrap();
                    if let Some(last) = bytes.last_mut() {
                        *last ^= 1;
                    }
                    *v = Value::String(URL_SAFE_NO_PAD.encode(bytes));
                } else {
                    corrupt(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(corrupt),
        _ => {}
    }
}

async fn forward(State(proxy): State<Proxy>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let headers = request.headers().clone();
    let body: Bytes = axum::body::to_bytes(request.into_body(), 1 << 24)
        .await
        .unwrap();
    let mut upstream = proxy
        .http
        .request(method, format!("{}{path}", proxy.upstream))
        .body(body.to_vec());
    for name in ["authorization", "content-type", "accept"] {
        if let Some(value) = headers.get(name) {
            upstream = upstream.header(name, value.as_bytes());
        }
    }
    let answer = upstream.send().await.unwrap();
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
    let binary = answer
        .headers()
        .get("content-type")
        .is_some_and(|v| v == OCTET_STREAM);
    let bytes = answer.bytes().await.unwrap();
    if binary {
        // Binary event frames: commits travel as JSON frames, corrupted
        // like any other JSON answer.
        let mut frames = decode_frames(&bytes).unwrap();
        if let Some(last) = frames.last().map(EventFrame::cursor)
            && let Some(mut event) = proxy.inject.lock().unwrap().take()
        {
            event["cursor"] = last.into();
            let at = frames.len() - 1;
            frames.insert(
                at,
                EventFrame::Json {
                    cursor: last,
                    json: event.to_string(),
                },
            );
        }
        if proxy.tamper.load(Ordering::SeqCst) {
            for frame in &mut frames {
                if let EventFrame::Json { json, .. } = frame {
                    let mut value: Value = serde_json::from_str(json).unwrap();
                    corrupt(&mut value);
                    *json = value.to_string();
                }
            }
        }
        let mut body = Vec::new();
        for frame in &frames {
            encode_frame(frame, &mut body);
        }
        return (status, [("content-type", OCTET_STREAM)], body).into_response();
    }
    if proxy.tamper.load(Ordering::SeqCst)
        && let Ok(mut json) = serde_json::from_slice::<Value>(&bytes)
    {
        corrupt(&mut json);
        return (
            status,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response();
    }
    (status, [("content-type", "application/json")], bytes).into_response()
}

/// Serves `proxy` on a loopback port; returns its URL.
async fn serve(proxy: Proxy) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn a_commit_with_a_forged_certificate_is_never_merged() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let tamper = Arc::new(AtomicBool::new(false));
    let proxy = Proxy {
        upstream: server.url().to_owned(),
        tamper: Arc::clone(&tamper),
        inject: Arc::default(),
        http: reqwest::Client::new(),
    };
    let proxy_url = serve(proxy).await;

    let mut alice = Client::register(&dir.path().join("alice"), server.url(), "alice", None)
        .await
        .unwrap();
    // Bob reaches the homeserver only through the hostile proxy.
    let mut bob = Client::register(&dir.path().join("bob"), &proxy_url, "bob", None)
        .await
        .unwrap();
    let channel = alice.create_channel("watched", "text/plain").await.unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    bob.sync().await.unwrap();
    let (before, _) = bob.channel_state(channel).unwrap();

    // Alice's commit is accepted; Bob gets it with a corrupted certificate,
    // over the event stream and from the commit list alike.
    tamper.store(true, Ordering::SeqCst);
    alice.self_update(channel).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(
        bob.channel_state(channel).unwrap().0,
        before,
        "merged a commit with a forged certificate"
    );
    assert!(bob.catch_up(channel).await.is_err());
    assert_eq!(bob.channel_state(channel).unwrap().0, before);
    // Bob's own commit, certified falsely, is not merged either.
    assert!(bob.self_update(channel).await.is_err());
    assert_eq!(bob.channel_state(channel).unwrap().0, before);

    // With honest answers again, Bob catches up to exactly Alice's state.
    tamper.store(false, Ordering::SeqCst);
    bob.catch_up(channel).await.unwrap();
    alice.sync().await.unwrap();
    assert_eq!(
        bob.channel_state(channel).unwrap(),
        alice.channel_state(channel).unwrap()
    );
    bob.send(channel, b"back on track").await.unwrap();
    alice.sync().await.unwrap();
    let last = alice.messages(channel, 1).unwrap();
    assert_eq!(last[0].body, b"back on track");
    server.stop().await;
}

/// A `device_removed` event (spec §6.8) is the homeserver's word alone: a
/// device acts on it (drops its link, removes the device from its
/// channels) only once the directory no longer lists the device (§5.7).
/// Here the event is made up on the way, and the directory still lists the
/// phone: the laptop keeps it.
#[tokio::test]
async fn a_device_removed_event_for_a_listed_device_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let inject = Arc::new(Mutex::new(None));
    let proxy_url = serve(Proxy {
        upstream: server.url().to_owned(),
        tamper: Arc::default(),
        inject: Arc::clone(&inject),
        http: reqwest::Client::new(),
    })
    .await;
    // The laptop reaches its homeserver only through the proxy.
    let mut laptop = Client::register(&dir.path().join("laptop"), &proxy_url, "alice", None)
        .await
        .unwrap();
    let phone_home = dir.path().join("phone");
    let phone_id = match Client::register(&phone_home, server.url(), "alice", None).await {
        Err(ClientError::NameTaken { device, .. }) => device,
        other => panic!("expected name_taken, got {:?}", other.map(|_| ())),
    };
    assert!(laptop.link_device(phone_id).await.unwrap());
    let mut phone = Client::register(&phone_home, server.url(), "alice", None)
        .await
        .unwrap();
    let general = laptop
        .create_channel("general", "text/plain")
        .await
        .unwrap();
    laptop.sync().await.unwrap();
    phone.sync().await.unwrap();
    assert!(laptop.members(general).unwrap().contains(&phone_id));

    // A message gives the laptop's next page of events something to carry
    // the made-up event.
    phone.send(general, b"still mine").await.unwrap();
    *inject.lock().unwrap() = Some(serde_json::json!({
        "kind": "device_removed",
        "device": phone_id.to_string(),
        "by": laptop.device_id().to_string(),
        "removed_at": 1,
    }));
    let report = laptop.sync().await.unwrap();
    assert!(
        inject.lock().unwrap().is_none(),
        "the event was not slipped in"
    );
    assert!(report.removed_devices.is_empty(), "{report:?}");
    assert!(laptop.record().unwrap().links_to(&phone_id));
    assert!(laptop.members(general).unwrap().contains(&phone_id));
    assert_eq!(laptop.messages(general, 1).unwrap()[0].body, b"still mine");
    // Nor does a later sync act on it.
    let report = laptop.sync().await.unwrap();
    assert!(report.removed_devices.is_empty(), "{report:?}");
    assert_eq!(laptop.user_devices("alice@a.test").await.unwrap().len(), 2);
    server.stop().await;
}
