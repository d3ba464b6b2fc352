//! A user's devices: removing a lost or stolen one (spec §6.4, §9.5).
//!
//! Another device of the user removes it from their name at their
//! homeserver ([`Client::remove_device`]); the server tells the user's
//! remaining devices (`device_removed` events). Each of them then drops its
//! link to the device, never adds it back, and rids every channel it shares
//! with it of it: by an MLS Remove where it is an admin, else by a
//! remove-device request that the admins' clients honour once their
//! directory confirms that the device is no longer the user's.

use kith_proto::{ChannelId, DeviceId, Handle};
use serde_json::Value;
use tracing::Instrument;

use crate::channels::{SyncReport, is_remote_failure, is_retryable, protocol};
use crate::requests::Honored;
use crate::store::Kept;
use crate::{Client, ClientError};

/// What [`Client::remove_device`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceRemoval {
    /// Channels this (admin) device removed the device from.
    pub removed_from: Vec<ChannelId>,
    /// Channels whose admins this device asked to remove it (they do when
    /// their clients next sync).
    pub requested: Vec<ChannelId>,
}

impl Client {
    /// Whether the homeserver says `device` was removed (`GET
    /// /v0/devices/{device}` carries `removed_at`).
    pub(crate) async fn removed_on_server(&mut self, device: &str) -> Result<bool, ClientError> {
        match self
            .authed(|api| {
                let d = device.to_owned();
                async move { api.device_status(&d).await }
            })
            .await
        {
            Ok((_, removed_at)) => Ok(removed_at.is_some()),
            Err(ClientError::Server { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes `device`, another device of this user (lost or stolen),
    /// from the user's name at the homeserver (§6.4): it can no longer log
    /// in, its sessions end, it is no longer listed for the handle, and no
    /// invite or linked-device add brings it back. Then removes it from
    /// every channel this device shares with it (an MLS Remove where this
    /// device is an admin, else a remove-device request to the admins).
    /// The user's other devices do the same for their channels when they
    /// next sync. 404 for a device not registered here, 403 for a device
    /// of another name.
    pub async fn remove_device(&mut self, device: DeviceId) -> Result<DeviceRemoval, ClientError> {
        if device == self.device_id() {
            return Err(ClientError::Invalid(
                "a device cannot remove itself: remove it from another device of this user".into(),
            ));
        }
        let text = device.to_string();
        let removal = self
            .authed(|api| {
                let d = text.clone();
                async move { api.remove_device(&d).await }
            })
            .instrument(tracing::debug_span!("client.remove_device"))
            .await;
        match removal {
            Ok(()) => {}
            // Already removed (a retry after an answer that was lost): the
            // removal still has to be completed here. Only for a device of
            // this user, which this device's record links.
            Err(ClientError::Server { status: 404, .. })
                if self.record()?.links_to(&device) && self.removed_on_server(&text).await? => {}
            Err(e) => return Err(e),
        }
        tracing::info!(%device, "removed a device of this user");
        self.forget_device(device).await?;
        // The sync brings the channels up to date and then removes the
        // device from them (`remove_removed_devices`).
        let report = self.sync().await?;
        Ok(DeviceRemoval {
            removed_from: report
                .removed_devices
                .iter()
                .filter(|(_, d)| *d == device)
                .map(|(c, _)| *c)
                .collect(),
            requested: report
                .removal_requested
                .iter()
                .filter(|(_, d)| *d == device)
                .map(|(c, _)| *c)
                .collect(),
        })
    }

    /// Asks the channel's admins to remove `device` by a remove-device
    /// request (§9.5). Their clients honour it only if `device` and this
    /// device share a handle and that handle's directory no longer lists
    /// `device`; sync sends these by itself for this user's removed
    /// devices.
    pub async fn request_remove_device(
        &mut self,
        id: ChannelId,
        device: DeviceId,
    ) -> Result<String, ClientError> {
        self.send_with_aad(
            id,
            device.as_bytes(),
            kith_mls::REMOVE_DEVICE_REQUEST_AAD,
            false,
        )
        .await
    }

    /// Remembers `device` as removed (never added back; channels to rid of
    /// it) and drops this device's link to it.
    async fn forget_device(&mut self, device: DeviceId) -> Result<(), ClientError> {
        self.store.save_removed_device(&device)?;
        let record = self.record()?;
        if record.links_to(&device) {
            let mut fields = record.fields();
            fields.links.retain(|d| *d != device);
            self.publish_fields(fields).await?;
            tracing::info!(%device, "dropped the link to a removed device");
        }
        Ok(())
    }

    /// A `device_removed` event: another device of this user (or the
    /// operator) removed `device` from the user's name.
    pub(crate) async fn device_removed_event(&mut self, event: &Value) -> Result<(), ClientError> {
        let device: DeviceId = event
            .get("device")
            .and_then(Value::as_str)
            .ok_or_else(|| protocol("a device_removed event without `device`"))?
            .parse()
            .map_err(protocol)?;
        if device == self.device_id() {
            return Ok(());
        }
        // The event alone is the homeserver's word: act only once the
        // directory agrees the device is no longer this user's. (A failed
        // lookup fails the sync, and the event is handled again.)
        let handle = self.own_handle()?.to_string();
        let listed = match self.user_devices(&handle).await {
            Ok(records) => records,
            Err(ClientError::Server { status: 404, .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        if listed.iter().any(|r| r.device_id() == device) {
            tracing::warn!(%device, "ignored a device_removed event for a device the directory still lists");
            return Ok(());
        }
        self.forget_device(device).await
    }

    /// This user's handle, parsed.
    fn own_handle(&self) -> Result<Handle, ClientError> {
        self.handle()
            .parse()
            .map_err(|e| ClientError::Store(format!("stored handle: {e}")))
    }

    /// Rids every channel this device is in of this user's removed
    /// devices: commits their removal where this device is an admin, else
    /// asks the admins once per channel. Only devices whose own record
    /// names this user's handle are touched, so a homeserver's event cannot
    /// make this device remove someone else's.
    pub(crate) async fn remove_removed_devices(
        &mut self,
        report: &mut SyncReport,
    ) -> Result<(), ClientError> {
        let pending = self.store.pending_removed_devices()?;
        if pending.is_empty() {
            return Ok(());
        }
        let me = self.device_id();
        let handle = self.own_handle()?;
        // A device whose removal failed because other servers did (its
        // record, or the channel's ordering, through an unreachable
        // server) stays pending for a later sync, with the back-off and
        // time limit of membership requests; the others and the rest of
        // the sync go on.
        for device in pending {
            let kept = Kept::Removal(device);
            if !self.is_due(&kept)? {
                continue;
            }
            if let Some(why) = self
                .remove_removed_device(device, &handle, me, report)
                .await?
                && self.keep_for_later(kept, &why, report)?
            {
                continue;
            }
            self.store.settle_removed_device(&device)?;
        }
        Ok(())
    }

    /// Rids every channel this device is in of `device`, this user's
    /// removed device (see [`Client::remove_removed_devices`]). Returns
    /// why not, when other servers' failure stopped it; it then stops at
    /// the first channel that failed.
    async fn remove_removed_device(
        &mut self,
        device: DeviceId,
        handle: &Handle,
        me: DeviceId,
        report: &mut SyncReport,
    ) -> Result<Option<String>, ClientError> {
        for row in self.channels()? {
            if !row.active {
                continue;
            }
            let (member, admin) = match self.mls.channel(row.id) {
                Ok(channel) if channel.is_active() => (
                    channel.members().contains(&device),
                    channel.extension().is_ok_and(|e| e.policy.is_admin(&me)),
                ),
                _ => continue,
            };
            if !member {
                continue;
            }
            if let Some(why) = self.stalled(row.id) {
                return Ok(Some(why));
            }
            let ours = match self.member_record(&device).await {
                Ok(record) => record.handles().any(|h| h == *handle),
                Err(e) if is_remote_failure(&e) => return Ok(Some(e.to_string())),
                Err(e) if is_retryable(&e) => return Err(e),
                Err(_) => false,
            };
            if !ours {
                tracing::warn!(%device, channel = %row.id, "not removing a device that is not this user's");
                continue;
            }
            if admin {
                let outcome = self
                    .commit_with_retry(row.id, |channel| {
                        if !channel.members().contains(&device) {
                            return Ok(None);
                        }
                        Ok(Some(channel.remove(&[device])?))
                    })
                    .await;
                match outcome {
                    Ok(Some(_)) => report.removed_devices.push((row.id, device)),
                    Ok(None) => {}
                    Err(e) if is_remote_failure(&e) => {
                        self.note_failure(row.id, &e);
                        return Ok(Some(e.to_string()));
                    }
                    // Kept pending: the next sync tries again.
                    Err(e) if is_retryable(&e) => return Err(e),
                    // Refused for good (say, this device lost its
                    // admin rights meanwhile): not tried on every sync.
                    Err(e) => {
                        tracing::warn!(channel = %row.id, %device, "cannot remove a removed device: {e}");
                    }
                }
            } else if !self.store.removal_requested(&row.id, &device)? {
                // Boxed: sending may sync, which comes back here.
                match Box::pin(self.request_remove_device(row.id, device)).await {
                    Ok(_) => {
                        self.store.save_removal_requested(&row.id, &device)?;
                        report.removal_requested.push((row.id, device));
                    }
                    Err(e) if is_remote_failure(&e) => {
                        self.note_failure(row.id, &e);
                        return Ok(Some(e.to_string()));
                    }
                    Err(e) if is_retryable(&e) => return Err(e),
                    Err(e) => {
                        tracing::warn!(channel = %row.id, %device, "cannot ask to remove a removed device: {e}");
                    }
                }
            }
        }
        Ok(None)
    }

    /// Checks a remove-device request (§9.5) and acts on it: removes
    /// `device` from channel `id` on `sender`'s request when: this device
    /// is an admin; both are members; the two records share a handle (one
    /// name at one server); and that handle's directory, asked now, lists
    /// `sender` but no longer `device` (its user removed it, §6.4), or the
    /// device's own entry is marked removed (`removed_at`). While the
    /// directory still lists `device` without that mark (it may be a
    /// cached copy while the user's server is unreachable, §12.2), the
    /// request is put off to a later sync.
    pub(crate) async fn honor_remove_request(
        &mut self,
        id: ChannelId,
        sender: DeviceId,
        device: DeviceId,
    ) -> Result<Honored, ClientError> {
        let Some(members) = self.admin_view(id, sender)? else {
            return Ok(Honored::Moot);
        };
        if sender == device || !members.contains(&device) {
            return Ok(Honored::Moot);
        }
        let from = self.member_record(&sender).await?;
        let target = self.member_record(&device).await?;
        let Some(handle) = from.handles().find(|h| target.handles().any(|t| t == *h)) else {
            return Err(protocol(format!(
                "{sender} asked to remove {device}, which is not a device of its user"
            )));
        };
        let listed = match self.user_devices(&handle.to_string()).await {
            Ok(records) => records,
            Err(ClientError::Server { status: 404, .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        if !listed.iter().any(|r| r.device_id() == sender) {
            return Err(protocol(format!(
                "{sender} asked to remove {device} but is not itself a device of {handle}"
            )));
        }
        if listed.iter().any(|r| r.device_id() == device)
            && !self.removed_on_server(&device.to_string()).await?
        {
            return Ok(Honored::NotYet(format!(
                "{sender} asked to remove {device}, which is still listed as a device of {handle}"
            )));
        }
        let outcome = self
            .commit_with_retry(id, |channel| {
                if !channel.members().contains(&device) {
                    return Ok(None);
                }
                Ok(Some(channel.remove(&[device])?))
            })
            .await?;
        Ok(if outcome.is_some() {
            Honored::Done
        } else {
            Honored::Moot
        })
    }
}
