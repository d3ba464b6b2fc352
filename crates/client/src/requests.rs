//! Acting on the membership requests other members send an admin (spec
//! §9.5): add-device and remove-device requests share one shape. Each is
//! kept in the store when it arrives, checked at the end of a sync, and
//! then acted on, dropped as moot or refused, or (when its check cannot
//! succeed yet) kept for later syncs, for at most [`DEFERRED_REQUEST_MS`].
//!
//! The same keeping ([`Client::keep_for_later`]: a back-off, a time limit,
//! a line in [`SyncReport::kept`]) serves every step at the end of a sync
//! that another server's failure can stop: leave requests, removing this
//! user's removed devices, adding its linked devices.

use kith_proto::{ChannelId, DeviceId};

use crate::channels::{SyncReport, is_ordering_unavailable, is_remote_failure, is_retryable};
use crate::store::{Kept, Requests};
use crate::{Client, ClientError, now_ms};

/// How long a request whose check cannot succeed yet is tried again, on
/// each later sync, before it is dropped (spec §9.5): seven days from the
/// first sync that could not act on it.
pub const DEFERRED_REQUEST_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// How long after its first deferral a kept request is checked again
/// (spec §9.5); the interval doubles with every further deferral, up to
/// [`DEFERRED_RETRY_MAX_MS`].
pub const DEFERRED_RETRY_FIRST_MS: u64 = 60 * 1000;

/// The longest interval between two checks of a kept request: an hour.
pub const DEFERRED_RETRY_MAX_MS: u64 = 60 * 60 * 1000;

/// The interval before the next check of a request put off `tries` times
/// (1 the first time): one minute, doubled each time, at most an hour.
pub(crate) fn retry_interval(tries: u32) -> u64 {
    let doublings = tries.saturating_sub(1).min(20);
    DEFERRED_RETRY_FIRST_MS
        .saturating_mul(1 << doublings)
        .min(DEFERRED_RETRY_MAX_MS)
}

/// Whether a kept request whose next check is at `next_at` is due at
/// `now`. A `next_at` further off than the longest interval (the clock
/// went back) is due at once.
pub(crate) fn due(next_at: u64, now: u64) -> bool {
    now >= next_at || next_at - now > DEFERRED_RETRY_MAX_MS
}

/// What checking a request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Honored {
    /// Acted on: the device was added or removed.
    Done,
    /// Nothing to do (no longer an admin, the device already in or out,
    /// the sender gone).
    Moot,
    /// Not yet: the check may succeed on a later sync (why not now).
    NotYet(String),
}

/// Whether work first put off at `since` is still tried at `now`.
pub(crate) fn still_deferred(since: u64, now: u64) -> bool {
    now.saturating_sub(since) < DEFERRED_REQUEST_MS
}

impl Requests {
    fn kept(self, channel: ChannelId, sender: DeviceId, device: DeviceId) -> Kept {
        Kept::Request(self, channel, sender, device)
    }
}

impl Kept {
    /// What this work is, for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Request(Requests::Add, ..) => "add-device request",
            Self::Request(Requests::Remove, ..) => "remove-device request",
            Self::Leave(..) => "leave request",
            Self::Removal(..) => "removal of a removed device",
            Self::Linked(..) => "add of a linked device",
        }
    }

    /// What this work is, as a word for machines (`kith sync --json`):
    /// `add_device`, `remove_device`, `leave`, `removed_device` or
    /// `linked_device`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Request(Requests::Add, ..) => "add_device",
            Self::Request(Requests::Remove, ..) => "remove_device",
            Self::Leave(..) => "leave",
            Self::Removal(..) => "removed_device",
            Self::Linked(..) => "linked_device",
        }
    }

    /// The channel it is about (`None`: every channel holding the device).
    pub fn channel(&self) -> Option<ChannelId> {
        match self {
            Self::Request(_, channel, ..) | Self::Leave(channel, _) | Self::Linked(channel, _) => {
                Some(*channel)
            }
            Self::Removal(_) => None,
        }
    }

    /// The device to add or remove (the leaver, for a leave request).
    pub fn device(&self) -> DeviceId {
        match self {
            Self::Request(.., device)
            | Self::Leave(_, device)
            | Self::Removal(device)
            | Self::Linked(_, device) => *device,
        }
    }
}

/// Work a sync could not do and keeps for a later one (spec §9.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptWork {
    /// What it is.
    pub work: Kept,
    /// When it is tried again (ms since the Unix epoch), at the earliest.
    pub retry_at: u64,
    /// Why it could not be done now.
    pub reason: String,
}

impl Client {
    /// Whether kept work is due: never put off, or its back-off is over.
    pub(crate) fn is_due(&self, kept: &Kept) -> Result<bool, ClientError> {
        Ok(due(self.store.next_at(kept)?, now_ms()))
    }

    /// Puts off `kept`, which could not be done now because of `why`: it
    /// is tried again after its back-off ([`retry_interval`]) and
    /// reported in `report.kept`. Returns `false` once it has been put off
    /// for [`DEFERRED_REQUEST_MS`]: the caller gives it up (and drops it).
    pub(crate) fn keep_for_later(
        &self,
        kept: Kept,
        why: &str,
        report: &mut SyncReport,
    ) -> Result<bool, ClientError> {
        let now = now_ms();
        let since = self.store.defer(&kept, now)?;
        if !still_deferred(since, now) {
            tracing::warn!(channel = ?kept.channel(), device = %kept.device(), "gave up on a {}: {why}", kept.name());
            return Ok(false);
        }
        let next = self.store.back_off(&kept, now, retry_interval)?;
        tracing::info!(
            channel = ?kept.channel(),
            device = %kept.device(),
            "kept a {}, to try again in {} s: {why}",
            kept.name(),
            next.saturating_sub(now) / 1000
        );
        report.kept.push(KeptWork {
            work: kept,
            retry_at: next,
            reason: why.to_owned(),
        });
        Ok(true)
    }

    /// Why work on channel `id` is put off without trying in this sync:
    /// its ordering group was unavailable earlier in the sync (each try
    /// costs the server's wait for a leader, about 20 s).
    pub(crate) fn stalled(&self, id: ChannelId) -> Option<String> {
        self.stalled.contains(&id).then(|| {
            format!("the ordering group of channel {id} was unavailable earlier in this sync")
        })
    }

    /// Notes an error of work on channel `id`: one that says the channel's
    /// ordering group is unavailable stalls the channel for the rest of
    /// the sync.
    pub(crate) fn note_failure(&mut self, id: ChannelId, e: &ClientError) {
        if is_ordering_unavailable(e) {
            self.stalled.insert(id);
        }
    }

    /// Acts on the requests of `kind` this (admin) device recorded. A
    /// request that can never succeed is dropped; one that failed for a
    /// passing reason at this device's homeserver (unreachable, 5xx of its
    /// own, 401, 429) is kept and fails the sync; one whose check cannot
    /// succeed yet, or failed because another server did
    /// ([`is_remote_failure`]), is kept for later syncs, within
    /// [`DEFERRED_REQUEST_MS`], while the sync goes on.
    pub(crate) async fn honor_requests(
        &mut self,
        kind: Requests,
        report: &mut SyncReport,
    ) -> Result<(), ClientError> {
        for (id, sender, device) in self.store.requests(kind)? {
            let kept = kind.kept(id, sender, device);
            // Kept work waits out its back-off: each check may cost
            // directory lookups, and with an unreachable server a connect
            // timeout.
            if !self.is_due(&kept)? {
                continue;
            }
            let outcome = match self.stalled(id) {
                Some(why) => Ok(Honored::NotYet(why)),
                None => match kind {
                    Requests::Add => self.honor_add_request(id, sender, device).await,
                    Requests::Remove => self.honor_remove_request(id, sender, device).await,
                },
            };
            // Another server's failure (its user's directory unreachable,
            // with nothing cached, or the channel's ordering group): this
            // request waits, the others and the rest of the sync go on.
            let outcome = match outcome {
                Err(e) if is_remote_failure(&e) => {
                    self.note_failure(id, &e);
                    Ok(Honored::NotYet(e.to_string()))
                }
                other => other,
            };
            match outcome {
                Ok(Honored::Done) => match kind {
                    Requests::Add => report.linked_added.push((id, device)),
                    Requests::Remove => report.removed_devices.push((id, device)),
                },
                Ok(Honored::Moot) => {}
                Ok(Honored::NotYet(why)) => {
                    if self.keep_for_later(kept, &why, report)? {
                        continue;
                    }
                }
                Err(e) if is_retryable(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(channel = %id, %device, "refused a {}: {e}", kept.name());
                }
            }
            self.store.drop_request(kind, &id, &sender, &device)?;
        }
        Ok(())
    }

    /// Makes all work a sync kept for later (§9.5: add- and remove-device
    /// requests, leave requests, removals of removed devices, adds of
    /// linked devices) due at the next sync, whatever its back-off: for
    /// when the server it waits for is known to be back. Each keeps its
    /// first deferral time, and so its seven days.
    pub fn recheck_kept_requests(&self) -> Result<(), ClientError> {
        self.store.recheck_deferred()
    }

    /// The members of channel `id` when this device is an active admin of
    /// it and `sender` is still a member: what every request needs before
    /// it is looked at. `None` makes the request moot.
    pub(crate) fn admin_view(
        &self,
        id: ChannelId,
        sender: DeviceId,
    ) -> Result<Option<Vec<DeviceId>>, ClientError> {
        let me = self.device_id();
        let admin = self
            .resolve_channel(&id.to_string())
            .is_ok_and(|r| r.active)
            && self.mls.channel(id).is_ok_and(|c| c.is_active())
            && self.channel_admins(id).is_ok_and(|a| a.contains(&me));
        let members = self.members(id)?;
        Ok((admin && members.contains(&sender)).then_some(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client store in a temporary directory (kept alive by the first
    /// value), and a request's channel, sender and device.
    #[allow(clippy::unwrap_used)]
    fn store_and_request() -> (
        tempfile::TempDir,
        crate::store::Store,
        (ChannelId, DeviceId, DeviceId),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("client.db")).unwrap();
        let request = (
            ChannelId::from_bytes([1; 16]),
            DeviceId::from_bytes([2; 32]),
            DeviceId::from_bytes([3; 32]),
        );
        (dir, store, request)
    }

    #[test]
    fn a_deferred_request_is_tried_for_seven_days_then_dropped() {
        let since = 1_000;
        assert!(still_deferred(since, since));
        assert!(still_deferred(since, since + DEFERRED_REQUEST_MS - 1));
        assert!(!still_deferred(since, since + DEFERRED_REQUEST_MS));
        // A clock that went back keeps it.
        assert!(still_deferred(since, 0));
    }

    #[test]
    fn a_kept_request_is_checked_again_after_a_doubling_interval_of_at_most_an_hour() {
        assert_eq!(retry_interval(1), 60_000);
        assert_eq!(retry_interval(2), 120_000);
        assert_eq!(retry_interval(6), 32 * 60_000);
        assert_eq!(retry_interval(7), DEFERRED_RETRY_MAX_MS);
        assert_eq!(retry_interval(u32::MAX), DEFERRED_RETRY_MAX_MS);
        assert!(due(0, 5));
        assert!(due(100, 100));
        assert!(!due(100, 99));
        // A clock that went back makes it due rather than stuck.
        assert!(due(DEFERRED_RETRY_MAX_MS + 10, 5));
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn the_back_off_is_stored_with_the_request() {
        let (_dir, store, (channel, sender, device)) = store_and_request();
        let kind = Requests::Remove;
        let kept = kind.kept(channel, sender, device);
        store
            .save_request(kind, &channel, &sender, &device)
            .unwrap();
        assert_eq!(store.next_at(&kept).unwrap(), 0);
        store.defer(&kept, 10).unwrap();
        let first = store.back_off(&kept, 10, retry_interval).unwrap();
        assert_eq!(first, 10 + 60_000);
        let second = store.back_off(&kept, first, retry_interval).unwrap();
        assert_eq!(second, first + 120_000);
        assert_eq!(store.next_at(&kept).unwrap(), second);
        store.recheck_deferred().unwrap();
        assert_eq!(store.next_at(&kept).unwrap(), 0);
        // Dropped and asked again: no back-off left over.
        store
            .drop_request(kind, &channel, &sender, &device)
            .unwrap();
        store
            .save_request(kind, &channel, &sender, &device)
            .unwrap();
        assert_eq!(store.next_at(&kept).unwrap(), 0);
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_store_from_before_the_back_off_gets_its_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE deferred_requests (kind TEXT NOT NULL, channel BLOB NOT NULL,
                 sender BLOB NOT NULL, device BLOB NOT NULL, since INTEGER NOT NULL,
                 PRIMARY KEY (kind, channel, sender, device));",
            )
            .unwrap();
        let store = crate::store::Store::open(&path).unwrap();
        let (channel, sender, device) = (
            ChannelId::from_bytes([1; 16]),
            DeviceId::from_bytes([2; 32]),
            DeviceId::from_bytes([3; 32]),
        );
        let kind = Requests::Add;
        let kept = kind.kept(channel, sender, device);
        store
            .save_request(kind, &channel, &sender, &device)
            .unwrap();
        store.defer(&kept, 5).unwrap();
        assert_eq!(store.next_at(&kept).unwrap(), 0);
        assert_eq!(store.back_off(&kept, 5, retry_interval).unwrap(), 60_005);
        drop(store);
        // Opened again: nothing to add.
        crate::store::Store::open(&path).unwrap();
    }

    #[test]
    fn only_other_servers_failure_puts_a_request_off() {
        let server = |status: u16, code: &str| ClientError::Server {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(is_remote_failure(&server(502, "remote_unavailable")));
        assert!(is_remote_failure(&server(502, "remote_invalid")));
        // Most of the channel's servers down: its ordering group has no
        // leader.
        assert!(is_remote_failure(&server(503, "ordering_unavailable")));
        // The homeserver's own trouble still fails the sync.
        for own in [
            server(500, "internal"),
            server(503, "busy"),
            server(429, "rate_limited"),
            server(401, "unauthorized"),
            server(404, "remote_unavailable"),
        ] {
            assert!(!is_remote_failure(&own), "{own}");
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_deferral_keeps_its_first_time_until_the_request_is_dropped() {
        let (_dir, store, (channel, sender, device)) = store_and_request();
        for kind in [Requests::Add, Requests::Remove] {
            store
                .save_request(kind, &channel, &sender, &device)
                .unwrap();
        }
        let (add, remove) = (Requests::Add, Requests::Remove);
        let defer = |kind: Requests, at| {
            store
                .defer(&kind.kept(channel, sender, device), at)
                .unwrap()
        };
        assert_eq!(defer(remove, 10), 10);
        assert_eq!(defer(remove, 20), 10);
        // The other kind's request is another request.
        assert_eq!(defer(add, 30), 30);
        store
            .drop_request(remove, &channel, &sender, &device)
            .unwrap();
        assert!(store.requests(remove).unwrap().is_empty());
        assert_eq!(
            store.requests(add).unwrap(),
            vec![(channel, sender, device)]
        );
        // Asked again later: a fresh deferral.
        store
            .save_request(remove, &channel, &sender, &device)
            .unwrap();
        assert_eq!(defer(remove, 40), 40);
        assert_eq!(defer(add, 50), 30);
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn leaves_and_removals_are_kept_apart_from_requests_and_forgotten_when_settled() {
        let (_dir, store, (channel, sender, device)) = store_and_request();
        let leave = Kept::Leave(channel, device);
        let removal = Kept::Removal(device);
        let linked = Kept::Linked(channel, device);
        let request = Requests::Remove.kept(channel, device, device);
        for (at, kept) in [leave, removal, linked, request].iter().enumerate() {
            assert_eq!(store.defer(kept, at as u64).unwrap(), at as u64);
        }
        store.save_leave_request(&channel, &device).unwrap();
        store.drop_leave_request(&channel, &device).unwrap();
        store.save_removed_device(&device).unwrap();
        assert_eq!(store.defer(&removal, 9).unwrap(), 9, "a fresh removal");
        store.settle_removed_device(&device).unwrap();
        store.save_linked_added(&channel, &sender).unwrap();
        // Each settled one starts afresh; the others keep their time.
        assert_eq!(store.defer(&leave, 10).unwrap(), 10);
        assert_eq!(store.defer(&removal, 11).unwrap(), 11);
        assert_eq!(store.defer(&linked, 12).unwrap(), 2);
        assert_eq!(store.defer(&request, 13).unwrap(), 3);
        store.save_linked_added(&channel, &device).unwrap();
        assert_eq!(store.defer(&linked, 14).unwrap(), 14);
    }
}
