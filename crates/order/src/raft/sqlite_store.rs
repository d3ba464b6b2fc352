//! A durable Raft log in SQLite.
//!
//! Many channels can share one database: every row carries its channel.
//! The ordering state machine is not stored: since Kith's groups never
//! purge their log, a restarted node rebuilds it by replaying the log up to
//! the stored commit index.

// openraft's traits fix the error type; its size is not ours to choose.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

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

/// A channel's Raft log in a SQLite database. Clones share the connection.
#[derive(Clone)]
pub struct SqliteLogStore {
    db: Arc<Mutex<Connection>>,
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
    /// full sync, so an append is on disk before Raft counts it.
    pub fn open(path: &Path, channel: ChannelId) -> Result<Self, OpenError> {
        let conn = Connection::open(path)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::with_connection(Arc::new(Mutex::new(conn)), channel)
    }

    /// A store over an open connection, which other channels' stores may
    /// share.
    pub fn with_connection(
        db: Arc<Mutex<Connection>>,
        channel: ChannelId,
    ) -> Result<Self, OpenError> {
        lock(&db).execute_batch(SCHEMA)?;
        Ok(Self { db, channel })
    }

    /// A store in a private in-memory database, for tests.
    pub fn open_in_memory(channel: ChannelId) -> Result<Self, OpenError> {
        Self::with_connection(Arc::new(Mutex::new(Connection::open_in_memory()?)), channel)
    }

    /// Runs `f` on the connection off the async runtime's threads.
    async fn run<T, F>(&self, f: F) -> Result<T, StorageError<NodeId>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &[u8]) -> Result<T, StorageError<NodeId>> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let channel = *self.channel.as_bytes();
        tokio::task::spawn_blocking(move || f(&mut lock(&db), &channel))
            .await
            .map_err(|e| StorageError::from(StorageIOError::write(&e)))?
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
        self.run(move |conn, channel| {
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
        self.run(move |conn, channel| {
            let write = |conn: &Connection| {
                conn.execute(
                    "INSERT OR REPLACE INTO order_raft_meta (channel, name, value)
                     VALUES (?1, 'committed', ?2)",
                    params![channel, json],
                )
            };
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
            .run(move |conn, channel| {
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
            // Committed with synchronous=FULL: on disk.
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        written
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let from = sql_index(log_id.index)?;
        self.run(move |conn, channel| {
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
        self.run(move |conn, channel| {
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
