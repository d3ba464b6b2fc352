//! Channels, commits and messages end to end: real servers on loopback and
//! real OpenMLS clients (`kith_mls::Device`) driving the HTTP API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{Device, TestServer, assert_error, b64, client, now_ms, send, unb64};
use kith_mls::{
    CIPHERSUITE_V0, Channel, ChannelExtension, ChannelSettings, CommitOutput, ContentType,
    Incoming, MlsStore, Policy,
};
use kith_order::{OrderingCertificateIn, VoterSet};
use kith_proto::events::{EventFrame, decode_frames};
use kith_proto::{ChannelId, ServerKeysIn};
use reqwest::StatusCode;
use serde_json::{Value, json};

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

    fn key_package(&self) -> Vec<u8> {
        self.mls
            .key_packages(1, CIPHERSUITE_V0)
            .unwrap()
            .pop()
            .unwrap()
    }

    fn channel(&self, id: ChannelId) -> Channel<'_> {
        self.mls.channel(id).unwrap()
    }

    async fn post_commit(
        &self,
        server: &TestServer,
        id: ChannelId,
        epoch: u64,
        out: &CommitOutput,
    ) -> (StatusCode, Value) {
        self.http
            .post(
                server,
                &format!("/v0/channels/{id}/commits"),
                json!({
                    "epoch": epoch,
                    "commit": b64(&out.commit),
                    "welcome": out.welcome.as_deref().map(b64),
                    "group_info": b64(&out.group_info),
                    "ratchet_tree": b64(&out.ratchet_tree),
                }),
            )
            .await
    }

    async fn post_message(
        &self,
        server: &TestServer,
        id: ChannelId,
        text: &[u8],
    ) -> (StatusCode, Value, Vec<u8>) {
        let mut channel = self.channel(id);
        let message = channel.encrypt(text).unwrap();
        let epoch = channel.epoch();
        let (status, body) = self
            .http
            .post(
                server,
                &format!("/v0/channels/{id}/messages"),
                json!({ "epoch": epoch, "message": b64(&message) }),
            )
            .await;
        (status, body, message)
    }

    /// Events of `kind` after `after`, with the last cursor seen.
    async fn events(&self, server: &TestServer, kind: &str, after: u64) -> (Vec<Value>, u64) {
        let (status, body) = self
            .http
            .get(server, &format!("/v0/events?after={after}&limit=500"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let next = body["next"].as_u64().unwrap();
        let events = body["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .cloned()
            .collect();
        (events, next)
    }

    /// Fetches commits from `from` on, checks each certificate, processes
    /// and merges them.
    async fn catch_up(&self, server: &TestServer, id: ChannelId, voters: &VoterSet) {
        let from = self.channel(id).epoch();
        let (status, body) = self
            .http
            .get(
                server,
                &format!("/v0/channels/{id}/commits?from_epoch={from}"),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for c in body["commits"].as_array().unwrap() {
            let commit = unb64(c["commit"].as_str().unwrap());
            let epoch = c["epoch"].as_u64().unwrap();
            OrderingCertificateIn::decode(&unb64(c["certificate"].as_str().unwrap()))
                .unwrap()
                .verify_for(id, epoch, &commit, voters)
                .unwrap();
            let mut channel = self.channel(id);
            match channel.process(&commit).unwrap() {
                Incoming::Commit(staged) => channel.merge_staged(staged).unwrap(),
                Incoming::OwnCommit => channel.merge_pending().unwrap(),
                other => panic!("expected a commit, got {other:?}"),
            }
        }
    }
}

/// The voter set of a one-server channel: the server with its key.
async fn voters(server: &TestServer) -> VoterSet {
    let (status, info) = send(client().get(server.url("/v0/server"))).await;
    assert_eq!(status, StatusCode::OK);
    let keys = ServerKeysIn::decode(&unb64(info["server_keys"].as_str().unwrap()))
        .unwrap()
        .verify(now_ms())
        .unwrap();
    VoterSet::new([(
        server.name.clone(),
        keys.keys().iter().map(|k| k.key.clone()).collect(),
    )])
}

fn settings(admin: &Member) -> ChannelSettings {
    ChannelSettings::new(ChannelExtension::new(
        ContentType::kith_chat_v1(),
        "general".parse().unwrap(),
        Policy::new([admin.mls.device_id()]).unwrap(),
    ))
}

async fn create(server: &TestServer, who: &Member, channel: &Channel<'_>) -> (StatusCode, Value) {
    who.http
        .post(
            server,
            "/v0/channels",
            json!({
                "channel": channel.id().to_string(),
                "group_info": b64(&channel.group_info().unwrap()),
                "ratchet_tree": b64(&channel.ratchet_tree().unwrap()),
            }),
        )
        .await
}

/// Checks a commit answer's certificate and merges the pending commit.
fn certified(
    voters: &VoterSet,
    id: ChannelId,
    epoch: u64,
    out: &CommitOutput,
    answer: &(StatusCode, Value),
) {
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    assert_eq!(answer.1["epoch"], epoch);
    let cert = OrderingCertificateIn::decode(&unb64(answer.1["certificate"].as_str().unwrap()))
        .unwrap()
        .verify_for(id, epoch, &out.commit, voters)
        .unwrap();
    assert_eq!(
        answer.1["commit_hash"],
        hex::encode(cert.commit_hash().as_bytes())
    );
}

/// Decrypts the `message` events for `id` a member received since `after`.
async fn receive(
    server: &TestServer,
    member: &Member,
    id: ChannelId,
    after: u64,
) -> (Vec<Vec<u8>>, u64) {
    let (events, next) = member.events(server, "message", after).await;
    let mut channel = member.channel(id);
    let texts = events
        .iter()
        .filter(|e| e["channel"] == id.to_string())
        .map(|e| {
            let message = unb64(e["message"].as_str().unwrap());
            match channel.process(&message).unwrap() {
                Incoming::Application { data, .. } => data,
                other => panic!("expected application data, got {other:?}"),
            }
        })
        .collect();
    (texts, next)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_with_a_race_a_removal_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), "chan.example").await;
    let voters = voters(&server).await;
    let alice = Member::join(&server, "alice").await;
    let bob = Member::join(&server, "bob").await;
    let carol = Member::join(&server, "carol").await;
    let dave = Member::join(&server, "dave").await;

    // Creation: only by the group's sole member, once.
    let channel = alice
        .mls
        .create_channel(ChannelId::random(), &settings(&alice))
        .unwrap();
    let id = channel.id();
    assert_error(
        &create(&server, &bob, &channel).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let (status, body) = create(&server, &alice, &channel).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["channel"], id.to_string());
    assert_eq!(body["epoch"], 0);
    assert_eq!(body["name"], "general");
    assert_eq!(body["content_type"], "application/vnd.kith.chat.v1");
    assert_error(
        &create(&server, &alice, &channel).await,
        StatusCode::CONFLICT,
        "channel_exists",
    );
    drop(channel);

    // Alice adds Bob and Carol.
    let out = alice
        .channel(id)
        .add(&[bob.key_package(), carol.key_package()])
        .unwrap();
    let answer = alice.post_commit(&server, id, 0, &out).await;
    certified(&voters, id, 0, &out, &answer);
    // A retry after a lost answer gets the same answer.
    let again = alice.post_commit(&server, id, 0, &out).await;
    assert_eq!(again, answer);
    alice.channel(id).merge_pending().unwrap();

    // The joiners find the Welcome among the commits and the tree of epoch 1.
    for joiner in [&bob, &carol] {
        let (status, body) = joiner
            .http
            .get(&server, &format!("/v0/channels/{id}/commits?from_epoch=0"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let welcome = unb64(body["commits"][0]["welcome"].as_str().unwrap());
        let (status, tree) = joiner
            .http
            .get(&server, &format!("/v0/channels/{id}/tree?epoch=1"))
            .await;
        assert_eq!(status, StatusCode::OK, "{tree}");
        assert_eq!(tree["epoch"], 1);
        let joined = joiner
            .mls
            .join(&welcome, &unb64(tree["ratchet_tree"].as_str().unwrap()))
            .unwrap();
        assert_eq!(joined.epoch(), 1);
        // Not members of epoch 0; no event for the commit that added them.
        let (status, _) = joiner
            .http
            .get(&server, &format!("/v0/channels/{id}/tree?epoch=0"))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(joiner.events(&server, "commit", 0).await.0.is_empty());
    }
    // Alice, a member before the commit, got its event.
    let (commits, _) = alice.events(&server, "commit", 0).await;
    assert_eq!(commits.len(), 1);
    assert_eq!(commits[0]["channel"], id.to_string());
    assert_eq!(commits[0]["epoch"], 0);
    assert_eq!(commits[0]["certificate"], answer.1["certificate"]);

    let (status, list) = bob.http.get(&server, "/v0/channels").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list["channels"],
        json!([{"channel": id.to_string(), "name": "general",
                "content_type": "application/vnd.kith.chat.v1", "epoch": 1}])
    );

    // Alice speaks; Bob and Carol get the message as events.
    let (status, sent, message) = alice.post_message(&server, id, b"hello kith").await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!(sent["seq"], 1);
    assert_eq!(
        sent["id"],
        hex::encode(kith_proto::sign::message_id(&message))
    );
    let (repeat_status, repeat) = alice
        .http
        .post(
            &server,
            &format!("/v0/channels/{id}/messages"),
            json!({ "epoch": 1, "message": b64(&message) }),
        )
        .await;
    assert_eq!((repeat_status, &repeat), (StatusCode::OK, &sent));
    let (texts, bob_cursor) = receive(&server, &bob, id, 0).await;
    assert_eq!(texts, vec![b"hello kith".to_vec()]);
    let (texts, mut carol_cursor) = receive(&server, &carol, id, 0).await;
    assert_eq!(texts, vec![b"hello kith".to_vec()]);
    assert!(alice.events(&server, "message", 0).await.0.is_empty());
    let (status, msgs) = bob
        .http
        .get(&server, &format!("/v0/channels/{id}/messages?after=0"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(msgs["messages"].as_array().unwrap().len(), 1);
    assert_eq!(msgs["messages"][0]["sender"], alice.http.id.to_string());
    assert_eq!(msgs["messages"][0]["message"], b64(&message));

    // Dave is not a member.
    let got = dave
        .http
        .post(
            &server,
            &format!("/v0/channels/{id}/messages"),
            json!({ "epoch": 1, "message": b64(b"not even MLS") }),
        )
        .await;
    assert_error(&got, StatusCode::FORBIDDEN, "not_member");
    for path in ["commits", "messages", "tree"] {
        let got = dave
            .http
            .get(&server, &format!("/v0/channels/{id}/{path}"))
            .await;
        assert_error(&got, StatusCode::FORBIDDEN, "not_member");
    }

    // Bob and Carol race for epoch 1: one wins, the other is told.
    let bob_out = bob.channel(id).self_update().unwrap();
    let carol_out = carol.channel(id).self_update().unwrap();
    let (bob_answer, carol_answer) = tokio::join!(
        bob.post_commit(&server, id, 1, &bob_out),
        carol.post_commit(&server, id, 1, &carol_out)
    );
    let ((winner, win_out, win_answer), (loser, lose_answer)) = if bob_answer.0 == StatusCode::OK {
        ((&bob, &bob_out, bob_answer), (&carol, carol_answer))
    } else {
        ((&carol, &carol_out, carol_answer), (&bob, bob_answer))
    };
    certified(&voters, id, 1, win_out, &win_answer);
    winner.channel(id).merge_pending().unwrap();
    assert_error(&lose_answer, StatusCode::CONFLICT, "wrong_epoch");
    assert_eq!(lose_answer.1["current_epoch"], 2);
    // The answer carries the winning commit and its certificate.
    assert_eq!(lose_answer.1["winner"]["epoch"], 1);
    assert_eq!(lose_answer.1["winner"]["commit"], b64(&win_out.commit));
    assert_eq!(
        lose_answer.1["winner"]["certificate"],
        win_answer.1["certificate"]
    );
    loser.channel(id).clear_pending().unwrap();
    loser.catch_up(&server, id, &voters).await;
    assert_eq!(loser.channel(id).epoch(), 2);
    let retry = loser.channel(id).self_update().unwrap();
    let answer = loser.post_commit(&server, id, 2, &retry).await;
    certified(&voters, id, 2, &retry, &answer);
    loser.channel(id).merge_pending().unwrap();
    winner.catch_up(&server, id, &voters).await;
    alice.catch_up(&server, id, &voters).await;
    let auth = alice.channel(id).epoch_authenticator();
    for m in [&bob, &carol] {
        assert_eq!(m.channel(id).epoch(), 3);
        assert_eq!(m.channel(id).epoch_authenticator(), auth);
    }

    // Restart mid-conversation.
    server.stop().await;
    server = TestServer::start(dir.path(), "chan.example").await;
    let (status, sent, _) = bob.post_message(&server, id, b"after the restart").await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let (texts, _) = receive(&server, &alice, id, 0).await;
    assert_eq!(texts, vec![b"after the restart".to_vec()]);
    let (texts, next) = receive(&server, &carol, id, carol_cursor).await;
    assert_eq!(texts, vec![b"after the restart".to_vec()]);
    carol_cursor = next;

    // Alice removes Carol; Carol learns it and can no longer post.
    let out = alice.channel(id).remove(&[carol.mls.device_id()]).unwrap();
    let answer = alice.post_commit(&server, id, 3, &out).await;
    certified(&voters, id, 3, &out, &answer);
    alice.channel(id).merge_pending().unwrap();
    let (commits, _) = carol.events(&server, "commit", carol_cursor).await;
    assert_eq!(commits.len(), 1, "the removed member gets the commit");
    assert_eq!(commits[0]["epoch"], 3);
    // Still at epoch 3 in her own view, Carol can encrypt, but not post.
    let (status, body, _) = carol.post_message(&server, id, b"still here?").await;
    assert_error(&(status, body), StatusCode::FORBIDDEN, "not_member");
    carol.catch_up(&server, id, &voters).await;
    assert!(!carol.channel(id).is_active());
    bob.catch_up(&server, id, &voters).await;
    assert_eq!(
        bob.channel(id).epoch_authenticator(),
        alice.channel(id).epoch_authenticator()
    );
    let (status, sent, _) = alice.post_message(&server, id, b"just us").await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let (texts, _) = receive(&server, &bob, id, bob_cursor).await;
    assert_eq!(texts, vec![b"just us".to_vec()]);

    // One more restart, with the server's MLS state lost (as if it crashed
    // between storing a commit and merging it): it is rebuilt from the
    // store. Then the removed member still reads its history.
    server.stop().await;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.starts_with(kith_server::MLS_DB_FILE) {
            std::fs::remove_file(path).unwrap();
        }
    }
    server = TestServer::start(dir.path(), "chan.example").await;
    let (status, body) = carol
        .http
        .get(&server, &format!("/v0/channels/{id}/commits?from_epoch=3"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["commits"].as_array().unwrap().len(), 1);
    let out = alice.channel(id).self_update().unwrap();
    let answer = alice.post_commit(&server, id, 4, &out).await;
    certified(&voters, id, 4, &out, &answer);
    alice.channel(id).merge_pending().unwrap();

    let (status, metrics) = {
        let resp = client().get(server.url("/metrics")).send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    };
    assert_eq!(status, StatusCode::OK);
    assert!(metrics.contains("kith_commits_accepted_total"));
    assert!(metrics.contains("kith_channel_messages_total"));
    server.stop().await;

    // No plaintext anywhere in the data directory.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for text in [&b"hello kith"[..], b"after the restart", b"just us"] {
            assert!(!bytes.windows(text.len()).any(|w| w == text));
        }
    }
}

/// Puts the store files (`kith.db` and its WAL) of the stopped server in
/// `from` in place of those in `to`.
fn copy_store(from: &std::path::Path, to: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let name = format!("{}{suffix}", kith_server::DB_FILE);
        let _ = std::fs::remove_file(to.join(&name));
        if from.join(&name).exists() {
            std::fs::copy(from.join(&name), to.join(&name)).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mls_state_ahead_of_the_store_is_rebuilt_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let saved = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(dir.path(), "ahead.example").await;
    let voters = voters(&server).await;
    let alice = Member::join(&server, "alice").await;
    let channel = alice
        .mls
        .create_channel(ChannelId::random(), &settings(&alice))
        .unwrap();
    let id = channel.id();
    let (status, body) = create(&server, &alice, &channel).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(channel);
    let first = alice.channel(id).self_update().unwrap();
    let answer = alice.post_commit(&server, id, 0, &first).await;
    certified(&voters, id, 0, &first, &answer);
    alice.channel(id).merge_pending().unwrap();

    // The store as it is at epoch 1; then a commit to epoch 2, which the
    // store, the MLS state and the Raft log all record.
    server.stop().await;
    copy_store(dir.path(), saved.path());
    server = TestServer::start(dir.path(), "ahead.example").await;
    let lost = alice.channel(id).self_update().unwrap();
    let answer = alice.post_commit(&server, id, 1, &lost).await;
    certified(&voters, id, 1, &lost, &answer);
    alice.channel(id).merge_pending().unwrap();

    // What an OS crash can leave (the validator's MLS write is not synced,
    // its store write is synced after it): `mls.db` and the log at epoch
    // 2, the store's last transactions taken back, at epoch 1.
    server.stop().await;
    copy_store(saved.path(), dir.path());
    server = TestServer::start(dir.path(), "ahead.example").await;

    // Listing the commits runs the orderer, whose log replays the lost
    // commit: the MLS state is rebuilt at the store's epoch, and the
    // commit accepted and certified again.
    let (status, body) = alice
        .http
        .get(&server, &format!("/v0/channels/{id}/commits?from_epoch=1"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let commits = body["commits"].as_array().unwrap();
    assert_eq!(commits.len(), 1, "{body}");
    assert_eq!(commits[0]["epoch"], 1);
    assert_eq!(commits[0]["commit"], b64(&lost.commit));
    OrderingCertificateIn::decode(&unb64(commits[0]["certificate"].as_str().unwrap()))
        .unwrap()
        .verify_for(id, 1, &lost.commit, &voters)
        .unwrap();
    // And the channel goes on from epoch 2.
    let next = alice.channel(id).self_update().unwrap();
    let answer = alice.post_commit(&server, id, 2, &next).await;
    certified(&voters, id, 2, &next, &answer);
    alice.channel(id).merge_pending().unwrap();
    let (status, sent, _) = alice.post_message(&server, id, b"still here").await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), "mem.example", |c| {
        c.backend = kith_server::Backend::Memory;
        c.limits.max_message_bytes = 4096;
    })
    .await;
    let voters = voters(&server).await;
    let alice = Member::join(&server, "alice").await;
    let bob = Member::join(&server, "bob").await;
    let channel = alice
        .mls
        .create_channel(ChannelId::random(), &settings(&alice))
        .unwrap();
    let id = channel.id();
    let group_info = b64(&channel.group_info().unwrap());
    let tree = b64(&channel.ratchet_tree().unwrap());
    drop(channel);

    // Creation.
    let no_auth = send(client().post(server.url("/v0/channels")).json(&json!({}))).await;
    assert_error(&no_auth, StatusCode::UNAUTHORIZED, "unauthorized");
    for body in [
        json!({}),
        json!({"channel": "xyz", "group_info": group_info, "ratchet_tree": tree}),
        json!({"channel": id.to_string(), "group_info": "!!", "ratchet_tree": tree}),
        json!({"channel": id.to_string(), "group_info": b64(b"junk"), "ratchet_tree": tree}),
        json!({"channel": id.to_string(), "group_info": group_info, "ratchet_tree": b64(b"junk")}),
        json!({"channel": ChannelId::random().to_string(), "group_info": group_info, "ratchet_tree": tree}),
        json!({"channel": id.to_string(), "group_info": group_info, "ratchet_tree": tree, "extra": 1}),
    ] {
        let got = alice.http.post(&server, "/v0/channels", body).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    }
    let raw = send(
        alice
            .http
            .authed(alice.http.http.post(server.url("/v0/channels")))
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_error(&raw, StatusCode::BAD_REQUEST, "bad_request");
    let (status, body) = alice.http.get(&server, "/v0/channels").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"channels": []})));
    let (status, body) = alice
        .http
        .post(
            &server,
            "/v0/channels",
            json!({"channel": id.to_string(), "group_info": group_info, "ratchet_tree": tree}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Commits.
    let unknown = ChannelId::random();
    let out = alice.channel(id).add(&[bob.key_package()]).unwrap();
    let got = alice.post_commit(&server, unknown, 0, &out).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = bob.post_commit(&server, id, 0, &out).await;
    assert_error(&got, StatusCode::FORBIDDEN, "not_member");
    let got = alice.post_commit(&server, id, 5, &out).await;
    assert_error(&got, StatusCode::CONFLICT, "wrong_epoch");
    assert_eq!(got.1["current_epoch"], 0);
    let mut junk = out.clone();
    junk.commit = b"junk".to_vec();
    assert_error(
        &alice.post_commit(&server, id, 0, &junk).await,
        StatusCode::BAD_REQUEST,
        "rejected",
    );
    let mut wrong_info = out.clone();
    wrong_info.group_info = unb64(&group_info);
    assert_error(
        &alice.post_commit(&server, id, 0, &wrong_info).await,
        StatusCode::BAD_REQUEST,
        "rejected",
    );
    for body in [
        json!({"epoch": 0}),
        json!({"epoch": 0, "commit": "@@", "group_info": group_info}),
        json!({"epoch": -1, "commit": b64(&out.commit), "group_info": group_info}),
        json!({"epoch": 0, "commit": b64(&out.commit), "group_info": group_info, "x": 1}),
    ] {
        let got = alice
            .http
            .post(&server, &format!("/v0/channels/{id}/commits"), body)
            .await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    }
    // None of that moved the channel; the real commit still goes through.
    let answer = alice.post_commit(&server, id, 0, &out).await;
    certified(&voters, id, 0, &out, &answer);
    alice.channel(id).merge_pending().unwrap();
    let welcome = out.welcome.clone().unwrap();
    let (_, tree1) = bob
        .http
        .get(&server, &format!("/v0/channels/{id}/tree"))
        .await;
    bob.mls
        .join(&welcome, &unb64(tree1["ratchet_tree"].as_str().unwrap()))
        .unwrap();

    // A commit submitted by another member than its committer.
    let update = alice.channel(id).self_update().unwrap();
    assert_error(
        &bob.post_commit(&server, id, 1, &update).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    let answer = alice.post_commit(&server, id, 1, &update).await;
    certified(&voters, id, 1, &update, &answer);
    alice.channel(id).merge_pending().unwrap();
    bob.catch_up(&server, id, &voters).await;

    // Trees and lists.
    for (path, status, code) in [
        ("tree?epoch=99", StatusCode::NOT_FOUND, "not_yet"),
        ("tree?epoch=abc", StatusCode::BAD_REQUEST, "bad_request"),
        ("commits?limit=x", StatusCode::BAD_REQUEST, "bad_request"),
        ("messages?after=-3", StatusCode::BAD_REQUEST, "bad_request"),
    ] {
        let got = alice
            .http
            .get(&server, &format!("/v0/channels/{id}/{path}"))
            .await;
        assert_error(&got, status, code);
    }
    let got = alice
        .http
        .get(&server, &format!("/v0/channels/{unknown}/tree"))
        .await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    let got = alice.http.get(&server, "/v0/channels/nothex/tree").await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    let (status, page) = bob
        .http
        .get(
            &server,
            &format!("/v0/channels/{id}/commits?from_epoch=1&limit=1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["commits"].as_array().unwrap().len(), 1);
    assert_eq!(page["commits"][0]["epoch"], 1);
    assert_eq!(page["commits"][0]["welcome"], Value::Null);

    // Messages.
    let path = format!("/v0/channels/{id}/messages");
    for (body, status, code) in [
        (
            json!({"epoch": 9, "message": b64(b"m")}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            json!({"epoch": 2, "message": ""}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            json!({"epoch": 2, "message": "@"}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (json!({"epoch": 2}), StatusCode::BAD_REQUEST, "bad_request"),
        (
            json!({"epoch": 2, "message": b64(&[0u8; 5000])}),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
    ] {
        let got = alice.http.post(&server, &path, body).await;
        assert_error(&got, status, code);
    }
    let (status, msgs) = bob.http.get(&server, &path).await;
    assert_eq!((status, msgs), (StatusCode::OK, json!({"messages": []})));
    assert!(bob.events(&server, "message", 0).await.0.is_empty());
    let (status, sent, _) = alice.post_message(&server, id, b"fine").await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    let (texts, _) = receive(&server, &bob, id, 0).await;
    assert_eq!(texts, vec![b"fine".to_vec()]);
    server.stop().await;
}

/// A channel on a.test may not gain a device sponsored only by a server
/// a.test blocks; devices of other servers it fetched are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_servers_device_cannot_be_added() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster =
        kith_testkit::Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], |_| {}).await;
    let view = |c: &kith_testkit::Cluster, n: &str| {
        TestServer::view(c.server(n).url(), c.server(n).name())
    };
    let (mut a, b, c) = (
        view(&cluster, "a.test"),
        view(&cluster, "b.test"),
        view(&cluster, "c.test"),
    );
    let mut alice = Member::join(&a, "alice").await;
    let bob = Member::join(&b, "bob").await;
    let carol = Member::join(&c, "carol").await;
    // a.test learns bob's and carol's records, then starts blocking c.test.
    for handle in ["bob@b.test", "carol@c.test"] {
        let (status, body) = alice.http.get(&a, &format!("/v0/users/{handle}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let mut stopped = cluster.take("a.test").stop_keeping().await;
    stopped
        .config_mut()
        .blocked_servers
        .insert("c.test".parse().unwrap());
    cluster.put(stopped.start().await);
    a = view(&cluster, "a.test");
    alice.http.login(&a).await;

    let channel = alice
        .mls
        .create_channel(ChannelId::random(), &settings(&alice))
        .unwrap();
    let id = channel.id();
    assert_eq!(create(&a, &alice, &channel).await.0, StatusCode::OK);
    drop(channel);
    let out = alice.channel(id).add(&[carol.key_package()]).unwrap();
    assert_error(
        &alice.post_commit(&a, id, 0, &out).await,
        StatusCode::FORBIDDEN,
        "blocked",
    );
    alice.channel(id).clear_pending().unwrap();
    // A device a.test has never seen is refused while it blocks anyone.
    let stranger = Member::join(&b, "stranger").await;
    let out = alice.channel(id).add(&[stranger.key_package()]).unwrap();
    assert_error(
        &alice.post_commit(&a, id, 0, &out).await,
        StatusCode::FORBIDDEN,
        "blocked",
    );
    alice.channel(id).clear_pending().unwrap();
    let out = alice.channel(id).add(&[bob.key_package()]).unwrap();
    let (status, body) = alice.post_commit(&a, id, 0, &out).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    cluster.stop().await;
}

/// `POST .../messages?epoch=E` with an `application/octet-stream` body.
async fn post_binary(
    server: &TestServer,
    who: &Member,
    id: ChannelId,
    query: &str,
    body: &[u8],
) -> (StatusCode, Value) {
    send(
        who.http
            .authed(
                who.http
                    .http
                    .post(server.url(&format!("/v0/channels/{id}/messages{query}"))),
            )
            .header("content-type", "application/octet-stream")
            .body(body.to_vec()),
    )
    .await
}

/// `GET /v0/events` as binary frames.
async fn binary_events(server: &TestServer, who: &Member, after: u64) -> Vec<EventFrame> {
    let response = who
        .http
        .authed(
            who.http
                .http
                .get(server.url(&format!("/v0/events?after={after}&limit=500"))),
        )
        .header("accept", "application/octet-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    decode_frames(&response.bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_travel_in_binary_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "bin.example").await;
    let voters = voters(&server).await;
    let alice = Member::join(&server, "alice").await;
    let bob = Member::join(&server, "bob").await;
    let dave = Member::join(&server, "dave").await;
    let channel = alice
        .mls
        .create_channel(ChannelId::random(), &settings(&alice))
        .unwrap();
    let id = channel.id();
    assert_eq!(create(&server, &alice, &channel).await.0, StatusCode::OK);
    drop(channel);
    let out = alice.channel(id).add(&[bob.key_package()]).unwrap();
    let answer = alice.post_commit(&server, id, 0, &out).await;
    certified(&voters, id, 0, &out, &answer);
    alice.channel(id).merge_pending().unwrap();
    let (_, tree) = bob
        .http
        .get(&server, &format!("/v0/channels/{id}/tree?epoch=1"))
        .await;
    bob.mls
        .join(
            &out.welcome.clone().unwrap(),
            &unb64(tree["ratchet_tree"].as_str().unwrap()),
        )
        .unwrap();

    // The body is the MLS message and nothing else; the answer is the JSON
    // form's.
    let message = alice.channel(id).encrypt(b"raw bytes").unwrap();
    let (status, sent) = post_binary(&server, &alice, id, "?epoch=1", &message).await;
    assert_eq!(status, StatusCode::OK, "{sent}");
    assert_eq!(sent["seq"], 1);
    assert_eq!(
        sent["id"],
        hex::encode(kith_proto::sign::message_id(&message))
    );
    // The JSON form still works beside it.
    let (status, body, json_message) = alice.post_message(&server, id, b"as json").await;
    assert_eq!((status, body["seq"].clone()), (StatusCode::OK, json!(2)));

    // Only the current epoch is taken: a stale or future one is refused
    // with the epoch the channel is at, and nothing is stored.
    let stale = alice.channel(id).encrypt(b"late").unwrap();
    for query in ["?epoch=0", "?epoch=2"] {
        let got = post_binary(&server, &alice, id, query, &stale).await;
        assert_error(&got, StatusCode::CONFLICT, "wrong_epoch");
        assert_eq!(got.1["current_epoch"], 1);
    }
    for query in ["", "?epoch=x", "?epoch=1&more=1"] {
        let got = post_binary(&server, &alice, id, query, &stale).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    }
    let got = post_binary(&server, &alice, id, "?epoch=1", &[]).await;
    assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    let got = post_binary(&server, &dave, id, "?epoch=1", &stale).await;
    assert_error(&got, StatusCode::FORBIDDEN, "not_member");
    let got = post_binary(&server, &alice, ChannelId::random(), "?epoch=1", &stale).await;
    assert_error(&got, StatusCode::NOT_FOUND, "not_found");
    // The body must be a PrivateMessage of this channel at this epoch:
    // receivers of the compact frame read both from its header.
    let mut other_channel = stale.clone();
    other_channel[5] ^= 1;
    let mut public = stale.clone();
    public[3] = 1;
    for body in [&b"not MLS"[..], &other_channel, &public, &stale[..20]] {
        let got = post_binary(&server, &alice, id, "?epoch=1", body).await;
        assert_error(&got, StatusCode::BAD_REQUEST, "bad_request");
    }
    // The JSON form takes any bytes; such a message travels with every
    // field explicit.
    let (status, body) = alice
        .http
        .post(
            &server,
            &format!("/v0/channels/{id}/messages"),
            json!({ "epoch": 1, "message": b64(b"not MLS") }),
        )
        .await;
    assert_eq!((status, body["seq"].clone()), (StatusCode::OK, json!(3)));

    // Bob reads the three messages as binary frames, with the JSON form's
    // cursors and fields: the MLS ones compact (channel and epoch from the
    // MLS header, no sender), the other explicit.
    let (json_events, _) = bob.events(&server, "message", 0).await;
    let frames = binary_events(&server, &bob, 0).await;
    assert_eq!(frames.len(), 3);
    let mut channel = bob.channel(id);
    for ((frame, event), (bytes, text)) in frames.iter().zip(&json_events).zip([
        (&message, &b"raw bytes"[..]),
        (&json_message, &b"as json"[..]),
    ]) {
        let EventFrame::Compact { cursor, event: m } = frame else {
            panic!("expected a compact message frame, got {frame:?}");
        };
        assert_eq!(json!(cursor), event["cursor"]);
        assert_eq!(m.channel(), id);
        assert_eq!(json!(m.seq), event["seq"]);
        assert_eq!(m.epoch(), 1);
        assert_eq!(json!(m.received_at), event["received_at"]);
        assert_eq!(m.message(), &bytes[..]);
        assert_eq!(
            json!(hex::encode(kith_proto::sign::message_id(m.message()))),
            event["id"]
        );
        match channel.process(m.message()).unwrap() {
            Incoming::Application { sender, data, .. } => {
                assert_eq!((sender, &data[..]), (alice.http.id, text));
            }
            other => panic!("expected application data, got {other:?}"),
        }
    }
    drop(channel);
    let EventFrame::Message { cursor, event: m } = &frames[2] else {
        panic!("expected an explicit message frame, got {:?}", frames[2]);
    };
    assert_eq!(json!(cursor), json_events[2]["cursor"]);
    assert_eq!((m.channel, m.seq, m.epoch), (id, 3, 1));
    assert_eq!(m.sender, alice.http.id);
    assert_eq!(m.message, b"not MLS");
    let last = frames.last().unwrap().cursor();
    assert!(binary_events(&server, &bob, last).await.is_empty());

    // Other kinds travel as their JSON text, unchanged.
    let (status, all) = alice.http.get(&server, "/v0/events?after=0").await;
    assert_eq!(status, StatusCode::OK);
    let frames = binary_events(&server, &alice, 0).await;
    let texts: Vec<Value> = frames
        .iter()
        .map(|f| match f {
            EventFrame::Json { json, .. } => serde_json::from_str(json).unwrap(),
            other => panic!("expected a JSON frame, got {other:?}"),
        })
        .collect();
    assert_eq!(json!(texts), all["events"]);
    assert!(texts.iter().any(|e| e["kind"] == "commit"));
    server.stop().await;
}

/// `POST .../messages?epoch=E` with a message batch body (spec §6.7).
async fn post_batch(
    server: &TestServer,
    who: &Member,
    id: ChannelId,
    query: &str,
    content_type: &str,
    body: &[u8],
) -> (StatusCode, Value) {
    send(
        who.http
            .authed(
                who.http
                    .http
                    .post(server.url(&format!("/v0/channels/{id}/messages{query}"))),
            )
            .header("content-type", content_type)
            .body(body.to_vec()),
    )
    .await
}

/// A refused batch: what it is, who posts it, the query, the content type,
/// the body, and the status, code and the words that must name the message.
type BatchCase<'a> = (
    &'a str,
    &'a Member,
    &'a str,
    &'a str,
    Vec<u8>,
    StatusCode,
    &'a str,
    Option<&'a str>,
);

/// A multi-message send stores every message of the body in its order, at
/// consecutive positions, and delivers them so; a body with any bad
/// message (another epoch, not MLS, over the limit, cut short, too many)
/// is refused whole, naming the message, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_batch_is_stored_whole_and_in_order_or_not_at_all() {
    use kith_proto::batch::{MAX_BATCH_MESSAGES, MESSAGE_BATCH, encode_batch};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), "batch.example").await;
    let voters = voters(&server).await;
    let alice = Member::join(&server, "alice").await;
    let bob = Member::join(&server, "bob").await;
    let dave = Member::join(&server, "dave").await;
    let channel = alice
        .mls
        .create_channel(ChannelId::random(), &settings(&alice))
        .unwrap();
    let id = channel.id();
    assert_eq!(create(&server, &alice, &channel).await.0, StatusCode::OK);
    drop(channel);
    let out = alice.channel(id).add(&[bob.key_package()]).unwrap();
    let answer = alice.post_commit(&server, id, 0, &out).await;
    certified(&voters, id, 0, &out, &answer);
    alice.channel(id).merge_pending().unwrap();
    let (_, tree) = bob
        .http
        .get(&server, &format!("/v0/channels/{id}/tree?epoch=1"))
        .await;
    bob.mls
        .join(
            &out.welcome.clone().unwrap(),
            &unb64(tree["ratchet_tree"].as_str().unwrap()),
        )
        .unwrap();
    let stored = || async {
        let (status, body) = alice
            .http
            .get(&server, &format!("/v0/channels/{id}/messages?limit=500"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["messages"].as_array().unwrap().len()
    };

    // A refused batch stores nothing and appends no event: checked after
    // every refusal below.
    let texts: Vec<String> = (0..5).map(|i| format!("batched {i}")).collect();
    let good: Vec<Vec<u8>> = texts
        .iter()
        .map(|t| alice.channel(id).encrypt(t.as_bytes()).unwrap())
        .collect();
    let mut other_epoch = good[2].clone();
    // The header: version 2, wire format 2, group id length 1, 16 bytes of
    // group id, then the 8-byte epoch.
    other_epoch[5 + 16 + 7] ^= 3;
    let with = |index: usize, bad: &[u8]| {
        let mut messages: Vec<&[u8]> = good.iter().map(Vec::as_slice).collect();
        messages[index] = bad;
        encode_batch(messages)
    };
    let good_body = encode_batch(good.iter().map(Vec::as_slice));
    let too_big = vec![7u8; 300 * 1024];
    let too_many = encode_batch(vec![&good[0][..]; MAX_BATCH_MESSAGES + 1]);
    let cases: Vec<BatchCase<'_>> = vec![
        (
            "another epoch in the header",
            &alice,
            "?epoch=1",
            MESSAGE_BATCH,
            with(2, &other_epoch),
            StatusCode::BAD_REQUEST,
            "bad_request",
            Some("message 2 "),
        ),
        (
            "garbage",
            &alice,
            "?epoch=1",
            MESSAGE_BATCH,
            with(1, b"not MLS at all"),
            StatusCode::BAD_REQUEST,
            "bad_request",
            Some("message 1 "),
        ),
        (
            "a message over the limit",
            &alice,
            "?epoch=1",
            MESSAGE_BATCH,
            with(3, &too_big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            Some("message 3 "),
        ),
        (
            "cut short",
            &alice,
            "?epoch=1",
            MESSAGE_BATCH,
            good_body[..good_body.len() - 1].to_vec(),
            StatusCode::BAD_REQUEST,
            "bad_request",
            Some("message 4"),
        ),
        (
            "an empty message",
            &alice,
            "?epoch=1",
            MESSAGE_BATCH,
            [&good_body[..], &[0, 0, 0, 0]].concat(),
            StatusCode::BAD_REQUEST,
            "bad_request",
            Some("message 5 "),
        ),
        (
            "too many messages",
            &alice,
            "?epoch=1",
            MESSAGE_BATCH,
            too_many,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            None,
        ),
        (
            "no message",
            &alice,
            "?epoch=1",
            MESSAGE_BATCH,
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
        ),
        (
            "a stale epoch",
            &alice,
            "?epoch=0",
            MESSAGE_BATCH,
            good_body.clone(),
            StatusCode::CONFLICT,
            "wrong_epoch",
            None,
        ),
        (
            "no epoch",
            &alice,
            "",
            MESSAGE_BATCH,
            good_body.clone(),
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
        ),
        (
            "a non-member",
            &dave,
            "?epoch=1",
            MESSAGE_BATCH,
            good_body.clone(),
            StatusCode::FORBIDDEN,
            "not_member",
            None,
        ),
        (
            "an unknown content type",
            &alice,
            "?epoch=1",
            "application/x-kith-unknown",
            good_body.clone(),
            StatusCode::BAD_REQUEST,
            "bad_request",
            None,
        ),
    ];
    for (what, who, query, content_type, body, status, code, names) in cases {
        let got = post_batch(&server, who, id, query, content_type, &body).await;
        assert_error(&got, status, code);
        if let Some(names) = names {
            let message = got.1["message"].as_str().unwrap();
            assert!(message.contains(names), "{what}: {message}");
        }
        assert_eq!(stored().await, 0, "{what} stored something");
        assert!(
            bob.events(&server, "message", 0).await.0.is_empty(),
            "{what}"
        );
    }

    // The good batch: one answer per message, in order, at consecutive
    // positions.
    let got = post_batch(&server, &alice, id, "?epoch=1", MESSAGE_BATCH, &good_body).await;
    assert_eq!(got.0, StatusCode::OK, "{}", got.1);
    let answers = got.1["messages"].as_array().unwrap();
    assert_eq!(answers.len(), good.len());
    for (i, (answer, message)) in answers.iter().zip(&good).enumerate() {
        assert_eq!(answer["seq"], json!(i + 1));
        assert_eq!(
            answer["id"],
            hex::encode(kith_proto::sign::message_id(message))
        );
        assert_eq!(answer["received_at"], answers[0]["received_at"]);
    }
    // Bob receives them in that order and reads them.
    let frames = binary_events(&server, &bob, 0).await;
    assert_eq!(frames.len(), good.len());
    let mut channel = bob.channel(id);
    for (i, frame) in frames.iter().enumerate() {
        let EventFrame::Compact { event: m, .. } = frame else {
            panic!("expected a compact message frame, got {frame:?}");
        };
        assert_eq!(m.seq, i as u64 + 1);
        match channel.process(m.message()).unwrap() {
            Incoming::Application { sender, data, .. } => {
                assert_eq!((sender, &data[..]), (alice.http.id, texts[i].as_bytes()));
            }
            other => panic!("expected application data, got {other:?}"),
        }
    }
    drop(channel);
    // The same body again is answered as stored, with no new events.
    let again = post_batch(&server, &alice, id, "?epoch=1", MESSAGE_BATCH, &good_body).await;
    assert_eq!(again, got);
    assert_eq!(stored().await, good.len());
    assert_eq!(binary_events(&server, &bob, 0).await.len(), good.len());
    server.stop().await;
}

/// A device that floods a channel with commits gets 429 `rate_limited`
/// once its burst is spent (spec §10.8), and the refused commit changes
/// nothing; another device of the channel still commits. (With one token a
/// minute, the burst could only refill if these few commits took a minute.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_flooding_commits_is_rate_limited_and_others_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir.path(), "flood.example", |c| {
        c.limits.commit_burst = 3;
        c.limits.commits_per_minute = 1;
    })
    .await;
    let voters = voters(&server).await;
    let alice = Member::join(&server, "alice").await;
    let bob = Member::join(&server, "bob").await;
    let channel = alice
        .mls
        .create_channel(ChannelId::random(), &settings(&alice))
        .unwrap();
    let id = channel.id();
    assert_eq!(create(&server, &alice, &channel).await.0, StatusCode::OK);
    drop(channel);

    // Alice's burst: she adds Bob, then updates twice.
    let out = alice.channel(id).add(&[bob.key_package()]).unwrap();
    certified(
        &voters,
        id,
        0,
        &out,
        &alice.post_commit(&server, id, 0, &out).await,
    );
    alice.channel(id).merge_pending().unwrap();
    for epoch in 1..3 {
        let out = alice.channel(id).self_update().unwrap();
        let answer = alice.post_commit(&server, id, epoch, &out).await;
        certified(&voters, id, epoch, &out, &answer);
        alice.channel(id).merge_pending().unwrap();
    }

    // Her fourth commit, valid as it is, is refused and not ordered.
    let (_, before) = alice.http.get(&server, "/v0/channels").await;
    assert_eq!(before["channels"][0]["epoch"], 3, "{before}");
    let flood = alice.channel(id).self_update().unwrap();
    let limited = alice.post_commit(&server, id, 3, &flood).await;
    assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(limited.1["retry_after_ms"].as_u64().unwrap() > 0);
    // Resubmitting it is refused too.
    let again = alice.post_commit(&server, id, 3, &flood).await;
    assert_error(&again, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let (_, after) = alice.http.get(&server, "/v0/channels").await;
    assert_eq!(after, before);
    let (status, commits) = alice
        .http
        .get(&server, &format!("/v0/channels/{id}/commits?from_epoch=0"))
        .await;
    assert_eq!(status, StatusCode::OK, "{commits}");
    assert_eq!(commits["commits"].as_array().unwrap().len(), 3);
    alice.channel(id).clear_pending().unwrap();

    // Bob, in the same channel, has his own bucket.
    let (status, body) = bob
        .http
        .get(&server, &format!("/v0/channels/{id}/commits?from_epoch=0"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let welcome = unb64(body["commits"][0]["welcome"].as_str().unwrap());
    let (_, tree) = bob
        .http
        .get(&server, &format!("/v0/channels/{id}/tree?epoch=1"))
        .await;
    bob.mls
        .join(&welcome, &unb64(tree["ratchet_tree"].as_str().unwrap()))
        .unwrap();
    bob.catch_up(&server, id, &voters).await;
    let out = bob.channel(id).self_update().unwrap();
    let answer = bob.post_commit(&server, id, 3, &out).await;
    certified(&voters, id, 3, &out, &answer);
    bob.channel(id).merge_pending().unwrap();
    alice.catch_up(&server, id, &voters).await;
    assert_eq!(
        alice.channel(id).epoch_authenticator(),
        bob.channel(id).epoch_authenticator()
    );
    server.stop().await;
}
