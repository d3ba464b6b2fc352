//! A homeserver that hands its user a commit whose ordering certificate
//! does not verify cannot make the client merge it. The hostile server is a
//! proxy in front of a real `kithd` that corrupts every certificate on its
//! way to one client.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kith_client::Client;
use kith_proto::events::{EventFrame, OCTET_STREAM, decode_frames, encode_frame};
use kith_testkit::TestServer;
use serde_json::Value;

#[derive(Clone)]
struct Proxy {
    upstream: String,
    tamper: Arc<AtomicBool>,
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

#[tokio::test]
async fn a_commit_with_a_forged_certificate_is_never_merged() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let tamper = Arc::new(AtomicBool::new(false));
    let proxy = Proxy {
        upstream: server.url().to_owned(),
        tamper: Arc::clone(&tamper),
        http: reqwest::Client::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(listener, app).await });

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
