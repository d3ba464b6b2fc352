//! API fuzzing (issue 7): every client and federation endpoint of a real
//! homeserver on loopback is sent malformed, truncated, oversized, wrongly
//! typed, unauthenticated, wrongly signed and out-of-order input, then
//! seeded random bodies and random mutations of valid ones. Every refusal
//! must be a 4xx with a JSON `{"error", "message"}` body — never a 5xx,
//! never a dropped connection (a handler panic) — the server must still
//! answer afterwards, and its observable state (events, inboxes, key
//! package counts, channels, commits, messages, records, metrics) must be
//! exactly what it was before.
//!
//! The valid bodies that get mutated are chosen so that the request, even
//! unmutated, changes nothing: an idempotent re-registration, a key-package
//! upload to a full store, a deposit into a full inbox or one already
//! delivered, a commit submitted by a member who did not make it, a message
//! from a non-member, a claim for a user without packages. A mutation that
//! happens to be valid may then be answered with a 2xx, but must still
//! change nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Device, TestServer, b64, client, now_ms};
use kith_mls::{ChannelExtension, ChannelSettings, ContentType, MlsStore, Policy};
use kith_proto::{ChannelId, FederationRequest, Handle, SecretKey, ServerName};
use kith_server::Config;
use kith_testkit::Cluster;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The limits the fuzzed server runs with: small, so that going over them
/// is cheap.
const MAX_BODY: usize = 64 * 1024;
const MAX_ITEM: usize = 1024;
const MAX_INBOX: usize = 2;
const MAX_PACKAGES_STORED: usize = 4;
const MAX_PACKAGES_PER_UPLOAD: usize = 3;

/// Random bodies and mutations per POST endpoint.
const RANDOM_BODIES: usize = 40;
const MUTATIONS: usize = 150;
/// Mutated signature headers per federation POST endpoint.
const SIGNATURE_MUTATIONS: usize = 40;

fn limits(config: &mut Config) {
    config.limits.max_body_bytes = MAX_BODY;
    config.limits.max_envelope_bytes = MAX_ITEM;
    config.limits.max_key_package_bytes = MAX_ITEM;
    config.limits.max_message_bytes = MAX_ITEM;
    config.limits.max_inbox_items = MAX_INBOX;
    config.limits.max_key_packages_stored = MAX_PACKAGES_STORED;
    config.limits.max_key_packages_per_upload = MAX_PACKAGES_PER_UPLOAD;
    config.federation.retry_base_ms = 50;
    config.federation.retry_max_ms = 300;
    config.federation.request_timeout_ms = 5_000;
    config.federation.connect_timeout_ms = 1_000;
    // A name whose keys cannot be had: it resolves to a closed loopback port.
    config.resolve.insert(
        "gone.test".parse::<ServerName>().unwrap(),
        "http://127.0.0.1:1".into(),
    );
}

// -- a seeded generator ---------------------------------------------------------

/// SplitMix64: the same seed gives the same run every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    /// Random bytes; half the time only JSON-looking characters.
    fn body(&mut self) -> Vec<u8> {
        let len = self.below(300);
        if self.below(2) == 0 {
            (0..len).map(|_| self.byte()).collect()
        } else {
            (0..len)
                .map(|_| JSONISH[self.below(JSONISH.len())])
                .collect()
        }
    }
}

/// Bytes that mean something to a JSON or base64 parser.
const JSONISH: &[u8] = b"{}[]\",:0123456789-+.eE\\/ntrufalsAZaz_=\x00\xff";

/// One to three random edits: bit flips, truncations, deleted or
/// duplicated runs, inserted or replaced bytes.
fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut out = valid.to_vec();
    for _ in 0..=rng.below(3) {
        if out.is_empty() {
            out.push(rng.byte());
            continue;
        }
        let at = rng.below(out.len());
        let run_end = (at + 1 + rng.below(16)).min(out.len());
        match rng.below(6) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out.truncate(at),
            2 => {
                out.drain(at..run_end);
            }
            3 => {
                let run = out[at..run_end].to_vec();
                out.splice(at..at, run);
            }
            4 => out.insert(at, JSONISH[rng.below(JSONISH.len())]),
            _ => out[at] = rng.byte(),
        }
    }
    out
}

/// A mutation that keeps the JSON well formed, to get past the JSON and
/// base64 checks: one field's decoded bytes mutated and encoded again, or
/// one number replaced by an edge value.
fn mutate_field(rng: &mut Rng, valid: &Value) -> Vec<u8> {
    let mut copy = valid.clone();
    let Value::Object(fields) = &mut copy else {
        panic!("templates are objects")
    };
    let keys: Vec<String> = fields.keys().cloned().collect();
    let key = &keys[rng.below(keys.len())];
    let field = &mut fields[key];
    match field {
        Value::Number(n) => {
            let n = n.as_u64().unwrap_or(0);
            let edges = [
                0,
                1,
                n.wrapping_sub(1),
                n + 1,
                i64::MAX as u64,
                1 << 63,
                u64::MAX,
            ];
            *field = json!(edges[rng.below(edges.len())]);
        }
        Value::String(text) => {
            let bytes = URL_SAFE_NO_PAD
                .decode(text.as_bytes())
                .unwrap_or_else(|_| text.as_bytes().to_vec());
            *field = json!(URL_SAFE_NO_PAD.encode(mutate(rng, &bytes)));
        }
        Value::Array(items) if !items.is_empty() => {
            let at = rng.below(items.len());
            let bytes = common::unb64(items[at].as_str().unwrap());
            items[at] = json!(URL_SAFE_NO_PAD.encode(mutate(rng, &bytes)));
        }
        _ => {}
    }
    copy.to_string().into_bytes()
}

// -- answers --------------------------------------------------------------------

struct Answer {
    status: StatusCode,
    text: String,
}

async fn call(what: &str, req: reqwest::RequestBuilder) -> Answer {
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: no answer (did a handler panic?): {e}"));
    let status = resp.status();
    let text = resp
        .text()
        .await
        .unwrap_or_else(|e| panic!("{what}: the answer broke off: {e}"));
    Answer { status, text }
}

/// An answer's endpoint, status and error code, to count.
fn tally<'a>(endpoint: &'a str, answer: &Answer) -> (&'a str, u16, String) {
    let code = serde_json::from_str::<Value>(&answer.text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (endpoint, answer.status.as_u16(), code)
}

/// A refusal: a 4xx whose body is `{"error": code, "message": text}`.
fn assert_refused(what: &str, a: &Answer) -> Value {
    assert!(
        a.status.is_client_error(),
        "{what}: expected a 4xx, got {} {}",
        a.status,
        a.text
    );
    let body: Value = serde_json::from_str(&a.text)
        .unwrap_or_else(|_| panic!("{what}: the {} answer is not JSON: {:?}", a.status, a.text));
    assert!(
        body["error"].as_str().is_some_and(|c| !c.is_empty()),
        "{what}: no error code: {}",
        a.text
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no error message: {}",
        a.text
    );
    body
}

/// A refusal with this status and code.
fn assert_refused_with(what: &str, a: &Answer, status: StatusCode, code: &str) {
    let body = assert_refused(what, a);
    assert_eq!(a.status, status, "{what}: {}", a.text);
    assert_eq!(body["error"], code, "{what}: {}", a.text);
}

/// For input that may happen to be valid: a success or a proper refusal.
fn assert_handled(what: &str, a: &Answer) {
    if !a.status.is_success() {
        assert_refused(what, a);
    }
}

// -- the fixture ----------------------------------------------------------------

/// Two servers (a.test signs federation requests, b.test is fuzzed), users
/// on b.test, and one channel, set up so that the valid bodies below change
/// nothing.
struct Fixture {
    cluster: Cluster,
    b: TestServer,
    http: reqwest::Client,
    a_key: SecretKey,
    /// Channel admin; her key-package store is full.
    alice: Device,
    /// A member of the channel.
    bob: Device,
    /// Not a member; her inbox is full.
    carol: Device,
    /// No key packages; every event acked.
    erin: Device,
    channel: ChannelId,
    create_body: Value,
    /// A commit of alice's for the current epoch, which bob submits.
    commit_body: Value,
    /// A message of the channel, which carol (not a member) posts.
    message_body: Value,
    /// erin's used login answer.
    login_body: Value,
    /// The federated deposit already delivered to carol.
    fed_deposit_body: Value,
}

/// The signing key of a server, read from its data directory.
fn server_key(dir: &Path) -> SecretKey {
    let text = std::fs::read_to_string(dir.join(kith_server::KEY_FILE)).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut seed = [0u8; 32];
    hex::decode_to_slice(table["seed"].as_str().unwrap(), &mut seed).unwrap();
    SecretKey::from_seed(seed)
}

impl Fixture {
    async fn start(dir: &Path) -> Self {
        let cluster = Cluster::start(dir, &["a.test", "b.test"], limits).await;
        let s = cluster.server("b.test");
        let b = TestServer::view(s.url(), s.name());
        let alice = Device::join(&b, "alice").await;
        let bob = Device::join(&b, "bob").await;
        let carol = Device::join(&b, "carol").await;
        let mut erin = Device::join(&b, "erin").await;
        // Read once a.test has surely started (it writes the key file).
        let a = cluster.server("a.test");
        let answer = call(
            "a.test is up",
            client().get(format!("{}/v0/server", a.url())),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        let a_key = server_key(a.data_dir());
        let http = client();

        // alice's key-package store is full.
        let pkg = |i: u8| b64(&[i; 16]);
        for body in [
            json!({ "packages": [pkg(1), pkg(2), pkg(3)], "last_resort": pkg(9) }),
            json!({ "packages": [pkg(4)] }),
        ] {
            let (status, answer) = alice.post(&b, "/v0/keypackages", body).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
        }

        // A channel of alice's with bob in it, at epoch 1, with a message.
        let alice_mls = kith_mls::Device::new(&alice.key, MlsStore::in_memory().unwrap());
        let bob_mls = kith_mls::Device::new(&bob.key, MlsStore::in_memory().unwrap());
        let settings = ChannelSettings::new(ChannelExtension::new(
            ContentType::kith_chat_v1(),
            "general".parse().unwrap(),
            Policy::new([alice.id]).unwrap(),
        ));
        let channel = alice_mls
            .create_channel(ChannelId::random(), &settings)
            .unwrap();
        let id = channel.id();
        let create_body = json!({
            "channel": id.to_string(),
            "group_info": b64(&channel.group_info().unwrap()),
            "ratchet_tree": b64(&channel.ratchet_tree().unwrap()),
        });
        drop(channel);
        let (status, answer) = alice.post(&b, "/v0/channels", create_body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let kp = bob_mls
            .key_packages(1, kith_mls::CIPHERSUITE_V0)
            .unwrap()
            .pop()
            .unwrap();
        let out = alice_mls.channel(id).unwrap().add(&[kp]).unwrap();
        let (status, answer) = alice
            .post(
                &b,
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
        assert_eq!(status, StatusCode::OK, "{answer}");
        alice_mls.channel(id).unwrap().merge_pending().unwrap();
        let message = alice_mls.channel(id).unwrap().encrypt(b"hello").unwrap();
        let message_body = json!({ "epoch": 1, "message": b64(&message) });
        let (status, answer) = alice
            .post(
                &b,
                &format!("/v0/channels/{id}/messages"),
                message_body.clone(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let update = alice_mls.channel(id).unwrap().self_update().unwrap();
        let commit_body = json!({
            "epoch": 1,
            "commit": b64(&update.commit),
            "group_info": b64(&update.group_info),
            "ratchet_tree": b64(&update.ratchet_tree),
        });

        // carol's inbox: one federated deposit, one local; then it is full.
        let fed_deposit_body = json!({
            "deposit_id": "00112233445566778899aabbccddeeff",
            "envelope": b64(b"sealed for carol, from a.test"),
        });
        let fixture_path = format!("/v0/federation/inbox/{}", carol.id);
        let body = fed_deposit_body.to_string().into_bytes();
        let (origin, signature) = Forge::new(&a_key).headers("POST", &fixture_path, &body);
        let answer = call(
            "first federated deposit",
            http.post(b.url(&fixture_path))
                .header("Kith-Origin", origin)
                .header("Kith-Signature", signature)
                .header("Content-Type", "application/json")
                .body(body),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
        let (status, answer) = bob.deposit(&b, &carol.id, b"sealed for carol").await;
        assert_eq!(status, StatusCode::OK, "{answer}");

        // erin logs in once (the answer is kept, to replay) and acks
        // everything she has.
        let (challenge, expires_at) = erin.login_challenge(&b).await;
        let signature = erin.answer(&b, &challenge, expires_at);
        let login_body = json!({
            "device": erin.id.to_string(),
            "challenge": b64(&challenge),
            "signature": b64(&signature),
        });
        let (status, answer) = erin.login_raw(&b, &challenge, &signature).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        erin.token = Some(answer["token"].as_str().unwrap().to_owned());
        let (status, answer) = erin
            .post(&b, "/v0/events/ack", json!({ "ack": u64::MAX }))
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");

        Self {
            cluster,
            b,
            http,
            a_key,
            alice,
            bob,
            carol,
            erin,
            channel: id,
            create_body,
            commit_body,
            message_body,
            login_body,
            fed_deposit_body,
        }
    }

    fn token(device: &Device) -> Option<String> {
        device.token.clone()
    }

    /// Every client POST and PUT endpoint, each with a valid body that
    /// changes nothing.
    fn client_posts(&self) -> Vec<Post> {
        let id = self.channel;
        let carol = self.carol.id;
        let p = |name, method: Method, path: String, who: Option<&Device>, body: Value| Post {
            name,
            method,
            path,
            token: who.and_then(Self::token),
            body,
        };
        vec![
            p(
                "register (idempotent)",
                Method::POST,
                "/v0/register".into(),
                None,
                json!({ "record": b64(&self.erin.record.encode()), "name": "erin" }),
            ),
            // Answered with a new challenge: stored, but single-use, bounded
            // per device and invisible to clients.
            p(
                "login challenge",
                Method::POST,
                "/v0/login/challenge".into(),
                None,
                json!({ "device": self.erin.id.to_string() }),
            ),
            p(
                "login (used answer)",
                Method::POST,
                "/v0/login".into(),
                None,
                self.login_body.clone(),
            ),
            p(
                "put record (unchanged)",
                Method::PUT,
                "/v0/devices/self".into(),
                Some(&self.erin),
                json!({ "record": b64(&self.erin.record.encode()) }),
            ),
            p(
                "key-package upload (store full)",
                Method::POST,
                "/v0/keypackages".into(),
                Some(&self.alice),
                json!({ "packages": [b64(&[7; 16])] }),
            ),
            p(
                "key-package claim (none to claim)",
                Method::POST,
                "/v0/keypackages/claim".into(),
                Some(&self.bob),
                json!({ "handle": "erin@b.test" }),
            ),
            p(
                "inbox deposit (inbox full)",
                Method::POST,
                format!("/v0/inbox/{carol}"),
                Some(&self.bob),
                json!({ "envelope": b64(b"one too many") }),
            ),
            p(
                "events ack (all acked)",
                Method::POST,
                "/v0/events/ack".into(),
                Some(&self.erin),
                json!({ "ack": 1 }),
            ),
            p(
                "channel create (exists)",
                Method::POST,
                "/v0/channels".into(),
                Some(&self.alice),
                self.create_body.clone(),
            ),
            p(
                "commit (another member's)",
                Method::POST,
                format!("/v0/channels/{id}/commits"),
                Some(&self.bob),
                self.commit_body.clone(),
            ),
            p(
                "message (not a member)",
                Method::POST,
                format!("/v0/channels/{id}/messages"),
                Some(&self.carol),
                self.message_body.clone(),
            ),
        ]
    }

    /// Every federation POST endpoint, each with a valid body that changes
    /// nothing.
    fn federation_posts(&self) -> Vec<Post> {
        vec![
            Post {
                name: "federation claim (none to claim)",
                method: Method::POST,
                path: "/v0/federation/keypackages/claim".into(),
                token: None,
                body: json!({ "handle": "erin@b.test" }),
            },
            Post {
                name: "federation deposit (already delivered)",
                method: Method::POST,
                path: format!("/v0/federation/inbox/{}", self.carol.id),
                token: None,
                body: self.fed_deposit_body.clone(),
            },
        ]
    }

    /// A client request with a raw body sent as JSON.
    fn client_request(
        &self,
        post: &Post,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(post.method.clone(), self.b.url(&post.path))
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        req
    }

    /// A federation request signed by a.test for b.test.
    fn signed(&self, method: Method, path: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
        let headers = Forge::new(&self.a_key).headers(method.as_str(), path, &body);
        self.raw_federation(method, path, Some(headers), body)
    }

    fn raw_federation(
        &self,
        method: Method,
        path: &str,
        headers: Option<(String, String)>,
        body: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method.clone(), self.b.url(path));
        if method == Method::POST {
            req = req.header("Content-Type", "application/json").body(body);
        }
        if let Some((origin, signature)) = headers {
            req = req.header("Kith-Origin", origin);
            if !signature.is_empty() {
                req = req.header("Kith-Signature", signature);
            }
        }
        req
    }

    /// Asserts the server still answers.
    async fn assert_alive(&self, after: &str) {
        let answer = call(after, self.http.get(self.b.url("/v0/server"))).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "after {after}: {}",
            answer.text
        );
    }

    /// Everything a client can observe of the server's state.
    async fn snapshot(&self) -> Value {
        let mut out = serde_json::Map::new();
        let id = self.channel;
        for (who, device) in [
            ("alice", &self.alice),
            ("bob", &self.bob),
            ("carol", &self.carol),
            ("erin", &self.erin),
        ] {
            let handle = device.handle.clone().unwrap();
            for path in [
                "/v0/events?after=0&limit=500".to_owned(),
                "/v0/events".to_owned(),
                "/v0/inbox?limit=500".to_owned(),
                "/v0/keypackages/count".to_owned(),
                "/v0/channels".to_owned(),
                format!("/v0/devices/{}", device.id),
                format!("/v0/users/{handle}"),
            ] {
                let (status, body) = device.get(&self.b, &path).await;
                out.insert(format!("{who} GET {path}"), json!([status.as_u16(), body]));
            }
        }
        for path in [
            format!("/v0/channels/{id}/commits?from_epoch=0"),
            format!("/v0/channels/{id}/messages?limit=500"),
            format!("/v0/channels/{id}/tree"),
        ] {
            let (status, body) = self.alice.get(&self.b, &path).await;
            out.insert(format!("alice GET {path}"), json!([status.as_u16(), body]));
        }
        let metrics = self.metrics().await;
        let counters: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                [
                    "kith_registered_devices",
                    "kith_inbox_deposits",
                    "kith_commits_accepted",
                    "kith_channel_messages",
                ]
                .iter()
                .any(|m| l.starts_with(m))
            })
            .collect();
        out.insert("metrics".into(), json!(counters));
        Value::Object(out)
    }

    async fn metrics(&self) -> String {
        call("metrics", self.http.get(self.b.url("/metrics")))
            .await
            .text
    }

    /// The end of every test: the state is what it was, the server never
    /// answered 5xx, and it stops cleanly.
    async fn finish(self, before: &Value) {
        self.assert_alive("everything").await;
        let after = self.snapshot().await;
        assert_eq!(&after, before, "the server's state changed");
        let metrics = self.metrics().await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("kith_http_requests") && l.contains("status=\"4")),
            "the request counters are not where this test looks: {metrics}"
        );
        let server_errors: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("kith_http_requests") && l.contains("status=\"5"))
            .collect();
        assert!(server_errors.is_empty(), "5xx answers: {server_errors:?}");
        self.cluster.stop().await;
    }
}

/// A POST or PUT endpoint and a valid body for it.
#[derive(Clone)]
struct Post {
    name: &'static str,
    method: Method,
    path: String,
    token: Option<String>,
    body: Value,
}

/// A federation case: what it is, the `(Kith-Origin, Kith-Signature)`
/// headers, the body, and the status and code it must get.
type SignedCase<'a> = (
    &'a str,
    Option<(String, String)>,
    Vec<u8>,
    StatusCode,
    &'a str,
);

static NONCE: AtomicU64 = AtomicU64::new(1);

/// The parts of a signed federation request, to forge.
#[derive(Clone, Copy)]
struct Forge<'a> {
    key: &'a SecretKey,
    origin: &'a str,
    signed_origin: &'a str,
    destination: &'a str,
    timestamp: u64,
}

impl<'a> Forge<'a> {
    fn new(key: &'a SecretKey) -> Self {
        Self {
            key,
            origin: "a.test",
            signed_origin: "a.test",
            destination: "b.test",
            timestamp: now_ms(),
        }
    }

    /// `(Kith-Origin, Kith-Signature)` with a fresh nonce.
    fn headers(&self, method: &str, path: &str, body: &[u8]) -> (String, String) {
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&NONCE.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        let request = FederationRequest::new(
            self.signed_origin.parse().unwrap(),
            self.destination.parse().unwrap(),
            method,
            path,
            body,
            self.timestamp,
            nonce,
        );
        (
            self.origin.to_owned(),
            b64(&request.sign(self.key).encode()),
        )
    }
}

// -- bad bodies -----------------------------------------------------------------

/// A bad body for an endpoint and whether it must be refused (`strict`) or
/// may happen to be valid.
struct BadBody {
    what: String,
    body: Vec<u8>,
    strict: bool,
}

fn bad(what: impl Into<String>, body: impl Into<Vec<u8>>, strict: bool) -> BadBody {
    BadBody {
        what: what.into(),
        body: body.into(),
        strict,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The table of bad bodies for an endpoint whose valid body is `valid`.
fn bad_bodies(valid: &Value) -> Vec<BadBody> {
    let text = valid.to_string();
    let mut cases = vec![
        bad("an empty body", "", true),
        bad("not JSON", "not json", true),
        bad("an unclosed object", "{", true),
        bad("null", "null", true),
        bad("an array", "[1,2,3]", true),
        bad("a number", "42", true),
        bad("a string", "\"hello\"", true),
        bad("NUL bytes", "\0\0\0", true),
        bad("invalid UTF-8", b"{\"\xff\xfe\": 1}".to_vec(), true),
        bad("deep nesting", "[".repeat(100_000), true),
        bad("an empty object", "{}", false),
        bad("trailing garbage", format!("{text}x"), true),
        bad("two objects", format!("{text}{text}"), true),
    ];
    let Value::Object(fields) = valid else {
        panic!("templates are objects")
    };
    let mut numbers = vec![];
    let mut with = |what: String, change: &dyn Fn(&mut serde_json::Map<String, Value>), strict| {
        let mut copy = fields.clone();
        change(&mut copy);
        cases.push(bad(what, Value::Object(copy).to_string(), strict));
    };
    with(
        "an unknown field".into(),
        &|m| {
            m.insert("unexpected".into(), json!(1));
        },
        true,
    );
    for (key, value) in fields {
        with(
            format!("without `{key}`"),
            &|m| {
                m.remove(key);
            },
            false,
        );
        for wrong in [
            json!(null),
            json!(true),
            json!(1),
            json!(-1),
            json!(1.5),
            json!(18_446_744_073_709_551_615_u64),
            json!(""),
            json!([]),
            json!({}),
            json!([value]),
        ] {
            let strict = !wrong.is_null() && type_name(&wrong) != type_name(value);
            with(
                format!("`{key}` = {wrong}"),
                &|m| {
                    m.insert(key.clone(), wrong.clone());
                },
                strict,
            );
        }
        if value.is_number() {
            // Over u64, and over what JSON numbers can be.
            numbers.push(bad(
                format!("`{key}` = 2^64"),
                text.replacen(
                    &format!("\"{key}\":{value}"),
                    &format!("\"{key}\":18446744073709551616"),
                    1,
                ),
                true,
            ));
            numbers.push(bad(
                format!("`{key}` = 1e400"),
                text.replacen(
                    &format!("\"{key}\":{value}"),
                    &format!("\"{key}\":1e400"),
                    1,
                ),
                true,
            ));
        }
        if value.is_string() {
            for garbage in [
                "!!!",
                "AAA=",
                "+/+/",
                "A",
                "%00",
                "\u{0}",
                "é",
                "@",
                &"A".repeat(8 * MAX_ITEM),
            ] {
                let shown: String = garbage.chars().take(12).collect();
                with(
                    format!("`{key}` = {shown:?}"),
                    &|m| {
                        m.insert(key.clone(), json!(garbage));
                    },
                    true,
                );
            }
            // Valid base64url of bytes that mean nothing.
            with(
                format!("`{key}` = base64 of garbage"),
                &|m| {
                    m.insert(key.clone(), json!(b64(&[0xA5; 100])));
                },
                false,
            );
        }
    }
    cases.extend(numbers);
    // Every cut of the valid body is malformed JSON.
    let cuts: Vec<usize> = if text.len() <= 60 {
        (0..text.len()).collect()
    } else {
        (0..20)
            .chain((1..40).map(|i| i * text.len() / 40))
            .chain(text.len() - 5..text.len())
            .collect()
    };
    for cut in cuts {
        cases.push(bad(
            format!("cut at {cut} of {}", text.len()),
            &text.as_bytes()[..cut],
            true,
        ));
    }
    // Over the body limit: a valid body with padding inside a field.
    let mut big = fields.clone();
    big.insert("padding".into(), json!("A".repeat(MAX_BODY)));
    cases.push(bad(
        "over the body limit",
        Value::Object(big).to_string(),
        true,
    ));
    cases
}

/// Whether a request body would make the server ask a server that is not
/// on loopback (a handle of another server than a.test or b.test).
fn stays_on_loopback(body: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return true;
    };
    let Some(handle) = value.get("handle").and_then(Value::as_str) else {
        return true;
    };
    match handle.parse::<Handle>() {
        Ok(h) => ["a.test", "b.test"].contains(&h.server().as_str()),
        Err(_) => true,
    }
}

// -- the tests ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_endpoints_refuse_bad_input_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::start(dir.path()).await;
    let before = f.snapshot().await;

    for post in f.client_posts() {
        // The valid body itself is answered and changes nothing.
        let what = format!("{}: the valid body", post.name);
        let answer = call(
            &what,
            f.client_request(&post, post.token.as_deref(), post.body.to_string().into()),
        )
        .await;
        assert_handled(&what, &answer);

        for case in bad_bodies(&post.body) {
            let what = format!("{}: {}", post.name, case.what);
            let answer = call(
                &what,
                f.client_request(&post, post.token.as_deref(), case.body),
            )
            .await;
            if case.strict {
                assert_refused(&what, &answer);
            } else {
                assert_handled(&what, &answer);
            }
            if case.what == "over the body limit" {
                assert_refused_with(&what, &answer, StatusCode::PAYLOAD_TOO_LARGE, "too_large");
            }
        }
        // Without a JSON content type.
        let what = format!("{}: no content type", post.name);
        let mut req = f
            .http
            .request(post.method.clone(), f.b.url(&post.path))
            .body(post.body.to_string());
        if let Some(token) = &post.token {
            req = req.bearer_auth(token);
        }
        assert_refused(&what, &call(&what, req).await);

        if let Some(token) = &post.token {
            let body = post.body.to_string();
            for (case, header) in [
                ("no Authorization", None),
                ("an unknown token", Some("Bearer not-a-token".to_owned())),
                ("an empty token", Some("Bearer ".to_owned())),
                ("another scheme", Some(format!("Basic {token}"))),
                ("a lowercase scheme", Some(format!("bearer {token}"))),
                ("a token with junk", Some(format!("Bearer {token}x"))),
            ] {
                let what = format!("{}: {case}", post.name);
                let mut req = f
                    .http
                    .request(post.method.clone(), f.b.url(&post.path))
                    .header("Content-Type", "application/json")
                    .body(body.clone());
                if let Some(header) = header {
                    req = req.header("Authorization", header);
                }
                assert_refused_with(
                    &what,
                    &call(&what, req).await,
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                );
            }
        }
        f.assert_alive(post.name).await;
    }

    // Field limits under the body limit.
    let too_big = b64(&[1; MAX_ITEM + 1]);
    let id = f.channel;
    let carol = f.carol.id;
    let cases = [
        (
            "an envelope over the limit",
            &f.bob,
            format!("/v0/inbox/{carol}"),
            json!({ "envelope": too_big }),
        ),
        (
            "a key package over the limit",
            &f.alice,
            "/v0/keypackages".into(),
            json!({ "packages": [too_big] }),
        ),
        (
            "a last-resort package over the limit",
            &f.alice,
            "/v0/keypackages".into(),
            json!({ "last_resort": too_big }),
        ),
        (
            "too many packages in one upload",
            &f.alice,
            "/v0/keypackages".into(),
            json!({ "packages": vec![b64(&[1; 8]); MAX_PACKAGES_PER_UPLOAD + 1] }),
        ),
        (
            "a message over the limit",
            &f.alice,
            format!("/v0/channels/{id}/messages"),
            json!({ "epoch": 1, "message": too_big }),
        ),
    ];
    for (what, who, path, body) in cases {
        let (status, body) = who.post(&f.b, &path, body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{what}: {body}");
        assert_eq!(body["error"], "too_large", "{what}: {body}");
    }

    // Out of order, replayed or misdirected.
    let commit = |epoch: u64| {
        let mut body = f.commit_body.clone();
        body["epoch"] = epoch.into();
        body
    };
    let cases: Vec<(&str, &Device, Method, String, Value, StatusCode, &str)> = vec![
        (
            "a used login answer, replayed",
            &f.erin,
            Method::POST,
            "/v0/login".into(),
            f.login_body.clone(),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "a login answer to no challenge",
            &f.erin,
            Method::POST,
            "/v0/login".into(),
            json!({
                "device": f.erin.id.to_string(),
                "challenge": b64(&[3; 32]),
                "signature": b64(&[4; 64]),
            }),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "a challenge for an unknown device",
            &f.erin,
            Method::POST,
            "/v0/login/challenge".into(),
            json!({ "device": "ab".repeat(32) }),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "another device's record",
            &f.erin,
            Method::PUT,
            "/v0/devices/self".into(),
            json!({ "record": b64(&f.bob.record.encode()) }),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "an older record",
            &f.erin,
            Method::PUT,
            "/v0/devices/self".into(),
            json!({ "record": b64(&f.erin.next_record(|r| r.sequence = 1).encode()) }),
            StatusCode::CONFLICT,
            "sequence_went_backwards",
        ),
        (
            "another record with the same sequence",
            &f.erin,
            Method::PUT,
            "/v0/devices/self".into(),
            json!({ "record": b64(&f.erin.next_record(|r| {
                r.sequence -= 1;
                r.display_name = "someone else".into();
            }).encode()) }),
            StatusCode::CONFLICT,
            "equivocation",
        ),
        (
            "a commit for a future epoch",
            &f.alice,
            Method::POST,
            format!("/v0/channels/{id}/commits"),
            commit(7),
            StatusCode::CONFLICT,
            "wrong_epoch",
        ),
        (
            "a commit for a past epoch",
            &f.alice,
            Method::POST,
            format!("/v0/channels/{id}/commits"),
            commit(0),
            StatusCode::CONFLICT,
            "wrong_epoch",
        ),
        (
            "a commit for an epoch past u64",
            &f.alice,
            Method::POST,
            format!("/v0/channels/{id}/commits"),
            commit(u64::MAX),
            StatusCode::CONFLICT,
            "wrong_epoch",
        ),
        (
            "a commit from a non-member",
            &f.carol,
            Method::POST,
            format!("/v0/channels/{id}/commits"),
            f.commit_body.clone(),
            StatusCode::FORBIDDEN,
            "not_member",
        ),
        (
            "a commit to an unknown channel",
            &f.alice,
            Method::POST,
            format!("/v0/channels/{}/commits", "0".repeat(32)),
            f.commit_body.clone(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "a message for a future epoch",
            &f.alice,
            Method::POST,
            format!("/v0/channels/{id}/messages"),
            json!({ "epoch": 2, "message": f.message_body["message"] }),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "a channel created by a non-member of its group",
            &f.bob,
            Method::POST,
            "/v0/channels".into(),
            f.create_body.clone(),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "a deposit for an unknown device",
            &f.bob,
            Method::POST,
            format!("/v0/inbox/{}", "cd".repeat(32)),
            json!({ "envelope": b64(b"x") }),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "a claim for an unknown user",
            &f.bob,
            Method::POST,
            "/v0/keypackages/claim".into(),
            json!({ "handle": "nobody@b.test" }),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (what, who, method, path, body, status, code) in cases {
        let answer = call(
            what,
            who.authed(f.http.request(method, f.b.url(&path)))
                .json(&body),
        )
        .await;
        assert_refused_with(what, &answer, status, code);
    }
    // Deleting another device's inbox item is a no-op.
    let (_, items) = f.carol.get(&f.b, "/v0/inbox").await;
    let item = items["items"][0]["id"].as_u64().unwrap();
    let answer = call(
        "bob deletes carol's item",
        f.bob
            .authed(f.http.delete(f.b.url(&format!("/v0/inbox/{item}")))),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text);

    // GETs and DELETEs: bad path parameters, bad queries, bad auth.
    let id = f.channel.to_string();
    let bad_devices = [
        "zz".to_owned(),
        "0".repeat(63),
        "0".repeat(65),
        "g".repeat(64),
        "0".repeat(10_000),
        "%00".to_owned(),
        "%FF".to_owned(),
        "-1".to_owned(),
    ];
    let bad_channels = [
        "zz".to_owned(),
        "0".repeat(31),
        "0".repeat(33),
        "g".repeat(32),
        "0".repeat(10_000),
        "%FF".to_owned(),
        "0".repeat(32),
    ];
    let bad_handles = [
        "nobody".to_owned(),
        "@".to_owned(),
        "a@".to_owned(),
        "@b.test".to_owned(),
        "a@b@b.test".to_owned(),
        "not%20a%20name@b.test".to_owned(),
        format!("{}@b.test", "a".repeat(300)),
        format!("alice@{}.test", "b".repeat(300)),
        "%FF@b.test".to_owned(),
        "nobody@b.test".to_owned(),
        "nobody@a.test".to_owned(),
    ];
    let mut gets: Vec<(String, Option<&Device>)> = vec![];
    for d in &bad_devices {
        gets.push((format!("/v0/devices/{d}"), None));
    }
    gets.push((
        format!("/v0/devices/{}?server=not..a..name", "ab".repeat(32)),
        None,
    ));
    gets.push((format!("/v0/devices/{}?unknown=1", f.bob.id), None));
    for h in &bad_handles {
        gets.push((format!("/v0/users/{h}"), None));
    }
    for c in &bad_channels {
        for tail in ["commits", "tree", "messages"] {
            gets.push((format!("/v0/channels/{c}/{tail}"), Some(&f.alice)));
        }
    }
    for query in [
        "after=-1",
        "after=abc",
        "after=18446744073709551616",
        "limit=-5",
        "limit=abc",
        "unknown=1",
        "after=%FF",
    ] {
        for path in ["/v0/events", "/v0/inbox", "/v0/events/ws"] {
            gets.push((format!("{path}?{query}"), Some(&f.erin)));
        }
        gets.push((
            format!("/v0/channels/{id}/messages?{query}"),
            Some(&f.alice),
        ));
    }
    for query in [
        "from_epoch=-1",
        "from_epoch=x",
        "from_epoch=18446744073709551616",
        "limit=x",
        "epoch=1",
    ] {
        gets.push((format!("/v0/channels/{id}/commits?{query}"), Some(&f.alice)));
    }
    for query in [
        "epoch=-1",
        "epoch=x",
        "epoch=5",
        "epoch=18446744073709551615",
        "after=1",
    ] {
        gets.push((format!("/v0/channels/{id}/tree?{query}"), Some(&f.alice)));
    }
    // Channel reads by a non-member.
    for tail in ["commits", "tree", "messages"] {
        gets.push((format!("/v0/channels/{id}/{tail}"), Some(&f.carol)));
    }
    // The WebSocket without an upgrade.
    gets.push(("/v0/events/ws".into(), Some(&f.erin)));
    gets.push(("/v0/events/ws?token=not-a-token".into(), None));
    for (path, who) in &gets {
        let mut req = f.http.get(f.b.url(path));
        if let Some(who) = who {
            req = who.authed(req);
        }
        let what = format!("GET {path:.80}");
        assert_refused(&what, &call(&what, req).await);
    }
    // Lists past every stored cursor are empty, not errors.
    for (path, who) in [
        ("/v0/events?after=18446744073709551615", &f.erin),
        ("/v0/inbox?after=18446744073709551615", &f.carol),
        (
            &*format!("/v0/channels/{id}/messages?after=18446744073709551615"),
            &f.alice,
        ),
        (
            &*format!("/v0/channels/{id}/commits?from_epoch=18446744073709551615"),
            &f.alice,
        ),
    ] {
        let what = format!("GET {path}");
        let answer = call(&what, who.authed(f.http.get(f.b.url(path)))).await;
        assert_eq!(answer.status, StatusCode::OK, "{what}: {}", answer.text);
    }
    for item in [
        "abc",
        "-1",
        "1.5",
        "18446744073709551616",
        "18446744073709551615",
        "%FF",
    ] {
        let what = format!("DELETE /v0/inbox/{item}");
        let answer = call(
            &what,
            f.carol
                .authed(f.http.delete(f.b.url(&format!("/v0/inbox/{item}")))),
        )
        .await;
        assert_handled(&what, &answer);
    }
    // Removing a device (§6.4): bad ids, an unknown device, another
    // user's device, the caller itself; each refused, nothing removed.
    for (path, status, code) in [
        ("abc".to_owned(), StatusCode::BAD_REQUEST, "bad_request"),
        ("%FF".into(), StatusCode::BAD_REQUEST, "bad_request"),
        ("ab".repeat(33), StatusCode::BAD_REQUEST, "bad_request"),
        ("ab".repeat(32), StatusCode::NOT_FOUND, "not_found"),
        (f.alice.id.to_string(), StatusCode::FORBIDDEN, "forbidden"),
        (
            f.carol.id.to_string(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ] {
        let what = format!("DELETE /v0/devices/{path}");
        let answer = call(
            &what,
            f.carol
                .authed(f.http.delete(f.b.url(&format!("/v0/devices/{path}")))),
        )
        .await;
        assert_refused_with(&what, &answer, status, code);
    }
    // Every endpoint that needs a session, without one.
    for (method, path) in [
        (Method::DELETE, format!("/v0/devices/{}", f.bob.id)),
        (Method::GET, "/v0/keypackages/count".to_owned()),
        (Method::GET, "/v0/inbox".into()),
        (Method::DELETE, "/v0/inbox/1".into()),
        (Method::GET, "/v0/events".into()),
        (Method::GET, "/v0/events/ws".into()),
        (Method::GET, "/v0/channels".into()),
        (Method::GET, format!("/v0/channels/{id}/commits")),
        (Method::GET, format!("/v0/channels/{id}/tree")),
        (Method::GET, format!("/v0/channels/{id}/messages")),
    ] {
        for header in [None, Some("Bearer nope"), Some("Token x")] {
            let what = format!("{method} {path} with {header:?}");
            let mut req = f.http.request(method.clone(), f.b.url(&path));
            if let Some(header) = header {
                req = req.header("Authorization", header);
            }
            assert_refused_with(
                &what,
                &call(&what, req).await,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            );
        }
    }
    // Unknown routes and wrong methods.
    for (method, path) in [
        (Method::GET, "/v0/nothing"),
        (Method::GET, "/"),
        (Method::POST, "/v0/server"),
        (Method::DELETE, "/v0/register"),
        (Method::GET, "/v0/login"),
        (Method::PUT, "/v0/keypackages/count"),
        (Method::PATCH, "/v0/channels"),
        (Method::GET, "/v0/federation/keypackages/claim"),
        (Method::DELETE, "/v0/federation/users/erin@b.test"),
        (Method::POST, "/metrics"),
    ] {
        let what = format!("{method} {path}");
        assert_refused(
            &what,
            &call(&what, f.http.request(method, f.b.url(path))).await,
        );
    }

    f.finish(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_endpoints_refuse_bad_input_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::start(dir.path()).await;
    let before = f.snapshot().await;
    let stranger = SecretKey::generate();
    let now = now_ms();

    let mut routes: Vec<(Method, String, Value)> = vec![
        (
            Method::GET,
            "/v0/federation/users/erin@b.test".into(),
            Value::Null,
        ),
        (
            Method::GET,
            format!("/v0/federation/devices/{}", f.erin.id),
            Value::Null,
        ),
    ];
    for post in f.federation_posts() {
        routes.push((post.method, post.path, post.body));
    }
    for (method, path, valid) in &routes {
        let body = if valid.is_null() {
            Vec::new()
        } else {
            valid.to_string().into_bytes()
        };
        let good = Forge::new(&f.a_key);
        let sig = |forge: Forge<'_>| Some(forge.headers(method.as_str(), path, &body));
        let other_method = if *method == Method::GET {
            "POST"
        } else {
            "GET"
        };
        let cases: Vec<SignedCase<'_>> = vec![
            (
                "no signature headers",
                None,
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "no Kith-Signature",
                Some(("a.test".into(), String::new())),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "an origin that is not a server name",
                Some((
                    "not a name!".into(),
                    good.headers(method.as_str(), path, &body).1,
                )),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "a signature that is not base64url",
                Some(("a.test".into(), "!!!not base64!!!".into())),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "a signature of random bytes",
                Some(("a.test".into(), b64(&[0x5A; 200]))),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "a truncated signature",
                {
                    let (o, s) = good.headers(method.as_str(), path, &body);
                    Some((o, s[..s.len() / 2].to_owned()))
                },
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "an oversized signature",
                Some(("a.test".into(), b64(&vec![0; 8192]))),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "signed by a key a.test does not publish",
                sig(Forge {
                    key: &stranger,
                    ..good
                }),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "a stale timestamp",
                sig(Forge {
                    timestamp: now - 10 * 60 * 1000,
                    ..good
                }),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "stale_request",
            ),
            (
                "a timestamp from the future",
                sig(Forge {
                    timestamp: now + 10 * 60 * 1000,
                    ..good
                }),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "stale_request",
            ),
            (
                "the timestamp 0",
                sig(Forge {
                    timestamp: 0,
                    ..good
                }),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "stale_request",
            ),
            (
                "the timestamp 2^64-1",
                sig(Forge {
                    timestamp: u64::MAX,
                    ..good
                }),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "stale_request",
            ),
            (
                "for another server",
                sig(Forge {
                    destination: "c.test",
                    ..good
                }),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "wrong_destination",
            ),
            (
                "a header origin that is not the signed one",
                sig(Forge {
                    origin: "gone.test",
                    ..good
                }),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "an origin whose keys cannot be had",
                sig(Forge {
                    origin: "gone.test",
                    signed_origin: "gone.test",
                    ..good
                }),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "unknown_origin",
            ),
            (
                "signed for another method",
                Some(good.headers(other_method, path, &body)),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "signed for another path",
                Some(good.headers(method.as_str(), "/v0/federation/users/x@b.test", &body)),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
            (
                "signed for the path with a query added",
                Some(good.headers(method.as_str(), &format!("{path}?x=1"), &body)),
                body.clone(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ),
        ];
        let mut cases = cases;
        if *method == Method::POST {
            cases.push((
                "a body changed after signing",
                sig(good),
                b"{\"handle\":\"alice@b.test\"}".to_vec(),
                StatusCode::UNAUTHORIZED,
                "bad_signature",
            ));
            let big = vec![b' '; MAX_BODY + 1];
            cases.push((
                "a signed body over the limit",
                Some(good.headers("POST", path, &big)),
                big,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
            ));
        }
        for (what, headers, sent, status, code) in cases {
            let what = format!("{method} {path}: {what}");
            let answer = call(&what, f.raw_federation(method.clone(), path, headers, sent)).await;
            assert_refused_with(&what, &answer, status, code);
        }
        // The genuine request is answered once; its replay is refused.
        let headers = good.headers(method.as_str(), path, &body);
        let what = format!("{method} {path}: genuine");
        let answer = call(
            &what,
            f.raw_federation(method.clone(), path, Some(headers.clone()), body.clone()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{what}: {}", answer.text);
        let what = format!("{method} {path}: replayed");
        let answer = call(
            &what,
            f.raw_federation(method.clone(), path, Some(headers), body.clone()),
        )
        .await;
        assert_refused_with(&what, &answer, StatusCode::UNAUTHORIZED, "replayed_request");
        f.assert_alive(path).await;
    }

    // Properly signed requests with bad bodies.
    for post in f.federation_posts() {
        for case in bad_bodies(&post.body) {
            let what = format!("{}: {}", post.name, case.what);
            let answer = call(&what, f.signed(Method::POST, &post.path, case.body)).await;
            if case.strict {
                assert_refused(&what, &answer);
            } else {
                assert_handled(&what, &answer);
            }
        }
        f.assert_alive(post.name).await;
    }
    // Properly signed requests with bad path parameters and bad fields.
    let mut bad_paths: Vec<(Method, String, Vec<u8>)> = vec![];
    let deposit = f.fed_deposit_body.to_string().into_bytes();
    for d in [
        "zz".to_owned(),
        "0".repeat(63),
        "0".repeat(65),
        "g".repeat(64),
        "0".repeat(5000),
        "%FF".to_owned(),
        "ab".repeat(32),
    ] {
        bad_paths.push((Method::GET, format!("/v0/federation/devices/{d}"), vec![]));
        bad_paths.push((
            Method::POST,
            format!("/v0/federation/inbox/{d}"),
            deposit.clone(),
        ));
    }
    for h in [
        "nobody",
        "@",
        "@b.test",
        "a@b@b.test",
        &format!("{}@b.test", "a".repeat(300)),
        "%FF@b.test",
        "nobody@b.test",
        "erin@a.test",
        "erin@elsewhere.test",
    ] {
        bad_paths.push((Method::GET, format!("/v0/federation/users/{h}"), vec![]));
    }
    let inbox = format!("/v0/federation/inbox/{}", f.carol.id);
    for body in [
        json!({ "deposit_id": "00", "envelope": b64(b"x") }),
        json!({ "deposit_id": "zz".repeat(16), "envelope": b64(b"x") }),
        json!({ "deposit_id": "00".repeat(17), "envelope": b64(b"x") }),
        json!({ "deposit_id": "11".repeat(16), "envelope": "" }),
        json!({ "deposit_id": "11".repeat(16), "envelope": b64(&[1; MAX_ITEM + 1]) }),
        json!({ "deposit_id": "11".repeat(16), "envelope": b64(b"inbox is full") }),
    ] {
        bad_paths.push((Method::POST, inbox.clone(), body.to_string().into_bytes()));
    }
    for handle in [
        "nobody@b.test",
        "erin@a.test",
        "erin@gone.test",
        "not a handle",
    ] {
        bad_paths.push((
            Method::POST,
            "/v0/federation/keypackages/claim".into(),
            json!({ "handle": handle }).to_string().into_bytes(),
        ));
    }
    for (method, path, body) in bad_paths {
        let what = format!("signed {method} {path:.80}");
        let answer = call(&what, f.signed(method, &path, body)).await;
        assert_refused(&what, &answer);
    }

    f.finish(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_mutated_bodies_are_refused_or_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::start(dir.path()).await;
    let before = f.snapshot().await;
    let mut rng = Rng(0x4B17_F022);
    // Answers by endpoint and status, printed (`--nocapture`) to see how
    // deep the inputs got.
    let mut seen: BTreeMap<(&str, u16, String), usize> = BTreeMap::new();

    for post in f.client_posts() {
        let valid = post.body.to_string().into_bytes();
        let mut sent = 0;
        for i in 0..RANDOM_BODIES + MUTATIONS {
            let body = if i < RANDOM_BODIES {
                rng.body()
            } else if i % 2 == 0 {
                mutate(&mut rng, &valid)
            } else {
                mutate_field(&mut rng, &post.body)
            };
            if !stays_on_loopback(&body) {
                continue;
            }
            let what = format!("{}: #{i} {:?}", post.name, String::from_utf8_lossy(&body));
            let answer = call(&what, f.client_request(&post, post.token.as_deref(), body)).await;
            assert_handled(&what, &answer);
            *seen.entry(tally(post.name, &answer)).or_default() += 1;
            sent += 1;
        }
        assert!(
            sent > (RANDOM_BODIES + MUTATIONS) / 2,
            "{}: too few sent",
            post.name
        );
        f.assert_alive(post.name).await;
    }

    for post in f.federation_posts() {
        let valid = post.body.to_string().into_bytes();
        for i in 0..RANDOM_BODIES + MUTATIONS {
            let body = if i < RANDOM_BODIES {
                rng.body()
            } else if i % 2 == 0 {
                mutate(&mut rng, &valid)
            } else {
                mutate_field(&mut rng, &post.body)
            };
            let what = format!("{}: #{i} {:?}", post.name, String::from_utf8_lossy(&body));
            let answer = call(&what, f.signed(Method::POST, &post.path, body)).await;
            assert_handled(&what, &answer);
            *seen.entry(tally(post.name, &answer)).or_default() += 1;
        }
        // Mutated signatures over the valid body.
        for i in 0..SIGNATURE_MUTATIONS {
            let (origin, signature) = Forge::new(&f.a_key).headers("POST", &post.path, &valid);
            let bytes = common::unb64(&signature);
            let mutated = mutate(&mut rng, &bytes);
            let what = format!("{}: signature mutation #{i}", post.name);
            let answer = call(
                &what,
                f.raw_federation(
                    Method::POST,
                    &post.path,
                    Some((origin, b64(&mutated))),
                    valid.clone(),
                ),
            )
            .await;
            assert_handled(&what, &answer);
            *seen
                .entry(tally("federation signature", &answer))
                .or_default() += 1;
        }
        f.assert_alive(post.name).await;
    }
    message_batches(&f, &mut rng, &mut seen).await;
    event_stream_frames(&f, &mut rng).await;
    for ((endpoint, status, code), n) in &seen {
        println!("{endpoint}: {status} {code} x{n}");
    }

    f.finish(&before).await;
}

/// Multi-message sends (spec §6.7): random bodies and mutations of a valid
/// batch (the channel's stored message, twice) posted by carol, who is not
/// a member, so none may store anything; then the valid batch posted by
/// alice, who sent the message, answered as already stored.
async fn message_batches(
    f: &Fixture,
    rng: &mut Rng,
    seen: &mut BTreeMap<(&'static str, u16, String), usize>,
) {
    use kith_proto::batch::{MESSAGE_BATCH, encode_batch};
    let name = "message batch (not a member)";
    let path = format!("/v0/channels/{}/messages?epoch=1", f.channel);
    let message = common::unb64(f.message_body["message"].as_str().unwrap());
    let valid = encode_batch([&message[..], &message[..]]);
    let post = |who: &Device, body: Vec<u8>| {
        let mut req = f
            .http
            .post(f.b.url(&path))
            .header("Content-Type", MESSAGE_BATCH)
            .body(body);
        if let Some(token) = Fixture::token(who) {
            req = req.bearer_auth(token);
        }
        req
    };
    for i in 0..RANDOM_BODIES + MUTATIONS {
        let body = if i < RANDOM_BODIES {
            rng.body()
        } else {
            mutate(rng, &valid)
        };
        let what = format!("{name}: #{i} {body:?}");
        let answer = call(&what, post(&f.carol, body)).await;
        assert_refused(&what, &answer);
        *seen.entry(tally(name, &answer)).or_default() += 1;
    }
    let answer = call("message batch (stored)", post(&f.alice, valid)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    f.assert_alive(name).await;
}

/// What the event stream accepts from clients.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AckFrame {
    ack: u64,
}

/// Random and mutated frames on erin's event stream (she has nothing to
/// ack): every text frame that is not `{"ack": cursor}` gets an error frame
/// and the stream stays open; binary frames are ignored.
async fn event_stream_frames(f: &Fixture, rng: &mut Rng) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    let mut request = f.b.ws_url("/v0/events/ws").into_client_request().unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", f.erin.token.as_ref().unwrap())
            .parse()
            .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let valid = br#"{"ack":1}"#;
    let mut errors_due = 0;
    for i in 0..RANDOM_BODIES + MUTATIONS / 2 {
        let bytes = if i < RANDOM_BODIES {
            rng.body()
        } else {
            mutate(rng, valid)
        };
        if i % 5 == 0 {
            ws.send(Message::Binary(bytes.into())).await.unwrap();
            continue;
        }
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if serde_json::from_str::<AckFrame>(&text)
            .map(|frame| frame.ack)
            .is_err()
        {
            errors_due += 1;
        }
        ws.send(Message::Text(text.into())).await.unwrap();
    }
    // One more bad frame: its error is the last frame to come.
    ws.send(Message::Text("end".into())).await.unwrap();
    errors_due += 1;
    while errors_due > 0 {
        let frame = tokio::time::timeout(common::TIMEOUT, ws.next())
            .await
            .expect("the error frames arrive")
            .expect("the stream stays open")
            .unwrap();
        match frame {
            Message::Text(text) => {
                let error: Value = serde_json::from_str(text.as_str()).unwrap();
                assert_eq!(error["error"], "bad_request", "{error}");
                assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
                errors_due -= 1;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    ws.close(None).await.unwrap();
}

#[test]
fn the_generator_is_deterministic_and_mutations_differ() {
    let (mut a, mut b) = (Rng(7), Rng(7));
    let valid = br#"{"handle":"erin@b.test"}"#;
    let mut changed = 0;
    for _ in 0..100 {
        let mutated = mutate(&mut a, valid);
        assert_eq!(mutated, mutate(&mut b, valid));
        changed += usize::from(mutated != valid);
    }
    // Only a byte replaced by itself leaves the input as it was.
    assert!(
        changed >= 95,
        "{changed} of 100 mutations changed the input"
    );
}

/// The federation endpoints of channels (genesis, submit, votes, pushed
/// certificates, messages, the Raft RPCs), properly signed by a.test, which serves none of b.test's
/// channels: for b.test's channel, an unknown channel and malformed ids,
/// with empty, garbage, wrong-shaped and real-shaped bodies (the Raft
/// bodies are the `ordering_entry` fuzz seeds). Every answer is a 4xx
/// with a message (or, for what a.test may read, a success), and b.test's
/// state is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_channel_endpoints_refuse_bad_input_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::start(dir.path()).await;
    let before = f.snapshot().await;
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/ordering_entry");
    let seed = |name: &str| std::fs::read(seeds.join(name)).unwrap();
    let raft_bodies = [
        seed("append"),
        seed("heartbeat"),
        seed("vote"),
        seed("snapshot"),
    ];
    let mut bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"not json".to_vec(),
        b"{}".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        json!({ "epoch": 1, "commit": "!!" })
            .to_string()
            .into_bytes(),
        json!({ "epoch": u64::MAX, "commit_hash": "00".repeat(32) })
            .to_string()
            .into_bytes(),
        seed("submission"),
        json!({ "certificate": "!!" }).to_string().into_bytes(),
        json!({ "certificate": "AAAA" }).to_string().into_bytes(),
        json!({ "certificate": "AAAA", "epoch": 1 })
            .to_string()
            .into_bytes(),
    ];
    bodies.extend(raft_bodies.iter().cloned());
    let known = f.channel.to_string();
    let unknown = ChannelId::from_bytes([0x77; 16]).to_string();
    let mut ids = vec![known.clone(), unknown];
    ids.extend(
        [
            "zz".to_owned(),
            "0".repeat(31),
            "0".repeat(33),
            "0".repeat(5000),
            "%FF".to_owned(),
            "g".repeat(32),
        ]
        .into_iter(),
    );
    let mut requests: Vec<(Method, String, Vec<u8>)> = Vec::new();
    for id in &ids {
        requests.push((
            Method::GET,
            format!("/v0/federation/channels/{id}/genesis"),
            vec![],
        ));
        for query in [
            "",
            "?after=0",
            "?after=0&min_epoch=0",
            "?after=x",
            "?min_epoch=-1",
        ] {
            requests.push((
                Method::GET,
                format!("/v0/federation/channels/{id}/messages{query}"),
                vec![],
            ));
        }
        for route in ["submit", "votes", "certificate", "messages"] {
            for body in &bodies {
                requests.push((
                    Method::POST,
                    format!("/v0/federation/channels/{id}/{route}"),
                    body.clone(),
                ));
            }
        }
        for kind in ["append", "vote", "snapshot", "bogus"] {
            for body in &bodies {
                requests.push((
                    Method::POST,
                    format!("/v0/federation/raft/{id}/{kind}"),
                    body.clone(),
                ));
            }
        }
    }
    for (method, path, body) in requests {
        let what = format!(
            "signed {method} {path:.100} with {:.60}",
            String::from_utf8_lossy(&body)
        );
        let readable = method == Method::GET && path.contains(&known);
        let answer = call(&what, f.signed(method, &path, body)).await;
        if readable {
            assert_handled(&what, &answer);
        } else {
            assert_refused(&what, &answer);
        }
    }
    f.assert_alive("the channel federation endpoints").await;
    f.finish(&before).await;
}
