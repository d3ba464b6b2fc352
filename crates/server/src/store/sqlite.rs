//! The SQLite backend: the embedded default. One database file in the data
//! directory, in WAL mode with `synchronous = FULL`, so a write has reached
//! the disk when its transaction commits and the call returns.
//!
//! One connection behind a mutex: SQLite serialises writers anyway, and the
//! calls are short. Durability is by group commit ([`GroupCommit`]):
//! transactions commit under `synchronous = NORMAL` and every call returns
//! only after an fsync of the WAL that followed its commit, one fsync
//! shared by all the calls waiting for it. Integers are stored as SQLite's signed 64-bit integers;
//! every value Kith stores (times in ms, cursors, ids) fits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use kith_proto::{ChannelId, DeviceId, LocalName, ServerName};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::DeferredMessages;
use super::{
    ChannelRow, Claimed, CommitRow, DeferredMessage, DeviceRow, EpochState, Event, InboxItem,
    MessageRow, Millis, NewCommit, NewMessage, OutboxItem, Registered, RemoteRecord, Removal,
    RemovedDevice, Store, StoreError, StoredMessage,
};

/// WAL pages between automatic checkpoints (`PRAGMA wal_autocheckpoint`).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 8192;

/// Prepared statements kept by the connection.
const STATEMENT_CACHE: usize = 64;

/// The schema version this code writes (`PRAGMA user_version`). Version 5
/// added `removed_devices`: an older kithd would let a removed device
/// register again, so it must not open a version 5 database.
const SCHEMA_VERSION: i64 = 5;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    device BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    identity_key BLOB NOT NULL,
    record BLOB NOT NULL,
    record_at INTEGER NOT NULL,
    registered_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_by_name ON devices(name);
-- Devices removed from their name (spec §6.4), with their last row: they
-- never register again, and their record stays for the channels they are
-- still members of until a commit removes them.
CREATE TABLE IF NOT EXISTS removed_devices (
    device BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    identity_key BLOB NOT NULL,
    record BLOB NOT NULL,
    record_at INTEGER NOT NULL,
    registered_at INTEGER NOT NULL,
    removed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    owner BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS challenges (
    challenge BLOB PRIMARY KEY,
    device BLOB NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS challenges_by_device ON challenges(device);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash BLOB PRIMARY KEY,
    device BLOB NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS key_packages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device BLOB NOT NULL,
    package BLOB NOT NULL,
    last_resort INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS key_packages_by_device ON key_packages(device, last_resort, id);
CREATE UNIQUE INDEX IF NOT EXISTS one_last_resort ON key_packages(device) WHERE last_resort = 1;
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device BLOB NOT NULL,
    envelope BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_by_device ON inbox(device, id);
-- shared: NULL, or the event_payloads row holding the payload (then
-- payload is empty): an event that goes to many devices (a channel
-- message or commit) stores its payload once, not once per device.
CREATE TABLE IF NOT EXISTS events (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    device BLOB NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    shared INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_device ON events(device, cursor);
-- refs: the events rows that still point here; the row goes at 0.
CREATE TABLE IF NOT EXISTS event_payloads (
    id INTEGER PRIMARY KEY,
    payload TEXT NOT NULL,
    refs INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS event_acks (
    device BLOB PRIMARY KEY,
    acked INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS channels (
    channel BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
-- members: the 32-byte device ids of the epoch's members, concatenated.
CREATE TABLE IF NOT EXISTS channel_epochs (
    channel BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    ratchet_tree BLOB NOT NULL,
    group_info BLOB NOT NULL,
    members BLOB NOT NULL,
    PRIMARY KEY (channel, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channel_members (
    channel BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (channel, device)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS channel_members_by_device ON channel_members(device);
CREATE TABLE IF NOT EXISTS channel_history (
    channel BLOB NOT NULL,
    device BLOB NOT NULL,
    PRIMARY KEY (channel, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channel_commits (
    channel BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    commit_msg BLOB NOT NULL,
    commit_hash BLOB NOT NULL,
    welcome BLOB,
    certificate BLOB,
    PRIMARY KEY (channel, epoch)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS channel_messages (
    channel BLOB NOT NULL,
    seq INTEGER NOT NULL,
    id BLOB NOT NULL,
    epoch INTEGER NOT NULL,
    sender BLOB NOT NULL,
    message BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (channel, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS channel_messages_by_id ON channel_messages(channel, id);
CREATE TABLE IF NOT EXISTS remote_records (
    device BLOB PRIMARY KEY,
    server TEXT NOT NULL,
    record BLOB NOT NULL,
    fetched_at INTEGER NOT NULL
);
-- Remote devices whose server said it removed them (spec §12.2).
CREATE TABLE IF NOT EXISTS remote_removed (
    device BLOB PRIMARY KEY,
    removed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    path TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    next_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_by_due ON outbox(next_at, id);
CREATE TABLE IF NOT EXISTS remote_deposits (
    origin TEXT NOT NULL,
    deposit_id BLOB NOT NULL,
    item INTEGER NOT NULL,
    PRIMARY KEY (origin, deposit_id)
) WITHOUT ROWID;
";

/// A [`Store`] in one SQLite database file.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    sync: GroupCommit,
    tails: Tails,
}

/// The newest cursor appended to each device's log since the store opened,
/// so an append can name the event before it ([`Event::prev`]) without a
/// query. Advanced under the connection's lock: by a channel message's
/// events once their transaction has committed ([`BatchTails`]); by other
/// appends at their insert, before their transaction commits, where a
/// rollback leaves a cursor no event has (SQLite may hand it out again,
/// and the device's next event then names a `prev` that is not the event
/// before it: a stream then reads the store, which is slow but correct). A
/// device not appended to since the store opened has no entry and its next
/// event no `prev`.
#[derive(Debug, Default)]
struct Tails(Mutex<HashMap<DeviceId, u64>>);

impl Tails {
    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, u64>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `cursor` as the device's newest and returns the one before.
    fn advance(&self, device: DeviceId, cursor: u64) -> Option<u64> {
        self.lock().insert(device, cursor)
    }
}

/// The cursors a transaction appended, kept apart from [`Tails`] until it
/// commits: a transaction rolled back gives its cursors back to SQLite
/// (`AUTOINCREMENT`'s counter is rolled back with it), which hands them
/// out again, so they must not have been recorded as any device's newest
/// (the next event would name its own cursor as the one before it).
struct BatchTails<'a> {
    tails: &'a Tails,
    appended: HashMap<DeviceId, u64>,
}

impl<'a> BatchTails<'a> {
    fn new(tails: &'a Tails) -> Self {
        Self {
            tails,
            appended: HashMap::new(),
        }
    }

    /// As [`Tails::advance`], within the batch.
    fn advance(&mut self, device: DeviceId, cursor: u64) -> Option<u64> {
        self.appended
            .insert(device, cursor)
            .or_else(|| self.tails.lock().get(&device).copied())
    }

    /// Once the batch has committed.
    fn commit(self) {
        self.tails.lock().extend(self.appended);
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Self::setup(conn, Some(PathBuf::from(wal)))
    }

    /// A private in-memory SQLite database (for the conformance suite).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::setup(Connection::open_in_memory()?, None)
    }

    fn setup(conn: Connection, wal: Option<PathBuf>) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // No fsync at commit: `GroupCommit` makes each write durable before
        // its call returns. (NORMAL still syncs around checkpoints.)
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // A message to many devices dirties one `events_by_device` leaf per
        // recipient, the same leaves message after message. Checkpointing
        // every 1,000 WAL pages (SQLite's default; every ~7 messages to 100
        // devices) wrote those leaves back again and again, on the
        // connection's lock; every 8,192 pages (a WAL of up to 32 MiB)
        // writes each of them back once per ~60 messages.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // More statements are cached than rusqlite's default of 16 (an
        // evicted one is parsed and planned again at its next use).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Without the query planner stability guarantee, SQLite (built with
        // STAT4) plans with the bound `LIMIT ?` value, and rebinding it
        // expires the statement: every cached read of events, inbox items
        // and messages was parsed and planned again (profiled: 8% of
        // kithd's CPU in fan-out). The plans here do not depend on values.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "database schema version {version} is newer than this kithd ({SCHEMA_VERSION})"
            )));
        }
        conn.execute_batch(SCHEMA)?;
        // Schema 4 added `events.shared` (older databases have the table
        // without it, and `CREATE TABLE IF NOT EXISTS` leaves it so).
        let has_shared: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('events') WHERE name = 'shared'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_shared {
            conn.execute_batch("ALTER TABLE events ADD COLUMN shared INTEGER")?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let store = Self {
            tails: Tails::default(),
            conn: Mutex::new(conn),
            sync: GroupCommit::new(wal),
        };
        // The schema, durably, before the first call.
        let ticket = store.sync.ticket(u64::MAX);
        store.sync.wait(ticket);
        Ok(store)
    }

    /// [`Store::register`], or with `shared` [`Store::register_linked`].
    fn register_device(&self, row: &DeviceRow, shared: bool) -> Result<Registered, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let removed = tx
            .query_row(
                "SELECT 1 FROM removed_devices WHERE device = ?1",
                [row.device.as_bytes()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if removed {
            return Err(StoreError::DeviceRemoved(row.device));
        }
        let existing: Option<String> = tx
            .query_row(
                "SELECT name FROM devices WHERE device = ?1",
                [row.device.as_bytes()],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(name) = existing {
            return if name == row.name.as_str() {
                Ok(Registered::Existing)
            } else {
                Err(StoreError::DeviceHasOtherName(
                    LocalName::parse_canonical(&name)
                        .map_err(|e| StoreError::Corrupt(format!("local name {name:?}: {e}")))?,
                ))
            };
        }
        let taken: bool = tx
            .query_row(
                "SELECT 1 FROM names WHERE name = ?1",
                [row.name.as_str()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if taken && !shared {
            return Err(StoreError::NameTaken(row.name.clone()));
        }
        if !taken {
            tx.execute(
                "INSERT INTO names (name, owner) VALUES (?1, ?2)",
                params![row.name.as_str(), row.device.as_bytes()],
            )?;
        }
        tx.execute(
            "INSERT INTO devices (device, name, identity_key, record, record_at, registered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                row.device.as_bytes(),
                row.name.as_str(),
                row.identity_key.as_slice(),
                row.record,
                int(row.record_at)?,
                int(row.registered_at)?
            ],
        )?;
        tx.commit()?;
        Ok(Registered::New)
    }

    fn lock(&self) -> Result<Conn<'_>, StoreError> {
        let guard = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(Conn {
            changes_at_lock: guard.total_changes(),
            guard: Some(guard),
            sync: &self.sync,
        })
    }
}

/// Group commit. Transactions commit with `synchronous = NORMAL`, which
/// writes the WAL but does not fsync it; a caller then returns only once
/// the WAL file has been fsynced after its commit, and every caller
/// waiting at that moment shares that one fsync. A write is therefore on
/// disk before any answer is based on it, as with `synchronous = FULL`, but
/// concurrent writers pay for one fsync instead of one each.
///
/// Reads wait too, for the writes committed before them: nothing is
/// served that a crash could still take back.
#[derive(Debug)]
struct GroupCommit {
    /// The WAL file (`<database>-wal`); `None` for an in-memory database.
    wal: Option<PathBuf>,
    state: Mutex<SyncState>,
    synced: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// The connection's `total_changes()` when last seen.
    changes: u64,
    /// Write generations seen (one per lock release that changed rows).
    written: u64,
    /// The highest generation known to be on disk.
    durable: u64,
    /// Whether a thread is running an fsync now.
    syncing: bool,
    /// The open WAL file, once it exists.
    file: Option<std::fs::File>,
}

impl GroupCommit {
    fn new(wal: Option<PathBuf>) -> Self {
        Self {
            wal,
            state: Mutex::new(SyncState::default()),
            synced: Condvar::new(),
        }
    }

    /// Called with the connection still locked: the generation a caller
    /// must see on disk before it returns.
    fn ticket(&self, total_changes: u64) -> u64 {
        let mut state = self.lock_state();
        if total_changes != state.changes {
            state.changes = total_changes;
            state.written += 1;
        }
        state.written
    }

    /// The counters stay consistent whatever a panicking thread did (it
    /// can only have panicked between whole updates), so poisoning is
    /// ignored.
    fn lock_state(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Returns once generation `ticket` is on disk, running the fsync if no
    /// other thread is. A failed fsync aborts the process: the kernel may
    /// have dropped the unwritten pages, so no later answer could be
    /// trusted (the lesson of PostgreSQL's "fsyncgate"); after a restart
    /// SQLite recovers to what is really on disk, and no client was told
    /// that anything lost was accepted.
    fn wait(&self, ticket: u64) {
        let Some(wal) = &self.wal else {
            return;
        };
        let mut state = self.lock_state();
        // Each round returns, waits for the fsync in progress, or runs one
        // that covers `ticket`: at most three rounds do real work.
        loop {
            if state.durable >= ticket {
                return;
            }
            if state.syncing {
                state = self
                    .synced
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.syncing = true;
            let target = state.written;
            let mut file = state.file.take();
            drop(state);
            let result = match &file {
                Some(f) => f.sync_data(),
                None => match std::fs::File::open(wal) {
                    Ok(f) => {
                        let synced = f.sync_data();
                        file = Some(f);
                        synced
                    }
                    // No WAL yet: nothing was written that needs it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = result {
                tracing::error!(wal = %wal.display(), error = %e, "fsync of the SQLite WAL failed; stopping");
                std::process::abort();
            }
            state = self.lock_state();
            state.file = file;
            state.syncing = false;
            state.durable = state.durable.max(target);
            self.synced.notify_all();
        }
    }
}

/// The locked connection. Releasing it waits for group commit: see
/// [`GroupCommit`].
struct Conn<'a> {
    guard: Option<MutexGuard<'a, Connection>>,
    sync: &'a GroupCommit,
    /// The connection's `total_changes()` when locked.
    changes_at_lock: u64,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        // Present until drop.
        #[allow(clippy::expect_used)]
        self.guard.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        #[allow(clippy::expect_used)]
        self.guard.as_mut().expect("held until drop")
    }
}

impl Conn<'_> {
    /// Unlocks without waiting for the disk; returns the generation to
    /// pass to [`GroupCommit::wait`] before anyone is told of the writes.
    fn release(mut self) -> u64 {
        match self.guard.take() {
            Some(guard) => self.sync.ticket(guard.total_changes()),
            None => 0,
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let changes = guard.total_changes();
        let ticket = self.sync.ticket(changes);
        drop(guard);
        // A check that wrote nothing need not wait (see `store::unsynced`).
        if changes == self.changes_at_lock && super::is_unsynced() {
            return;
        }
        self.sync.wait(ticket);
    }
}

/// Stores a message and its events in one transaction (see
/// [`Store::store_message`]).
fn insert_message(
    conn: &mut Connection,
    tails: &Tails,
    channel: &ChannelId,
    message: &NewMessage,
    payload: &dyn Fn(&MessageRow) -> String,
) -> Result<StoredMessage, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut appended = BatchTails::new(tails);
    let stored = message_rows(
        &tx,
        &mut |device, cursor| appended.advance(device, cursor),
        channel,
        message,
        payload,
    )?;
    tx.commit()?;
    appended.commit();
    Ok(stored)
}

/// Stores a batch of messages in one transaction. Any error rolls all of
/// it back (the caller then stores them one by one): a savepoint per
/// message would let the others commit, but it copies every page the
/// message changes into a sub-journal first (profiled: 13% of `kithd`'s
/// CPU in fan-out, about 100 index pages per message), for errors that
/// the checks before storing make rare.
fn insert_messages(
    conn: &mut Connection,
    tails: &Tails,
    batch: &[(ChannelId, NewMessage)],
    payload: &dyn Fn(&ChannelId, &MessageRow) -> String,
) -> Result<Vec<StoredMessage>, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut appended = BatchTails::new(tails);
    let stored = batch
        .iter()
        .map(|(channel, message)| {
            message_rows(
                &tx,
                &mut |device, cursor| appended.advance(device, cursor),
                channel,
                message,
                &|row| payload(channel, row),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit()?;
    appended.commit();
    Ok(stored)
}

/// Messages stored in order, and the events appended for them.
type StoredMessages = (Vec<MessageRow>, Vec<(DeviceId, Event)>);

/// Stores several messages of one channel and their events in one
/// transaction, in order, at consecutive positions (see
/// [`Store::store_messages_deferred`]): all of them, or none.
fn insert_channel_messages(
    conn: &mut Connection,
    tails: &Tails,
    channel: &ChannelId,
    messages: &[NewMessage],
    payload: &dyn Fn(&MessageRow) -> String,
) -> Result<StoredMessages, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut appended = BatchTails::new(tails);
    let mut rows = Vec::with_capacity(messages.len());
    let mut events = Vec::new();
    for message in messages {
        let (row, new) = message_rows(
            &tx,
            &mut |device, cursor| appended.advance(device, cursor),
            channel,
            message,
            payload,
        )?;
        rows.push(row);
        events.extend(new);
    }
    tx.commit()?;
    appended.commit();
    Ok((rows, events))
}

/// The rows of one message and its events (see [`Store::store_message`]),
/// inside the caller's transaction.
fn message_rows(
    tx: &Connection,
    advance: &mut dyn FnMut(DeviceId, u64) -> Option<u64>,
    channel: &ChannelId,
    message: &NewMessage,
    payload: &dyn Fn(&MessageRow) -> String,
) -> Result<StoredMessage, StoreError> {
    let known = tx
        .prepare_cached("SELECT 1 FROM channels WHERE channel = ?1")?
        .query_row([channel.as_bytes()], |_| Ok(()))
        .optional()?
        .is_some();
    if !known {
        return Err(StoreError::UnknownChannel(*channel));
    }
    let existing = tx
        .prepare_cached(
            "SELECT seq, id, epoch, sender, message, received_at FROM channel_messages
             WHERE channel = ?1 AND id = ?2",
        )?
        .query_row(
            params![channel.as_bytes(), message.id.as_slice()],
            message_row,
        )
        .optional()?;
    if let Some(raw) = existing {
        return Ok((to_message_row(raw)?, Vec::new()));
    }
    let last: i64 = tx
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM channel_messages WHERE channel = ?1")?
        .query_row([channel.as_bytes()], |r| r.get(0))?;
    let row = MessageRow {
        seq: uint(last)? + 1,
        id: message.id,
        epoch: message.epoch,
        sender: message.sender,
        message: message.message.clone(),
        received_at: message.received_at,
    };
    tx.prepare_cached(
        "INSERT INTO channel_messages (channel, seq, id, epoch, sender, message, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        channel.as_bytes(),
        int(row.seq)?,
        row.id.as_slice(),
        int(row.epoch)?,
        row.sender.as_bytes(),
        row.message,
        int(row.received_at)?
    ])?;
    let recipients: Vec<Vec<u8>> = {
        let mut stmt = tx.prepare_cached(
            "SELECT m.device FROM channel_members m JOIN devices d ON d.device = m.device
             WHERE m.channel = ?1 AND m.device != ?2",
        )?;
        stmt.query_map(
            params![channel.as_bytes(), message.sender.as_bytes()],
            |r| r.get(0),
        )?
        .collect::<Result<Vec<_>, _>>()?
    };
    let recipients = recipients
        .iter()
        .map(|raw| device_id(raw))
        .collect::<Result<Vec<_>, _>>()?;
    let events = insert_shared_events(
        tx,
        advance,
        recipients,
        "message",
        &payload(&row),
        row.received_at,
    )?;
    Ok((row, events))
}

fn int(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{v} does not fit in SQLite")))
}

/// A lookup key or lower bound: ids, cursors and epochs count up from 1 or
/// 0 and stay far below `i64::MAX`, so a larger value (which a client may
/// send) is clamped and matches nothing, rather than being an error.
fn int_key(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative value {v}")))
}

fn device_id(bytes: &[u8]) -> Result<DeviceId, StoreError> {
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("device id is not 32 bytes".into()))?;
    Ok(DeviceId::from_bytes(arr))
}

type RawDevice = (Vec<u8>, String, Vec<u8>, Vec<u8>, i64, i64);

/// Columns: device, name, identity_key, record, record_at, registered_at.
fn device_row(row: &Row<'_>) -> rusqlite::Result<RawDevice> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn to_device_row(
    (device, name, key, record, record_at, registered_at): RawDevice,
) -> Result<DeviceRow, StoreError> {
    Ok(DeviceRow {
        device: device_id(&device)?,
        name: LocalName::parse_canonical(&name)
            .map_err(|e| StoreError::Corrupt(format!("local name {name:?}: {e}")))?,
        identity_key: key
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("identity key is not 32 bytes".into()))?,
        record,
        record_at: uint(record_at)?,
        registered_at: uint(registered_at)?,
    })
}

fn to_event(
    (cursor, kind, payload, created_at): (i64, String, String, i64),
) -> Result<Event, StoreError> {
    Ok(Event {
        cursor: uint(cursor)?,
        kind,
        payload,
        created_at: uint(created_at)?,
        prev: None,
    })
}

/// Deletes the device's events with a cursor up to `cursor`. Shared
/// payloads lose a reference per deleted event; the last one deletes the
/// payload.
fn delete_events_through(
    conn: &Connection,
    device: &DeviceId,
    cursor: i64,
) -> Result<(), StoreError> {
    let released: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT shared, COUNT(*) FROM events
             WHERE device = ?1 AND cursor <= ?2 AND shared IS NOT NULL GROUP BY shared",
        )?
        .query_map(params![device.as_bytes(), cursor], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    for (shared, count) in released {
        conn.prepare_cached("UPDATE event_payloads SET refs = refs - ?2 WHERE id = ?1")?
            .execute(params![shared, count])?;
        conn.prepare_cached("DELETE FROM event_payloads WHERE id = ?1 AND refs <= 0")?
            .execute([shared])?;
    }
    conn.prepare_cached("DELETE FROM events WHERE device = ?1 AND cursor <= ?2")?
        .execute(params![device.as_bytes(), cursor])?;
    Ok(())
}

/// Fails with [`StoreError::UnknownDevice`] unless `device` is registered,
/// read in the caller's transaction so a removal cannot come between the
/// check and the write (§6.4: nothing is stored for a removed device).
fn require_registered(conn: &Connection, device: &DeviceId) -> Result<(), StoreError> {
    let registered = conn
        .prepare_cached("SELECT 1 FROM devices WHERE device = ?1")?
        .query_row([device.as_bytes()], |_| Ok(()))
        .optional()?
        .is_some();
    if registered {
        Ok(())
    } else {
        Err(StoreError::UnknownDevice(*device))
    }
}

fn insert_event(
    conn: &Connection,
    advance: &mut dyn FnMut(DeviceId, u64) -> Option<u64>,
    device: &DeviceId,
    kind: &str,
    payload: &str,
    now: Millis,
) -> Result<Event, StoreError> {
    conn.execute(
        "INSERT INTO events (device, kind, payload, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![device.as_bytes(), kind, payload, int(now)?],
    )?;
    let cursor = uint(conn.last_insert_rowid())?;
    Ok(Event {
        cursor,
        kind: kind.to_owned(),
        payload: payload.to_owned(),
        created_at: now,
        prev: advance(*device, cursor),
    })
}

/// Appends one event to each recipient's log, all with the same payload,
/// stored once in `event_payloads` (the events point at it) when there is
/// more than one recipient: a 1 KiB message to 100 devices writes its
/// ~1.7 KB of JSON once, not 100 times.
fn insert_shared_events(
    conn: &Connection,
    advance: &mut dyn FnMut(DeviceId, u64) -> Option<u64>,
    recipients: Vec<DeviceId>,
    kind: &str,
    payload: &str,
    now: Millis,
) -> Result<Vec<(DeviceId, Event)>, StoreError> {
    if recipients.len() < 2 {
        return recipients
            .into_iter()
            .map(|device| {
                Ok((
                    device,
                    insert_event(conn, advance, &device, kind, payload, now)?,
                ))
            })
            .collect();
    }
    conn.prepare_cached("INSERT INTO event_payloads (payload, refs) VALUES (?1, ?2)")?
        .execute(params![payload, int(recipients.len() as u64)?])?;
    let shared = conn.last_insert_rowid();
    let mut insert = conn.prepare_cached(
        "INSERT INTO events (device, kind, payload, created_at, shared)
         VALUES (?1, ?2, '', ?3, ?4)",
    )?;
    let mut events = Vec::with_capacity(recipients.len());
    for device in recipients {
        insert.execute(params![device.as_bytes(), kind, int(now)?, shared])?;
        let cursor = uint(conn.last_insert_rowid())?;
        events.push((
            device,
            Event {
                cursor,
                kind: kind.to_owned(),
                payload: payload.to_owned(),
                created_at: now,
                prev: advance(device, cursor),
            },
        ));
    }
    Ok(events)
}

/// Queues an inbox item for `recipient` unless its inbox already holds
/// `max_items`. Local and federated deposits share it.
fn insert_inbox_item(
    conn: &Connection,
    recipient: &DeviceId,
    envelope: &[u8],
    received_at: Millis,
    max_items: usize,
) -> Result<InboxItem, StoreError> {
    let held = uint(conn.query_row(
        "SELECT COUNT(*) FROM inbox WHERE device = ?1",
        [recipient.as_bytes()],
        |r| r.get(0),
    )?)? as usize;
    if held >= max_items {
        return Err(StoreError::InboxFull { limit: max_items });
    }
    conn.execute(
        "INSERT INTO inbox (device, envelope, received_at) VALUES (?1, ?2, ?3)",
        params![recipient.as_bytes(), envelope, int(received_at)?],
    )?;
    Ok(InboxItem {
        id: uint(conn.last_insert_rowid())?,
        envelope: envelope.to_vec(),
        received_at,
    })
}

fn server_name(text: &str) -> Result<ServerName, StoreError> {
    ServerName::parse_canonical(text)
        .map_err(|e| StoreError::Corrupt(format!("server name {text:?}: {e}")))
}

type RawOutbox = (i64, String, String, Vec<u8>, i64, i64, i64);

/// Columns: id, destination, path, body, attempts, next_at, created_at.
fn outbox_row(row: &Row<'_>) -> rusqlite::Result<RawOutbox> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
    ))
}

fn to_outbox_item(
    (id, destination, path, body, attempts, next_at, created_at): RawOutbox,
) -> Result<OutboxItem, StoreError> {
    Ok(OutboxItem {
        id: uint(id)?,
        destination: server_name(&destination)?,
        path,
        body,
        attempts: u32::try_from(attempts)
            .map_err(|_| StoreError::Corrupt(format!("attempts {attempts}")))?,
        next_at: uint(next_at)?,
        created_at: uint(created_at)?,
    })
}

fn channel_id(bytes: &[u8]) -> Result<ChannelId, StoreError> {
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("channel id is not 16 bytes".into()))?;
    Ok(ChannelId::from_bytes(arr))
}

fn hash32(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("hash is not 32 bytes".into()))
}

fn join_members(members: &[DeviceId]) -> Vec<u8> {
    members.iter().flat_map(|d| *d.as_bytes()).collect()
}

fn split_members(bytes: &[u8]) -> Result<Vec<DeviceId>, StoreError> {
    if !bytes.len().is_multiple_of(32) {
        return Err(StoreError::Corrupt(
            "member list is not a multiple of 32 bytes".into(),
        ));
    }
    bytes.chunks_exact(32).map(device_id).collect()
}

type RawChannel = (Vec<u8>, String, String, i64, i64);

/// Columns: channel, name, content_type, epoch, created_at.
fn channel_row(row: &Row<'_>) -> rusqlite::Result<RawChannel> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn to_channel_row(
    (channel, name, content_type, epoch, created_at): RawChannel,
) -> Result<ChannelRow, StoreError> {
    Ok(ChannelRow {
        channel: channel_id(&channel)?,
        name,
        content_type,
        epoch: uint(epoch)?,
        created_at: uint(created_at)?,
    })
}

type RawCommit = (i64, Vec<u8>, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>);

/// Columns: epoch, commit_msg, commit_hash, welcome, certificate.
fn commit_row(row: &Row<'_>) -> rusqlite::Result<RawCommit> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ))
}

fn to_commit_row(
    (epoch, commit, hash, welcome, certificate): RawCommit,
) -> Result<CommitRow, StoreError> {
    Ok(CommitRow {
        epoch: uint(epoch)?,
        commit,
        commit_hash: hash32(&hash)?,
        welcome,
        certificate,
    })
}

type RawMessage = (i64, Vec<u8>, i64, Vec<u8>, Vec<u8>, i64);

/// Columns: seq, id, epoch, sender, message, received_at.
fn message_row(row: &Row<'_>) -> rusqlite::Result<RawMessage> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn to_message_row(
    (seq, id, epoch, sender, message, received_at): RawMessage,
) -> Result<MessageRow, StoreError> {
    Ok(MessageRow {
        seq: uint(seq)?,
        id: hash32(&id)?,
        epoch: uint(epoch)?,
        sender: device_id(&sender)?,
        message,
        received_at: uint(received_at)?,
    })
}

/// Whether `device` is registered here.
fn is_local(conn: &Connection, device: &DeviceId) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM devices WHERE device = ?1",
            [device.as_bytes()],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn epoch_members(
    conn: &Connection,
    channel: &ChannelId,
    epoch: u64,
) -> Result<Option<Vec<DeviceId>>, StoreError> {
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT members FROM channel_epochs WHERE channel = ?1 AND epoch = ?2",
            params![channel.as_bytes(), int(epoch)?],
            |r| r.get(0),
        )
        .optional()?;
    blob.as_deref().map(split_members).transpose()
}

fn insert_epoch(
    conn: &Connection,
    channel: &ChannelId,
    state: &EpochState,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO channel_epochs (channel, epoch, ratchet_tree, group_info, members)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            channel.as_bytes(),
            int(state.epoch)?,
            state.ratchet_tree,
            state.group_info,
            join_members(&state.members)
        ],
    )?;
    conn.execute(
        "DELETE FROM channel_members WHERE channel = ?1",
        [channel.as_bytes()],
    )?;
    for device in &state.members {
        conn.execute(
            "INSERT OR IGNORE INTO channel_members (channel, device) VALUES (?1, ?2)",
            params![channel.as_bytes(), device.as_bytes()],
        )?;
        conn.execute(
            "INSERT OR IGNORE INTO channel_history (channel, device) VALUES (?1, ?2)",
            params![channel.as_bytes(), device.as_bytes()],
        )?;
    }
    Ok(())
}

impl Store for SqliteStore {
    fn register(&self, row: &DeviceRow) -> Result<Registered, StoreError> {
        self.register_device(row, false)
    }

    fn register_linked(&self, row: &DeviceRow) -> Result<Registered, StoreError> {
        self.register_device(row, true)
    }

    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRow>, StoreError> {
        let conn = self.lock()?;
        // Cached: a voter set looks up every member (1,000 lookups per
        // commit in a 1,000-member channel).
        conn.prepare_cached(
            "SELECT device, name, identity_key, record, record_at, registered_at FROM devices
             WHERE device = ?1",
        )?
        .query_row([device.as_bytes()], device_row)
        .optional()?
        .map(to_device_row)
        .transpose()
    }

    fn devices_named(&self, name: &LocalName) -> Result<Vec<DeviceRow>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT device, name, identity_key, record, record_at, registered_at FROM devices
             WHERE name = ?1 ORDER BY rowid",
        )?;
        let rows = stmt
            .query_map([name.as_str()], device_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(to_device_row).collect()
    }

    fn device_count(&self) -> Result<u64, StoreError> {
        let conn = self.lock()?;
        uint(conn.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))?)
    }

    fn remove_device(
        &self,
        device: &DeviceId,
        by: Option<&DeviceId>,
        now: Millis,
        payload: &str,
    ) -> Result<Option<Removal>, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let key = device.as_bytes();
        let Some(raw) = tx
            .query_row(
                "SELECT device, name, identity_key, record, record_at, registered_at
                 FROM devices WHERE device = ?1",
                [key],
                device_row,
            )
            .optional()?
        else {
            return Ok(None);
        };
        let row = to_device_row(raw)?;
        if let Some(by) = by {
            let same_name = tx
                .query_row(
                    "SELECT 1 FROM devices WHERE device = ?1 AND name = ?2",
                    params![by.as_bytes(), row.name.as_str()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !same_name {
                return Err(StoreError::RemoverGone(*by));
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO removed_devices
             (device, name, identity_key, record, record_at, registered_at, removed_at)
             SELECT device, name, identity_key, record, record_at, registered_at, ?2
             FROM devices WHERE device = ?1",
            params![key, int(now)?],
        )?;
        // `sessions` has no index on `device` (it is keyed by token hash):
        // its delete scans the table, which is fine for a removal, rare and
        // done once per device.
        for table in [
            "devices",
            "sessions",
            "challenges",
            "key_packages",
            "inbox",
            "event_acks",
        ] {
            tx.execute(&format!("DELETE FROM {table} WHERE device = ?1"), [key])?;
        }
        // As an ack does, for every event of the device.
        delete_events_through(&tx, device, i64::MAX)?;
        let remaining: Vec<Vec<u8>> = tx
            .prepare("SELECT device FROM devices WHERE name = ?1 ORDER BY rowid")?
            .query_map([row.name.as_str()], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let remaining = remaining
            .iter()
            .map(|raw| device_id(raw))
            .collect::<Result<Vec<_>, _>>()?;
        let mut appended = BatchTails::new(&self.tails);
        let events = insert_shared_events(
            &tx,
            &mut |device, cursor| appended.advance(device, cursor),
            remaining,
            "device_removed",
            payload,
            now,
        )?;
        tx.commit()?;
        appended.commit();
        Ok(Some((row, events)))
    }

    fn release_name(&self, name: &LocalName) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        let released = conn.execute(
            "DELETE FROM names WHERE name = ?1
             AND NOT EXISTS (SELECT 1 FROM devices WHERE name = ?1)",
            [name.as_str()],
        )?;
        Ok(released == 1)
    }

    fn removed_device(&self, device: &DeviceId) -> Result<Option<RemovedDevice>, StoreError> {
        let conn = self.lock()?;
        let found = conn
            .query_row(
                "SELECT device, name, identity_key, record, record_at, registered_at, removed_at
                 FROM removed_devices WHERE device = ?1",
                [device.as_bytes()],
                |r| Ok((device_row(r)?, r.get::<_, i64>(6)?)),
            )
            .optional()?;
        found
            .map(|(raw, removed_at)| {
                Ok(RemovedDevice {
                    row: to_device_row(raw)?,
                    removed_at: uint(removed_at)?,
                })
            })
            .transpose()
    }

    fn replace_record(
        &self,
        device: &DeviceId,
        expected: &[u8],
        new: &[u8],
        now: Millis,
    ) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        let changed = conn.execute(
            "UPDATE devices SET record = ?3, record_at = ?4 WHERE device = ?1 AND record = ?2",
            params![device.as_bytes(), expected, new, int(now)?],
        )?;
        if changed == 0 {
            let known: bool = conn
                .query_row(
                    "SELECT 1 FROM devices WHERE device = ?1",
                    [device.as_bytes()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !known {
                return Err(StoreError::UnknownDevice(*device));
            }
        }
        Ok(changed == 1)
    }

    fn put_challenge(
        &self,
        device: &DeviceId,
        challenge: &[u8; 32],
        expires_at: Millis,
        now: Millis,
        max_per_device: usize,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM challenges WHERE expires_at <= ?1", [int(now)?])?;
        let keep = int(max_per_device.saturating_sub(1) as u64)?;
        tx.execute(
            "DELETE FROM challenges WHERE device = ?1 AND rowid NOT IN
               (SELECT rowid FROM challenges WHERE device = ?1 ORDER BY rowid DESC LIMIT ?2)",
            params![device.as_bytes(), keep],
        )?;
        tx.execute(
            "INSERT INTO challenges (challenge, device, expires_at) VALUES (?1, ?2, ?3)",
            params![challenge.as_slice(), device.as_bytes(), int(expires_at)?],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn take_challenge(
        &self,
        device: &DeviceId,
        challenge: &[u8; 32],
    ) -> Result<Option<Millis>, StoreError> {
        let conn = self.lock()?;
        let expires: Option<i64> = conn
            .query_row(
                "DELETE FROM challenges WHERE challenge = ?1 AND device = ?2
                 RETURNING expires_at",
                params![challenge.as_slice(), device.as_bytes()],
                |r| r.get(0),
            )
            .optional()?;
        expires.map(uint).transpose()
    }

    fn put_session(
        &self,
        token_hash: &[u8; 32],
        device: &DeviceId,
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        let conn = self.lock()?;
        // One statement, so a removal cannot slip between the check and the
        // insert and leave a removed device with a fresh session.
        let inserted = conn.execute(
            "INSERT INTO sessions (token_hash, device, expires_at)
             SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM devices WHERE device = ?2)",
            params![token_hash.as_slice(), device.as_bytes(), int(expires_at)?],
        )?;
        if inserted == 0 {
            return Err(StoreError::UnknownDevice(*device));
        }
        Ok(())
    }

    fn session(&self, token_hash: &[u8; 32]) -> Result<Option<(DeviceId, Millis)>, StoreError> {
        let conn = self.lock()?;
        let row: Option<(Vec<u8>, i64)> = conn
            .prepare_cached("SELECT device, expires_at FROM sessions WHERE token_hash = ?1")?
            .query_row([token_hash.as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        row.map(|(d, e)| Ok((device_id(&d)?, uint(e)?))).transpose()
    }

    fn add_key_packages(
        &self,
        device: &DeviceId,
        packages: &[Vec<u8>],
        last_resort: Option<&[u8]>,
        max_stored: usize,
    ) -> Result<usize, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored = uint(tx.query_row(
            "SELECT COUNT(*) FROM key_packages WHERE device = ?1 AND last_resort = 0",
            [device.as_bytes()],
            |r| r.get(0),
        )?)? as usize;
        if stored + packages.len() > max_stored {
            return Err(StoreError::TooManyKeyPackages {
                limit: max_stored,
                stored,
            });
        }
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO key_packages (device, package, last_resort) VALUES (?1, ?2, ?3)",
            )?;
            for p in packages {
                insert.execute(params![device.as_bytes(), p, 0])?;
            }
            if let Some(lr) = last_resort {
                tx.execute(
                    "DELETE FROM key_packages WHERE device = ?1 AND last_resort = 1",
                    [device.as_bytes()],
                )?;
                insert.execute(params![device.as_bytes(), lr, 1])?;
            }
        }
        tx.commit()?;
        Ok(stored + packages.len())
    }

    fn key_package_count(&self, device: &DeviceId) -> Result<(usize, bool), StoreError> {
        let conn = self.lock()?;
        let (normal, lr): (i64, i64) = conn.query_row(
            "SELECT COALESCE(SUM(last_resort = 0), 0), COALESCE(SUM(last_resort = 1), 0)
             FROM key_packages WHERE device = ?1",
            [device.as_bytes()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((uint(normal)? as usize, lr > 0))
    }

    fn claim_key_package(&self, device: &DeviceId) -> Result<Claimed, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let normal: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT id, package FROM key_packages WHERE device = ?1 AND last_resort = 0
                 ORDER BY id LIMIT 1",
                [device.as_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((id, package)) = normal {
            tx.execute("DELETE FROM key_packages WHERE id = ?1", [id])?;
            tx.commit()?;
            return Ok(Claimed::Package(package));
        }
        let lr: Option<Vec<u8>> = tx
            .query_row(
                "SELECT package FROM key_packages WHERE device = ?1 AND last_resort = 1",
                [device.as_bytes()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(lr.map_or(Claimed::Exhausted, Claimed::LastResort))
    }

    fn deposit_inbox(
        &self,
        recipient: &DeviceId,
        envelope: &[u8],
        received_at: Millis,
        max_items: usize,
        payload: &dyn Fn(&InboxItem) -> String,
    ) -> Result<(InboxItem, Event), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        require_registered(&tx, recipient)?;
        let item = insert_inbox_item(&tx, recipient, envelope, received_at, max_items)?;
        let event = insert_event(
            &tx,
            &mut |device, cursor| self.tails.advance(device, cursor),
            recipient,
            "inbox",
            &payload(&item),
            received_at,
        )?;
        tx.commit()?;
        Ok((item, event))
    }

    fn inbox(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InboxItem>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, envelope, received_at FROM inbox WHERE device = ?1 AND id > ?2
             ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(
                params![device.as_bytes(), int_key(after), int(limit as u64)?],
                |r| Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get::<_, i64>(2)?)),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(id, envelope, received_at)| {
                Ok(InboxItem {
                    id: uint(id)?,
                    envelope,
                    received_at: uint(received_at)?,
                })
            })
            .collect()
    }

    fn delete_inbox(&self, device: &DeviceId, id: u64) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        let changed = conn.execute(
            "DELETE FROM inbox WHERE device = ?1 AND id = ?2",
            params![device.as_bytes(), int_key(id)],
        )?;
        Ok(changed > 0)
    }

    fn append_event(
        &self,
        device: &DeviceId,
        kind: &str,
        payload: &str,
        now: Millis,
    ) -> Result<Event, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        require_registered(&tx, device)?;
        // The cursor becomes this device's newest only once committed.
        let mut appended = BatchTails::new(&self.tails);
        let event = insert_event(
            &tx,
            &mut |device, cursor| appended.advance(device, cursor),
            device,
            kind,
            payload,
            now,
        )?;
        tx.commit()?;
        appended.commit();
        Ok(event)
    }

    fn events(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT e.cursor, e.kind,
                    CASE WHEN e.shared IS NULL THEN e.payload ELSE p.payload END,
                    e.created_at
             FROM events e LEFT JOIN event_payloads p ON p.id = e.shared
             WHERE e.device = ?1 AND e.cursor > ?2 ORDER BY e.cursor LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(
                params![device.as_bytes(), int_key(after), int(limit as u64)?],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(to_event).collect()
    }

    fn ack_events(&self, device: &DeviceId, cursor: u64) -> Result<u64, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let acked = tx
            .query_row(
                "SELECT acked FROM event_acks WHERE device = ?1",
                [device.as_bytes()],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(uint)
            .transpose()?
            .unwrap_or(0);
        let newest = uint(tx.query_row(
            "SELECT COALESCE(MAX(cursor), 0) FROM events WHERE device = ?1",
            [device.as_bytes()],
            |r| r.get(0),
        )?)?;
        let new_ack = acked.max(cursor.min(newest));
        tx.execute(
            "INSERT INTO event_acks (device, acked) VALUES (?1, ?2)
             ON CONFLICT (device) DO UPDATE SET acked = excluded.acked",
            params![device.as_bytes(), int(new_ack)?],
        )?;
        delete_events_through(&tx, device, int(new_ack)?)?;
        tx.commit()?;
        Ok(new_ack)
    }

    fn acked_cursor(&self, device: &DeviceId) -> Result<u64, StoreError> {
        let conn = self.lock()?;
        conn.query_row(
            "SELECT acked FROM event_acks WHERE device = ?1",
            [device.as_bytes()],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(uint)
        .transpose()
        .map(Option::unwrap_or_default)
    }

    fn create_channel(&self, row: &ChannelRow, state: &EpochState) -> Result<(), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM channels WHERE channel = ?1",
                [row.channel.as_bytes()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Err(StoreError::ChannelExists(row.channel));
        }
        tx.execute(
            "INSERT INTO channels (channel, name, content_type, epoch, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                row.channel.as_bytes(),
                row.name,
                row.content_type,
                int(row.epoch)?,
                int(row.created_at)?
            ],
        )?;
        insert_epoch(&tx, &row.channel, state)?;
        tx.commit()?;
        Ok(())
    }

    fn channel(&self, channel: &ChannelId) -> Result<Option<ChannelRow>, StoreError> {
        let conn = self.lock()?;
        conn.prepare_cached(
            "SELECT channel, name, content_type, epoch, created_at FROM channels
             WHERE channel = ?1",
        )?
        .query_row([channel.as_bytes()], channel_row)
        .optional()?
        .map(to_channel_row)
        .transpose()
    }

    fn channels_of(&self, device: &DeviceId) -> Result<Vec<ChannelRow>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT c.channel, c.name, c.content_type, c.epoch, c.created_at
             FROM channels c JOIN channel_members m ON m.channel = c.channel
             WHERE m.device = ?1 ORDER BY c.channel",
        )?;
        let rows = stmt
            .query_map([device.as_bytes()], channel_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(to_channel_row).collect()
    }

    fn is_member(&self, channel: &ChannelId, device: &DeviceId) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        Ok(conn
            .prepare_cached("SELECT 1 FROM channel_members WHERE channel = ?1 AND device = ?2")?
            .query_row(params![channel.as_bytes(), device.as_bytes()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    fn was_member(&self, channel: &ChannelId, device: &DeviceId) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        Ok(conn
            .query_row(
                "SELECT 1 FROM channel_history WHERE channel = ?1 AND device = ?2",
                params![channel.as_bytes(), device.as_bytes()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    fn epoch_state(
        &self,
        channel: &ChannelId,
        epoch: u64,
    ) -> Result<Option<EpochState>, StoreError> {
        let conn = self.lock()?;
        let row: Option<(Vec<u8>, Vec<u8>, Vec<u8>)> = conn
            .query_row(
                "SELECT ratchet_tree, group_info, members FROM channel_epochs
                 WHERE channel = ?1 AND epoch = ?2",
                params![channel.as_bytes(), int_key(epoch)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        row.map(|(ratchet_tree, group_info, members)| {
            Ok(EpochState {
                epoch,
                ratchet_tree,
                group_info,
                members: split_members(&members)?,
            })
        })
        .transpose()
    }

    fn store_commit(&self, commit: &NewCommit) -> Result<(), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let channel = &commit.channel;
        let current: Option<i64> = tx
            .query_row(
                "SELECT epoch FROM channels WHERE channel = ?1",
                [channel.as_bytes()],
                |r| r.get(0),
            )
            .optional()?;
        let current = uint(current.ok_or(StoreError::UnknownChannel(*channel))?)?;
        let epoch = commit.commit.epoch;
        if current != epoch || commit.next.epoch != epoch.wrapping_add(1) {
            return Err(StoreError::EpochConflict {
                channel: *channel,
                current,
                got: epoch,
            });
        }
        tx.execute(
            "INSERT INTO channel_commits
               (channel, epoch, commit_msg, commit_hash, welcome, certificate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                channel.as_bytes(),
                int(epoch)?,
                commit.commit.commit,
                commit.commit.commit_hash.as_slice(),
                commit.commit.welcome,
                commit.commit.certificate
            ],
        )?;
        insert_epoch(&tx, channel, &commit.next)?;
        tx.execute(
            "UPDATE channels SET epoch = ?2, name = ?3, content_type = ?4 WHERE channel = ?1",
            params![
                channel.as_bytes(),
                int(commit.next.epoch)?,
                commit.name,
                commit.content_type
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn commit(&self, channel: &ChannelId, epoch: u64) -> Result<Option<CommitRow>, StoreError> {
        let conn = self.lock()?;
        conn.prepare_cached(
            "SELECT epoch, commit_msg, commit_hash, welcome, certificate FROM channel_commits
             WHERE channel = ?1 AND epoch = ?2",
        )?
        .query_row(params![channel.as_bytes(), int_key(epoch)], commit_row)
        .optional()?
        .map(to_commit_row)
        .transpose()
    }

    fn commits(
        &self,
        channel: &ChannelId,
        from_epoch: u64,
        limit: usize,
    ) -> Result<Vec<CommitRow>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT epoch, commit_msg, commit_hash, welcome, certificate FROM channel_commits
             WHERE channel = ?1 AND epoch >= ?2 ORDER BY epoch LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(
                params![channel.as_bytes(), int_key(from_epoch), int(limit as u64)?],
                commit_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(to_commit_row).collect()
    }

    fn certify_commit(
        &self,
        channel: &ChannelId,
        epoch: u64,
        certificate: &[u8],
        payload: &str,
        now: Millis,
    ) -> Result<Option<Vec<(DeviceId, Event)>>, StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<Option<Vec<u8>>> = tx
            .query_row(
                "SELECT certificate FROM channel_commits WHERE channel = ?1 AND epoch = ?2",
                params![channel.as_bytes(), int(epoch)?],
                |r| r.get(0),
            )
            .optional()?;
        match existing {
            None => {
                return Err(StoreError::Corrupt(format!(
                    "no commit stored for epoch {epoch}"
                )));
            }
            Some(Some(_)) => return Ok(None),
            Some(None) => {}
        }
        tx.execute(
            "UPDATE channel_commits SET certificate = ?3 WHERE channel = ?1 AND epoch = ?2",
            params![channel.as_bytes(), int(epoch)?, certificate],
        )?;
        // Events go to the members registered here; the others are other
        // servers' to notify.
        let mut recipients = epoch_members(&tx, channel, epoch)?.unwrap_or_default();
        recipients.retain(|d| is_local(&tx, d).unwrap_or(false));
        let events = insert_shared_events(
            &tx,
            &mut |device, cursor| self.tails.advance(device, cursor),
            recipients,
            "commit",
            payload,
            now,
        )?;
        tx.commit()?;
        Ok(Some(events))
    }

    fn store_message(
        &self,
        channel: &ChannelId,
        message: &NewMessage,
        payload: &dyn Fn(&MessageRow) -> String,
    ) -> Result<(MessageRow, Vec<(DeviceId, Event)>), StoreError> {
        let mut conn = self.lock()?;
        insert_message(&mut conn, &self.tails, channel, message, payload)
    }

    fn store_messages(
        &self,
        batch: &[(ChannelId, NewMessage)],
        payload: &dyn Fn(&ChannelId, &MessageRow) -> String,
    ) -> Vec<Result<StoredMessage, StoreError>> {
        let mut conn = match self.lock() {
            Ok(conn) => conn,
            Err(_) => return batch.iter().map(|_| Err(StoreError::Poisoned)).collect(),
        };
        // If the batch fails, nothing of it was stored: each message is
        // tried again alone, so an error reaches only the messages it
        // belongs to.
        match insert_messages(&mut conn, &self.tails, batch, payload) {
            Ok(stored) => stored.into_iter().map(Ok).collect(),
            Err(e) if batch.len() == 1 => vec![Err(e)],
            Err(e) => {
                tracing::info!(error = %e, messages = batch.len(), "a batch of messages failed; storing them one by one");
                batch
                    .iter()
                    .map(|(channel, message)| {
                        insert_message(&mut conn, &self.tails, channel, message, &|row| {
                            payload(channel, row)
                        })
                    })
                    .collect()
            }
        }
        // Dropping `conn` waits until all of it is on disk.
    }

    fn store_message_deferred(
        &self,
        channel: &ChannelId,
        message: &NewMessage,
        payload: &dyn Fn(&MessageRow) -> String,
    ) -> Result<DeferredMessage, StoreError> {
        let mut conn = self.lock()?;
        let stored = insert_message(&mut conn, &self.tails, channel, message, payload);
        let token = conn.release();
        stored.map(|(row, events)| (row, events, token))
    }

    fn store_messages_deferred(
        &self,
        channel: &ChannelId,
        messages: &[NewMessage],
        payload: &dyn Fn(&MessageRow) -> String,
    ) -> Result<DeferredMessages, StoreError> {
        let mut conn = self.lock()?;
        let stored = insert_channel_messages(&mut conn, &self.tails, channel, messages, payload);
        let token = conn.release();
        stored.map(|(rows, events)| (rows, events, token))
    }

    fn wait_durable(&self, token: u64) -> Result<(), StoreError> {
        self.sync.wait(token);
        Ok(())
    }

    fn messages(
        &self,
        channel: &ChannelId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MessageRow>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT seq, id, epoch, sender, message, received_at FROM channel_messages
             WHERE channel = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(
                params![channel.as_bytes(), int_key(after), int(limit as u64)?],
                message_row,
            )?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(to_message_row).collect()
    }

    fn put_remote_record(&self, row: &RemoteRecord) -> Result<(), StoreError> {
        let conn = self.lock()?;
        conn.execute(
            "INSERT OR REPLACE INTO remote_records (device, server, record, fetched_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                row.device.as_bytes(),
                row.server.as_str(),
                row.record,
                int(row.fetched_at)?
            ],
        )?;
        Ok(())
    }

    fn remote_records_from(&self, server: &ServerName) -> Result<Vec<RemoteRecord>, StoreError> {
        let conn = self.lock()?;
        let rows = conn
            .prepare(
                "SELECT device, record, fetched_at FROM remote_records
                 WHERE server = ?1 ORDER BY device",
            )?
            .query_map([server.as_str()], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(device, record, fetched_at)| {
                Ok(RemoteRecord {
                    device: device_id(&device)?,
                    server: server.clone(),
                    record,
                    fetched_at: uint(fetched_at)?,
                })
            })
            .collect()
    }

    fn mark_remote_removed(&self, device: &DeviceId, removed_at: Millis) -> Result<(), StoreError> {
        self.lock()?.execute(
            "INSERT OR IGNORE INTO remote_removed (device, removed_at) VALUES (?1, ?2)",
            params![device.as_bytes(), int(removed_at)?],
        )?;
        Ok(())
    }

    fn remote_removed(&self, device: &DeviceId) -> Result<Option<Millis>, StoreError> {
        let at: Option<i64> = self
            .lock()?
            .query_row(
                "SELECT removed_at FROM remote_removed WHERE device = ?1",
                [device.as_bytes()],
                |r| r.get(0),
            )
            .optional()?;
        at.map(uint).transpose()
    }

    fn remote_record(&self, device: &DeviceId) -> Result<Option<RemoteRecord>, StoreError> {
        let conn = self.lock()?;
        let raw: Option<(String, Vec<u8>, i64)> = conn
            .query_row(
                "SELECT server, record, fetched_at FROM remote_records WHERE device = ?1",
                [device.as_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        raw.map(|(server, record, fetched_at)| {
            Ok(RemoteRecord {
                device: *device,
                server: server_name(&server)?,
                record,
                fetched_at: uint(fetched_at)?,
            })
        })
        .transpose()
    }

    fn enqueue_outbox(
        &self,
        destination: &ServerName,
        path: &str,
        body: &[u8],
        now: Millis,
    ) -> Result<u64, StoreError> {
        let conn = self.lock()?;
        conn.execute(
            "INSERT INTO outbox (destination, path, body, attempts, next_at, created_at)
             VALUES (?1, ?2, ?3, 0, ?4, ?4)",
            params![destination.as_str(), path, body, int(now)?],
        )?;
        uint(conn.last_insert_rowid())
    }

    fn due_outbox(&self, now: Millis, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, destination, path, body, attempts, next_at, created_at FROM outbox
             WHERE next_at <= ?1 ORDER BY id LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![int(now)?, int(limit as u64)?], outbox_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(to_outbox_item).collect()
    }

    fn next_outbox_due(&self) -> Result<Option<Millis>, StoreError> {
        let conn = self.lock()?;
        let next: Option<i64> =
            conn.query_row("SELECT MIN(next_at) FROM outbox", [], |r| r.get(0))?;
        next.map(uint).transpose()
    }

    fn retry_outbox(&self, id: u64, attempts: u32, next_at: Millis) -> Result<(), StoreError> {
        let conn = self.lock()?;
        conn.execute(
            "UPDATE outbox SET attempts = ?2, next_at = ?3 WHERE id = ?1",
            params![int(id)?, i64::from(attempts), int(next_at)?],
        )?;
        Ok(())
    }

    fn remove_outbox(&self, id: u64) -> Result<bool, StoreError> {
        let conn = self.lock()?;
        Ok(conn.execute("DELETE FROM outbox WHERE id = ?1", [int(id)?])? == 1)
    }

    fn deposit_remote_inbox(
        &self,
        origin: &ServerName,
        deposit_id: &[u8; 16],
        recipient: &DeviceId,
        envelope: &[u8],
        received_at: Millis,
        max_items: usize,
        payload: &dyn Fn(&InboxItem) -> String,
    ) -> Result<(u64, Option<Event>), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seen: Option<i64> = tx
            .query_row(
                "SELECT item FROM remote_deposits WHERE origin = ?1 AND deposit_id = ?2",
                params![origin.as_str(), deposit_id.as_slice()],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(item) = seen {
            return Ok((uint(item)?, None));
        }
        require_registered(&tx, recipient)?;
        let item = insert_inbox_item(&tx, recipient, envelope, received_at, max_items)?;
        tx.execute(
            "INSERT INTO remote_deposits (origin, deposit_id, item) VALUES (?1, ?2, ?3)",
            params![origin.as_str(), deposit_id.as_slice(), int(item.id)?],
        )?;
        let event = insert_event(
            &tx,
            &mut |device, cursor| self.tails.advance(device, cursor),
            recipient,
            "inbox",
            &payload(&item),
            received_at,
        )?;
        tx.commit()?;
        Ok((item.id, Some(event)))
    }
}
