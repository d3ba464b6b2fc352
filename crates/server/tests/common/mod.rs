//! A test harness: real servers from `kith_server::run` on 127.0.0.1:0, and
//! devices that talk to them over HTTP with reqwest.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kith_proto::{
    DeviceId, DeviceRecord, DeviceRecordFields, DeviceRecordIn, InboxKey, LoginChallenge,
    SecretKey, ServerName, Sponsorship, SponsorshipIn,
};
use kith_server::{Config, Registration};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every wait in these tests is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn unb64(text: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(text).unwrap()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A running homeserver.
pub struct TestServer {
    pub base: String,
    pub name: ServerName,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), kith_server::ServerError>>>,
}

impl TestServer {
    /// A server named `name`, registration open, data in `dir`.
    pub async fn start(dir: &Path, name: &str) -> Self {
        Self::start_with(dir, name, |_| {}).await
    }

    pub async fn start_with(dir: &Path, name: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_name: ServerName = name.parse().unwrap();
        let mut config = Config::new(server_name.clone(), dir);
        config.registration = Registration::Open;
        tweak(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kith_server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            base: format!("http://{addr}"),
            name: server_name,
            data_dir: dir.to_owned(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A handle on a server started elsewhere (a testkit cluster), for the
    /// device helpers; stopping it is its owner's job.
    pub fn view(base: &str, name: &str) -> Self {
        Self {
            base: base.to_owned(),
            name: name.parse().unwrap(),
            data_dir: PathBuf::new(),
            stop: None,
            task: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("{}{path}", self.base.replacen("http://", "ws://", 1))
    }

    /// Stops the server through its shutdown future and waits for `run` to
    /// return cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .no_proxy()
        .build()
        .unwrap()
}

/// Sends a request and returns status and JSON body (Null if empty).
pub async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
    };
    (status, body)
}

/// Asserts an error answer: the status and the `error` code, with a message.
pub fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "body: {}", got.1);
    assert_eq!(got.1["error"], code, "body: {}", got.1);
    assert!(got.1["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// A client device: its key, its current record, its session.
pub struct Device {
    pub key: SecretKey,
    pub id: DeviceId,
    pub record: DeviceRecord,
    pub token: Option<String>,
    pub handle: Option<String>,
    pub http: reqwest::Client,
}

impl Device {
    /// A device with a fresh key and an unsponsored record (sequence 1).
    pub fn new() -> Self {
        let key = SecretKey::generate();
        let id = DeviceId::of(&key.public());
        let now = now_ms();
        let record = DeviceRecord::sign(
            &key,
            DeviceRecordFields {
                sequence: 1,
                inbox_key: InboxKey::x25519([0x42; 32]),
                display_name: "test device".into(),
                links: vec![],
                sponsorships: vec![],
                created_at: now,
                updated_at: now,
            },
            now,
        )
        .unwrap();
        Self {
            key,
            id,
            record,
            token: None,
            handle: None,
            http: client(),
        }
    }

    /// The current record's fields with `sequence` bumped, signed.
    pub fn next_record(&self, change: impl FnOnce(&mut DeviceRecordFields)) -> DeviceRecord {
        let mut fields = self.record.fields();
        fields.sequence += 1;
        fields.updated_at = now_ms().max(fields.created_at);
        change(&mut fields);
        DeviceRecord::sign(&self.key, fields, now_ms()).unwrap()
    }

    pub async fn register_raw(
        &self,
        server: &TestServer,
        name: &str,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut body = json!({ "record": b64(&self.record.encode()), "name": name });
        if let Some(token) = token {
            body["token"] = token.into();
        }
        send(self.http.post(server.url("/v0/register")).json(&body)).await
    }

    pub async fn login_challenge(&self, server: &TestServer) -> (Vec<u8>, u64) {
        let (status, body) = send(
            self.http
                .post(server.url("/v0/login/challenge"))
                .json(&json!({ "device": self.id.to_string() })),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (
            unb64(body["challenge"].as_str().unwrap()),
            body["expires_at"].as_u64().unwrap(),
        )
    }

    pub fn answer(&self, server: &TestServer, challenge: &[u8], expires_at: u64) -> Vec<u8> {
        LoginChallenge::new(
            server.name.clone(),
            self.id,
            challenge.try_into().unwrap(),
            expires_at,
        )
        .sign(&self.key)
    }

    pub async fn login_raw(
        &self,
        server: &TestServer,
        challenge: &[u8],
        signature: &[u8],
    ) -> (StatusCode, Value) {
        send(self.http.post(server.url("/v0/login")).json(&json!({
            "device": self.id.to_string(),
            "challenge": b64(challenge),
            "signature": b64(signature),
        })))
        .await
    }

    pub async fn login(&mut self, server: &TestServer) {
        let (challenge, expires_at) = self.login_challenge(server).await;
        let signature = self.answer(server, &challenge, expires_at);
        let (status, body) = self.login_raw(server, &challenge, &signature).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        self.token = Some(body["token"].as_str().unwrap().to_owned());
    }

    pub async fn put_record(
        &self,
        server: &TestServer,
        record: &DeviceRecord,
    ) -> (StatusCode, Value) {
        send(
            self.authed(self.http.put(server.url("/v0/devices/self")))
                .json(&json!({ "record": b64(&record.encode()) })),
        )
        .await
    }

    /// Registers as `name`, logs in and publishes a record carrying the
    /// sponsorship.
    pub async fn join(server: &TestServer, name: &str) -> Self {
        let mut device = Self::new();
        let (status, body) = device.register_raw(server, name, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["handle"], format!("{name}@{}", server.name));
        let sponsorship = SponsorshipIn::decode(&unb64(body["sponsorship"].as_str().unwrap()))
            .unwrap()
            .verify(&device.id, now_ms())
            .unwrap();
        device.handle = Some(body["handle"].as_str().unwrap().to_owned());
        device.login(server).await;
        device.publish(server, sponsorship).await;
        device
    }

    pub async fn publish(&mut self, server: &TestServer, sponsorship: Sponsorship) {
        let record = self.next_record(|f| f.sponsorships = vec![sponsorship]);
        let (status, body) = self.put_record(server, &record).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["result"], "newer");
        self.record = record;
    }

    pub fn authed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    pub async fn get(&self, server: &TestServer, path: &str) -> (StatusCode, Value) {
        send(self.authed(self.http.get(server.url(path)))).await
    }

    pub async fn post(&self, server: &TestServer, path: &str, body: Value) -> (StatusCode, Value) {
        send(self.authed(self.http.post(server.url(path))).json(&body)).await
    }

    pub async fn deposit(
        &self,
        server: &TestServer,
        to: &DeviceId,
        envelope: &[u8],
    ) -> (StatusCode, Value) {
        self.post(
            server,
            &format!("/v0/inbox/{to}"),
            json!({ "envelope": b64(envelope) }),
        )
        .await
    }
}

/// Decodes a base64 record from an answer and verifies it.
pub fn record_of(value: &Value) -> DeviceRecord {
    DeviceRecordIn::decode(&unb64(value.as_str().unwrap()))
        .unwrap()
        .verify(now_ms())
        .unwrap()
}
