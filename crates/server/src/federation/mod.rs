//! Federation: how this homeserver talks to others.
//!
//! - [`Resolver`]: server name → base URL (`https://{name}` unless the
//!   resolve map says otherwise; plain HTTP only through the map).
//! - [`Client`]: signed, bounded HTTP requests to other servers
//!   (`FederationRequest`, spec §12.1), and fetching their `ServerKeys`.
//! - [`KeyCache`]: other servers' verified key lists, refetched after an
//!   hour or on meeting an unknown key.
//! - [`ReplayCache`]: the nonces seen within the replay window.
//! - `auth`: the [`Signed`] extractor that checks an incoming request.
//! - `api`: the federation endpoints (`/v0/federation/...`).
//! - `remote`: remote identity (users, devices, key-package claims) for the
//!   client API, verified and cached.
//! - `outbox`: the durable outbox and its delivery task.
//!
//! The [`Client`] is transport only; later parts (Raft RPCs for
//! multi-server ordering groups, votes, message fan-out) reuse it: a
//! `RaftNetworkFactory` over `Client::post` is the plan (spec §10.8).

mod api;
mod auth;
pub(crate) mod channels;
pub(crate) mod outbox;
pub(crate) mod raft;
pub(crate) mod remote;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kith_proto::{FederationRequest, SecretKey, ServerKeys, ServerKeysIn, ServerName};
use reqwest::StatusCode;

pub(crate) use api::routes;
pub(crate) use auth::Signed;

use crate::config::FederationSettings;
use crate::error::ApiError;

/// The replay window: a request's timestamp must be within this of the
/// receiver's clock, and its nonce is remembered this long.
pub(crate) const REPLAY_WINDOW_MS: u64 = 5 * 60 * 1000;

/// How long a fetched key list is trusted before it is fetched again.
const KEYS_TTL_MS: u64 = 3600 * 1000;

/// Most nonces the replay cache holds; past this, requests are refused
/// (503) until old entries leave the window, rather than forgetting nonces.
const MAX_NONCES: usize = 1_000_000;

/// The path of the published key list.
pub(crate) const SERVER_KEYS_PATH: &str = "/.well-known/kith/server-keys";

/// The headers of a signed request.
pub(crate) const ORIGIN_HEADER: &str = "kith-origin";
/// See [`ORIGIN_HEADER`].
pub(crate) const SIGNATURE_HEADER: &str = "kith-signature";

/// Why a federation request to another server failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FederationError {
    /// The destination is blocked by this server's configuration.
    #[error("{0} is blocked by this server")]
    Blocked(ServerName),
    /// The destination could not be reached or did not answer in time.
    #[error("{server} is unreachable: {why}")]
    Unreachable {
        /// The destination.
        server: ServerName,
        /// What went wrong.
        why: String,
    },
    /// The destination answered with an error.
    #[error("{server} answered {status}: {body}")]
    Status {
        /// The destination.
        server: ServerName,
        /// The HTTP status.
        status: StatusCode,
        /// The error code from the body, or the body's start.
        body: String,
        /// With 429: the body's `retry_after_ms`, if it had one.
        retry_after_ms: Option<u64>,
    },
    /// The destination's answer is not what the protocol allows.
    #[error("{server} sent an invalid answer: {why}")]
    Invalid {
        /// The destination.
        server: ServerName,
        /// What was wrong.
        why: String,
    },
}

impl FederationError {
    /// Whether retrying later may succeed (the outbox keeps such items).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            FederationError::Blocked(_) | FederationError::Invalid { .. } => false,
            FederationError::Unreachable { .. } => true,
            FederationError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::UNAUTHORIZED
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
        }
    }
}

impl From<FederationError> for ApiError {
    fn from(e: FederationError) -> Self {
        match &e {
            FederationError::Blocked(_) => blocked(e.to_string()),
            FederationError::Status { status, body, .. }
                if *status == StatusCode::FORBIDDEN && body == "blocked" =>
            {
                blocked(e.to_string())
            }
            FederationError::Status { status, .. } if *status == StatusCode::NOT_FOUND => {
                ApiError::not_found(e.to_string())
            }
            FederationError::Status {
                status,
                retry_after_ms,
                ..
            } if *status == StatusCode::TOO_MANY_REQUESTS => {
                // The remote's wait, bounded (a remote cannot make our
                // clients wait for ever); 1 s when it named none.
                let wait = retry_after_ms
                    .unwrap_or(1_000)
                    .min(MAX_REMOTE_RETRY_AFTER_MS);
                ApiError::rate_limited(e.to_string(), Duration::from_millis(wait))
            }
            _ => ApiError::new(StatusCode::BAD_GATEWAY, "remote_unavailable", e.to_string()),
        }
    }
}

/// The longest `retry_after_ms` passed on from another server's 429.
const MAX_REMOTE_RETRY_AFTER_MS: u64 = 60_000;

/// 403 `blocked`.
pub(crate) fn blocked(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "blocked", message)
}

/// Server names to base URLs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Resolver {
    map: BTreeMap<ServerName, String>,
}

impl Resolver {
    pub(crate) fn new(map: BTreeMap<ServerName, String>) -> Self {
        Self { map }
    }

    /// The base URL of `server`, without a trailing `/`.
    pub(crate) fn base_url(&self, server: &ServerName) -> String {
        match self.map.get(server) {
            Some(url) => url.clone(),
            None => format!("https://{server}"),
        }
    }
}

/// An answer from another server.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The HTTP status (2xx; errors are [`FederationError::Status`]).
    pub(crate) status: StatusCode,
    /// The body, at most the configured limit.
    pub(crate) body: Vec<u8>,
}

/// Signed HTTP requests to other servers. Cheap to share: one connection
/// pool for all destinations.
pub(crate) struct Client {
    http: reqwest::Client,
    me: ServerName,
    key: SecretKey,
    resolver: Resolver,
    blocked: BTreeSet<ServerName>,
    max_response_bytes: usize,
    /// Test hook: links cut on purpose ([`crate::Config::faults`]).
    faults: Option<Arc<crate::faults::LinkFaults>>,
}

impl Client {
    pub(crate) fn new(
        me: ServerName,
        key: SecretKey,
        resolver: Resolver,
        blocked: BTreeSet<ServerName>,
        settings: &FederationSettings,
        faults: Option<Arc<crate::faults::LinkFaults>>,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.request_timeout_ms))
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            // A redirect could leave the resolved URL (even for plain HTTP).
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("kithd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the federation HTTP client: {e}"))?;
        Ok(Self {
            http,
            me,
            key,
            resolver,
            blocked,
            max_response_bytes: settings.max_response_bytes,
            faults,
        })
    }

    /// Whether `server` is blocked here.
    pub(crate) fn is_blocked(&self, server: &ServerName) -> bool {
        self.blocked.contains(server)
    }

    /// This server's name.
    pub(crate) fn me(&self) -> &ServerName {
        &self.me
    }

    /// Refuses blocked destinations, and (test hook) links cut on purpose,
    /// which fail as unreachable before anything is sent.
    fn check_destination(&self, server: &ServerName) -> Result<(), FederationError> {
        if self.is_blocked(server) {
            return Err(FederationError::Blocked(server.clone()));
        }
        if let Some(faults) = &self.faults
            && faults.is_cut(&self.me, server)
        {
            return Err(FederationError::Unreachable {
                server: server.clone(),
                why: "the link is cut (fault injection)".into(),
            });
        }
        Ok(())
    }

    /// A signed GET of `path_and_query` on `server`.
    pub(crate) async fn get(
        &self,
        server: &ServerName,
        path_and_query: &str,
    ) -> Result<Answer, FederationError> {
        self.send(server, reqwest::Method::GET, path_and_query, Vec::new())
            .await
    }

    /// A signed POST of a JSON `body` to `path_and_query` on `server`.
    pub(crate) async fn post(
        &self,
        server: &ServerName,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> Result<Answer, FederationError> {
        self.send(server, reqwest::Method::POST, path_and_query, body)
            .await
    }

    async fn send(
        &self,
        server: &ServerName,
        method: reqwest::Method,
        path_and_query: &str,
        body: Vec<u8>,
    ) -> Result<Answer, FederationError> {
        self.check_destination(server)?;
        if let Some(faults) = &self.faults
            && faults.is_fanout_held(&self.me, server, method.as_str(), path_and_query)
        {
            return Err(FederationError::Unreachable {
                server: server.clone(),
                why: "message fan-out is held back (fault injection)".into(),
            });
        }
        let url = format!("{}{path_and_query}", self.resolver.base_url(server));
        let url = reqwest::Url::parse(&url).map_err(|e| FederationError::Invalid {
            server: server.clone(),
            why: format!("bad URL {url:?}: {e}"),
        })?;
        // Sign what the URL parser will send, so both ends see one path.
        let signed_path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
        let request = FederationRequest::new(
            self.me.clone(),
            server.clone(),
            method.as_str(),
            &signed_path,
            &body,
            crate::state::now_ms(),
            random_16(),
        );
        let signature = crate::api::b64(&request.sign(&self.key).encode());
        let mut builder = self
            .http
            .request(method, url)
            .header(ORIGIN_HEADER, self.me.as_str())
            .header(SIGNATURE_HEADER, signature);
        if !body.is_empty() {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| FederationError::Unreachable {
                server: server.clone(),
                why: e.to_string(),
            })?;
        self.read(server, response).await
    }

    /// Reads an answer, at most `max_response_bytes` of it.
    async fn read(
        &self,
        server: &ServerName,
        mut response: reqwest::Response,
    ) -> Result<Answer, FederationError> {
        let status = response.status();
        let mut body = Vec::new();
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|e| FederationError::Unreachable {
                    server: server.clone(),
                    why: format!("reading the answer: {e}"),
                })?;
            let Some(chunk) = chunk else { break };
            if body.len().saturating_add(chunk.len()) > self.max_response_bytes {
                return Err(FederationError::Invalid {
                    server: server.clone(),
                    why: format!("answer over {} bytes", self.max_response_bytes),
                });
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
            let code = json
                .as_ref()
                .and_then(|v| v.get("error").and_then(|c| c.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            let retry_after_ms = json
                .as_ref()
                .and_then(|v| v.get("retry_after_ms"))
                .and_then(serde_json::Value::as_u64);
            return Err(FederationError::Status {
                server: server.clone(),
                status,
                body: code,
                retry_after_ms,
            });
        }
        Ok(Answer { status, body })
    }

    /// Fetches and verifies `server`'s published key list (unsigned GET).
    pub(crate) async fn fetch_server_keys(
        &self,
        server: &ServerName,
        now: u64,
    ) -> Result<ServerKeys, FederationError> {
        self.check_destination(server)?;
        let url = format!("{}{SERVER_KEYS_PATH}", self.resolver.base_url(server));
        let response =
            self.http
                .get(&url)
                .send()
                .await
                .map_err(|e| FederationError::Unreachable {
                    server: server.clone(),
                    why: e.to_string(),
                })?;
        let answer = self.read(server, response).await?;
        let invalid = |why: String| FederationError::Invalid {
            server: server.clone(),
            why,
        };
        let keys = ServerKeysIn::decode(&answer.body)
            .map_err(|e| invalid(e.to_string()))?
            .verify(now)
            .map_err(|e| invalid(e.to_string()))?;
        if keys.server() != server {
            return Err(invalid(format!(
                "its key list is for {}, not for it",
                keys.server()
            )));
        }
        Ok(keys)
    }
}

/// 16 bytes from the operating system's generator.
pub(crate) fn random_16() -> [u8; 16] {
    use rand_core::RngCore as _;
    let mut bytes = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// Other servers' verified key lists.
///
/// A list is fetched again after an hour, or when a request names a key it
/// does not hold, but at most every [`MIN_REFETCH_MS`], so that forged
/// requests cannot make this server hammer another. A failed fetch is
/// remembered for [`FAILED_FETCH_MS`] for the same reason. Fetches for one
/// server are serialised; different servers do not wait for each other.
#[derive(Default)]
pub(crate) struct KeyCache {
    lists: Mutex<HashMap<ServerName, CachedKeys>>,
    fetching: Mutex<HashMap<ServerName, Arc<tokio::sync::Mutex<()>>>>,
}

/// Fetch a known server's keys again for an unknown key at most this often.
const MIN_REFETCH_MS: u64 = 30_000;
/// Do not try a server whose keys could not be fetched again before this.
const FAILED_FETCH_MS: u64 = 10_000;
/// Most servers the cache remembers; past this, failures are forgotten
/// first.
const MAX_CACHED_SERVERS: usize = 10_000;

#[derive(Clone)]
struct CachedKeys {
    keys: Option<ServerKeys>,
    fetched_at: u64,
    failed_at: Option<u64>,
}

enum Lookup {
    Use(ServerKeys),
    Failed,
    Fetch,
}

impl KeyCache {
    fn lock_lists(&self) -> std::sync::MutexGuard<'_, HashMap<ServerName, CachedKeys>> {
        self.lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lookup(
        &self,
        server: &ServerName,
        want: Option<&kith_proto::SignaturePublicKey>,
        now: u64,
    ) -> Lookup {
        let lists = self.lock_lists();
        let Some(cached) = lists.get(server) else {
            return Lookup::Fetch;
        };
        if let Some(keys) = &cached.keys {
            let age = now.saturating_sub(cached.fetched_at);
            let has = want.is_none_or(|k| keys.keys().iter().any(|e| &e.key == k));
            if age < KEYS_TTL_MS && (has || age < MIN_REFETCH_MS) {
                return Lookup::Use(keys.clone());
            }
        }
        match cached.failed_at {
            Some(at) if now.saturating_sub(at) < FAILED_FETCH_MS => match &cached.keys {
                Some(keys) => Lookup::Use(keys.clone()),
                None => Lookup::Failed,
            },
            _ => Lookup::Fetch,
        }
    }

    fn store(&self, server: &ServerName, entry: CachedKeys) {
        let mut lists = self.lock_lists();
        if lists.len() >= MAX_CACHED_SERVERS && !lists.contains_key(server) {
            lists.retain(|_, c| c.keys.is_some());
            if lists.len() >= MAX_CACHED_SERVERS {
                return;
            }
        }
        lists.insert(server.clone(), entry);
    }

    /// `server`'s key list (see the type's docs for when it is fetched). A
    /// fetched list replaces the cached one only if it is at least as new.
    pub(crate) async fn get(
        &self,
        client: &Client,
        server: &ServerName,
        want: Option<&kith_proto::SignaturePublicKey>,
        now: u64,
    ) -> Result<ServerKeys, FederationError> {
        let recently_failed = || FederationError::Unreachable {
            server: server.clone(),
            why: "its keys could not be fetched a moment ago".into(),
        };
        match self.lookup(server, want, now) {
            Lookup::Use(keys) => return Ok(keys),
            Lookup::Failed => return Err(recently_failed()),
            Lookup::Fetch => {}
        }
        let gate = {
            let mut fetching = self
                .fetching
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(fetching.entry(server.clone()).or_default())
        };
        let result = {
            let _one_fetch = gate.lock().await;
            // Another request may have fetched while this one waited.
            match self.lookup(server, want, crate::state::now_ms()) {
                Lookup::Use(keys) => Ok(keys),
                Lookup::Failed => Err(recently_failed()),
                Lookup::Fetch => self.fetch(client, server, now).await,
            }
        };
        let mut fetching = self
            .fetching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if Arc::strong_count(&gate) <= 2 {
            fetching.remove(server);
        }
        result
    }

    async fn fetch(
        &self,
        client: &Client,
        server: &ServerName,
        now: u64,
    ) -> Result<ServerKeys, FederationError> {
        let held = self.lock_lists().get(server).cloned();
        let held_keys = held.as_ref().and_then(|h| h.keys.clone());
        match client.fetch_server_keys(server, now).await {
            Ok(keys) => {
                let newer = held_keys
                    .as_ref()
                    .is_none_or(|h| keys.published_at() >= h.published_at());
                // A rolled-back list is refused: keep what we had.
                let keys = if newer {
                    keys
                } else {
                    held_keys.unwrap_or(keys)
                };
                self.store(
                    server,
                    CachedKeys {
                        keys: Some(keys.clone()),
                        fetched_at: now,
                        failed_at: None,
                    },
                );
                Ok(keys)
            }
            Err(e) => {
                self.store(
                    server,
                    CachedKeys {
                        keys: held_keys,
                        fetched_at: held.map_or(0, |h| h.fetched_at),
                        failed_at: Some(now),
                    },
                );
                Err(e)
            }
        }
    }
}

/// The nonces of accepted requests, each kept for the replay window.
///
/// In memory: after a restart it is empty, so the server also refuses every
/// request timestamped before it started (`not_before`), which the cache
/// could not have seen. Senders re-sign on every retry, so nothing is lost.
pub(crate) struct ReplayCache {
    not_before: u64,
    seen: Mutex<HashMap<(ServerName, [u8; 16]), u64>>,
}

/// Why the replay cache refused a request.
pub(crate) enum Replay {
    /// The nonce was seen within the window.
    Seen,
    /// The cache is full.
    Full,
}

impl ReplayCache {
    pub(crate) fn new(not_before: u64) -> Self {
        Self {
            not_before,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Requests timestamped before this are refused as stale.
    pub(crate) fn not_before(&self) -> u64 {
        self.not_before
    }

    /// Records `nonce` from `origin` at `now`, or says it was seen.
    pub(crate) fn check_and_insert(
        &self,
        origin: &ServerName,
        nonce: [u8; 16],
        now: u64,
    ) -> Result<(), Replay> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (origin.clone(), nonce);
        if let Some(at) = seen.get(&key)
            && now.saturating_sub(*at) <= 2 * REPLAY_WINDOW_MS
        {
            return Err(Replay::Seen);
        }
        if seen.len() >= MAX_NONCES {
            seen.retain(|_, at| now.saturating_sub(*at) <= 2 * REPLAY_WINDOW_MS);
            if seen.len() >= MAX_NONCES {
                return Err(Replay::Full);
            }
        }
        seen.insert(key, now);
        Ok(())
    }
}

/// Everything federation needs, shared by handlers and tasks.
pub(crate) struct Federation {
    pub(crate) client: Client,
    pub(crate) keys: KeyCache,
    pub(crate) replay: ReplayCache,
    /// Wakes the outbox task when an item is queued.
    pub(crate) outbox_wake: tokio::sync::Notify,
    /// Inbox deposits per origin server.
    pub(crate) deposit_limiter: crate::state::RateLimiter<ServerName>,
    /// Submissions forwarded per origin server and channel, when this
    /// server leads the channel's Raft group (spec §10.8).
    pub(crate) submit_limiter: crate::state::RateLimiter<(ServerName, kith_proto::ChannelId)>,
    /// Counts the Raft requests this server sends (`kith_raft_requests_sent`).
    pub(crate) raft_requests: prometheus_client::metrics::family::Family<
        crate::metrics::RaftRequestLabels,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl Federation {
    /// Counts one Raft request of `kind` sent.
    pub(crate) fn count_raft_request(&self, kind: &'static str) {
        self.raft_requests
            .get_or_create(&crate::metrics::RaftRequestLabels { kind })
            .inc();
    }
}
