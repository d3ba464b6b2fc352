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
                        tracing::info!(channel = %id, %device, "kept a {} request for a later sync: {why}", kind.name());
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
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("client.db")).unwrap();
        let (channel, sender, device) = (
            ChannelId::from_bytes([1; 16]),
            DeviceId::from_bytes([2; 32]),
            DeviceId::from_bytes([3; 32]),
        );
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
