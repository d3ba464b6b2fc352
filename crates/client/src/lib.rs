//! The Kith client SDK: a device's keys and local store, and the calls it
//! makes to its homeserver.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kith_client::ClientError> {
//! let home = std::path::Path::new("/tmp/alice");
//! let alice = kith_client::Client::register(home, "http://127.0.0.1:8448", "alice", None).await?;
//! println!("registered as {}", alice.handle());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod api;
pub mod channels;
pub mod chat;
pub mod devices;
pub mod requests;
pub mod sender;
pub mod store;
mod voters;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kith_mls::{CIPHERSUITE_V0, Device, MlsStore};
use kith_proto::inbox::{InboxKind, InboxSecretKey, seal};
use kith_proto::{
    DeviceId, DeviceRecord, DeviceRecordFields, DeviceRecordIn, Handle, LoginChallenge, SecretKey,
    ServerName, SponsorshipIn,
};

pub use api::Api;
pub use channels::{LeaveOutcome, SyncReport};
pub use chat::{ChatTimeline, TypingEvent};
pub use devices::DeviceRemoval;
pub use kith_chat;
pub use requests::KeptWork;
pub use sender::{SendError, Sender};
pub use store::Kept;
pub use store::{ChannelRow, MessageRow};
use store::{Identity, Store};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The homeserver could not be reached.
    #[error("cannot reach the homeserver at {0}: {1}")]
    Unreachable(String, #[source] reqwest::Error),
    /// The homeserver refused the request.
    #[error("the homeserver refused: {message} ({code}, HTTP {status})")]
    Server {
        /// HTTP status.
        status: u16,
        /// The server's error code.
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// The server's answer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The local store failed.
    #[error("local store: {0}")]
    Store(String),
    /// The device has not registered yet.
    #[error("this device is not registered yet (run `kith register`)")]
    NotRegistered,
    /// The device is already registered in this home directory.
    #[error("this home directory already holds a device ({0})")]
    AlreadyRegistered(String),
    /// A user-supplied argument is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The name is held by devices that do not link this one (§6.3).
    #[error(
        "{name} is taken on {server}. If it is yours, run `kith device link {device}` on one \
         of its devices, then register this device again"
    )]
    NameTaken {
        /// The local name asked for.
        name: String,
        /// The homeserver's name.
        server: String,
        /// This (unregistered) device's id, for the other device to link.
        device: DeviceId,
    },
    /// MLS (channel crypto) failed.
    #[error("channel crypto: {0}")]
    Mls(#[from] kith_mls::DeviceError),
}

impl From<kith_mls::StoreError> for ClientError {
    fn from(e: kith_mls::StoreError) -> Self {
        ClientError::Store(e.to_string())
    }
}

/// How many key packages a device keeps on its server.
pub const KEY_PACKAGE_BATCH: usize = 20;

impl From<rusqlite::Error> for ClientError {
    fn from(e: rusqlite::Error) -> Self {
        ClientError::Store(e.to_string())
    }
}

/// The current time in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The default home directory: `$KITH_HOME`, else the per-user data
/// directory's `kith` folder.
pub fn default_home() -> PathBuf {
    if let Some(home) = std::env::var_os("KITH_HOME") {
        return PathBuf::from(home);
    }
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("kith")
}

/// A message from another device's inbox deposit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectMessage {
    /// The sender's handle, as its record names it (or its device id).
    pub sender: String,
    /// The sender's device.
    pub sender_device: DeviceId,
    /// When the sender says it sent it.
    pub sent_at: u64,
    /// The body.
    pub body: Vec<u8>,
}

/// Verified member records a client keeps in memory.
const VERIFIED_RECORDS: usize = 4096;

/// A registered device, with its store and homeserver connection.
pub struct Client {
    store: Store,
    identity: Identity,
    key: SecretKey,
    inbox_key: InboxSecretKey,
    api: Api,
    mls: Device,
    commit_conflicts: u64,
    /// Commits this device merged since it last read its events: past
    /// [`channels::SYNC_EVERY_COMMITS`] it reads them before committing
    /// again, so messages queued for it stay within the epochs it keeps.
    commits_since_sync: usize,
    /// Events processed (their cursor stored here) but not yet
    /// acknowledged to the homeserver: acknowledged once
    /// [`channels::ACK_EVERY_EVENTS`] have gathered.
    unacked_events: usize,
    /// Members' records already verified (voter sets check every member's
    /// record for each commit).
    records: kith_proto::VerifiedRecords,
    /// Channels whose ordering group was unavailable (503
    /// `ordering_unavailable`) earlier in the current sync: the rest of its
    /// steps on them are kept for later without trying.
    stalled: std::collections::BTreeSet<kith_proto::ChannelId>,
    /// Whether the steps at the end of a sync are running: a sync that
    /// one of them starts (a commit or a send catching up) reads events
    /// only, so it cannot come back to the same step.
    in_tail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The batch a dropped [`Sender`] left in flight, settled before this
    /// device posts anything else (`Client::settle_dropped_batch`).
    dropped_batch: Option<sender::InFlight>,
    /// Payloads of such batches the server did not acknowledge, for the
    /// next sync to report.
    unacknowledged: Vec<(kith_proto::ChannelId, Vec<u8>)>,
    /// What each member's record gives voter sets, while the store holds
    /// that record and it is valid.
    sponsors: voters::MemberSponsors,
}

impl Client {
    /// Creates a new device in `home`, registers it as `name` on the server
    /// at `server_url`, publishes its sponsored record and logs in.
    pub async fn register(
        home: &Path,
        server_url: &str,
        name: &str,
        token: Option<&str>,
    ) -> Result<Self, ClientError> {
        std::fs::create_dir_all(home)
            .map_err(|e| ClientError::Store(format!("{}: {e}", home.display())))?;
        let store = Store::open(&home.join("client.db"))?;
        if let Some(existing) = store.identity()? {
            return Err(ClientError::AlreadyRegistered(existing.handle));
        }
        let name: kith_proto::LocalName = name
            .parse()
            .map_err(|e| ClientError::Invalid(format!("name {name:?}: {e}")))?;
        let api = Api::new(server_url);
        let info = api.server_info().await?;
        let server_name: ServerName = info
            .name
            .parse()
            .map_err(|e| ClientError::Protocol(format!("server name {:?}: {e}", info.name)))?;

        // The keys outlive a refused attempt, so the device id a user's
        // other device links is the one that registers next time.
        let (seed, inbox_secret) = match store.pending_keys()? {
            Some(keys) => keys,
            None => {
                let keys = (
                    SecretKey::generate().to_seed(),
                    InboxSecretKey::generate().to_bytes(),
                );
                store.save_pending_keys(&keys.0, &keys.1)?;
                keys
            }
        };
        let key = SecretKey::from_seed(seed);
        let inbox_key = InboxSecretKey::from_bytes(inbox_secret);
        let now = now_ms();
        let unsponsored = DeviceRecord::sign(
            &key,
            DeviceRecordFields {
                sequence: 1,
                inbox_key: inbox_key.public(),
                display_name: name.to_string(),
                links: vec![],
                sponsorships: vec![],
                created_at: now,
                updated_at: now,
            },
            now,
        )
        .map_err(|e| ClientError::Invalid(e.to_string()))?;
        let device = unsponsored.device_id();
        let (handle, sponsorship) = match api
            .register(&unsponsored.encode(), name.as_str(), token)
            .await
        {
            Err(ClientError::Server {
                status: 409, code, ..
            }) if code == "name_taken" => {
                return Err(ClientError::NameTaken {
                    name: name.to_string(),
                    server: server_name.to_string(),
                    device,
                });
            }
            other => other?,
        };
        let sponsorship = SponsorshipIn::decode(&sponsorship)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .verify(&device, now_ms())
            .map_err(|e| {
                ClientError::Protocol(format!("the server's sponsorship is invalid: {e}"))
            })?;
        if sponsorship.server() != &server_name {
            return Err(ClientError::Protocol(format!(
                "the server {server_name} sponsored us as {}",
                sponsorship.server()
            )));
        }
        let mut fields = unsponsored.fields();
        fields.sequence += 1;
        fields.sponsorships = vec![sponsorship];
        // Joining a user: link back every device of the name that links
        // this one (a link only counts when it is mutual, §5.7).
        fields.links = linking_devices(&api, &handle, &device).await?;
        fields.updated_at = now_ms().max(fields.updated_at);
        let record = DeviceRecord::sign(&key, fields, now_ms())
            .map_err(|e| ClientError::Invalid(e.to_string()))?;

        let identity = Identity {
            identity_seed: key.to_seed(),
            inbox_secret: inbox_key.to_bytes(),
            server_url: api.base().to_owned(),
            server_name: server_name.to_string(),
            handle,
            record: record.encode(),
            token: None,
        };
        store.save_identity(&identity)?;
        let mls = Device::new(&key, MlsStore::open(home.join("mls.db"))?);
        let mut client = Self {
            store,
            identity,
            key,
            inbox_key,
            api,
            mls,
            commit_conflicts: 0,
            commits_since_sync: 0,
            unacked_events: 0,
            records: kith_proto::VerifiedRecords::new(VERIFIED_RECORDS),
            stalled: Default::default(),
            in_tail: Default::default(),
            dropped_batch: None,
            unacknowledged: Vec::new(),
            sponsors: voters::MemberSponsors::new(VERIFIED_RECORDS),
        };
        client.login().await?;
        client.api.publish_record(&record.encode()).await?;
        client.upload_key_packages(KEY_PACKAGE_BATCH, true).await?;
        Ok(client)
    }

    /// Links `device` to this device's user (§5.7): publishes a new version
    /// of this device's record that lists it. The other device becomes part
    /// of the user once its record links this one back, which it does when
    /// it registers under this device's name (or, already registered, when
    /// it links this device in turn). Returns whether the record changed.
    pub async fn link_device(&mut self, device: DeviceId) -> Result<bool, ClientError> {
        if device == self.device_id() {
            return Err(ClientError::Invalid("a device cannot link itself".into()));
        }
        let record = self.record()?;
        if record.links_to(&device) {
            return Ok(false);
        }
        let mut fields = record.fields();
        if fields.links.len() >= kith_proto::record::MAX_LINKS {
            return Err(ClientError::Invalid(format!(
                "this device already links {} devices, the most a record may list",
                fields.links.len()
            )));
        }
        fields.links.push(device);
        self.publish_fields(fields).await?;
        tracing::info!(%device, "linked a device");
        Ok(true)
    }

    /// The devices of this user: those this device's record links whose
    /// own current record links it back, each verified (§5.7; one hop: the
    /// reference client links every new device to the device that added it,
    /// which links it back).
    pub async fn linked_devices(&mut self) -> Result<Vec<DeviceRecord>, ClientError> {
        let me = self.device_id();
        let mut linked = Vec::new();
        for device in self.record()?.links().collect::<Vec<_>>() {
            let text = device.to_string();
            if self.store.is_removed_device(&device)? {
                continue;
            }
            let bytes = match self
                .authed(|api| {
                    let d = text.clone();
                    async move { api.device_status(&d).await }
                })
                .await
            {
                Ok((bytes, None)) => bytes,
                // Removed from the name (§6.4): no longer part of the user.
                Ok((_, Some(_))) => continue,
                // Not registered (yet): not part of the user.
                Err(ClientError::Server { status: 404, .. }) => continue,
                Err(e) => return Err(e),
            };
            let Ok(record) = DeviceRecordIn::decode(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|r| r.verify(now_ms()).map_err(|e| e.to_string()))
                .inspect_err(|e| tracing::warn!(%device, "a linked device's record: {e}"))
            else {
                continue;
            };
            if record.device_id() == device && record.links_to(&me) {
                self.store.save_record(&device, &bytes)?;
                linked.push(record);
            }
        }
        Ok(linked)
    }

    /// Signs and publishes the next version of this device's record with
    /// `fields` (its sequence and time advanced here), and keeps it.
    pub(crate) async fn publish_fields(
        &mut self,
        mut fields: DeviceRecordFields,
    ) -> Result<(), ClientError> {
        fields.sequence += 1;
        fields.updated_at = now_ms().max(fields.updated_at);
        let next = DeviceRecord::sign(&self.key, fields, now_ms())
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        let encoded = next.encode();
        self.authed(|api| {
            let r = encoded.clone();
            async move { api.publish_record(&r).await }
        })
        .await?;
        self.identity.record = encoded;
        self.store.save_identity(&self.identity)?;
        Ok(())
    }

    /// Opens the device registered in `home`.
    pub fn open(home: &Path) -> Result<Self, ClientError> {
        let path = home.join("client.db");
        if !path.exists() {
            return Err(ClientError::NotRegistered);
        }
        let store = Store::open(&path)?;
        let identity = store.identity()?.ok_or(ClientError::NotRegistered)?;
        let key = SecretKey::from_seed(identity.identity_seed);
        let inbox_key = InboxSecretKey::from_bytes(identity.inbox_secret);
        let api = Api::new(&identity.server_url).with_token(identity.token.clone());
        let mls = Device::new(&key, MlsStore::open(home.join("mls.db"))?);
        Ok(Self {
            store,
            identity,
            key,
            inbox_key,
            api,
            mls,
            commit_conflicts: 0,
            commits_since_sync: 0,
            unacked_events: 0,
            records: kith_proto::VerifiedRecords::new(VERIFIED_RECORDS),
            stalled: Default::default(),
            in_tail: Default::default(),
            dropped_batch: None,
            unacknowledged: Vec::new(),
            sponsors: voters::MemberSponsors::new(VERIFIED_RECORDS),
        })
    }

    /// Logs in afresh: signs the server's challenge with the identity key.
    pub async fn login(&mut self) -> Result<(), ClientError> {
        let device = self.device_id();
        let (challenge, expires_at) = self.api.login_challenge(&device.to_string()).await?;
        let challenge: [u8; 32] = challenge
            .try_into()
            .map_err(|_| ClientError::Protocol("login challenge is not 32 bytes".into()))?;
        let server: ServerName = self
            .identity
            .server_name
            .parse()
            .map_err(|e| ClientError::Store(format!("stored server name: {e}")))?;
        let signature = LoginChallenge::new(server, device, challenge, expires_at).sign(&self.key);
        let token = self
            .api
            .login(&device.to_string(), &challenge, &signature)
            .await?;
        self.identity.token = Some(token.clone());
        self.store.save_identity(&self.identity)?;
        self.api = self.api.clone().with_token(Some(token));
        Ok(())
    }

    /// This device's current record, as last published.
    pub fn record(&self) -> Result<DeviceRecord, ClientError> {
        DeviceRecordIn::decode(&self.identity.record)
            .map_err(|e| ClientError::Store(format!("stored record: {e}")))?
            .verify_as_of_update()
            .map_err(|e| ClientError::Store(format!("stored record: {e}")))
    }

    /// Renews the home server's sponsorship of this device when less than a
    /// third of its lifetime is left (or always, with `force`): asks for a
    /// fresh one, signs the next version of the record with it and
    /// publishes it. Without this, a record whose sponsorship expired no
    /// longer verifies and nobody can add or verify this device. Returns
    /// whether it renewed. `sync` calls it.
    pub async fn renew_sponsorship(&mut self, force: bool) -> Result<bool, ClientError> {
        let record = self.record()?;
        let server: ServerName = self
            .identity
            .server_name
            .parse()
            .map_err(|e| ClientError::Store(format!("stored server name: {e}")))?;
        let now = now_ms();
        let due = record
            .sponsorships()
            .iter()
            .filter(|s| s.server() == &server)
            .all(|s| {
                let lifetime = s.expires_at().saturating_sub(s.issued_at());
                s.expires_at().saturating_sub(now) < lifetime / 3
            });
        if !due && !force {
            return Ok(false);
        }
        let bytes = self
            .authed(|api| async move { api.renew_sponsorship().await })
            .await?;
        let device = self.device_id();
        let fresh = SponsorshipIn::decode(&bytes)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .verify(&device, now_ms())
            .map_err(|e| {
                ClientError::Protocol(format!("the renewed sponsorship is invalid: {e}"))
            })?;
        if fresh.server() != &server {
            return Err(ClientError::Protocol(format!(
                "{server} sponsored this device as {}",
                fresh.server()
            )));
        }
        let mut fields = record.fields();
        fields.sponsorships.retain(|s| s.server() != &server);
        fields.sponsorships.insert(0, fresh);
        self.publish_fields(fields).await?;
        tracing::info!("renewed this device's sponsorship");
        Ok(true)
    }

    /// Runs `op`, logging in again once if the session has expired.
    pub(crate) async fn authed<T, F, Fut>(&mut self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Api) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        match op(self.api.clone()).await {
            Err(ClientError::Server { status: 401, .. }) => {
                self.login().await?;
                op(self.api.clone()).await
            }
            other => other,
        }
    }

    /// Makes `count` fresh key packages (and a last-resort one if asked) and
    /// uploads them, so others can add this device to channels while it is
    /// offline.
    pub async fn upload_key_packages(
        &mut self,
        count: usize,
        last_resort: bool,
    ) -> Result<u64, ClientError> {
        let packages = self.mls.key_packages(count, CIPHERSUITE_V0)?;
        let last = if last_resort {
            Some(self.mls.last_resort_key_package(CIPHERSUITE_V0)?)
        } else {
            None
        };
        self.authed(|api| {
            let (p, l) = (packages.clone(), last.clone());
            async move { api.upload_key_packages(&p, l.as_deref()).await }
        })
        .await
    }

    /// The device's handle, `name@server`.
    pub fn handle(&self) -> &str {
        &self.identity.handle
    }

    /// The device id.
    pub fn device_id(&self) -> DeviceId {
        DeviceId::of(&self.key.public())
    }

    /// The homeserver's base URL.
    pub fn server_url(&self) -> &str {
        &self.identity.server_url
    }

    /// The homeserver's name.
    pub fn server_name(&self) -> &str {
        &self.identity.server_name
    }

    /// The API handle (logged in).
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// The device's identity key.
    pub fn secret_key(&self) -> &SecretKey {
        &self.key
    }

    /// The current records of every device of `handle`, each verified.
    pub async fn user_devices(&mut self, handle: &str) -> Result<Vec<DeviceRecord>, ClientError> {
        let handle: Handle = handle
            .parse()
            .map_err(|e| ClientError::Invalid(format!("handle {handle:?}: {e}")))?;
        let wanted = handle.to_string();
        let raw = self
            .authed(|api| {
                let h = wanted.clone();
                async move { api.user_records(&h).await }
            })
            .await?;
        let now = now_ms();
        let mut records = Vec::new();
        for bytes in raw {
            let record = DeviceRecordIn::decode(&bytes)
                .map_err(|e| ClientError::Protocol(e.to_string()))?
                .verify(now)
                .map_err(|e| {
                    ClientError::Protocol(format!("a record of {handle} is invalid: {e}"))
                })?;
            // The server must not slip in a device that is not this user's.
            if !record.handles().any(|h| h == handle) {
                return Err(ClientError::Protocol(format!(
                    "the server sent a device that is not {handle}"
                )));
            }
            records.push(record);
        }
        Ok(records)
    }

    /// Seals `body` to every device of `handle` and deposits it in their
    /// inboxes. Returns how many devices it reached.
    pub async fn send_direct(&mut self, handle: &str, body: &[u8]) -> Result<usize, ClientError> {
        self.deposit_to_user(handle, InboxKind::Direct, body).await
    }

    /// Seals `body` of `kind` to every device of `handle`.
    pub async fn deposit_to_user(
        &mut self,
        handle: &str,
        kind: InboxKind,
        body: &[u8],
    ) -> Result<usize, ClientError> {
        let devices = self.user_devices(handle).await?;
        if devices.is_empty() {
            return Err(ClientError::Invalid(format!("{handle} has no devices")));
        }
        for record in &devices {
            let envelope = seal(
                &self.key,
                record.device_id(),
                record.inbox_key(),
                kind,
                body,
                now_ms(),
            )
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
            let device = record.device_id().to_string();
            self.authed(|api| {
                let (d, e) = (device.clone(), envelope.clone());
                async move { api.deposit(&d, &e).await }
            })
            .await?;
        }
        Ok(devices.len())
    }

    /// Fetches the inbox, opens every envelope, stores direct messages,
    /// and acknowledges what was handled. Envelopes that do not open are
    /// acknowledged too (they can never open) and reported in the log.
    pub async fn sync_inbox(&mut self) -> Result<Vec<DirectMessage>, ClientError> {
        let mut report = channels::SyncReport::default();
        self.sync_inbox_into(&mut report).await?;
        Ok(report.direct)
    }

    /// Processes the inbox: stores direct messages and joins channels from
    /// Welcomes. An item is acknowledged (deleted) once handled; one that
    /// can never be handled (does not open, bad Welcome) is logged and
    /// deleted too, so it cannot block the queue.
    pub(crate) async fn sync_inbox_into(
        &mut self,
        report: &mut channels::SyncReport,
    ) -> Result<(), ClientError> {
        let items = self.authed(|api| async move { api.inbox().await }).await?;
        let me = self.device_id();
        for item in items {
            let envelope = api::unb64("envelope", &item.envelope)?;
            match self.inbox_key.open(&me, &envelope) {
                Ok(message) if message.kind == InboxKind::Direct => {
                    let sender = self.sender_name(&message.sender).await;
                    self.store.save_direct(
                        &sender,
                        message.sender.as_bytes(),
                        message.sent_at,
                        &message.body,
                        now_ms(),
                    )?;
                    report.direct.push(DirectMessage {
                        sender,
                        sender_device: message.sender,
                        sent_at: message.sent_at,
                        body: message.body,
                    });
                }
                Ok(message) if message.kind == InboxKind::Welcome => {
                    match self.join_from_welcome(&message.body).await {
                        Ok(channel) => report.joined.push(channel),
                        // The channel may not have reached this homeserver yet
                        // (its ordering group is adding it): keep the Welcome.
                        Err(e) if channels::is_retryable(&e) => return Err(e),
                        Err(e) => tracing::warn!(id = item.id, "cannot join from a Welcome: {e}"),
                    }
                }
                Ok(message) => {
                    tracing::info!(kind = ?message.kind, "inbox item of a kind this client does not handle yet");
                }
                Err(e) => {
                    tracing::warn!(id = item.id, "dropping inbox item that does not open: {e}")
                }
            }
            let id = item.id;
            self.authed(|api| async move { api.ack_inbox(id).await })
                .await?;
        }
        Ok(())
    }

    /// The handle of `device`, from its record, or its id if unknown.
    async fn sender_name(&mut self, device: &DeviceId) -> String {
        let id = device.to_string();
        let record = self
            .authed(|api| {
                let d = id.clone();
                async move { api.device_record(&d).await }
            })
            .await;
        record
            .ok()
            .and_then(|bytes| DeviceRecordIn::decode(&bytes).ok())
            .and_then(|r| r.verify(now_ms()).ok())
            .filter(|r| r.device_id() == *device)
            .and_then(|r| r.handles().next())
            .map(|h| h.to_string())
            .unwrap_or(id)
    }
}

/// The devices registered under `handle` whose verified current records
/// link `device`: the ones a device registering under that name links back.
async fn linking_devices(
    api: &Api,
    handle: &str,
    device: &DeviceId,
) -> Result<Vec<DeviceId>, ClientError> {
    let records = match api.user_records(handle).await {
        Ok(records) => records,
        // No device of the name has a sponsored record: a new user.
        Err(ClientError::Server { status: 404, .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let now = now_ms();
    Ok(records
        .iter()
        .filter_map(|bytes| DeviceRecordIn::decode(bytes).ok())
        .filter_map(|r| r.verify(now).ok())
        .filter(|r| r.device_id() != *device && r.links_to(device))
        .map(|r| r.device_id())
        .take(kith_proto::record::MAX_LINKS)
        .collect())
}
