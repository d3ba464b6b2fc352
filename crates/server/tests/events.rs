//! The per-device event stream over HTTP and WebSocket, with acks and
//! resumption; and a restart of the server on the same data directory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{Device, TIMEOUT, TestServer, assert_error, client, send, unb64};
use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer, device: &Device, query: &str) -> Ws {
    let mut request = server
        .ws_url(&format!("/v0/events/ws{query}"))
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", device.token.as_ref().unwrap())
            .parse()
            .unwrap(),
    );
    let (ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap();
    ws
}

/// The next JSON text frame (skipping pings), within the timeout.
async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("an event arrives")
            .expect("the stream is open")
            .unwrap();
        match frame {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn ack(ws: &mut Ws, cursor: u64) {
    ws.send(Message::Text(json!({ "ack": cursor }).to_string().into()))
        .await
        .unwrap();
}

#[tokio::test]
async fn events_over_http_with_acks() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let alice = Device::join(&server, "alice").await;
    let bob = Device::join(&server, "bob").await;
    let (_, empty) = alice.get(&server, "/v0/events").await;
    assert_eq!(empty, json!({ "events": [], "next": 0 }));

    let mut ids = Vec::new();
    for i in 0..3u8 {
        ids.push(bob.deposit(&server, &alice.id, &[i]).await.1["id"].clone());
    }
    let (status, body) = alice.get(&server, "/v0/events?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["kind"], "inbox");
    assert_eq!(events[0]["id"], ids[0]);
    assert_eq!(unb64(events[0]["envelope"].as_str().unwrap()), [0]);
    assert!(events[0]["received_at"].as_u64().is_some());
    let c0 = events[0]["cursor"].as_u64().unwrap();
    let c1 = events[1]["cursor"].as_u64().unwrap();
    assert!(c1 > c0);
    assert_eq!(body["next"], c1);

    let (_, rest) = alice.get(&server, &format!("/v0/events?after={c1}")).await;
    assert_eq!(rest["events"].as_array().unwrap().len(), 1);
    assert_eq!(rest["events"][0]["id"], ids[2]);

    // Ack the first two; without `after`, reading resumes past the ack.
    let (status, acked) = alice
        .post(&server, "/v0/events/ack", json!({ "ack": c1 }))
        .await;
    assert_eq!((status, acked), (StatusCode::OK, json!({ "acked": c1 })));
    let (_, after_ack) = alice.get(&server, "/v0/events").await;
    assert_eq!(after_ack["events"].as_array().unwrap().len(), 1);
    // Acks never go backwards.
    let (_, acked) = alice
        .post(&server, "/v0/events/ack", json!({ "ack": c0 }))
        .await;
    assert_eq!(acked, json!({ "acked": c1 }));
    // Bob's log is his own.
    assert_eq!(bob.get(&server, "/v0/events").await.1["events"], json!([]));

    assert_error(
        &alice.get(&server, "/v0/events?after=minus-one").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &alice
            .post(&server, "/v0/events/ack", json!({ "ack": "x" }))
            .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    server.stop().await;
}

#[tokio::test]
async fn websocket_replays_then_streams_and_resumes_from_ack() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let alice = Device::join(&server, "alice").await;
    let bob = Device::join(&server, "bob").await;

    // One event before connecting: replayed from storage.
    bob.deposit(&server, &alice.id, b"stored").await;
    let mut ws = connect(&server, &alice, "").await;
    let first = next_event(&mut ws).await;
    assert_eq!(first["kind"], "inbox");
    assert_eq!(unb64(first["envelope"].as_str().unwrap()), b"stored");

    // Then live ones, as they are deposited.
    bob.deposit(&server, &alice.id, b"live 1").await;
    let second = next_event(&mut ws).await;
    assert_eq!(unb64(second["envelope"].as_str().unwrap()), b"live 1");
    bob.deposit(&server, &alice.id, b"live 2").await;
    let third = next_event(&mut ws).await;
    assert_eq!(unb64(third["envelope"].as_str().unwrap()), b"live 2");

    // Ack through the second, then drop the connection.
    ack(&mut ws, second["cursor"].as_u64().unwrap()).await;
    // A bad frame gets an error frame, and the stream goes on.
    ws.send(Message::Text("hello".into())).await.unwrap();
    let error = next_event(&mut ws).await;
    assert_eq!(error["error"], "bad_request");
    ws.close(None).await.unwrap();
    drop(ws);

    // The ack was recorded (the error frame came after it was processed).
    let (_, pending) = alice.get(&server, "/v0/events").await;
    let pending = pending["events"].as_array().unwrap().clone();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["cursor"], third["cursor"]);

    // While away, another deposit. Reconnecting (token in the query this
    // time, no cursor) resumes after the ack: the unacked third, then the
    // new one.
    bob.deposit(&server, &alice.id, b"while away").await;
    let url = server.ws_url(&format!(
        "/v0/events/ws?token={}",
        alice.token.as_ref().unwrap()
    ));
    let (mut ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .unwrap();
    let again = next_event(&mut ws).await;
    assert_eq!(again["cursor"], third["cursor"]);
    let away = next_event(&mut ws).await;
    assert_eq!(unb64(away["envelope"].as_str().unwrap()), b"while away");
    ack(&mut ws, away["cursor"].as_u64().unwrap()).await;
    ws.close(None).await.unwrap();

    // An explicit cursor wins over the ack.
    bob.deposit(&server, &alice.id, b"four").await;
    bob.deposit(&server, &alice.id, b"five").await;
    let (_, pending) = alice.get(&server, "/v0/events").await;
    let four = pending["events"][0]["cursor"].as_u64().unwrap();
    let mut ws = connect(&server, &alice, &format!("?after={four}")).await;
    let five = next_event(&mut ws).await;
    assert_eq!(unb64(five["envelope"].as_str().unwrap()), b"five");
    ws.close(None).await.unwrap();

    // Without credentials there is no stream.
    let refused = tokio_tungstenite::connect_async(server.ws_url("/v0/events/ws")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn server_shutdown_closes_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let alice = Device::join(&server, "alice").await;
    let mut ws = connect(&server, &alice, "").await;
    // `stop` returns only once `run` has returned, streams included.
    server.stop().await;
    let end = tokio::time::timeout(TIMEOUT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream ends");
}

#[tokio::test]
async fn restart_on_the_same_data_dir_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let (_, info_before) = send(client().get(server.url("/v0/server"))).await;
    let alice = Device::join(&server, "alice").await;
    let bob = Device::join(&server, "bob").await;
    alice
        .post(
            &server,
            "/v0/keypackages",
            json!({ "packages": [common::b64(b"kp")], "last_resort": common::b64(b"lr") }),
        )
        .await;
    let id1 = bob.deposit(&server, &alice.id, b"one").await.1["id"].clone();
    bob.deposit(&server, &alice.id, b"two").await;
    let (_, events) = alice.get(&server, "/v0/events").await;
    let c1 = events["events"][0]["cursor"].as_u64().unwrap();
    alice
        .post(&server, "/v0/events/ack", json!({ "ack": c1 }))
        .await;
    server.stop().await;

    let server = TestServer::start(dir.path(), "a.example").await;
    // Same key, same published key list.
    let (_, info_after) = send(client().get(server.url("/v0/server"))).await;
    assert_eq!(info_before["server_keys"], info_after["server_keys"]);
    // Sessions, records, names.
    let (status, inbox) = alice.get(&server, "/v0/inbox").await;
    assert_eq!(status, StatusCode::OK, "the old token still works");
    assert_eq!(inbox["items"].as_array().unwrap().len(), 2);
    assert_eq!(inbox["items"][0]["id"], id1);
    let (_, user) = send(client().get(server.url("/v0/users/alice@a.example"))).await;
    assert_eq!(common::record_of(&user["records"][0]), alice.record);
    assert_error(
        &Device::new().register_raw(&server, "bob", None).await,
        StatusCode::CONFLICT,
        "name_taken",
    );
    // The event log resumes after the ack.
    let (_, events) = alice.get(&server, "/v0/events").await;
    let events = events["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert!(events[0]["cursor"].as_u64().unwrap() > c1);
    // Key packages: the ordinary one, then the last resort.
    let claim = json!({ "handle": "alice@a.example" });
    let (_, one) = bob
        .post(&server, "/v0/keypackages/claim", claim.clone())
        .await;
    assert_eq!(one["packages"][0]["last_resort"], false);
    let (_, two) = bob.post(&server, "/v0/keypackages/claim", claim).await;
    assert_eq!(two["packages"][0]["last_resort"], true);
    // New deposits get new ids and cursors.
    let id3 = bob.deposit(&server, &alice.id, b"three").await.1["id"].clone();
    assert!(id3.as_u64().unwrap() > id1.as_u64().unwrap() + 1);
    let metrics = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("kith_registered_devices 2"), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn record_updates_and_low_key_packages_become_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let mut alice = Device::join(&server, "alice").await;
    let mut bob = Device::join(&server, "bob").await;
    let events_of = |d: &Device| {
        let d_token = d.token.clone();
        let url = server.url("/v0/events");
        async move {
            let (_, body) = send(client().get(url).bearer_auth(d_token.unwrap())).await;
            body["events"].as_array().unwrap().clone()
        }
    };

    // A one-sided link tells nobody.
    let a = alice.next_record(|f| f.links = vec![bob.id]);
    assert_eq!(alice.put_record(&server, &a).await.1["result"], "newer");
    alice.record = a;
    assert!(events_of(&bob).await.is_empty());
    // Once the link is mutual, each update reaches the other device.
    let b = bob.next_record(|f| f.links = vec![alice.id]);
    assert_eq!(bob.put_record(&server, &b).await.1["result"], "newer");
    bob.record = b;
    let a = alice.next_record(|f| f.display_name = "renamed".into());
    assert_eq!(alice.put_record(&server, &a).await.1["result"], "newer");
    let to_alice = events_of(&alice).await;
    assert_eq!(to_alice.len(), 1);
    assert_eq!(to_alice[0]["kind"], "record_update");
    assert_eq!(to_alice[0]["device"], bob.id.to_string());
    assert_eq!(common::record_of(&to_alice[0]["record"]), bob.record);
    let to_bob = events_of(&bob).await;
    assert_eq!(to_bob.len(), 1);
    assert_eq!(common::record_of(&to_bob[0]["record"]), a);

    // A claim that leaves fewer than 10 packages asks the owner to refill.
    let packages: Vec<String> = (0..3u8).map(|i| common::b64(&[i])).collect();
    alice
        .post(&server, "/v0/keypackages", json!({ "packages": packages }))
        .await;
    bob.post(
        &server,
        "/v0/keypackages/claim",
        json!({ "handle": "alice@a.example" }),
    )
    .await;
    let to_alice = events_of(&alice).await;
    assert_eq!(to_alice.len(), 2);
    assert_eq!(to_alice[1]["kind"], "key_packages_low");
    assert_eq!(to_alice[1]["remaining"], 2);
    server.stop().await;
}

/// Removing a device (spec §6.4) ends its open event stream at once (close
/// code 1008) and tells the name's remaining devices with a
/// `device_removed` event; a malformed id is 400 and changes nothing.
#[tokio::test]
async fn removing_a_device_closes_its_stream_and_tells_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "a.example").await;
    let mut laptop = Device::join(&server, "alice").await;
    let mut phone = Device::new();
    let linked = laptop.next_record(|f| f.links = vec![phone.id]);
    assert_eq!(
        laptop.put_record(&server, &linked).await.1["result"],
        "newer"
    );
    laptop.record = linked;
    let (status, body) = phone.register_raw(&server, "alice", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    phone.login(&server).await;
    let mut ws = connect(&server, &phone, "").await;

    let bad = send(laptop.authed(client().delete(server.url("/v0/devices/nothex")))).await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "bad_request");
    let gone =
        send(laptop.authed(client().delete(server.url(&format!("/v0/devices/{}", phone.id)))))
            .await;
    assert_eq!(gone.0, StatusCode::NO_CONTENT, "{}", gone.1);
    assert_eq!(close_code(&mut ws).await, Some(1008));

    let (status, body) = laptop.get(&server, "/v0/events").await;
    assert_eq!(status, StatusCode::OK);
    let events = body["events"].as_array().unwrap();
    let removed = events
        .iter()
        .find(|e| e["kind"] == "device_removed")
        .unwrap();
    assert_eq!(removed["device"], phone.id.to_string());
    assert_eq!(removed["by"], laptop.id.to_string());
    assert_error(
        &phone.get(&server, "/v0/events").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    server.stop().await;
}

/// The close code a stream ends with (`None` if it ends without one),
/// within the timeout.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
                None | Some(Err(_)) => break None,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .expect("the stream ends")
}

/// A stream of the device being removed that authenticated before the
/// removal but subscribed after it (the removal's close found nothing to
/// close) looks again once subscribed, and closes with 1008 too (spec
/// §6.4).
#[tokio::test]
async fn a_stream_opened_as_its_device_is_removed_closes_too() {
    let dir = tempfile::tempdir().unwrap();
    let faults = std::sync::Arc::new(kith_server::LinkFaults::new());
    let server = TestServer::start_with(dir.path(), "a.example", |config| {
        config.faults = Some(std::sync::Arc::clone(&faults));
    })
    .await;
    let mut laptop = Device::join(&server, "alice").await;
    let mut phone = Device::new();
    let linked = laptop.next_record(|f| f.links = vec![phone.id]);
    assert_eq!(
        laptop.put_record(&server, &linked).await.1["result"],
        "newer"
    );
    laptop.record = linked;
    let (status, body) = phone.register_raw(&server, "alice", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    phone.login(&server).await;

    // The phone's stream is authenticated and upgraded, then held before
    // it subscribes.
    faults.hold_streams();
    let mut ws = connect(&server, &phone, "").await;
    for _ in 0..200 {
        if faults.streams_waiting() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        faults.streams_waiting(),
        1,
        "the stream never reached the gate"
    );
    let gone =
        send(laptop.authed(client().delete(server.url(&format!("/v0/devices/{}", phone.id)))))
            .await;
    assert_eq!(gone.0, StatusCode::NO_CONTENT, "{}", gone.1);
    faults.release_streams();
    assert_eq!(close_code(&mut ws).await, Some(1008));
    assert_eq!(faults.streams_waiting(), 0);
    server.stop().await;
}
