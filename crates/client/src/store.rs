//! The client's local store: one SQLite file in the home directory holding
//! the device's secret keys, its session, and what it has received.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use kith_proto::{ChannelId, DeviceId};
use rusqlite::{Connection, OptionalExtension, params};

use crate::ClientError;
use crate::api::CommitBundle;

/// What the device is: its keys and where it is registered.
#[derive(Clone)]
pub struct Identity {
    /// Ed25519 seed of the device identity key.
    pub identity_seed: [u8; 32],
    /// X25519 inbox secret.
    pub inbox_secret: [u8; 32],
    /// The homeserver's base URL.
    pub server_url: String,
    /// The homeserver's name.
    pub server_name: String,
    /// `name@server`.
    pub handle: String,
    /// The current encoded device record.
    pub record: Vec<u8>,
    /// The session token, once logged in.
    pub token: Option<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("handle", &self.handle)
            .field("server_url", &self.server_url)
            .finish()
    }
}

/// An unregistered device's identity seed and inbox secret.
pub type PendingKeys = ([u8; 32], [u8; 32]);

/// A transaction opened by [`Store::begin`], to be given back to
/// [`Store::commit`] or [`Store::rollback`]. Dropped without either (a
/// panic that a caller caught, an early return), the outermost one is
/// rolled back before the store's next statement, so no later write joins
/// a transaction that nobody will commit (and that the next `begin` would
/// roll back, writes and all).
#[must_use = "a transaction is rolled back unless committed"]
#[derive(Debug)]
pub struct StoreTx {
    depth: Arc<AtomicU32>,
    abandoned: Arc<AtomicBool>,
    finished: bool,
}

impl Drop for StoreTx {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let before = self
            .depth
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some(d.saturating_sub(1))
            })
            .unwrap_or(0);
        if before <= 1 {
            // The outermost one: nobody is left to decide for it. Without
            // the connection here, the store rolls it back first thing.
            self.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// The local SQLite store.
pub struct Store {
    conn: Connection,
    /// How many [`Store::begin`]s are open: only the outermost commits.
    depth: Arc<AtomicU32>,
    /// Set when the outermost [`StoreTx`] was dropped without a verdict:
    /// its transaction is rolled back before the next statement.
    abandoned: Arc<AtomicBool>,
    /// What changed in the cached records since
    /// [`Store::record_changes`] last answered.
    record_log: RefCell<RecordLog>,
}

/// Which cached records (the `records` table) may have changed: what
/// [`Store::record_changes`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordChanges {
    /// Only these devices' records (none if empty).
    Devices(Vec<DeviceId>),
    /// Any of them: a transaction was rolled back, another connection
    /// wrote to the store, or too many changed to list.
    All,
}

/// The records saved since the last [`Store::record_changes`].
#[derive(Debug, Default)]
struct RecordLog {
    saved: Vec<DeviceId>,
    /// Something changed that `saved` does not list.
    all: bool,
    /// `PRAGMA data_version` when last asked: it changes when another
    /// connection commits to the database file (another process on the
    /// same device's store).
    data_version: Option<i64>,
}

/// Past this many records saved between two [`Store::record_changes`],
/// it answers [`RecordChanges::All`] instead of a list.
const RECORD_LOG_MAX: usize = 1024;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    identity_seed BLOB NOT NULL,
    inbox_secret BLOB NOT NULL,
    server_url TEXT NOT NULL,
    server_name TEXT NOT NULL,
    handle TEXT NOT NULL,
    record BLOB NOT NULL,
    token TEXT
);
CREATE TABLE IF NOT EXISTS pending_keys (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    identity_seed BLOB NOT NULL,
    inbox_secret BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS channels (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS messages (
    channel BLOB NOT NULL,
    id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    sender_device BLOB NOT NULL,
    sender TEXT NOT NULL,
    body BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (channel, id)
);
CREATE TABLE IF NOT EXISTS future_messages (
    channel BLOB NOT NULL,
    id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    -- Unused (written empty): the sender is the one MLS authenticates on
    -- decryption. Kept so stores made before it stay valid.
    sender_device BLOB NOT NULL,
    message BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (channel, id)
);
CREATE TABLE IF NOT EXISTS leave_requests (
    channel BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (channel, device)
);
CREATE TABLE IF NOT EXISTS add_requests (
    channel BLOB NOT NULL,
    sender BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (channel, sender, device)
);
CREATE TABLE IF NOT EXISTS linked_added (
    channel BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (channel, device)
);
-- Devices of this user removed from its name (spec §6.4): never added
-- back; `pending` while this device may still have to remove them from
-- channels.
CREATE TABLE IF NOT EXISTS removed_devices (
    device BLOB PRIMARY KEY,
    pending INTEGER NOT NULL
);
-- Remove-device requests (spec §9.5) this device sent, once per channel.
CREATE TABLE IF NOT EXISTS removal_requested (
    channel BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (channel, device)
);
-- Remove-device requests for this (admin) device to act on.
CREATE TABLE IF NOT EXISTS remove_requests (
    channel BLOB NOT NULL,
    sender BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (channel, sender, device)
);
-- Work a sync put off (membership requests of either kind above, leave
-- requests, removals of removed devices, adds of linked devices; `kind`
-- names which, `Kept` in the code) and tries again on later syncs: since
-- when (ms), how often it was put off, and not to be tried again before
-- `next_at` (ms).
CREATE TABLE IF NOT EXISTS deferred_requests (
    kind TEXT NOT NULL,
    channel BLOB NOT NULL,
    sender BLOB NOT NULL,
    device BLOB NOT NULL,
    since INTEGER NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, channel, sender, device)
);
-- A commit of this device whose outcome it does not know (the server
-- answered 5xx or not at all: it may still be ordered), kept as it was
-- submitted so that it is resubmitted, never replaced (spec §10.7).
CREATE TABLE IF NOT EXISTS unsettled_commits (
    channel BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    commit_msg BLOB NOT NULL,
    welcome BLOB,
    group_info BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    device BLOB PRIMARY KEY,
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    events_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS direct_messages (
    sender TEXT NOT NULL,
    sender_device BLOB NOT NULL,
    sent_at INTEGER NOT NULL,
    body BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
";

/// Adds the back-off columns of `deferred_requests` to a store made
/// before they existed.
fn add_backoff_columns(conn: &Connection) -> Result<(), ClientError> {
    let present: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('deferred_requests') WHERE name = 'next_at'",
        [],
        |r| r.get(0),
    )?;
    if present == 0 {
        conn.execute_batch(
            "ALTER TABLE deferred_requests ADD COLUMN tries INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE deferred_requests ADD COLUMN next_at INTEGER NOT NULL DEFAULT 0;",
        )?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        add_backoff_columns(&conn)?;
        restrict_permissions(path);
        Ok(Self {
            conn,
            depth: Arc::new(AtomicU32::new(0)),
            abandoned: Arc::new(AtomicBool::new(false)),
            record_log: RefCell::new(RecordLog::default()),
        })
    }

    /// Opens a transaction that every write up to [`Store::commit`] or
    /// [`Store::rollback`] joins (one disk sync for all of them). A nested
    /// one joins the outer one, which decides.
    pub fn begin(&self) -> Result<StoreTx, ClientError> {
        if self.depth.load(Ordering::Relaxed) == 0 {
            let conn = self.conn();
            if !conn.is_autocommit() {
                // Left open by a caller that never finished: none of it
                // was meant to be kept.
                self.rolled_back();
                conn.execute_batch("ROLLBACK")?;
            }
            conn.execute_batch("BEGIN IMMEDIATE")?;
        }
        self.depth.fetch_add(1, Ordering::Relaxed);
        Ok(StoreTx {
            depth: Arc::clone(&self.depth),
            abandoned: Arc::clone(&self.abandoned),
            finished: false,
        })
    }

    /// The connection, once a transaction whose [`StoreTx`] was dropped
    /// without a verdict is rolled back. Every statement goes through it.
    fn conn(&self) -> &Connection {
        if self.depth.load(Ordering::Relaxed) == 0 && self.abandoned.swap(false, Ordering::Relaxed)
        {
            self.rollback_now();
        }
        &self.conn
    }

    /// Commits the transaction of [`Store::begin`] (if outermost): durable
    /// when this returns `Ok`; on `Err` nothing of it is stored.
    pub fn commit(&self, mut tx: StoreTx) -> Result<(), ClientError> {
        tx.finished = true;
        let depth = self.leave();
        if depth != 0 {
            return Ok(());
        }
        if self.conn.is_autocommit() {
            // SQLite rolled the transaction back by itself (after an I/O
            // error, for one): what it saved is gone, and the caller must
            // not take it as stored.
            self.rolled_back();
            return Err(ClientError::Store(
                "the transaction was rolled back after an earlier error: nothing of it is stored"
                    .into(),
            ));
        } else if let Err(e) = self.conn.execute_batch("COMMIT") {
            self.rollback_now();
            return Err(e.into());
        }
        Ok(())
    }

    /// Drops the writes of the transaction of [`Store::begin`] (if
    /// outermost; a nested one leaves it to the outer one).
    pub fn rollback(&self, mut tx: StoreTx) {
        tx.finished = true;
        let depth = self.leave();
        if depth == 0 {
            self.rollback_now();
        }
    }

    /// One transaction level fewer; the depth left.
    fn leave(&self) -> u32 {
        let depth = self.depth.load(Ordering::Relaxed).saturating_sub(1);
        self.depth.store(depth, Ordering::Relaxed);
        depth
    }

    fn rollback_now(&self) {
        // Even when SQLite rolled back by itself (the transaction is gone):
        // records saved in it are not stored.
        self.rolled_back();
        if !self.conn.is_autocommit() {
            // Nothing more to do if it fails: SQLite has rolled back already.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// Notes that records saved in a rolled-back transaction are gone.
    fn rolled_back(&self) {
        self.record_log.borrow_mut().all = true;
    }

    /// The device's identity, if it has registered.
    pub fn identity(&self) -> Result<Option<Identity>, ClientError> {
        let row = self
            .conn()
            .query_row(
                "SELECT identity_seed, inbox_secret, server_url, server_name, handle, record, token
                 FROM identity WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((seed, inbox, server_url, server_name, handle, record, token)) = row else {
            return Ok(None);
        };
        let corrupt = || ClientError::Store("the stored keys have the wrong length".into());
        Ok(Some(Identity {
            identity_seed: seed.try_into().map_err(|_| corrupt())?,
            inbox_secret: inbox.try_into().map_err(|_| corrupt())?,
            server_url,
            server_name,
            handle,
            record,
            token,
        }))
    }

    /// The keys of a device that has not registered yet, made on the first
    /// attempt so that its device id stays the same across attempts (a
    /// user's other device links that id before it may join the user).
    pub fn pending_keys(&self) -> Result<Option<PendingKeys>, ClientError> {
        let row = self
            .conn()
            .query_row(
                "SELECT identity_seed, inbox_secret FROM pending_keys WHERE id = 1",
                [],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?;
        let Some((seed, inbox)) = row else {
            return Ok(None);
        };
        let corrupt = || ClientError::Store("the pending keys have the wrong length".into());
        Ok(Some((
            seed.try_into().map_err(|_| corrupt())?,
            inbox.try_into().map_err(|_| corrupt())?,
        )))
    }

    /// Keeps the keys of a device that is about to register.
    pub fn save_pending_keys(&self, seed: &[u8; 32], inbox: &[u8; 32]) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO pending_keys (id, identity_seed, inbox_secret)
             VALUES (1, ?1, ?2)",
            params![&seed[..], &inbox[..]],
        )?;
        Ok(())
    }

    /// Saves the identity (replacing any).
    pub fn save_identity(&self, id: &Identity) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO identity
             (id, identity_seed, inbox_secret, server_url, server_name, handle, record, token)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                &id.identity_seed[..],
                &id.inbox_secret[..],
                id.server_url,
                id.server_name,
                id.handle,
                id.record,
                id.token
            ],
        )?;
        Ok(())
    }

    /// Records a received direct message.
    pub fn save_direct(
        &self,
        sender: &str,
        sender_device: &[u8],
        sent_at: u64,
        body: &[u8],
        received_at: u64,
    ) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT INTO direct_messages (sender, sender_device, sent_at, body, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                sender,
                sender_device,
                sent_at as i64,
                body,
                received_at as i64
            ],
        )?;
        Ok(())
    }
}

/// A channel this device knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRow {
    /// The channel id.
    pub id: ChannelId,
    /// Its name.
    pub name: String,
    /// Its content type.
    pub content_type: String,
    /// Whether this device is still a member: false once a commit removed
    /// it, or once it sent a leave request (it then stops sending and
    /// reading, keeps its history, and processes commits until the one
    /// that removes it).
    pub active: bool,
}

/// A received (or sent) channel message, decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// The message id (hex).
    pub id: String,
    /// The server's sequence number in the channel.
    pub seq: u64,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// The sending device.
    pub sender_device: DeviceId,
    /// The sender's handle (or device id when unknown).
    pub sender: String,
    /// The application payload.
    pub body: Vec<u8>,
    /// When the homeserver received it.
    pub received_at: u64,
}

/// A message of an epoch this device has not reached yet.
#[derive(Debug, Clone)]
pub struct FutureMessage {
    /// The message id.
    pub id: [u8; 32],
    /// The server's sequence number.
    pub seq: u64,
    /// Its epoch.
    pub epoch: u64,
    /// The MLS message (its sender is learnt when it is decrypted).
    pub message: Vec<u8>,
    /// When the homeserver received it.
    pub received_at: u64,
}

fn blob32(v: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    v.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "32-byte id".into(), rusqlite::types::Type::Blob)
    })
}

fn blob16(v: Vec<u8>) -> rusqlite::Result<[u8; 16]> {
    v.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "16-byte id".into(), rusqlite::types::Type::Blob)
    })
}

impl Store {
    /// Records a channel (or updates its name and state).
    pub fn save_channel(&self, row: &ChannelRow) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT INTO channels (id, name, content_type, active) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET name = ?2, content_type = ?3, active = ?4",
            params![
                &row.id.as_bytes()[..],
                row.name,
                row.content_type,
                row.active
            ],
        )?;
        Ok(())
    }

    /// Every channel this device knows, by name.
    pub fn channels(&self) -> Result<Vec<ChannelRow>, ClientError> {
        let mut stmt = self
            .conn()
            .prepare("SELECT id, name, content_type, active FROM channels ORDER BY name, id")?;
        let rows = stmt.query_map([], |r| {
            Ok(ChannelRow {
                id: ChannelId::from_bytes(blob16(r.get(0)?)?),
                name: r.get(1)?,
                content_type: r.get(2)?,
                active: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One channel by id.
    pub fn channel(&self, id: &ChannelId) -> Result<Option<ChannelRow>, ClientError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT id, name, content_type, active FROM channels WHERE id = ?1")?
            .query_row([id.as_bytes()], |r| {
                Ok(ChannelRow {
                    id: ChannelId::from_bytes(blob16(r.get(0)?)?),
                    name: r.get(1)?,
                    content_type: r.get(2)?,
                    active: r.get(3)?,
                })
            })
            .optional()?)
    }

    /// Stores a decrypted message (once per id).
    pub fn save_message(&self, channel: &ChannelId, m: &MessageRow) -> Result<(), ClientError> {
        insert_message(self.conn(), channel, m)
    }

    /// Stores several messages in one transaction (one disk sync; joined
    /// to an open [`Store::begin`] if there is one).
    pub fn save_messages(
        &self,
        channel: &ChannelId,
        messages: &[MessageRow],
    ) -> Result<(), ClientError> {
        let tx = self.begin()?;
        for m in messages {
            if let Err(e) = insert_message(self.conn(), channel, m) {
                self.rollback(tx);
                return Err(e);
            }
        }
        self.commit(tx)
    }

    /// The last `limit` messages of a channel, oldest first.
    pub fn messages(
        &self,
        channel: &ChannelId,
        limit: usize,
    ) -> Result<Vec<MessageRow>, ClientError> {
        let mut stmt = self.conn().prepare(
            "SELECT id, seq, epoch, sender_device, sender, body, received_at FROM messages
             WHERE channel = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![&channel.as_bytes()[..], limit as i64], |r| {
            Ok(MessageRow {
                id: hex::encode(r.get::<_, Vec<u8>>(0)?),
                seq: r.get::<_, i64>(1)? as u64,
                epoch: r.get::<_, i64>(2)? as u64,
                sender_device: DeviceId::from_bytes(blob32(r.get(3)?)?),
                sender: r.get(4)?,
                body: r.get(5)?,
                received_at: r.get::<_, i64>(6)? as u64,
            })
        })?;
        let mut out: Vec<MessageRow> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Buffers a message for an epoch this device has not reached.
    pub fn save_future(&self, channel: &ChannelId, m: &FutureMessage) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO future_messages (channel, id, seq, epoch, sender_device, message, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                &channel.as_bytes()[..],
                &m.id[..],
                m.seq as i64,
                m.epoch as i64,
                &[] as &[u8],
                m.message,
                m.received_at as i64
            ],
        )?;
        Ok(())
    }

    /// The buffered messages of `channel` with epoch at most `epoch`, in
    /// order. Each stays buffered until [`Store::drop_future`] removes it.
    pub fn future(
        &self,
        channel: &ChannelId,
        epoch: u64,
    ) -> Result<Vec<FutureMessage>, ClientError> {
        let mut stmt = self.conn().prepare(
            "SELECT id, seq, epoch, message, received_at FROM future_messages
             WHERE channel = ?1 AND epoch <= ?2 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![&channel.as_bytes()[..], epoch as i64], |r| {
            Ok(FutureMessage {
                id: blob32(r.get(0)?)?,
                seq: r.get::<_, i64>(1)? as u64,
                epoch: r.get::<_, i64>(2)? as u64,
                message: r.get(3)?,
                received_at: r.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Removes one buffered message, once it is handled.
    pub fn drop_future(&self, channel: &ChannelId, id: &[u8; 32]) -> Result<(), ClientError> {
        self.conn().execute(
            "DELETE FROM future_messages WHERE channel = ?1 AND id = ?2",
            params![&channel.as_bytes()[..], &id[..]],
        )?;
        Ok(())
    }

    /// Records a member's leave request for this (admin) device to honor.
    pub fn save_leave_request(
        &self,
        channel: &ChannelId,
        device: &DeviceId,
    ) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO leave_requests (channel, device) VALUES (?1, ?2)",
            params![&channel.as_bytes()[..], &device.as_bytes()[..]],
        )?;
        Ok(())
    }

    /// The leave requests not honored yet, in the order they arrived.
    pub fn leave_requests(&self) -> Result<Vec<(ChannelId, DeviceId)>, ClientError> {
        let mut stmt = self
            .conn()
            .prepare("SELECT channel, device FROM leave_requests ORDER BY rowid")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                ChannelId::from_bytes(blob16(r.get(0)?)?),
                DeviceId::from_bytes(blob32(r.get(1)?)?),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a leave request, once it is honored (or moot, or given up),
    /// and any deferral of it.
    pub fn drop_leave_request(
        &self,
        channel: &ChannelId,
        device: &DeviceId,
    ) -> Result<(), ClientError> {
        self.conn().execute(
            "DELETE FROM leave_requests WHERE channel = ?1 AND device = ?2",
            params![&channel.as_bytes()[..], &device.as_bytes()[..]],
        )?;
        self.forget_deferral(&Kept::Leave(*channel, *device))
    }

    /// Keeps this device's commit to `channel` whose outcome is unknown.
    pub fn keep_unsettled_commit(
        &self,
        channel: &ChannelId,
        bundle: &CommitBundle,
    ) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO unsettled_commits (channel, epoch, commit_msg, welcome, group_info)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &channel.as_bytes()[..],
                bundle.epoch as i64,
                &bundle.commit,
                &bundle.welcome,
                &bundle.group_info
            ],
        )?;
        Ok(())
    }

    /// This device's commit to `channel` whose outcome is unknown, if any.
    pub fn unsettled_commit(
        &self,
        channel: &ChannelId,
    ) -> Result<Option<CommitBundle>, ClientError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT epoch, commit_msg, welcome, group_info FROM unsettled_commits WHERE channel = ?1",
                params![&channel.as_bytes()[..]],
                |r| {
                    Ok(CommitBundle {
                        epoch: r.get::<_, i64>(0)? as u64,
                        commit: r.get(1)?,
                        welcome: r.get(2)?,
                        group_info: r.get(3)?,
                        ratchet_tree: None,
                    })
                },
            )
            .optional()?)
    }

    /// Forgets the commit of [`Store::keep_unsettled_commit`], once settled.
    pub fn drop_unsettled_commit(&self, channel: &ChannelId) -> Result<(), ClientError> {
        self.conn().execute(
            "DELETE FROM unsettled_commits WHERE channel = ?1",
            params![&channel.as_bytes()[..]],
        )?;
        Ok(())
    }

    /// Records that this device added its user's linked `device` to
    /// `channel` (it does so once: a device that later leaves stays out).
    pub fn save_linked_added(
        &self,
        channel: &ChannelId,
        device: &DeviceId,
    ) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO linked_added (channel, device) VALUES (?1, ?2)",
            params![&channel.as_bytes()[..], &device.as_bytes()[..]],
        )?;
        self.forget_deferral(&Kept::Linked(*channel, *device))
    }

    /// Whether this device already added the linked `device` to `channel`.
    pub fn linked_added(
        &self,
        channel: &ChannelId,
        device: &DeviceId,
    ) -> Result<bool, ClientError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM linked_added WHERE channel = ?1 AND device = ?2",
                params![&channel.as_bytes()[..], &device.as_bytes()[..]],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Remembers that `device`, of this user, was removed from its name:
    /// it is never added back, and channels still holding it are to be
    /// rid of it (pending).
    pub fn save_removed_device(&self, device: &DeviceId) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT INTO removed_devices (device, pending) VALUES (?1, 1)
             ON CONFLICT (device) DO UPDATE SET pending = 1",
            params![&device.as_bytes()[..]],
        )?;
        self.forget_deferral(&Kept::Removal(*device))
    }

    /// Whether `device` is one of this user's removed devices.
    pub fn is_removed_device(&self, device: &DeviceId) -> Result<bool, ClientError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM removed_devices WHERE device = ?1",
                params![&device.as_bytes()[..]],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// The removed devices this device may still have to remove from
    /// channels.
    pub fn pending_removed_devices(&self) -> Result<Vec<DeviceId>, ClientError> {
        let mut stmt = self
            .conn()
            .prepare("SELECT device FROM removed_devices WHERE pending = 1 ORDER BY rowid")?;
        let rows = stmt.query_map([], |r| Ok(DeviceId::from_bytes(blob32(r.get(0)?)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Notes that no channel of this device needs anything more done
    /// about the removed `device` (done, or given up), and forgets any
    /// deferral of it.
    pub fn settle_removed_device(&self, device: &DeviceId) -> Result<(), ClientError> {
        self.conn().execute(
            "UPDATE removed_devices SET pending = 0 WHERE device = ?1",
            params![&device.as_bytes()[..]],
        )?;
        self.forget_deferral(&Kept::Removal(*device))
    }

    /// Records that this device asked `channel`'s admins to remove
    /// `device`.
    pub fn save_removal_requested(
        &self,
        channel: &ChannelId,
        device: &DeviceId,
    ) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT OR IGNORE INTO removal_requested (channel, device) VALUES (?1, ?2)",
            params![&channel.as_bytes()[..], &device.as_bytes()[..]],
        )?;
        Ok(())
    }

    /// Whether this device asked `channel`'s admins to remove `device`.
    pub fn removal_requested(
        &self,
        channel: &ChannelId,
        device: &DeviceId,
    ) -> Result<bool, ClientError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM removal_requested WHERE channel = ?1 AND device = ?2",
                params![&channel.as_bytes()[..], &device.as_bytes()[..]],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Keeps a request of `kind` (spec §9.5) for this admin device to act
    /// on at the end of a sync (once: a repeat is ignored).
    pub fn save_request(
        &self,
        kind: Requests,
        channel: &ChannelId,
        sender: &DeviceId,
        device: &DeviceId,
    ) -> Result<(), ClientError> {
        self.conn().execute(
            &format!(
                "INSERT OR IGNORE INTO {} (channel, sender, device) VALUES (?1, ?2, ?3)",
                kind.table()
            ),
            params![
                &channel.as_bytes()[..],
                &sender.as_bytes()[..],
                &device.as_bytes()[..]
            ],
        )?;
        Ok(())
    }

    /// The requests of `kind` not acted on yet, in the order they arrived:
    /// (channel, sender, device).
    pub fn requests(
        &self,
        kind: Requests,
    ) -> Result<Vec<(ChannelId, DeviceId, DeviceId)>, ClientError> {
        let mut stmt = self.conn().prepare(&format!(
            "SELECT channel, sender, device FROM {} ORDER BY rowid",
            kind.table()
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok((
                ChannelId::from_bytes(blob16(r.get(0)?)?),
                DeviceId::from_bytes(blob32(r.get(1)?)?),
                DeviceId::from_bytes(blob32(r.get(2)?)?),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a request of `kind` (acted on, moot, or given up), and
    /// any deferral of it.
    pub fn drop_request(
        &self,
        kind: Requests,
        channel: &ChannelId,
        sender: &DeviceId,
        device: &DeviceId,
    ) -> Result<(), ClientError> {
        self.conn().execute(
            &format!(
                "DELETE FROM {} WHERE channel = ?1 AND sender = ?2 AND device = ?3",
                kind.table()
            ),
            params![
                &channel.as_bytes()[..],
                &sender.as_bytes()[..],
                &device.as_bytes()[..]
            ],
        )?;
        self.forget_deferral(&Kept::Request(kind, *channel, *sender, *device))
    }

    /// Notes that `kept` could not be done yet (it is tried again later)
    /// and returns since when that has been so: `now` the first time, the
    /// first time's `now` after that.
    pub fn defer(&self, kept: &Kept, now: u64) -> Result<u64, ClientError> {
        let (kind, channel, sender, device) = kept.key();
        self.conn().execute(
            "INSERT OR IGNORE INTO deferred_requests (kind, channel, sender, device, since)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![kind, channel, &sender[..], &device[..], now as i64],
        )?;
        let since: i64 = self.conn().query_row(
            "SELECT since FROM deferred_requests
             WHERE kind = ?1 AND channel = ?2 AND sender = ?3 AND device = ?4",
            params![kind, channel, &sender[..], &device[..]],
            |r| r.get(0),
        )?;
        Ok(u64::try_from(since).unwrap_or(0))
    }

    /// Puts off the next try of deferred `kept` (see [`Store::defer`]) by
    /// `interval(tries)` from `now`, `tries` counting this one. Returns
    /// when it is due.
    pub fn back_off(
        &self,
        kept: &Kept,
        now: u64,
        interval: impl Fn(u32) -> u64,
    ) -> Result<u64, ClientError> {
        let (kind, channel, sender, device) = kept.key();
        let keys = params![kind, channel, &sender[..], &device[..]];
        let tries: i64 = self
            .conn()
            .query_row(
                "SELECT tries FROM deferred_requests
                 WHERE kind = ?1 AND channel = ?2 AND sender = ?3 AND device = ?4",
                keys,
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let tries = u32::try_from(tries).unwrap_or(u32::MAX).saturating_add(1);
        let next_at = now.saturating_add(interval(tries));
        self.conn().execute(
            "UPDATE deferred_requests SET tries = ?5, next_at = ?6
             WHERE kind = ?1 AND channel = ?2 AND sender = ?3 AND device = ?4",
            params![
                kind,
                channel,
                &sender[..],
                &device[..],
                i64::from(tries),
                i64::try_from(next_at).unwrap_or(i64::MAX)
            ],
        )?;
        Ok(next_at)
    }

    /// When deferred `kept` is next to be tried (0: now, also for work
    /// never put off).
    pub fn next_at(&self, kept: &Kept) -> Result<u64, ClientError> {
        let (kind, channel, sender, device) = kept.key();
        let next_at: Option<i64> = self
            .conn()
            .prepare_cached(
                "SELECT next_at FROM deferred_requests
                 WHERE kind = ?1 AND channel = ?2 AND sender = ?3 AND device = ?4",
            )?
            .query_row(params![kind, channel, &sender[..], &device[..]], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(next_at.map_or(0, |t| u64::try_from(t).unwrap_or(0)))
    }

    /// Forgets that `kept` was ever put off (done, moot, given up, or
    /// asked for afresh).
    pub fn forget_deferral(&self, kept: &Kept) -> Result<(), ClientError> {
        let (kind, channel, sender, device) = kept.key();
        self.conn().execute(
            "DELETE FROM deferred_requests
             WHERE kind = ?1 AND channel = ?2 AND sender = ?3 AND device = ?4",
            params![kind, channel, &sender[..], &device[..]],
        )?;
        Ok(())
    }

    /// Makes all deferred work due at the next sync, whatever its
    /// back-off (its first deferral time, and so its 7 days, are kept).
    pub fn recheck_deferred(&self) -> Result<(), ClientError> {
        self.conn()
            .execute("UPDATE deferred_requests SET next_at = 0", [])?;
        Ok(())
    }

    /// A cached device record.
    pub fn record(&self, device: &DeviceId) -> Result<Option<Vec<u8>>, ClientError> {
        // Cached: a voter set reads every member's record (1,000 lookups
        // for a commit in a 1,000-member channel).
        Ok(self
            .conn()
            .prepare_cached("SELECT record FROM records WHERE device = ?1")?
            .query_row(params![&device.as_bytes()[..]], |r| r.get(0))
            .optional()?)
    }

    /// Caches a device record.
    pub fn save_record(&self, device: &DeviceId, record: &[u8]) -> Result<(), ClientError> {
        // Noted before the write: a write that fails half-way may still
        // have changed the row.
        {
            let mut log = self.record_log.borrow_mut();
            if log.saved.len() >= RECORD_LOG_MAX {
                log.all = true;
            } else {
                log.saved.push(*device);
            }
        }
        self.conn().execute(
            "INSERT OR REPLACE INTO records (device, record) VALUES (?1, ?2)",
            params![&device.as_bytes()[..], record],
        )?;
        Ok(())
    }

    /// Which cached records may have changed since the last call (on the
    /// first, [`RecordChanges::All`]): whatever remembers something derived
    /// from them (the voter sets' member sponsors) forgets that. The
    /// answer is for one such user: each call starts a new interval.
    pub fn record_changes(&self) -> Result<RecordChanges, ClientError> {
        let version: i64 = self
            .conn()
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        let mut log = self.record_log.borrow_mut();
        let changes = if log.all || log.data_version != Some(version) {
            log.saved.clear();
            RecordChanges::All
        } else {
            RecordChanges::Devices(std::mem::take(&mut log.saved))
        };
        log.all = false;
        log.data_version = Some(version);
        Ok(changes)
    }

    /// The event cursor this device has processed up to.
    pub fn events_after(&self) -> Result<u64, ClientError> {
        let v: Option<i64> = self
            .conn()
            .query_row("SELECT events_after FROM cursor WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }

    /// Records the processed event cursor.
    pub fn set_events_after(&self, cursor: u64) -> Result<(), ClientError> {
        self.conn().execute(
            "INSERT INTO cursor (id, events_after) VALUES (1, ?1)
             ON CONFLICT(id) DO UPDATE SET events_after = MAX(events_after, ?1)",
            params![cursor as i64],
        )?;
        Ok(())
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The file holds secret keys: only the owner may read it.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_: &Path) {}

/// One message row, ignored if its id is already stored.
fn insert_message(
    conn: &Connection,
    channel: &ChannelId,
    m: &MessageRow,
) -> Result<(), ClientError> {
    let id = hex::decode(&m.id).map_err(|_| ClientError::Store("bad message id".into()))?;
    // Cached: a page or a batch stores up to hundreds in a row, and
    // parsing the statement each time was a visible share of the time.
    conn.prepare_cached(
        "INSERT OR IGNORE INTO messages (channel, id, seq, epoch, sender_device, sender, body, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
            &channel.as_bytes()[..],
            id,
            m.seq as i64,
            m.epoch as i64,
            &m.sender_device.as_bytes()[..],
            m.sender,
            m.body,
            m.received_at as i64
        ],
    )?;
    Ok(())
}

/// The two kinds of membership request an admin device keeps until it acts
/// on them (spec §9.5), one table each, of the same shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requests {
    /// Add-device requests.
    Add,
    /// Remove-device requests.
    Remove,
}

impl Requests {
    fn table(self) -> &'static str {
        match self {
            Self::Add => "add_requests",
            Self::Remove => "remove_requests",
        }
    }
}

/// Work a sync may have to put off, with a back-off and a time limit
/// (spec §9.5), when it cannot be done yet: what identifies it in
/// `deferred_requests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// A membership request of that kind: (channel, sender, device).
    Request(Requests, ChannelId, DeviceId, DeviceId),
    /// A member's leave request: (channel, the leaving device).
    Leave(ChannelId, DeviceId),
    /// Ridding this device's channels of one of its user's removed
    /// devices (all channels: one deferral).
    Removal(DeviceId),
    /// Bringing this user's linked device into a channel (spec §5.7).
    Linked(ChannelId, DeviceId),
}

impl Kept {
    /// The row's key: kind, channel (empty for every channel), sender,
    /// device. Requests keep the kind names stores already hold.
    fn key(&self) -> (&'static str, Vec<u8>, [u8; 32], [u8; 32]) {
        match self {
            Self::Request(kind, channel, sender, device) => (
                kind.table(),
                channel.as_bytes().to_vec(),
                *sender.as_bytes(),
                *device.as_bytes(),
            ),
            Self::Leave(channel, device) => (
                "leave_requests",
                channel.as_bytes().to_vec(),
                *device.as_bytes(),
                *device.as_bytes(),
            ),
            Self::Removal(device) => (
                "removed_devices",
                Vec::new(),
                *device.as_bytes(),
                *device.as_bytes(),
            ),
            Self::Linked(channel, device) => (
                "linked_added",
                channel.as_bytes().to_vec(),
                *device.as_bytes(),
                *device.as_bytes(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_transaction_a_caught_panic_dropped_is_rolled_back_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.db");
        let store = Store::open(&path).unwrap();
        let (channel, device) = (
            ChannelId::from_bytes([1; 16]),
            DeviceId::from_bytes([2; 32]),
        );
        // A page of messages being stored when a bug panics; the caller
        // catches it and carries on with the same client.
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _open = store.begin().unwrap();
            store.save_leave_request(&channel, &device).unwrap();
            panic!("a bug while receiving");
        }));
        assert!(caught.is_err());
        // The next write is its own, durable at once, and the half-done
        // one is gone.
        store.set_events_after(7).unwrap();
        assert!(store.leave_requests().unwrap().is_empty());
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.events_after().unwrap(), 7);
        assert!(store.leave_requests().unwrap().is_empty());
        // Nested: an inner one dropped leaves the outer one to decide.
        let outer = store.begin().unwrap();
        drop(store.begin().unwrap());
        store.save_leave_request(&channel, &device).unwrap();
        store.commit(outer).unwrap();
        assert_eq!(store.leave_requests().unwrap(), vec![(channel, device)]);
    }
}
