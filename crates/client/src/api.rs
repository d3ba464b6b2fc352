//! The homeserver's HTTP API v0, as the client calls it.
//!
//! Binary fields travel as unpadded base64url; errors come back as
//! `{"error": code, "message": text}` with a 4xx or 5xx status.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use kith_proto::batch::{MESSAGE_BATCH, encode_batch};
use kith_proto::events::{EventFrame, OCTET_STREAM, decode_frames};

use crate::ClientError;

/// Encodes bytes for a JSON field.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes a JSON byte field, naming it in the error.
pub fn unb64(field: &str, text: &str) -> Result<Vec<u8>, ClientError> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| ClientError::Protocol(format!("the server sent invalid base64 in `{field}`")))
}

/// A connection to one homeserver, optionally logged in.
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
    /// With 429 `rate_limited`: when the request may be made again.
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// How many times a request refused with 429 `rate_limited` is made again
/// after the wait the server names.
const RATE_LIMIT_RETRIES: u32 = 3;

/// The longest wait for a rate limit the client sits out; a longer one is
/// returned to the caller as the error.
const MAX_RATE_LIMIT_WAIT_MS: u64 = 5_000;

/// `GET /v0/server`.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerInfo {
    /// The server's name.
    pub name: String,
    /// Protocol version.
    pub version: u16,
    /// The encoded `ServerKeys`.
    pub server_keys: String,
    /// `open`, `token` or `closed`.
    pub registration: String,
}

/// One stored inbox item.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct InboxItem {
    /// The server's id for it (for acking).
    pub id: u64,
    /// The sealed envelope, base64url.
    pub envelope: String,
    /// When the server received it.
    pub received_at: u64,
}

/// A claimed key package.
#[derive(Debug, Clone, Deserialize)]
pub struct ClaimedPackage {
    /// The device, hex.
    pub device: String,
    /// The key package, base64url.
    pub package: String,
}

/// `POST /v0/keypackages/claim`.
#[derive(Debug, Clone, Deserialize)]
pub struct Claim {
    /// One package per device that had one.
    pub packages: Vec<ClaimedPackage>,
    /// Devices that had none.
    #[serde(default)]
    pub exhausted: Vec<String>,
}

impl Api {
    /// An API handle for the server at `base` (e.g. `http://127.0.0.1:8448`).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// The session token this handle sends, if logged in (for a
    /// WebSocket opened by other means, e.g. `?token=`).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The same handle, logged in with `token`.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ClientError> {
        let mut request = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let bytes = self.fetch(request).await?;
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes)
            .map_err(|e| ClientError::Protocol(format!("unexpected answer to {path}: {e}")))
    }

    /// Sends `request` (with the session token, if any) and returns the
    /// body of a 2xx answer, or the server's error.
    async fn fetch(&self, request: reqwest::RequestBuilder) -> Result<Vec<u8>, ClientError> {
        self.fetch_typed(request).await.map(|(_, body)| body)
    }

    /// As [`Api::fetch`], with whether the answer is
    /// `application/octet-stream`.
    ///
    /// A request refused with 429 `rate_limited` changed nothing at the
    /// server (spec §10.8), so it is made again after the wait the server
    /// names, up to [`RATE_LIMIT_RETRIES`] times and only for waits up to
    /// [`MAX_RATE_LIMIT_WAIT_MS`]; after that the 429 is the answer.
    async fn fetch_typed(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(bool, Vec<u8>), ClientError> {
        let mut retries = 0;
        loop {
            // Bodies here are bytes or JSON, never streams, so the request
            // can always be copied for a retry.
            let again = (retries < RATE_LIMIT_RETRIES)
                .then(|| request.try_clone())
                .flatten();
            let Some(again) = again else {
                return self.fetch_once(request).await.map_err(|(e, _)| e);
            };
            match self.fetch_once(again).await {
                Err((_, Some(wait_ms))) if wait_ms <= MAX_RATE_LIMIT_WAIT_MS => {
                    tracing::debug!(wait_ms, "rate limited; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
                    retries += 1;
                }
                other => return other.map_err(|(e, _)| e),
            }
        }
    }

    /// One attempt of [`Api::fetch_typed`]; a failure carries the server's
    /// `retry_after_ms` if it was 429 `rate_limited`.
    async fn fetch_once(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<(bool, Vec<u8>), (ClientError, Option<u64>)> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let unreachable = |e| (ClientError::Unreachable(self.base.clone(), e), None);
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let binary = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(';').next().map(str::trim) == Some(OCTET_STREAM));
        let bytes = response.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let (code, message, retry_after_ms) = match serde_json::from_slice::<ErrorBody>(&bytes)
            {
                Ok(body) => (body.error, body.message, body.retry_after_ms),
                Err(_) => (
                    status.as_str().to_owned(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                    None,
                ),
            };
            let retry = (status == reqwest::StatusCode::TOO_MANY_REQUESTS
                && code == "rate_limited")
                .then_some(retry_after_ms)
                .flatten();
            return Err((
                ClientError::Server {
                    status: status.as_u16(),
                    code,
                    message,
                },
                retry,
            ));
        }
        Ok((binary, bytes.to_vec()))
    }

    /// `GET /v0/server`.
    pub async fn server_info(&self) -> Result<ServerInfo, ClientError> {
        self.call(reqwest::Method::GET, "/v0/server", None).await
    }

    /// `POST /v0/register`: returns `(handle, sponsorship bytes)`.
    pub async fn register(
        &self,
        record: &[u8],
        name: &str,
        token: Option<&str>,
    ) -> Result<(String, Vec<u8>), ClientError> {
        #[derive(Deserialize)]
        struct Registered {
            handle: String,
            sponsorship: String,
        }
        let body = json!({ "record": b64(record), "name": name, "token": token });
        let r: Registered = self
            .call(reqwest::Method::POST, "/v0/register", Some(body))
            .await?;
        Ok((r.handle, unb64("sponsorship", &r.sponsorship)?))
    }

    /// `POST /v0/login/challenge`: returns `(challenge, expires_at)`.
    pub async fn login_challenge(&self, device: &str) -> Result<(Vec<u8>, u64), ClientError> {
        #[derive(Deserialize)]
        struct Challenge {
            challenge: String,
            expires_at: u64,
        }
        let c: Challenge = self
            .call(
                reqwest::Method::POST,
                "/v0/login/challenge",
                Some(json!({ "device": device })),
            )
            .await?;
        Ok((unb64("challenge", &c.challenge)?, c.expires_at))
    }

    /// `POST /v0/login`: returns the session token.
    pub async fn login(
        &self,
        device: &str,
        challenge: &[u8],
        signature: &[u8],
    ) -> Result<String, ClientError> {
        #[derive(Deserialize)]
        struct Session {
            token: String,
        }
        let body =
            json!({ "device": device, "challenge": b64(challenge), "signature": b64(signature) });
        let s: Session = self
            .call(reqwest::Method::POST, "/v0/login", Some(body))
            .await?;
        Ok(s.token)
    }

    /// `POST /v0/devices/self/sponsorship`: a fresh sponsorship's bytes.
    pub async fn renew_sponsorship(&self) -> Result<Vec<u8>, ClientError> {
        #[derive(Deserialize)]
        struct Renewed {
            sponsorship: String,
        }
        let r: Renewed = self
            .call(
                reqwest::Method::POST,
                "/v0/devices/self/sponsorship",
                Some(json!({})),
            )
            .await?;
        unb64("sponsorship", &r.sponsorship)
    }

    /// `PUT /v0/devices/self`: returns `newer` or `unchanged`.
    pub async fn publish_record(&self, record: &[u8]) -> Result<String, ClientError> {
        #[derive(Deserialize)]
        struct Published {
            result: String,
        }
        let p: Published = self
            .call(
                reqwest::Method::PUT,
                "/v0/devices/self",
                Some(json!({ "record": b64(record) })),
            )
            .await?;
        Ok(p.result)
    }

    /// `GET /v0/users/{handle}`: the current records of the user's devices.
    pub async fn user_records(&self, handle: &str) -> Result<Vec<Vec<u8>>, ClientError> {
        #[derive(Deserialize)]
        struct Records {
            records: Vec<String>,
        }
        let r: Records = self
            .call(reqwest::Method::GET, &format!("/v0/users/{handle}"), None)
            .await?;
        r.records.iter().map(|t| unb64("records", t)).collect()
    }

    /// `GET /v0/devices/{device}`.
    pub async fn device_record(&self, device: &str) -> Result<Vec<u8>, ClientError> {
        #[derive(Deserialize)]
        struct Record {
            record: String,
        }
        let r: Record = self
            .call(reqwest::Method::GET, &format!("/v0/devices/{device}"), None)
            .await?;
        unb64("record", &r.record)
    }

    /// `GET /v0/devices/{device}`, with when the device was removed from
    /// its name, if its server says it was (§6.4; its last record is still
    /// served).
    pub async fn device_status(&self, device: &str) -> Result<(Vec<u8>, Option<u64>), ClientError> {
        #[derive(Deserialize)]
        struct Record {
            record: String,
            #[serde(default)]
            removed_at: Option<u64>,
        }
        let r: Record = self
            .call(reqwest::Method::GET, &format!("/v0/devices/{device}"), None)
            .await?;
        Ok((unb64("record", &r.record)?, r.removed_at))
    }

    /// `DELETE /v0/devices/{device}`: removes another device of this
    /// device's name from its server (§6.4).
    pub async fn remove_device(&self, device: &str) -> Result<(), ClientError> {
        self.call::<()>(
            reqwest::Method::DELETE,
            &format!("/v0/devices/{device}"),
            None,
        )
        .await
    }

    /// `POST /v0/keypackages`.
    pub async fn upload_key_packages(
        &self,
        packages: &[Vec<u8>],
        last_resort: Option<&[u8]>,
    ) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Stored {
            stored: u64,
        }
        let body = json!({
            "packages": packages.iter().map(|p| b64(p)).collect::<Vec<_>>(),
            "last_resort": last_resort.map(b64),
        });
        let s: Stored = self
            .call(reqwest::Method::POST, "/v0/keypackages", Some(body))
            .await?;
        Ok(s.stored)
    }

    /// `POST /v0/keypackages/claim`.
    pub async fn claim_key_packages(&self, handle: &str) -> Result<Claim, ClientError> {
        self.call(
            reqwest::Method::POST,
            "/v0/keypackages/claim",
            Some(json!({ "handle": handle })),
        )
        .await
    }

    /// `POST /v0/keypackages/claim` for only `devices` of a local `handle`.
    pub async fn claim_device_key_packages(
        &self,
        handle: &str,
        devices: &[String],
    ) -> Result<Claim, ClientError> {
        self.call(
            reqwest::Method::POST,
            "/v0/keypackages/claim",
            Some(json!({ "handle": handle, "devices": devices })),
        )
        .await
    }

    /// `POST /v0/inbox/{device}`: returns the item id.
    pub async fn deposit(&self, device: &str, envelope: &[u8]) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Deposited {
            id: u64,
        }
        let d: Deposited = self
            .call(
                reqwest::Method::POST,
                &format!("/v0/inbox/{device}"),
                Some(json!({ "envelope": b64(envelope) })),
            )
            .await?;
        Ok(d.id)
    }

    /// `GET /v0/inbox`.
    pub async fn inbox(&self) -> Result<Vec<InboxItem>, ClientError> {
        #[derive(Deserialize)]
        struct Items {
            items: Vec<InboxItem>,
        }
        let i: Items = self.call(reqwest::Method::GET, "/v0/inbox", None).await?;
        Ok(i.items)
    }

    /// `DELETE /v0/inbox/{id}`.
    pub async fn ack_inbox(&self, id: u64) -> Result<(), ClientError> {
        let _: Value = self
            .call(reqwest::Method::DELETE, &format!("/v0/inbox/{id}"), None)
            .await?;
        Ok(())
    }

    /// `POST /v0/channels`.
    pub async fn create_channel(
        &self,
        channel: &str,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<(), ClientError> {
        let body = json!({ "channel": channel, "group_info": b64(group_info), "ratchet_tree": b64(ratchet_tree) });
        let _: Value = self
            .call(reqwest::Method::POST, "/v0/channels", Some(body))
            .await?;
        Ok(())
    }

    /// `POST /v0/channels/{id}/commits`.
    pub async fn submit_commit(
        &self,
        channel: &str,
        bundle: &CommitBundle,
    ) -> Result<Accepted, ClientError> {
        let body = json!({
            "epoch": bundle.epoch,
            "commit": b64(&bundle.commit),
            "welcome": bundle.welcome.as_deref().map(b64),
            "group_info": b64(&bundle.group_info),
            "ratchet_tree": bundle.ratchet_tree.as_deref().map(b64),
        });
        self.call(
            reqwest::Method::POST,
            &format!("/v0/channels/{channel}/commits"),
            Some(body),
        )
        .await
    }

    /// `GET /v0/channels/{id}/commits?from_epoch=N`.
    pub async fn commits(
        &self,
        channel: &str,
        from_epoch: u64,
    ) -> Result<Vec<CertifiedCommit>, ClientError> {
        #[derive(Deserialize)]
        struct Commits {
            commits: Vec<CertifiedCommit>,
        }
        let c: Commits = self
            .call(
                reqwest::Method::GET,
                &format!("/v0/channels/{channel}/commits?from_epoch={from_epoch}"),
                None,
            )
            .await?;
        Ok(c.commits)
    }

    /// `GET /v0/channels/{id}/tree?epoch=E`: `(ratchet tree, group info)`.
    pub async fn tree(&self, channel: &str, epoch: u64) -> Result<(Vec<u8>, Vec<u8>), ClientError> {
        #[derive(Deserialize)]
        struct Tree {
            ratchet_tree: String,
            group_info: String,
        }
        let t: Tree = self
            .call(
                reqwest::Method::GET,
                &format!("/v0/channels/{channel}/tree?epoch={epoch}"),
                None,
            )
            .await?;
        Ok((
            unb64("ratchet_tree", &t.ratchet_tree)?,
            unb64("group_info", &t.group_info)?,
        ))
    }

    /// `POST /v0/channels/{id}/messages`: returns `(id, seq, received_at)`.
    pub async fn send_message(
        &self,
        channel: &str,
        epoch: u64,
        message: &[u8],
    ) -> Result<(String, u64, u64), ClientError> {
        #[derive(Deserialize)]
        struct Sent {
            id: String,
            seq: u64,
            received_at: u64,
        }
        let body = json!({ "epoch": epoch, "message": b64(message) });
        let s: Sent = self
            .call(
                reqwest::Method::POST,
                &format!("/v0/channels/{channel}/messages"),
                Some(body),
            )
            .await?;
        Ok((s.id, s.seq, s.received_at))
    }

    /// `POST /v0/channels/{id}/messages?epoch=E` with the MLS message as an
    /// `application/octet-stream` body (spec §6.7): returns `(id, seq,
    /// received_at)`. The server refuses with 409 `wrong_epoch` unless
    /// `epoch` is the channel's current epoch.
    pub async fn send_message_binary(
        &self,
        channel: &str,
        epoch: u64,
        message: &[u8],
    ) -> Result<(String, u64, u64), ClientError> {
        #[derive(Deserialize)]
        struct Sent {
            id: String,
            seq: u64,
            received_at: u64,
        }
        let path = format!("/v0/channels/{channel}/messages?epoch={epoch}");
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, OCTET_STREAM)
            .body(message.to_vec());
        let bytes = self.fetch(request).await?;
        let s: Sent = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("unexpected answer to {path}: {e}")))?;
        Ok((s.id, s.seq, s.received_at))
    }

    /// `POST /v0/channels/{id}/messages?epoch=E` with a message batch body
    /// (spec §6.7, "Send several messages, binary"): `messages`, all
    /// PrivateMessages of `channel` at `epoch`, stored by the server in one
    /// transaction in this order, or none of them. Returns each message's
    /// `(id, seq, received_at)`, in order.
    pub async fn send_messages_binary(
        &self,
        channel: &str,
        epoch: u64,
        messages: &[Vec<u8>],
    ) -> Result<Vec<(String, u64, u64)>, ClientError> {
        #[derive(Deserialize)]
        struct Sent {
            id: String,
            seq: u64,
            received_at: u64,
        }
        #[derive(Deserialize)]
        struct Answer {
            messages: Vec<Sent>,
        }
        let path = format!("/v0/channels/{channel}/messages?epoch={epoch}");
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, MESSAGE_BATCH)
            .body(encode_batch(messages.iter().map(Vec::as_slice)));
        let bytes = self.fetch(request).await?;
        let answer: Answer = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("unexpected answer to {path}: {e}")))?;
        if answer.messages.len() != messages.len() {
            return Err(ClientError::Protocol(format!(
                "the server answered {} of {} messages sent",
                answer.messages.len(),
                messages.len()
            )));
        }
        Ok(answer
            .messages
            .into_iter()
            .map(|s| (s.id, s.seq, s.received_at))
            .collect())
    }

    /// `GET /v0/events?after=CURSOR` with `Accept: application/octet-stream`
    /// (spec §6.8): the events as binary frames. A server (or proxy) that
    /// answers in JSON instead is understood too: its events come back as
    /// JSON frames.
    pub async fn events_binary(&self, after: u64) -> Result<Vec<EventFrame>, ClientError> {
        #[derive(Deserialize)]
        struct Events {
            events: Vec<Value>,
        }
        let request = self
            .http
            .get(format!("{}/v0/events?after={after}&limit=500", self.base))
            .header(reqwest::header::ACCEPT, OCTET_STREAM);
        let (binary, bytes) = self.fetch_typed(request).await?;
        if binary {
            return decode_frames(&bytes).map_err(|e| {
                ClientError::Protocol(format!("the server sent undecodable events: {e}"))
            });
        }
        let e: Events = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Protocol(format!("unexpected answer to /v0/events: {e}")))?;
        e.events
            .into_iter()
            .map(|event| {
                let cursor = event.get("cursor").and_then(Value::as_u64).ok_or_else(|| {
                    ClientError::Protocol("an event without a numeric `cursor`".into())
                })?;
                Ok(EventFrame::Json {
                    cursor,
                    json: event.to_string(),
                })
            })
            .collect()
    }

    /// `GET /v0/channels/{id}/messages?after=SEQ`.
    pub async fn channel_messages(
        &self,
        channel: &str,
        after: u64,
    ) -> Result<Vec<StoredMessage>, ClientError> {
        #[derive(Deserialize)]
        struct Messages {
            messages: Vec<StoredMessage>,
        }
        let m: Messages = self
            .call(
                reqwest::Method::GET,
                &format!("/v0/channels/{channel}/messages?after={after}&limit=500"),
                None,
            )
            .await?;
        Ok(m.messages)
    }

    /// `GET /v0/events?after=CURSOR`.
    pub async fn events(&self, after: u64) -> Result<Vec<Value>, ClientError> {
        #[derive(Deserialize)]
        struct Events {
            events: Vec<Value>,
        }
        let e: Events = self
            .call(
                reqwest::Method::GET,
                &format!("/v0/events?after={after}&limit=500"),
                None,
            )
            .await?;
        Ok(e.events)
    }

    /// `POST /v0/events/ack`.
    pub async fn ack_events(&self, cursor: u64) -> Result<(), ClientError> {
        let _: Value = self
            .call(
                reqwest::Method::POST,
                "/v0/events/ack",
                Some(json!({ "ack": cursor })),
            )
            .await?;
        Ok(())
    }
}

/// A commit with what is stored beside it, as submitted.
#[derive(Debug, Clone)]
pub struct CommitBundle {
    /// The epoch the commit applies to.
    pub epoch: u64,
    /// The commit (MLSMessage).
    pub commit: Vec<u8>,
    /// The Welcome, if it adds devices.
    pub welcome: Option<Vec<u8>>,
    /// The GroupInfo of the new epoch.
    pub group_info: Vec<u8>,
    /// The ratchet tree of the new epoch.
    pub ratchet_tree: Option<Vec<u8>>,
}

/// `POST /v0/channels/{id}/commits` when the commit won its epoch.
#[derive(Debug, Clone, Deserialize)]
pub struct Accepted {
    /// The epoch it applies to.
    pub epoch: u64,
    /// The commit hash (hex).
    pub commit_hash: String,
    /// The encoded ordering certificate (base64url).
    pub certificate: String,
}

/// An accepted commit with its certificate.
#[derive(Debug, Clone, Deserialize)]
pub struct CertifiedCommit {
    /// The epoch it applies to.
    pub epoch: u64,
    /// The commit (base64url).
    pub commit: String,
    /// The commit hash (hex).
    pub commit_hash: String,
    /// The ordering certificate (base64url).
    pub certificate: String,
}

/// A channel message as the homeserver stores it.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredMessage {
    /// Sequence number in the channel.
    pub seq: u64,
    /// Message id (hex).
    pub id: String,
    /// Epoch it was sent in.
    pub epoch: u64,
    /// Sending device (hex).
    pub sender: String,
    /// The MLS message (base64url).
    pub message: String,
    /// When the server received it.
    pub received_at: u64,
}
