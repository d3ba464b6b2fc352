//! A homeserver of a multi-server channel that withholds or forges votes,
//! or hands its user a commit without a certificate, cannot make the client
//! merge anything: the client checks every certificate against the voter
//! set it computes itself from the members' own records. The hostile
//! server is a proxy in front of b.test's real `kithd`, seen only by Bob.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{server_key, signed_post};
use kith_client::{Client, ClientError};
use kith_order::{OrderingCertificateIn, Vote, VoteSig};
use kith_proto::{ChannelId, SecretKey};
use kith_testkit::Cluster;
use serde_json::Value;

/// What the proxy does to every certificate on its way to Bob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lie {
    /// Pass it on.
    None,
    /// Keep only the first vote, as if the other voters never voted.
    Withhold,
    /// Replace each vote with one signed by a key the voter never had.
    Forge,
    /// Send the commit with an empty certificate.
    Strip,
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    lie: Arc<Mutex<Lie>>,
    http: reqwest::Client,
}

fn tamper(lie: Lie, certificate: &str) -> String {
    if lie == Lie::Strip {
        return String::new();
    }
    let bytes = URL_SAFE_NO_PAD.decode(certificate).unwrap();
    let Ok(cert) = OrderingCertificateIn::decode(&bytes) else {
        return certificate.to_owned();
    };
    let votes = match lie {
        Lie::Withhold => cert.votes().iter().take(1).cloned().collect(),
        Lie::Forge => cert
            .votes()
            .iter()
            .map(|v| {
                let vote = Vote::sign(
                    &SecretKey::generate(),
                    v.server().clone(),
                    cert.channel(),
                    cert.epoch(),
                    cert.commit_hash(),
                );
                VoteSig::of(&vote)
            })
            .collect(),
        Lie::None | Lie::Strip => cert.votes().to_vec(),
    };
    URL_SAFE_NO_PAD.encode(cert.with_votes(votes).encode())
}

fn rewrite(lie: Lie, value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "certificate"
                    && let Some(text) = v.as_str()
                {
                    *v = Value::String(tamper(lie, text));
                } else {
                    rewrite(lie, v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite(lie, v)),
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
    let auth = request.headers().get("authorization").cloned();
    let body: Bytes = axum::body::to_bytes(request.into_body(), 1 << 24)
        .await
        .unwrap();
    let mut upstream = proxy
        .http
        .request(method, format!("{}{path}", proxy.upstream))
        .body(body.to_vec());
    if let Some(auth) = auth {
        upstream = upstream.header("authorization", auth);
    }
    upstream = upstream.header("content-type", "application/json");
    let answer = upstream.send().await.unwrap();
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap();
    let bytes = answer.bytes().await.unwrap();
    let lie = *proxy.lie.lock().unwrap();
    if lie != Lie::None
        && let Ok(mut json) = serde_json::from_slice::<Value>(&bytes)
    {
        rewrite(lie, &mut json);
        return (
            status,
            [("content-type", "application/json")],
            json.to_string(),
        )
            .into_response();
    }
    (status, [("content-type", "application/json")], bytes).into_response()
}

fn quick(config: &mut kith_testkit::Config) {
    config.federation.raft_heartbeat_ms = 150;
    config.federation.raft_election_min_ms = 600;
    config.federation.raft_election_max_ms = 1200;
    config.federation.retry_base_ms = 200;
    config.federation.retry_max_ms = 2_000;
}

async fn sync_until(client: &mut Client, what: &str, done: impl Fn(&Client) -> bool) {
    for _ in 0..300 {
        let _ = client.sync().await;
        if done(client) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn withheld_forged_or_missing_votes_are_never_merged() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], quick).await;
    let lie = Arc::new(Mutex::new(Lie::None));
    let proxy = Proxy {
        upstream: cluster.server("b.test").url().to_owned(),
        lie: Arc::clone(&lie),
        http: reqwest::Client::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let register = |name: &str, url: String| {
        let path = dir.path().join(name);
        let name = name.to_owned();
        async move { Client::register(&path, &url, &name, None).await.unwrap() }
    };
    let mut alice = register("alice", cluster.server("a.test").url().to_owned()).await;
    // Bob reaches b.test only through the hostile proxy.
    let mut bob = register("bob", proxy_url).await;
    let mut carol = register("carol", cluster.server("c.test").url().to_owned()).await;
    let channel: ChannelId = alice.create_channel("watched", "text/plain").await.unwrap();
    alice.invite(channel, "bob@b.test").await.unwrap();
    sync_until(&mut bob, "bob joins", |c| c.channel_state(channel).is_ok()).await;
    alice.invite(channel, "carol@c.test").await.unwrap();
    sync_until(&mut carol, "carol joins", |c| {
        c.channel_state(channel).is_ok()
    })
    .await;
    sync_until(&mut bob, "bob sees carol", |c| {
        c.channel_state(channel).unwrap().0 == 2
    })
    .await;

    for mode in [Lie::Withhold, Lie::Forge, Lie::Strip] {
        let (before, _) = bob.channel_state(channel).unwrap();
        *lie.lock().unwrap() = mode;
        // Carol's commit is certified by a, b and c; Bob gets it with a
        // certificate his server tampered with, by event and by listing.
        carol.self_update(channel).await.unwrap();
        for _ in 0..5 {
            let _ = bob.sync().await;
        }
        assert_eq!(
            bob.channel_state(channel).unwrap().0,
            before,
            "{mode:?}: merged a commit whose certificate was tampered with"
        );
        assert!(matches!(
            bob.catch_up(channel).await,
            Err(ClientError::Protocol(_))
        ));
        assert_eq!(bob.channel_state(channel).unwrap().0, before, "{mode:?}");

        // Honest again: Bob merges exactly what everyone else merged.
        *lie.lock().unwrap() = Lie::None;
        bob.catch_up(channel).await.unwrap();
        let _ = alice.sync().await;
        let _ = alice.catch_up(channel).await;
        assert_eq!(
            bob.channel_state(channel).unwrap(),
            carol.channel_state(channel).unwrap(),
            "{mode:?}"
        );
        assert_eq!(
            alice.channel_state(channel).unwrap(),
            carol.channel_state(channel).unwrap(),
            "{mode:?}"
        );
    }
    cluster.stop().await;
}

/// How many channel messages a server has stored, from its metrics.
async fn stored_messages(base: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("kith_channel_messages") && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| {
            panic!(
                "no channel message counter in:
{text}"
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_cannot_inject_messages_for_senders_it_does_not_sponsor() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], quick).await;
    let register = |name: &str, url: String| {
        let path = dir.path().join(name);
        let name = name.to_owned();
        async move { Client::register(&path, &url, &name, None).await.unwrap() }
    };
    let mut alice = register("alice", cluster.server("a.test").url().to_owned()).await;
    let mut bob = register("bob", cluster.server("b.test").url().to_owned()).await;
    let carol = register("carol", cluster.server("c.test").url().to_owned()).await;
    let channel: ChannelId = alice.create_channel("private", "text/plain").await.unwrap();
    alice.invite(channel, "bob@b.test").await.unwrap();
    sync_until(&mut bob, "bob joins", |c| c.channel_state(channel).is_ok()).await;
    alice.send(channel, b"genuine").await.unwrap();
    let epoch = alice.channel_state(channel).unwrap().0;
    let before = alice.messages(channel, 100).unwrap().len();
    let stored_before = stored_messages(cluster.server("a.test").url()).await;

    let path = format!("/v0/federation/channels/{channel}/messages");
    let a_url = cluster.server("a.test").url().to_owned();
    let body = |sender: kith_proto::DeviceId| {
        serde_json::json!({"messages": [{
            "epoch": epoch,
            "sender": sender.to_string(),
            "message": URL_SAFE_NO_PAD.encode(b"forged ciphertext"),
        }]})
        .to_string()
        .into_bytes()
    };
    let b_key = server_key(&dir.path().join("b.test"));
    let c_key = server_key(&dir.path().join("c.test"));
    // b.test claims a message from Alice, whom it does not sponsor.
    let (status, answer) = signed_post(
        &b_key,
        "b.test",
        "a.test",
        &a_url,
        &path,
        &body(alice.device_id()),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    // c.test, not a server of the channel, claims one from Bob.
    let (status, answer) = signed_post(
        &c_key,
        "c.test",
        "a.test",
        &a_url,
        &path,
        &body(bob.device_id()),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    // c.test, for its own user, who is not a member.
    let (status, answer) = signed_post(
        &c_key,
        "c.test",
        "a.test",
        &a_url,
        &path,
        &body(carol.device_id()),
    )
    .await;
    assert_eq!(status, 403, "{answer}");

    // Nothing was stored or delivered.
    assert_eq!(
        stored_messages(cluster.server("a.test").url()).await,
        stored_before
    );
    for _ in 0..3 {
        alice.sync().await.unwrap();
    }
    assert_eq!(alice.messages(channel, 100).unwrap().len(), before);
    cluster.stop().await;
}

/// A client computes each epoch's voter set from that epoch's members
/// (spec §10.2), however recently it computed the channel's last one: once
/// Bob of b.test is a member, Alice's commit needs b.test's vote too, and
/// a certificate her own server cut down to its vote alone (a majority
/// while she was the only member) is refused. Alice reaches a.test only
/// through the hostile proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_voter_set_follows_the_members_of_each_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test"], quick).await;
    let lie = Arc::new(Mutex::new(Lie::None));
    let proxy = Proxy {
        upstream: cluster.server("a.test").url().to_owned(),
        lie: Arc::clone(&lie),
        http: reqwest::Client::new(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut alice = Client::register(&dir.path().join("alice"), &proxy_url, "alice", None)
        .await
        .unwrap();
    let mut bob = Client::register(
        &dir.path().join("bob"),
        cluster.server("b.test").url(),
        "bob",
        None,
    )
    .await
    .unwrap();
    let channel = alice.create_channel("growing", "text/plain").await.unwrap();
    // Alone, Alice's server is the only voter: its vote is a majority.
    *lie.lock().unwrap() = Lie::Withhold;
    alice.self_update(channel).await.unwrap();
    *lie.lock().unwrap() = Lie::None;
    alice.invite(channel, "bob@b.test").await.unwrap();
    sync_until(&mut bob, "bob joins", |c| c.channel_state(channel).is_ok()).await;

    // With Bob a member, b.test votes too: a.test's vote alone is too few.
    let (epoch, _) = alice.channel_state(channel).unwrap();
    *lie.lock().unwrap() = Lie::Withhold;
    assert!(matches!(
        alice.self_update(channel).await,
        Err(ClientError::Protocol(_))
    ));
    assert_eq!(alice.channel_state(channel).unwrap().0, epoch);

    // Honest again: the commit both servers accepted is merged.
    *lie.lock().unwrap() = Lie::None;
    alice.catch_up(channel).await.unwrap();
    assert_eq!(alice.channel_state(channel).unwrap().0, epoch + 1);
    cluster.stop().await;
}
