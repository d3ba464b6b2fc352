//! A durable Raft log in SQLite.
//!
//! Many channels can share one database ([`LogDb`]): every row carries its
//! channel. The ordering state machine is not stored: since Kith's groups
//! never purge their log, a restarted node rebuilds it by replaying the log
//! up to the stored commit index.
//!
//! # Group commit
//!
//! A database on disk in WAL mode commits without a sync of its own
//! (`synchronous = NORMAL`); a write that Raft must find after a crash (an
//! append, a vote, a truncation) is reported done only once the WAL has
//! been fsynced after its commit, and every write waiting at that moment
//! shares that one fsync ([`WalSync`]). The connection is not held during
//! the fsync, so the appends of many channels at once cost one fsync per
//! round instead of one each, in series, under the connection's lock.

// openraft's traits fix the error type; its size is not ours to choose.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use kith_proto::ChannelId;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    Entry, LogId, LogState, RaftLogId, RaftLogReader, StorageError, StorageIOError, Vote,
};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use super::{NodeId, TypeConfig};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS order_raft_log (
    channel BLOB NOT NULL,
    idx INTEGER NOT NULL,
    entry TEXT NOT NULL,            -- JSON of openraft's Entry
    PRIMARY KEY (channel, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS order_raft_meta (
    channel BLOB NOT NULL,
    name TEXT NOT NULL,             -- 'vote', 'committed' or 'last_purged'
    value TEXT NOT NULL,            -- JSON
    PRIMARY KEY (channel, name)
) WITHOUT ROWID;
";

/// A SQLite database of Raft logs, shared by the stores of many channels.
pub struct LogDb {
    conn: Mutex<Connection>,
    /// Group commit of the WAL; `None`: each commit is as durable as the
    /// connection's own `synchronous` setting makes it.
    sync: Option<WalSync>,
}

impl Debug for LogDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogDb")
            .field("group_commit", &self.sync.is_some())
            .finish_non_exhaustive()
    }
}

impl LogDb {
    /// Opens (creating if needed) the database at `path` in WAL mode, with
    /// group commit (see the module docs).
    pub fn open(path: &Path) -> Result<Arc<Self>, OpenError> {
        Self::on_disk(Connection::open(path)?, path)
    }

    /// Group commit over `conn`, an open connection to the database file at
    /// `path` (other settings, such as its page cache, are the caller's):
    /// switches it to WAL mode and `synchronous = NORMAL`, and makes every
    /// write Raft relies on wait for an fsync of the WAL.
    pub fn on_disk(conn: Connection, path: &Path) -> Result<Arc<Self>, OpenError> {
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            // No WAL (an in-memory database): no group commit, full syncs.
            conn.pragma_update(None, "synchronous", "FULL")?;
            return Self::with_sync(conn, None);
        }
        // No sync at commit: `WalSync` syncs before anyone relies on the
        // write. (NORMAL still syncs the WAL before every checkpoint.)
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Self::with_sync(conn, Some(WalSync::new(PathBuf::from(wal))))
    }

    /// Over `conn` as it is, with no group commit: a commit is as durable as
    /// the connection's `synchronous` setting makes it.
    pub fn from_connection(conn: Connection) -> Result<Arc<Self>, OpenError> {
        Self::with_sync(conn, None)
    }

    fn with_sync(conn: Connection, sync: Option<WalSync>) -> Result<Arc<Self>, OpenError> {
        conn.execute_batch(SCHEMA)?;
        Ok(Arc::new(Self {
            conn: Mutex::new(conn),
            sync,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }
}

/// Group commit of a WAL file: who waits for which commit, and the fsync.
struct WalSync {
    wal: PathBuf,
    state: Mutex<SyncState>,
    synced: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Writes committed (a generation each), in commit order.
    written: u64,
    /// The highest generation known to be on disk.
    durable: u64,
    /// Whether a thread is running an fsync now.
    syncing: bool,
    /// The open WAL file, once it exists.
    file: Option<std::fs::File>,
    /// Set by a failed fsync, and never cleared: the kernel may have
    /// dropped the unwritten pages, so no later write can be reported
    /// durable until the process restarts and SQLite recovers from what is
    /// really on disk (the lesson of PostgreSQL's "fsyncgate").
    failed: Option<String>,
}

impl WalSync {
    fn new(wal: PathBuf) -> Self {
        Self {
            wal,
            state: Mutex::new(SyncState::default()),
            synced: Condvar::new(),
        }
    }

    /// The counters stay consistent whatever a panicking thread did (it can
    /// only have panicked between whole updates), so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called with the connection still locked, after a commit: the
    /// generation that must be on disk before the commit is relied on.
    fn ticket(&self) -> u64 {
        let mut state = self.state();
        state.written += 1;
        state.written
    }

    /// The generation of the last commit so far.
    fn current(&self) -> u64 {
        self.state().written
    }

    /// Returns once generation `ticket` is on disk, running the fsync if no
    /// other thread is: every commit before the fsync starts shares it.
    fn wait(&self, ticket: u64) -> std::io::Result<()> {
        let mut state = self.state();
        loop {
            if let Some(why) = &state.failed {
                return Err(std::io::Error::other(format!(
                    "an earlier fsync of the Raft log failed: {why}"
                )));
            }
            if state.durable >= ticket {
                return Ok(());
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
                None => match std::fs::File::open(&self.wal) {
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
            state = self.state();
            state.file = file;
            state.syncing = false;
            match result {
                Ok(()) => state.durable = state.durable.max(target),
                Err(e) => {
                    tracing::error!(wal = %self.wal.display(), error = %e, "fsync of the Raft log's WAL failed");
                    state.failed = Some(e.to_string());
                }
            }
            self.synced.notify_all();
        }
    }
}

/// A channel's Raft log in a [`LogDb`]. Clones share the database.
#[derive(Clone)]
pub struct SqliteLogStore {
    db: Arc<LogDb>,
    channel: ChannelId,
}

impl Debug for SqliteLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLogStore")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

/// Why a SQLite store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the Raft log database: {0}")]
pub struct OpenError(#[from] rusqlite::Error);

impl SqliteLogStore {
    /// Opens (creating if needed) the database at `path`, in WAL mode with
    /// group commit, so an append is on disk before Raft counts it.
    pub fn open(path: &Path, channel: ChannelId) -> Result<Self, OpenError> {
        Ok(Self::with_db(LogDb::open(path)?, channel))
    }

    /// The store of `channel` in `db`, which other channels' stores may
    /// share.
    pub fn with_db(db: Arc<LogDb>, channel: ChannelId) -> Self {
        Self { db, channel }
    }

    /// A store in a private in-memory database, for tests.
    pub fn open_in_memory(channel: ChannelId) -> Result<Self, OpenError> {
        Ok(Self::with_db(
            LogDb::from_connection(Connection::open_in_memory()?)?,
            channel,
        ))
    }

    /// Runs `f` on the connection off the async runtime's threads.
    async fn run<T, F>(&self, f: F) -> Result<T, StorageError<NodeId>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &[u8]) -> Result<T, StorageError<NodeId>> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let channel = *self.channel.as_bytes();
        tokio::task::spawn_blocking(move || f(&mut db.lock(), &channel))
            .await
            .map_err(|e| StorageError::from(StorageIOError::write(&e)))?
    }

    /// [`Self::run`] for a write that must be on disk when this returns:
    /// with group commit, it waits (without the connection) for an fsync of
    /// the WAL after the write's commit.
    async fn run_durable<T, F>(&self, f: F) -> Result<T, StorageError<NodeId>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &[u8]) -> Result<T, StorageError<NodeId>> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let channel = *self.channel.as_bytes();
        tokio::task::spawn_blocking(move || {
            let (value, ticket) = {
                let mut conn = db.lock();
                let value = f(&mut conn, &channel)?;
                (value, db.sync.as_ref().map(WalSync::ticket))
            };
            if let (Some(sync), Some(ticket)) = (&db.sync, ticket) {
                sync.wait(ticket)
                    .map_err(|e| StorageIOError::write_logs(&e))?;
            }
            Ok(value)
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::write(&e)))?
    }

    /// Waits until every write committed so far is on disk: what a node
    /// reads when it starts must not be something a crash can still take
    /// back (a node restarted in this process could otherwise acknowledge
    /// an entry whose append had not been synced yet).
    async fn settle(&self) -> Result<(), StorageError<NodeId>> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || match &db.sync {
            Some(sync) => sync
                .wait(sync.current())
                .map_err(|e| StorageError::from(StorageIOError::read_logs(&e))),
            None => Ok(()),
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::read(&e)))?
    }

    async fn read_meta<T: DeserializeOwned + Send + 'static>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        self.run(move |conn, channel| read_meta(conn, channel, name))
            .await
    }

    async fn write_meta<T: Serialize>(
        &self,
        name: &'static str,
        value: &T,
    ) -> Result<(), StorageError<NodeId>> {
        let json = serde_json::to_string(value).map_err(|e| StorageIOError::write(&e))?;
        self.run_durable(move |conn, channel| {
            conn.execute(
                "INSERT OR REPLACE INTO order_raft_meta (channel, name, value) VALUES (?1, ?2, ?3)",
                params![channel, name, json],
            )
            .map_err(|e| StorageIOError::write(&e))?;
            Ok(())
        })
        .instrument(tracing::debug_span!("raft.write_meta", name))
        .await
    }
}

fn lock(db: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the lock leaves SQLite's own transaction state
    // consistent; the connection stays usable.
    db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_meta<T: DeserializeOwned>(
    conn: &Connection,
    channel: &[u8],
    name: &str,
) -> Result<Option<T>, StorageError<NodeId>> {
    let json: Option<String> = conn
        .query_row(
            "SELECT value FROM order_raft_meta WHERE channel = ?1 AND name = ?2",
            params![channel, name],
            |row| row.get(0),
        )
        .optional()
        .map_err(|e| StorageIOError::read(&e))?;
    json.map(|j| serde_json::from_str(&j).map_err(|e| StorageIOError::read(&e).into()))
        .transpose()
}

fn sql_index(index: u64) -> Result<i64, StorageError<NodeId>> {
    i64::try_from(index).map_err(|e| StorageIOError::write_logs(&e).into())
}

fn parse_entry(json: &str) -> Result<Entry<TypeConfig>, StorageError<NodeId>> {
    serde_json::from_str(json).map_err(|e| StorageIOError::read_logs(&e).into())
}

impl RaftLogReader<TypeConfig> for SqliteLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let (start, end) = (
            i64::try_from(start).unwrap_or(i64::MAX),
            i64::try_from(end).unwrap_or(i64::MAX),
        );
        self.run(move |conn, channel| {
            let mut statement = conn
                .prepare_cached(
                    "SELECT entry FROM order_raft_log
                     WHERE channel = ?1 AND idx >= ?2 AND idx < ?3 ORDER BY idx",
                )
                .map_err(|e| StorageIOError::read_logs(&e))?;
            let rows = statement
                .query_map(params![channel, start, end], |row| row.get::<_, String>(0))
                .map_err(|e| StorageIOError::read_logs(&e))?;
            let mut entries = Vec::new();
            for row in rows {
                let json = row.map_err(|e| StorageIOError::read_logs(&e))?;
                entries.push(parse_entry(&json)?);
            }
            Ok(entries)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for SqliteLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        self.settle().await?;
        self.run(|conn, channel| {
            let last_purged: Option<LogId<NodeId>> = read_meta(conn, channel, "last_purged")?;
            let last_json: Option<String> = conn
                .query_row(
                    "SELECT entry FROM order_raft_log WHERE channel = ?1 ORDER BY idx DESC LIMIT 1",
                    params![channel],
                    |row| row.get(0),
                )
                .optional()
                .map_err(|e| StorageIOError::read_logs(&e))?;
            let last = match last_json {
                Some(json) => Some(*parse_entry(&json)?.get_log_id()),
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.settle().await?;
        self.read_meta("vote").await
    }

    /// Saved without a disk sync of its own: openraft does not need the
    /// committed pointer to be durable (it is an optimisation of restarts,
    /// see `RaftLogStorage::save_committed`), and Kith's state machine is
    /// rebuilt by replaying the log, whose effects the server's store
    /// already holds durably. A pointer lost in a crash only means a shorter
    /// replay; the next synced write (an append, a vote) makes it durable.
    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        let json = serde_json::to_string(&committed).map_err(|e| StorageIOError::write(&e))?;
        let grouped = self.db.sync.is_some();
        self.run(move |conn, channel| {
            let write = |conn: &Connection| {
                conn.execute(
                    "INSERT OR REPLACE INTO order_raft_meta (channel, name, value)
                     VALUES (?1, 'committed', ?2)",
                    params![channel, json],
                )
            };
            // With group commit the connection commits without a sync
            // already, and nothing waits for one here.
            if grouped {
                return write(conn)
                    .map(|_| ())
                    .map_err(|e| StorageIOError::write(&e).into());
            }
            // In WAL mode, NORMAL commits without syncing the WAL (and is
            // safe from corruption); in other modes it is not, so it keeps
            // the connection's setting.
            let mode: String = conn
                .query_row("PRAGMA journal_mode", [], |row| row.get(0))
                .map_err(|e| StorageIOError::write(&e))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return write(conn)
                    .map(|_| ())
                    .map_err(|e| StorageIOError::write(&e).into());
            }
            let synchronous: i64 = conn
                .query_row("PRAGMA synchronous", [], |row| row.get(0))
                .map_err(|e| StorageIOError::write(&e))?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| StorageIOError::write(&e))?;
            let written = write(conn);
            conn.pragma_update(None, "synchronous", synchronous)
                .map_err(|e| StorageIOError::write(&e))?;
            written.map_err(|e| StorageIOError::write(&e))?;
            Ok(())
        })
        .instrument(tracing::debug_span!("raft.save_committed"))
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>("committed")
            .await?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let json = serde_json::to_string(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            rows.push((sql_index(entry.get_log_id().index)?, json));
        }
        let written = self
            .run_durable(move |conn, channel| {
                let tx = conn
                    .transaction()
                    .map_err(|e| StorageIOError::write_logs(&e))?;
                {
                    let mut insert = tx
                        .prepare_cached(
                            "INSERT OR REPLACE INTO order_raft_log (channel, idx, entry)
                             VALUES (?1, ?2, ?3)",
                        )
                        .map_err(|e| StorageIOError::write_logs(&e))?;
                    for (index, json) in &rows {
                        insert
                            .execute(params![channel, index, json])
                            .map_err(|e| StorageIOError::write_logs(&e))?;
                    }
                }
                tx.commit().map_err(|e| StorageIOError::write_logs(&e))?;
                Ok(())
            })
            .instrument(tracing::debug_span!("raft.log_append"))
            .await;
        match &written {
            // On disk: synced by group commit, or committed with
            // synchronous=FULL.
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        written
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let from = sql_index(log_id.index)?;
        self.run_durable(move |conn, channel| {
            conn.execute(
                "DELETE FROM order_raft_log WHERE channel = ?1 AND idx >= ?2",
                params![channel, from],
            )
            .map_err(|e| StorageIOError::write_logs(&e))?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let upto = sql_index(log_id.index)?;
        let json = serde_json::to_string(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        self.run_durable(move |conn, channel| {
            let previous: Option<LogId<NodeId>> = read_meta(conn, channel, "last_purged")?;
            if previous.is_some_and(|p| p.index >= log_id.index) {
                return Ok(());
            }
            let tx = conn
                .transaction()
                .map_err(|e| StorageIOError::write_logs(&e))?;
            tx.execute(
                "INSERT OR REPLACE INTO order_raft_meta (channel, name, value)
                 VALUES (?1, 'last_purged', ?2)",
                params![channel, json],
            )
            .map_err(|e| StorageIOError::write_logs(&e))?;
            tx.execute(
                "DELETE FROM order_raft_log WHERE channel = ?1 AND idx <= ?2",
                params![channel, upto],
            )
            .map_err(|e| StorageIOError::write_logs(&e))?;
            tx.commit().map_err(|e| StorageIOError::write_logs(&e))?;
            Ok(())
        })
        .await
    }
}
