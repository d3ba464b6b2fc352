//! Durable storage behind a trait, with a SQLite backend and an in-memory
//! one. Both pass the same conformance suite (`tests/store.rs`).
//!
//! The trait is **synchronous**: every method does a short, bounded piece of
//! work and returns only after it is committed. The HTTP layer calls it
//! inside [`tokio::task::spawn_blocking`], so a slow disk never stalls the
//! async runtime. (A future PostgreSQL backend can implement it the same
//! way, or the trait can grow an async twin when one is needed.)
//!
//! Every method that changes several rows does so in one transaction: an
//! inbox deposit and its event, a key-package claim, a name and its device,
//! an accepted commit with its epoch's state, a message and its events.

mod memory;
mod sqlite;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

std::thread_local! {
    static UNSYNCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `check` (store reads on this thread) without waiting for other
/// callers' writes to reach the disk.
///
/// Reads normally wait for every write committed before them, so that
/// nothing a crash could take back is served. A read whose result is only
/// a **check** on the way to a write of the caller's own (is the device a
/// member, which epoch is the channel at) does not need to: the caller's
/// write commits after everything the check saw, and the caller waits for
/// its own write before answering, which covers what the check saw. A
/// refusal based on such a read (a 409 `wrong_epoch` naming an epoch that
/// a crash then takes back) tells the client only to catch up, which it
/// then finds nothing to do for. Writes inside `check` still wait.
pub fn unsynced<T>(check: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            UNSYNCED.with(|flag| flag.set(self.0));
        }
    }
    let _reset = Reset(UNSYNCED.with(|flag| flag.replace(true)));
    check()
}

/// Whether this thread is inside [`unsynced`].
fn is_unsynced() -> bool {
    UNSYNCED.with(std::cell::Cell::get)
}

use kith_proto::{ChannelId, DeviceId, LocalName, ServerName};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// A registered device as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    /// The device.
    pub device: DeviceId,
    /// The local name it is registered under.
    pub name: LocalName,
    /// The raw Ed25519 identity key (the device's id derives from it).
    pub identity_key: [u8; 32],
    /// The encoding of the device's current record.
    pub record: Vec<u8>,
    /// When the current record was accepted. It verified at that time, so
    /// it can always be verified again at that time (to compare a newer
    /// version against it even after its sponsorship expired).
    pub record_at: Millis,
    /// When the device registered.
    pub registered_at: Millis,
}

/// A device removed from this server (spec §6.4, "Remove a device"): its
/// last row, kept so that the channels it is still a member of can compute
/// their voters from its record, and so that it can never register again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedDevice {
    /// The device as it was registered when it was removed.
    pub row: DeviceRow,
    /// When it was removed.
    pub removed_at: Millis,
}

/// The outcome of [`Store::register`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// The device and name are new and now stored.
    New,
    /// The device was already registered under this same name; nothing
    /// changed.
    Existing,
}

/// A stored inbox item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxItem {
    /// Server-assigned id, increasing.
    pub id: u64,
    /// The sealed envelope, opaque to the server.
    pub envelope: Vec<u8>,
    /// When the server accepted it.
    pub received_at: Millis,
}

/// One entry of a device's event log.
#[derive(Debug, Clone)]
pub struct Event {
    /// Position in the log; strictly increasing along one device's log.
    pub cursor: u64,
    /// What happened: `inbox`, and later channel kinds.
    pub kind: String,
    /// A JSON object, as text, whose fields accompany `cursor` and `kind`.
    pub payload: String,
    /// When the event was appended.
    pub created_at: Millis,
    /// On an event just appended: the cursor of the device's event appended
    /// right before it (0 for the first ever), when the store knows it for
    /// certain; `None` otherwise, and always on events read back. A live
    /// stream that has sent exactly `prev` may send this event without
    /// reading the log: nothing lies between them. A store may only name a
    /// `prev` that no event of the device's log lies above (an event rolled
    /// back after being counted is harmless: nothing lies between either).
    pub prev: Option<u64>,
}

/// Two events are equal when they are the same entry of a log: `prev` is
/// what the appender knew, not part of the entry.
impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cursor == other.cursor
            && self.kind == other.kind
            && self.payload == other.payload
            && self.created_at == other.created_at
    }
}

impl Eq for Event {}

/// What a key-package claim found for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// An ordinary package, now removed from the store.
    Package(Vec<u8>),
    /// No ordinary package was left: the last-resort one, kept for reuse.
    LastResort(Vec<u8>),
    /// Nothing to hand out.
    Exhausted,
}

/// A channel as stored: what its current epoch's channel extension says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRow {
    /// The channel (MLS group id).
    pub channel: ChannelId,
    /// Its display name.
    pub name: String,
    /// Its content type.
    pub content_type: String,
    /// The current epoch.
    pub epoch: u64,
    /// When the channel was created here.
    pub created_at: Millis,
}

/// The public state of one epoch of a channel, as joiners fetch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochState {
    /// The epoch.
    pub epoch: u64,
    /// The ratchet tree (RFC 9420 `RatchetTree`), as the server computed it.
    pub ratchet_tree: Vec<u8>,
    /// The GroupInfo (an MLSMessage) a member made for this epoch.
    pub group_info: Vec<u8>,
    /// The member devices, in leaf order.
    pub members: Vec<DeviceId>,
}

/// An accepted commit, with everything stored with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRow {
    /// The epoch the commit applies to (it ends this epoch).
    pub epoch: u64,
    /// The commit (an MLSMessage).
    pub commit: Vec<u8>,
    /// Its hash (message id).
    pub commit_hash: [u8; 32],
    /// The Welcome for devices it adds, if any.
    pub welcome: Option<Vec<u8>>,
    /// Its ordering certificate, once assembled (absent only between the
    /// commit's acceptance and the certificate's storage).
    pub certificate: Option<Vec<u8>>,
}

/// An accepted commit to store, with the state of the epoch it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCommit {
    /// The channel.
    pub channel: ChannelId,
    /// The commit (its `epoch` is the one it ends).
    pub commit: CommitRow,
    /// The state of epoch `commit.epoch + 1`.
    pub next: EpochState,
    /// The channel's name in the new epoch.
    pub name: String,
    /// The channel's content type in the new epoch.
    pub content_type: String,
}

/// A stored channel message (an MLS PrivateMessage, opaque to the server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// Per-channel sequence number, increasing from 1.
    pub seq: u64,
    /// The message id (`kith_proto::sign::message_id` of the bytes).
    pub id: [u8; 32],
    /// The epoch the sender says it was sent in.
    pub epoch: u64,
    /// The sending device.
    pub sender: DeviceId,
    /// The MLS message.
    pub message: Vec<u8>,
    /// When the server accepted it.
    pub received_at: Millis,
}

/// A message to store; the store assigns its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// The message id (`kith_proto::sign::message_id` of the bytes).
    pub id: [u8; 32],
    /// The epoch the sender says it was sent in.
    pub epoch: u64,
    /// The sending device.
    pub sender: DeviceId,
    /// The MLS message.
    pub message: Vec<u8>,
    /// When the server accepted it.
    pub received_at: Millis,
}

/// What [`Store::store_message_deferred`] returns: the stored row, the
/// events appended, and the token to wait for before answering.
pub type DeferredMessage = (MessageRow, Vec<(DeviceId, Event)>, u64);

/// What [`Store::store_messages_deferred`] returns: the stored rows in
/// order, the events appended, and the token to wait for before answering.
pub type DeferredMessages = (Vec<MessageRow>, Vec<(DeviceId, Event)>, u64);

/// A stored message and the events appended for it (none when its id was
/// stored before).
pub type StoredMessage = (MessageRow, Vec<(DeviceId, Event)>);

/// What [`Store::remove_device`] returns: the removed device's last row and
/// the `device_removed` events appended to the name's remaining devices.
pub type Removal = (DeviceRow, Vec<(DeviceId, Event)>);

/// A device record fetched from another server, as cached here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteRecord {
    /// The device.
    pub device: DeviceId,
    /// The server it was fetched from (one that sponsors it).
    pub server: ServerName,
    /// The encoded record, verified when it was fetched.
    pub record: Vec<u8>,
    /// When it was fetched and verified; it verifies again at that time.
    pub fetched_at: Millis,
}

/// A federation request waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Store-assigned id, increasing.
    pub id: u64,
    /// The server it goes to.
    pub destination: ServerName,
    /// The path and query (a federation endpoint).
    pub path: String,
    /// The JSON body of the POST.
    pub body: Vec<u8>,
    /// How many sends failed so far.
    pub attempts: u32,
    /// Not to be sent before this time.
    pub next_at: Millis,
    /// When it was queued.
    pub created_at: Millis,
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The local name belongs to another device.
    #[error(
        "the name {0} is taken (a device of that user can link this one first, then it may register under it)"
    )]
    NameTaken(LocalName),
    /// The device is already registered under another name.
    #[error("the device is already registered as {0}")]
    DeviceHasOtherName(LocalName),
    /// The device is not registered here.
    #[error("unknown device {0}")]
    UnknownDevice(DeviceId),
    /// The device asking for a removal is no longer registered under the
    /// removed device's name (another removal took it first).
    #[error("device {0} is no longer registered under that name")]
    RemoverGone(DeviceId),
    /// The device was removed from this server and may not register again.
    #[error("device {0} was removed from this server and cannot register again; make a new device")]
    DeviceRemoved(DeviceId),
    /// Storing the key packages would exceed the per-device limit.
    #[error("a device may keep at most {limit} key packages; {stored} are stored")]
    TooManyKeyPackages {
        /// The limit.
        limit: usize,
        /// How many are stored now.
        stored: usize,
    },
    /// The recipient's inbox holds as many items as it may.
    #[error("the inbox is full ({limit} items)")]
    InboxFull {
        /// The limit.
        limit: usize,
    },
    /// A channel with this id exists already.
    #[error("channel {0} already exists")]
    ChannelExists(ChannelId),
    /// The channel is not stored here.
    #[error("unknown channel {0}")]
    UnknownChannel(ChannelId),
    /// A commit does not follow the channel's stored epoch (another commit
    /// was stored for it, or the channel is elsewhere).
    #[error("channel {channel} is at epoch {current}; cannot store a commit for epoch {got}")]
    EpochConflict {
        /// The channel.
        channel: ChannelId,
        /// Its stored epoch.
        current: u64,
        /// The commit's epoch.
        got: u64,
    },
    /// The SQLite backend failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Stored data does not read back as what was written (a corrupted or
    /// foreign database).
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// A lock was poisoned by a panicking thread.
    #[error("store lock poisoned")]
    Poisoned,
}

/// Storage for one homeserver. See the module docs for the threading model.
pub trait Store: Send + Sync + 'static {
    // -- devices and names --------------------------------------------------

    /// Registers `row.device` under `row.name`, atomically: fails with
    /// [`StoreError::NameTaken`] if another device holds the name and with
    /// [`StoreError::DeviceHasOtherName`] if the device holds another; if
    /// the device already holds this name, changes nothing.
    fn register(&self, row: &DeviceRow) -> Result<Registered, StoreError>;

    /// Registers `row.device` as one more device under `row.name`, which
    /// other devices may already hold (the caller checked that one of them
    /// links this device, spec §6.3): fails with
    /// [`StoreError::DeviceHasOtherName`] if the device holds another name;
    /// if it already holds this one, changes nothing.
    fn register_linked(&self, row: &DeviceRow) -> Result<Registered, StoreError>;

    /// The device, if registered.
    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRow>, StoreError>;

    /// Every device registered under `name`, in registration order.
    fn devices_named(&self, name: &LocalName) -> Result<Vec<DeviceRow>, StoreError>;

    /// How many devices are registered.
    fn device_count(&self) -> Result<u64, StoreError>;

    /// Removes a registered device (spec §6.4), in one transaction: it is
    /// no longer registered (nor listed under its name), its sessions,
    /// login challenges, key packages, inbox items and events are deleted,
    /// and it is remembered as removed at `now`, with its last record. A
    /// removed device's [`Store::register`] and [`Store::register_linked`]
    /// fail with [`StoreError::DeviceRemoved`]. With `by`, the device asking
    /// for it must still be registered under the same name, checked in the
    /// same transaction (else [`StoreError::RemoverGone`], changing
    /// nothing), so of two devices removing each other at once only the
    /// first succeeds. In the same transaction, a `device_removed` event
    /// with `payload` is appended to each device still registered under the
    /// name, so a removal is never committed without them. Returns the
    /// removed row and those events (for the live streams), or `None`
    /// (changing nothing) if the device is not registered.
    fn remove_device(
        &self,
        device: &DeviceId,
        by: Option<&DeviceId>,
        now: Millis,
        payload: &str,
    ) -> Result<Option<Removal>, StoreError>;

    /// The device, if it was removed from this server.
    fn removed_device(&self, device: &DeviceId) -> Result<Option<RemovedDevice>, StoreError>;

    /// Frees `name` for a new registration, once no device is registered
    /// under it (its devices were all removed). Returns `false`, changing
    /// nothing, if a device still holds it or it was never taken.
    fn release_name(&self, name: &LocalName) -> Result<bool, StoreError>;

    /// Replaces the device's record with `new`, accepted at `now`, if it is
    /// still `expected` (compare-and-swap). Returns whether it replaced.
    fn replace_record(
        &self,
        device: &DeviceId,
        expected: &[u8],
        new: &[u8],
        now: Millis,
    ) -> Result<bool, StoreError>;

    // -- login --------------------------------------------------------------

    /// Remembers a login challenge until `expires_at`. Drops expired
    /// challenges, and the oldest of the device's if it holds more than
    /// `max_per_device`.
    fn put_challenge(
        &self,
        device: &DeviceId,
        challenge: &[u8; 32],
        expires_at: Millis,
        now: Millis,
        max_per_device: usize,
    ) -> Result<(), StoreError>;

    /// Removes and returns (its expiry) the challenge, if it was issued to
    /// `device`: a challenge is used at most once.
    fn take_challenge(
        &self,
        device: &DeviceId,
        challenge: &[u8; 32],
    ) -> Result<Option<Millis>, StoreError>;

    /// Stores a session under the hash of its token. Fails with
    /// [`StoreError::UnknownDevice`], storing nothing, unless the device is
    /// registered, checked atomically with the insert (a device removed
    /// while it logged in gets no session).
    fn put_session(
        &self,
        token_hash: &[u8; 32],
        device: &DeviceId,
        expires_at: Millis,
    ) -> Result<(), StoreError>;

    /// The device and expiry of the session with this token hash.
    fn session(&self, token_hash: &[u8; 32]) -> Result<Option<(DeviceId, Millis)>, StoreError>;

    // -- key packages -------------------------------------------------------

    /// Adds ordinary packages and, if given, replaces the last-resort one.
    /// Fails, storing nothing, if the device would hold more than
    /// `max_stored` ordinary packages. Returns how many ordinary packages
    /// the device now holds.
    fn add_key_packages(
        &self,
        device: &DeviceId,
        packages: &[Vec<u8>],
        last_resort: Option<&[u8]>,
        max_stored: usize,
    ) -> Result<usize, StoreError>;

    /// How many ordinary packages the device holds, and whether it has a
    /// last-resort one.
    fn key_package_count(&self, device: &DeviceId) -> Result<(usize, bool), StoreError>;

    /// Removes and returns the device's oldest ordinary package, or returns
    /// (keeping it) its last-resort one.
    fn claim_key_package(&self, device: &DeviceId) -> Result<Claimed, StoreError>;

    // -- inbox --------------------------------------------------------------

    /// Files an envelope in `recipient`'s inbox and appends an `inbox` event
    /// to its log, in one transaction. `payload` builds the event's payload
    /// from the new item. Fails with [`StoreError::InboxFull`] when the
    /// inbox holds `max_items`, and with [`StoreError::UnknownDevice`] when
    /// the recipient is not registered (checked in the same transaction:
    /// nothing is stored for a removed device, §6.4).
    fn deposit_inbox(
        &self,
        recipient: &DeviceId,
        envelope: &[u8],
        received_at: Millis,
        max_items: usize,
        payload: &dyn Fn(&InboxItem) -> String,
    ) -> Result<(InboxItem, Event), StoreError>;

    /// Up to `limit` inbox items with id greater than `after`, oldest first.
    fn inbox(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InboxItem>, StoreError>;

    /// Deletes an inbox item; returns whether it existed.
    fn delete_inbox(&self, device: &DeviceId, id: u64) -> Result<bool, StoreError>;

    // -- events -------------------------------------------------------------

    /// Appends an event to the device's log and returns it with its cursor.
    /// Fails with [`StoreError::UnknownDevice`], appending nothing, when the
    /// device is not registered (checked in the same transaction).
    fn append_event(
        &self,
        device: &DeviceId,
        kind: &str,
        payload: &str,
        now: Millis,
    ) -> Result<Event, StoreError>;

    /// Up to `limit` events with cursor greater than `after`, in order.
    fn events(&self, device: &DeviceId, after: u64, limit: usize)
    -> Result<Vec<Event>, StoreError>;

    /// Records that the device has processed every event up to `cursor`
    /// and drops those events. Acks never go backwards and never beyond the
    /// device's newest event. Returns the acked cursor now in force.
    fn ack_events(&self, device: &DeviceId, cursor: u64) -> Result<u64, StoreError>;

    /// The device's acked cursor (0 if it never acked).
    fn acked_cursor(&self, device: &DeviceId) -> Result<u64, StoreError>;

    // -- channels -----------------------------------------------------------

    /// Stores a new channel at epoch 0 with its initial state and members,
    /// in one transaction. Fails with [`StoreError::ChannelExists`] if the
    /// id is taken.
    fn create_channel(&self, row: &ChannelRow, state: &EpochState) -> Result<(), StoreError>;

    /// The channel, if stored.
    fn channel(&self, channel: &ChannelId) -> Result<Option<ChannelRow>, StoreError>;

    /// The channels `device` is currently a member of, by channel id.
    fn channels_of(&self, device: &DeviceId) -> Result<Vec<ChannelRow>, StoreError>;

    /// Whether `device` is a member of the channel's current epoch.
    fn is_member(&self, channel: &ChannelId, device: &DeviceId) -> Result<bool, StoreError>;

    /// Whether `device` is or ever was a member of the channel.
    fn was_member(&self, channel: &ChannelId, device: &DeviceId) -> Result<bool, StoreError>;

    /// The state of one epoch of the channel.
    fn epoch_state(
        &self,
        channel: &ChannelId,
        epoch: u64,
    ) -> Result<Option<EpochState>, StoreError>;

    /// Stores an accepted commit and the state of the epoch it starts, moves
    /// the channel to that epoch and its members to the new ones, all in
    /// one transaction. Fails with [`StoreError::EpochConflict`] unless the
    /// channel is at the commit's epoch.
    fn store_commit(&self, commit: &NewCommit) -> Result<(), StoreError>;

    /// The accepted commit of `epoch`, if any.
    fn commit(&self, channel: &ChannelId, epoch: u64) -> Result<Option<CommitRow>, StoreError>;

    /// Up to `limit` accepted commits from `from_epoch` on, by epoch.
    fn commits(
        &self,
        channel: &ChannelId,
        from_epoch: u64,
        limit: usize,
    ) -> Result<Vec<CommitRow>, StoreError>;

    /// Stores the certificate of the accepted commit of `epoch` and, in the
    /// same transaction, appends a `commit` event with `payload` to every
    /// member of that epoch (the members before the commit). Returns the
    /// events, or `None` (changing nothing) if the commit already has a
    /// certificate. Fails if no commit is stored for `epoch`.
    fn certify_commit(
        &self,
        channel: &ChannelId,
        epoch: u64,
        certificate: &[u8],
        payload: &str,
        now: Millis,
    ) -> Result<Option<Vec<(DeviceId, Event)>>, StoreError>;

    /// Stores a message under the next sequence number of the channel and,
    /// in the same transaction, appends a `message` event built by
    /// `payload` to every current member except the sender. A message with
    /// an id already stored in the channel changes nothing and returns the
    /// stored row with no events.
    fn store_message(
        &self,
        channel: &ChannelId,
        message: &NewMessage,
        payload: &dyn Fn(&MessageRow) -> String,
    ) -> Result<(MessageRow, Vec<(DeviceId, Event)>), StoreError>;

    /// As [`Store::store_message`], but it may return once the message is
    /// committed and before it is on disk, with a token: the caller must
    /// then call [`Store::wait_durable`] with it before it tells anyone the
    /// message was accepted. For callers that hold a lock across the write
    /// and should not hold it across the disk sync. Backends whose writes
    /// are durable when committed keep this default.
    fn store_message_deferred(
        &self,
        channel: &ChannelId,
        message: &NewMessage,
        payload: &dyn Fn(&MessageRow) -> String,
    ) -> Result<DeferredMessage, StoreError> {
        self.store_message(channel, message, payload)
            .map(|(row, events)| (row, events, 0))
    }

    /// Stores `messages` (all of one channel) in order, as
    /// [`Store::store_message`] stores each, **in one transaction**: at
    /// consecutive sequence numbers, or, on an error, none of them. A
    /// message whose id is stored already (also earlier in `messages`)
    /// gets the stored row and no events. It may return before the
    /// messages are on disk, as [`Store::store_message_deferred`]. The
    /// default stores them one by one, for backends whose
    /// [`Store::store_message`] can fail only before it changes anything
    /// of the channel (an unknown channel), so that the first message's
    /// failure is the only one possible.
    fn store_messages_deferred(
        &self,
        channel: &ChannelId,
        messages: &[NewMessage],
        payload: &dyn Fn(&MessageRow) -> String,
    ) -> Result<DeferredMessages, StoreError> {
        let mut rows = Vec::with_capacity(messages.len());
        let mut events = Vec::new();
        for message in messages {
            let (row, appended) = self.store_message(channel, message, payload)?;
            rows.push(row);
            events.extend(appended);
        }
        Ok((rows, events, 0))
    }

    /// Returns once the writes behind a token of
    /// [`Store::store_message_deferred`] are on disk.
    fn wait_durable(&self, _token: u64) -> Result<(), StoreError> {
        Ok(())
    }

    /// Stores several messages, each as [`Store::store_message`] would, in
    /// the order given (so a channel's messages take their sequence numbers
    /// in that order), and returns once every stored one is durable. Each
    /// result is its message's own: a message that fails changes nothing
    /// and fails alone, and the others are stored as if it had not been
    /// there. A backend may write them all in one transaction (SQLite does:
    /// one `COMMIT` and one disk sync for all, and the index pages the
    /// recipients' events share are written once, not once per message);
    /// this default stores them one by one.
    fn store_messages(
        &self,
        batch: &[(ChannelId, NewMessage)],
        payload: &dyn Fn(&ChannelId, &MessageRow) -> String,
    ) -> Vec<Result<StoredMessage, StoreError>> {
        batch
            .iter()
            .map(|(channel, message)| {
                self.store_message(channel, message, &|row| payload(channel, row))
            })
            .collect()
    }

    /// Up to `limit` messages of the channel with `seq` greater than
    /// `after`, in order.
    fn messages(
        &self,
        channel: &ChannelId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MessageRow>, StoreError>;

    // -- federation ---------------------------------------------------------

    /// Stores (inserting or replacing) the cached record of a remote device.
    /// The caller has applied the update rule.
    fn put_remote_record(&self, row: &RemoteRecord) -> Result<(), StoreError>;

    /// The cached record of a remote device, if any.
    fn remote_record(&self, device: &DeviceId) -> Result<Option<RemoteRecord>, StoreError>;

    /// Every cached record fetched from `server`, by device id.
    fn remote_records_from(&self, server: &ServerName) -> Result<Vec<RemoteRecord>, StoreError>;

    /// Notes that the server of a remote device said it removed it, at
    /// `removed_at` (spec §6.4, §12.2): cached lookups no longer list it.
    /// The mark stays (a removal is final); a repeat keeps the first time.
    fn mark_remote_removed(&self, device: &DeviceId, removed_at: Millis) -> Result<(), StoreError>;

    /// When the server of a remote device said it removed it, if it did.
    fn remote_removed(&self, device: &DeviceId) -> Result<Option<Millis>, StoreError>;

    /// Forgets every cached record fetched from `server` (the removal
    /// marks stay: a removal is final), as if this server had never looked
    /// its users up; lookups fetch them again. Returns how many it forgot.
    fn forget_remote_records(&self, server: &ServerName) -> Result<usize, StoreError>;

    /// Queues a POST of `body` to `path` on `destination`, due at `now`.
    /// Returns the item's id.
    fn enqueue_outbox(
        &self,
        destination: &ServerName,
        path: &str,
        body: &[u8],
        now: Millis,
    ) -> Result<u64, StoreError>;

    /// Up to `limit` items due at `now` (`next_at <= now`), oldest first.
    fn due_outbox(&self, now: Millis, limit: usize) -> Result<Vec<OutboxItem>, StoreError>;

    /// The earliest `next_at` of any queued item.
    fn next_outbox_due(&self) -> Result<Option<Millis>, StoreError>;

    /// Records a failed send: the item's attempts and next due time.
    fn retry_outbox(&self, id: u64, attempts: u32, next_at: Millis) -> Result<(), StoreError>;

    /// Removes a delivered (or dropped) item; returns whether it existed.
    fn remove_outbox(&self, id: u64) -> Result<bool, StoreError>;

    /// Files an envelope that `origin` delivered as deposit `deposit_id`,
    /// as [`Store::deposit_inbox`] does, unless that deposit was filed
    /// before: then changes nothing and returns the id of the item filed
    /// then, with no event. The deduplication record is written in the same
    /// transaction as the item. A new deposit for a device not registered
    /// here fails with [`StoreError::UnknownDevice`], as in
    /// [`Store::deposit_inbox`].
    #[allow(clippy::too_many_arguments)]
    fn deposit_remote_inbox(
        &self,
        origin: &ServerName,
        deposit_id: &[u8; 16],
        recipient: &DeviceId,
        envelope: &[u8],
        received_at: Millis,
        max_items: usize,
        payload: &dyn Fn(&InboxItem) -> String,
    ) -> Result<(u64, Option<Event>), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_is_scoped_to_its_closure_and_thread() {
        assert!(!is_unsynced());
        let inner = unsynced(|| {
            let nested = unsynced(is_unsynced);
            let other_thread = std::thread::spawn(is_unsynced).join().ok();
            (is_unsynced(), nested, other_thread)
        });
        assert_eq!(inner, (true, true, Some(false)));
        assert!(!is_unsynced());
        let unwound = std::panic::catch_unwind(|| unsynced(|| panic!("a check failed")));
        assert!(unwound.is_err());
        assert!(
            !is_unsynced(),
            "a panic inside a check must not leave it on"
        );
    }
}
