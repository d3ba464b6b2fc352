//! Channel messages reaching many open event streams: the hub hands each
//! stored message to the streams that are caught up, and a stream that is
//! behind reads the store. Either way every stream gets every event, once,
//! in order.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeSet;

use common::{Device, TIMEOUT, TestServer, b64, client};
use futures_util::{StreamExt, stream};
use kith_mls::{CIPHERSUITE_V0, ChannelExtension, ChannelSettings, ContentType, MlsStore, Policy};
use kith_proto::ChannelId;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A registered device and its MLS state (same identity key).
struct Member {
    http: Device,
    mls: kith_mls::Device,
}

impl Member {
    async fn join(server: &TestServer, name: &str) -> Self {
        let http = Device::join(server, name).await;
        let mls = kith_mls::Device::new(&http.key, MlsStore::in_memory().unwrap());
        Self { http, mls }
    }
}

/// A channel of `owner` with `receivers` added in one commit, at epoch 1.
async fn channel(server: &TestServer, owner: &Member, receivers: &[Member]) -> ChannelId {
    let settings = ChannelSettings::new(ChannelExtension::new(
        ContentType::octet_stream(),
        "fanout".parse().unwrap(),
        Policy::new([owner.mls.device_id()]).unwrap(),
    ));
    let channel = owner
        .mls
        .create_channel(ChannelId::random(), &settings)
        .unwrap();
    let id = channel.id();
    let (status, body) = owner
        .http
        .post(
            server,
            "/v0/channels",
            json!({
                "channel": id.to_string(),
                "group_info": b64(&channel.group_info().unwrap()),
                "ratchet_tree": b64(&channel.ratchet_tree().unwrap()),
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(channel);
    let packages: Vec<Vec<u8>> = receivers
        .iter()
        .map(|r| {
            r.mls
                .key_packages(1, CIPHERSUITE_V0)
                .unwrap()
                .pop()
                .unwrap()
        })
        .collect();
    let out = owner.mls.channel(id).unwrap().add(&packages).unwrap();
    let (status, body) = owner
        .http
        .post(
            server,
            &format!("/v0/channels/{id}/commits"),
            json!({
                "epoch": 0,
                "commit": b64(&out.commit),
                "welcome": out.welcome.as_deref().map(b64),
                "group_info": b64(&out.group_info),
                "ratchet_tree": b64(&out.ratchet_tree),
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    owner.mls.channel(id).unwrap().merge_pending().unwrap();
    id
}

/// Posts message `n` (its bytes name it; `size` bytes in all) at epoch 1
/// and returns its seq.
async fn post(server: &TestServer, owner: &Member, id: ChannelId, n: usize, size: usize) -> u64 {
    let mut message = format!("message {n} ").into_bytes();
    message.resize(size.max(message.len()), b'.');
    let (status, body) = owner
        .http
        .post(
            server,
            &format!("/v0/channels/{id}/messages"),
            json!({ "epoch": 1, "message": b64(&message) }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["seq"].as_u64().unwrap()
}

/// Posts messages `from..to` with `in_flight` at once.
async fn burst(
    server: &TestServer,
    owner: &Member,
    id: ChannelId,
    from: usize,
    to: usize,
    in_flight: usize,
    size: usize,
) {
    stream::iter(from..to)
        .map(|n| post(server, owner, id, n, size))
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
}

/// An event stream whose socket takes at most `receive_buffer` bytes
/// before the server's writes block (when set).
async fn connect(server: &TestServer, device: &Device, receive_buffer: Option<u32>) -> Ws {
    let mut request = server
        .ws_url("/v0/events/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", device.token.as_ref().unwrap())
            .parse()
            .unwrap(),
    );
    let addr: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let tcp = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::client_async(request, tcp))
        .await
        .unwrap()
        .unwrap();
    ws
}

/// The next event (skipping pings), within the timeout.
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

/// Reads `count` message events, checking on the way that cursors and
/// seqs only go up (so none repeats and none comes out of order); returns
/// their seqs.
async fn messages(ws: &mut Ws, count: usize, last_cursor: &mut u64) -> Vec<u64> {
    let mut seqs: Vec<u64> = Vec::with_capacity(count);
    while seqs.len() < count {
        let event = next_event(ws).await;
        let cursor = event["cursor"].as_u64().unwrap();
        assert!(cursor > *last_cursor, "cursor {cursor} after {last_cursor}");
        *last_cursor = cursor;
        if event["kind"] != "message" {
            continue;
        }
        let seq = event["seq"].as_u64().unwrap();
        if let Some(&before) = seqs.last() {
            assert!(seq > before, "seq {seq} after {before}");
        }
        seqs.push(seq);
    }
    seqs
}

/// `kith_event_stream_handed_total` and `kith_event_stream_reads_total`.
async fn stream_counters(server: &TestServer) -> (u64, u64) {
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    (
        value("kith_event_stream_handed_total"),
        value("kith_event_stream_reads_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_reach_many_streams_complete_and_in_order() {
    const RECEIVERS: usize = 8;
    const MESSAGES: usize = 120;
    const ONE_BY_ONE: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "fan.example").await;
    let owner = Member::join(&server, "owner").await;
    let mut receivers = Vec::new();
    for i in 0..RECEIVERS {
        receivers.push(Member::join(&server, &format!("r{i}")).await);
    }
    let id = channel(&server, &owner, &receivers).await;
    let mut streams = Vec::new();
    for r in &receivers {
        streams.push((connect(&server, &r.http, None).await, 0u64));
    }

    // A burst with many posts in flight: appends race to the hub.
    let readers: Vec<_> = streams
        .into_iter()
        .map(|(mut ws, mut cursor)| {
            tokio::spawn(async move {
                let seqs = messages(&mut ws, MESSAGES, &mut cursor).await;
                (ws, cursor, seqs)
            })
        })
        .collect();
    burst(&server, &owner, id, 0, MESSAGES, 16, 600).await;
    let mut streams = Vec::new();
    let all: Vec<u64> = (1..=MESSAGES as u64).collect();
    for reader in readers {
        let (ws, cursor, seqs) = reader.await.unwrap();
        assert_eq!(seqs, all);
        streams.push((ws, cursor));
    }

    // One at a time, each read before the next: every stream is caught up
    // when a message comes, so each delivery is a hand-off, not a read.
    let (handed, reads) = stream_counters(&server).await;
    for n in 0..ONE_BY_ONE {
        let seq = post(&server, &owner, id, MESSAGES + n, 600).await;
        for (ws, cursor) in &mut streams {
            assert_eq!(messages(ws, 1, cursor).await, [seq]);
        }
    }
    let (handed_after, reads_after) = stream_counters(&server).await;
    assert_eq!(handed_after - handed, (RECEIVERS * ONE_BY_ONE) as u64);
    assert_eq!(reads_after, reads);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_read_still_gets_everything() {
    // Enough bytes to fill the socket's buffers, so the server's stream
    // blocks writing while more is appended: its queue fills and events
    // are dropped from it, and it reads them from the store.
    const BIG: usize = 40;
    const SMALL: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "slow.example").await;
    let owner = Member::join(&server, "owner").await;
    let receivers = vec![
        Member::join(&server, "slow").await,
        Member::join(&server, "quick").await,
    ];
    let id = channel(&server, &owner, &receivers).await;
    let mut slow = connect(&server, &receivers[0].http, Some(4096)).await;
    let mut quick = connect(&server, &receivers[1].http, None).await;
    let quick_reader = tokio::spawn(async move {
        let mut cursor = 0;
        let seqs = messages(&mut quick, BIG + SMALL, &mut cursor).await;
        (quick, seqs)
    });
    let (_, reads) = stream_counters(&server).await;

    burst(&server, &owner, id, 0, BIG, 4, 128 * 1024).await;
    burst(&server, &owner, id, BIG, BIG + SMALL, 4, 100).await;

    let all: Vec<u64> = (1..=(BIG + SMALL) as u64).collect();
    let mut cursor = 0;
    assert_eq!(messages(&mut slow, BIG + SMALL, &mut cursor).await, all);
    let (_quick, seqs) = quick_reader.await.unwrap();
    assert_eq!(seqs, all);
    // The slow stream read the store after its first pass (the big
    // messages never fit a queue).
    let (_, reads_after) = stream_counters(&server).await;
    assert!(reads_after > reads, "{reads} -> {reads_after}");

    // Caught up again, it is handed the next one.
    let seq = post(&server, &owner, id, BIG + SMALL, 100).await;
    assert_eq!(messages(&mut slow, 1, &mut cursor).await, [seq]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_mid_burst_gets_everything_once() {
    const MESSAGES: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "mid.example").await;
    let owner = Member::join(&server, "owner").await;
    let receivers = vec![Member::join(&server, "late").await];
    let id = channel(&server, &owner, &receivers).await;

    // The stream opens while the burst is going on: it replays the stored
    // messages and takes the live ones as they come.
    let device = &receivers[0].http;
    let (_, (mut ws, seqs)) =
        tokio::join!(burst(&server, &owner, id, 0, MESSAGES, 8, 300), async {
            // After some posts, not all.
            loop {
                let (status, body) = device.get(&server, "/v0/events?limit=500").await;
                assert_eq!(status, StatusCode::OK, "{body}");
                if body["events"].as_array().unwrap().len() > 20 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let mut ws = connect(&server, device, None).await;
            let mut cursor = 0;
            let seqs = messages(&mut ws, MESSAGES, &mut cursor).await;
            (ws, (cursor, seqs))
        });
    let (mut cursor, seqs) = seqs;
    let all: Vec<u64> = (1..=MESSAGES as u64).collect();
    assert_eq!(seqs, all);
    // Nothing more was queued for it: the next event is the next message.
    let seq = post(&server, &owner, id, MESSAGES, 300).await;
    assert_eq!(messages(&mut ws, 1, &mut cursor).await, [seq]);
    let distinct: BTreeSet<u64> = seqs.into_iter().collect();
    assert_eq!(distinct.len(), MESSAGES);
    server.stop().await;
}

/// The bytes `post` sends as message `n`.
fn message_bytes(n: usize, size: usize) -> Vec<u8> {
    let mut message = format!("message {n} ").into_bytes();
    message.resize(size.max(message.len()), b'.');
    message
}

/// As `post`, by `sender`, returning the answer's status and the seq of
/// an accepted message.
async fn try_post(
    server: &TestServer,
    sender: &Member,
    id: ChannelId,
    n: usize,
    size: usize,
) -> (StatusCode, Option<u64>) {
    let (status, body) = sender
        .http
        .post(
            server,
            &format!("/v0/channels/{id}/messages"),
            json!({ "epoch": 1, "message": b64(&message_bytes(n, size)) }),
        )
        .await;
    (status, body["seq"].as_u64())
}

/// Every member posts at once, several messages in flight each, so the
/// server stores them in batches (`writer`): every post is acknowledged
/// with its own seq, the seqs are 1..=N without a gap or a repeat, and
/// every member's stream gets every other member's messages once, in seq
/// order, and none of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_from_many_senders_are_each_delivered_once_in_order() {
    const MEMBERS: usize = 6;
    const PER_SENDER: usize = 20;
    const TOTAL: usize = MEMBERS * PER_SENDER;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "many.example").await;
    let owner = Member::join(&server, "owner").await;
    let mut others = Vec::new();
    for i in 1..MEMBERS {
        others.push(Member::join(&server, &format!("m{i}")).await);
    }
    let id = channel(&server, &owner, &others).await;
    let members: Vec<&Member> = std::iter::once(&owner).chain(&others).collect();
    let mut readers = Vec::new();
    for m in &members {
        let mut ws = connect(&server, &m.http, None).await;
        readers.push(tokio::spawn(async move {
            let mut cursor = 0;
            messages(&mut ws, TOTAL - PER_SENDER, &mut cursor).await
        }));
    }

    let at = &server;
    let acked: Vec<Vec<u64>> =
        futures_util::future::join_all(members.iter().enumerate().map(|(i, m)| {
            stream::iter(0..PER_SENDER)
                .map(move |k| async move {
                    let (status, seq) = try_post(at, m, id, i * 1000 + k, 300).await;
                    assert_eq!(status, StatusCode::OK);
                    seq.unwrap()
                })
                .buffer_unordered(4)
                .collect::<Vec<_>>()
        }))
        .await;
    let mut all: Vec<u64> = acked.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=TOTAL as u64).collect::<Vec<_>>());
    for (own, reader) in acked.iter().zip(readers) {
        let got = reader.await.unwrap();
        let own: BTreeSet<u64> = own.iter().copied().collect();
        let want: Vec<u64> = (1..=TOTAL as u64).filter(|s| !own.contains(s)).collect();
        assert_eq!(got, want);
    }
    server.stop().await;
}

/// A message whose storing fails halfway (a trigger refuses its second
/// event row, injected with another connection to the server's database)
/// fails alone: its sender gets an error, the messages posted with it are
/// stored and delivered once each with seqs that skip nothing, and it
/// left nothing behind (posted again without the fault, it is new).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_failing_to_store_fails_alone() {
    const MESSAGES: usize = 40;
    const DOOMED: usize = 17;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "doom.example").await;
    let owner = Member::join(&server, "owner").await;
    let receivers = vec![
        Member::join(&server, "r1").await,
        Member::join(&server, "r2").await,
    ];
    let id = channel(&server, &owner, &receivers).await;
    let doomed_id = kith_proto::sign::message_id(&message_bytes(DOOMED, 300));
    let hex: String = doomed_id.iter().map(|b| format!("{b:02x}")).collect();
    let db = rusqlite::Connection::open(server.data_dir.join(kith_server::DB_FILE)).unwrap();
    db.execute_batch(&format!(
        "CREATE TRIGGER doomed BEFORE INSERT ON events
         WHEN NEW.shared IS NOT NULL
          AND EXISTS (SELECT 1 FROM events WHERE shared = NEW.shared)
          AND (SELECT payload FROM event_payloads WHERE id = NEW.shared) LIKE '%{hex}%'
         BEGIN SELECT RAISE(ABORT, 'injected fault'); END;"
    ))
    .unwrap();
    let mut readers = Vec::new();
    for r in &receivers {
        let mut ws = connect(&server, &r.http, None).await;
        readers.push(tokio::spawn(async move {
            let mut cursor = 0;
            let seqs = messages(&mut ws, MESSAGES - 1, &mut cursor).await;
            (ws, cursor, seqs)
        }));
    }

    let (at, sender) = (&server, &owner);
    let answers: Vec<(usize, (StatusCode, Option<u64>))> = stream::iter(0..MESSAGES)
        .map(|n| async move { (n, try_post(at, sender, id, n, 300).await) })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut seqs = Vec::new();
    for (n, (status, seq)) in answers {
        if n == DOOMED {
            assert!(status.is_server_error(), "{status}");
        } else {
            assert_eq!(status, StatusCode::OK, "message {n}");
            seqs.push(seq.unwrap());
        }
    }
    seqs.sort_unstable();
    let all: Vec<u64> = (1..MESSAGES as u64).collect();
    assert_eq!(seqs, all);
    let mut streams = Vec::new();
    for reader in readers {
        let (ws, cursor, got) = reader.await.unwrap();
        assert_eq!(got, all);
        streams.push((ws, cursor));
    }

    db.execute_batch("DROP TRIGGER doomed").unwrap();
    let (status, seq) = try_post(&server, &owner, id, DOOMED, 300).await;
    assert_eq!((status, seq), (StatusCode::OK, Some(MESSAGES as u64)));
    for (ws, cursor) in &mut streams {
        assert_eq!(messages(ws, 1, cursor).await, [MESSAGES as u64]);
    }
    server.stop().await;
}
