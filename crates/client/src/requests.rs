//! Acting on the membership requests other members send an admin (spec
//! §9.5): add-device and remove-device requests share one shape. Each is
//! kept in the store when it arrives, checked at the end of a sync, and
//! then acted on, dropped as moot or refused, or (when its check cannot
//! succeed yet) kept for later syncs, for at most [`DEFERRED_REQUEST_MS`].

use kith_proto::{ChannelId, DeviceId};

use crate::channels::{SyncReport, is_remote_failure, is_retryable};
use crate::store::Requests;
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

/// Whether a request first put off at `since` is still tried at `now`.
pub(crate) fn still_deferred(since: u64, now: u64) -> bool {
    now.saturating_sub(since) < DEFERRED_REQUEST_MS
}

impl Requests {
    fn name(self) -> &'static str {
        match self {
            Self::Add => "add-device",
            Self::Remove => "remove-device",
        }
    }
}

impl Client {
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
            // A kept request waits out its back-off: each check may cost
            // directory lookups, and with an unreachable server a connect
            // timeout.
            let next_at = self.store.request_next_at(kind, &id, &sender, &device)?;
            if !due(next_at, now_ms()) {
                continue;
            }
            let outcome = match kind {
                Requests::Add => self.honor_add_request(id, sender, device).await,
                Requests::Remove => self.honor_remove_request(id, sender, device).await,
            };
            // Another server's failure (its user's directory unreachable,
            // with nothing cached): this request waits, the others and the
            // rest of the sync go on.
            let outcome = match outcome {
                Err(e) if is_remote_failure(&e) => Ok(Honored::NotYet(e.to_string())),
                other => other,
            };
            match outcome {
                Ok(Honored::Done) => match kind {
                    Requests::Add => report.linked_added.push((id, device)),
                    Requests::Remove => report.removed_devices.push((id, device)),
                },
                Ok(Honored::Moot) => {}
                Ok(Honored::NotYet(why)) => {
                    let now = now_ms();
                    let since = self.store.defer_request(kind, &id, &sender, &device, now)?;
                    if still_deferred(since, now) {
                        let next = self.store.back_off_request(
                            kind,
                            &id,
                            &sender,
                            &device,
                            now,
                            retry_interval,
                        )?;
                        tracing::info!(
                            channel = %id,
                            %device,
                            "kept a {} request, to check again in {} s: {why}",
                            kind.name(),
                            next.saturating_sub(now) / 1000
                        );
                        continue;
                    }
                    tracing::warn!(channel = %id, %device, "gave up on a {} request: {why}", kind.name());
                }
                Err(e) if is_retryable(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(channel = %id, %device, "refused a {} request: {e}", kind.name());
                }
            }
            self.store.drop_request(kind, &id, &sender, &device)?;
        }
        Ok(())
    }

    /// Makes every kept add- and remove-device request (§9.5) due at the
    /// next sync, whatever its back-off: for when the server its check
    /// waits for is known to be back. Each keeps its first deferral time,
    /// and so its seven days.
    pub fn recheck_kept_requests(&self) -> Result<(), ClientError> {
        self.store.recheck_deferred_requests()
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
        store
            .save_request(kind, &channel, &sender, &device)
            .unwrap();
        assert_eq!(
            store
                .request_next_at(kind, &channel, &sender, &device)
                .unwrap(),
            0
        );
        store
            .defer_request(kind, &channel, &sender, &device, 10)
            .unwrap();
        let first = store
            .back_off_request(kind, &channel, &sender, &device, 10, retry_interval)
            .unwrap();
        assert_eq!(first, 10 + 60_000);
        let second = store
            .back_off_request(kind, &channel, &sender, &device, first, retry_interval)
            .unwrap();
        assert_eq!(second, first + 120_000);
        assert_eq!(
            store
                .request_next_at(kind, &channel, &sender, &device)
                .unwrap(),
            second
        );
        store.recheck_deferred_requests().unwrap();
        assert_eq!(
            store
                .request_next_at(kind, &channel, &sender, &device)
                .unwrap(),
            0
        );
        // Dropped and asked again: no back-off left over.
        store
            .drop_request(kind, &channel, &sender, &device)
            .unwrap();
        store
            .save_request(kind, &channel, &sender, &device)
            .unwrap();
        assert_eq!(
            store
                .request_next_at(kind, &channel, &sender, &device)
                .unwrap(),
            0
        );
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
        store
            .save_request(kind, &channel, &sender, &device)
            .unwrap();
        store
            .defer_request(kind, &channel, &sender, &device, 5)
            .unwrap();
        assert_eq!(
            store
                .request_next_at(kind, &channel, &sender, &device)
                .unwrap(),
            0
        );
        assert_eq!(
            store
                .back_off_request(kind, &channel, &sender, &device, 5, retry_interval)
                .unwrap(),
            60_005
        );
        drop(store);
        // Opened again: nothing to add.
        crate::store::Store::open(&path).unwrap();
    }

    #[test]
    fn only_another_servers_failure_puts_a_request_off() {
        let server = |status: u16, code: &str| ClientError::Server {
            status,
            code: code.into(),
            message: String::new(),
        };
        assert!(is_remote_failure(&server(502, "remote_unavailable")));
        assert!(is_remote_failure(&server(502, "remote_invalid")));
        // The homeserver's own trouble still fails the sync.
        for own in [
            server(500, "internal"),
            server(503, "ordering_unavailable"),
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
        let remove = Requests::Remove;
        assert_eq!(
            store
                .defer_request(remove, &channel, &sender, &device, 10)
                .unwrap(),
            10
        );
        assert_eq!(
            store
                .defer_request(remove, &channel, &sender, &device, 20)
                .unwrap(),
            10
        );
        // The other kind's request is another request.
        let add = Requests::Add;
        assert_eq!(
            store
                .defer_request(add, &channel, &sender, &device, 30)
                .unwrap(),
            30
        );
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
        assert_eq!(
            store
                .defer_request(remove, &channel, &sender, &device, 40)
                .unwrap(),
            40
        );
        assert_eq!(
            store
                .defer_request(add, &channel, &sender, &device, 50)
                .unwrap(),
            30
        );
    }
}
